"""The rescue stand-in: a rescue-system-like VM until rescue builds real rescue media.

    s = rescue_standin(image, "rescue", workdir)          # bios, udev, network by default
    target = s.add_blank_disk("disk0", "4G")              # the disks to recover onto
    s.add_disk(backup_qcow2, "backup")                    # e.g. the disk holding a file:// backup
    s.start()
    s.wait_ready()                                        # udev settled, NIC up, sshd answers
    s.run("python3 /root/rescue.pyz recover --yes", timeout=900, check=True)
    print(s.disk_path(target))                            # /dev/vdb: found by serial in sysfs
    s.shutdown()

It boots the guest image's kernel with an initramfs built here (busybox, the virtio modules,
guest/standin-init.sh as /init). /init mounts the image's tools disk (tools.img: an ext4 copy
of the Debian rootfs, attached with snapshot=on, so writes are thrown away) read-write as the
root and switch_roots into it; stage 2 (guest/standin-stage2.sh, PID 1) mounts /dev/pts,
/dev/shm, /tmp (and efivarfs under UEFI), starts systemd-udevd with a coldplug (udevadm
trigger --action=add; udevadm settle) when udev=True, gives the first NIC QEMU user
networking's address (10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3) and starts sshd, whose
authorized key is the image's. There is no init system: shutdown() runs
guest/standin-poweroff.sh (unmount, remount / read-only, poweroff -f).

The tools disk is mounted at /, so rescue sees it as "holds the running system" and never
maps a layout disk onto it. Its serial is "tools": attached disks must use other names.
Without network there is no ssh: such a stand-in is driven through the serial console.
"""

import shlex
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import cpio
from .image import GUEST_DIR, HOST_BUSYBOX, GuestImage, module_load_order
from .machine import MAC, Disk, GuestError, Machine
from .procs import HarnessError

# Enough to reach the tools disk; the rest comes from the tools rootfs (udev or modprobe).
STANDIN_MODULES = ["virtio_pci", "virtio_blk"]
STANDIN_APPEND = "console=ttyS0,115200n8 panic=-1 quiet"
TOOLS_SERIAL = "tools"
READY_MARK = "STANDIN-READY"
FAILED_MARK = "STANDIN-FAILED"
SCRIPTS = {"init": "standin-init.sh", "stage2.sh": "standin-stage2.sh",
           "poweroff.sh": "standin-poweroff.sh"}
# /sys/block/<dev> -> "<dev> <serial>" for virtio-blk (serial), NVMe (the controller's serial),
# SCSI (VPD page 0x80: a 4-byte header, then the serial). No udev needed.
SERIALS_SCRIPT = r"""for d in /sys/block/*; do
  n=${d##*/}
  if [ -r "$d/serial" ]; then s=$(cat "$d/serial")
  elif [ -r "$d/device/serial" ]; then s=$(cat "$d/device/serial")
  elif [ -r "$d/device/vpd_pg80" ]; then s=$(tail -c +5 "$d/device/vpd_pg80" | tr -d '\000')
  else continue; fi
  printf '%s %s\n' "$n" "$(echo $s)"
done"""


def standin_conf(udev: bool, network: bool, hostname: str) -> bytes:
    """The settings stage 2 reads (shell assignments)."""
    if not hostname.replace("-", "").isalnum():
        raise HarnessError("stand-in hostname %r: letters, digits and - only" % hostname)
    return ("UDEV=%d\nNET=%s\nHOSTNAME=%s\n" % (int(udev), "static" if network else "none",
                                                shlex.quote(hostname))).encode()


def initramfs_entries(rootfs: Path, kver: str, conf: bytes) -> List[cpio.Entry]:
    """The stand-in's initramfs: busybox, the modules to reach the tools disk, the scripts."""
    modules = module_load_order(rootfs, kver, STANDIN_MODULES)
    entries = [cpio.directory(d) for d in ("bin", "dev", "etc", "proc", "sys", "newroot", "lib",
                                           "lib/modules")]
    entries.append(cpio.chardev("dev/console", 5, 1))
    entries.append(cpio.file("bin/busybox", HOST_BUSYBOX.read_bytes(), 0o755))
    for name, script in SCRIPTS.items():
        entries.append(cpio.file(name, (GUEST_DIR / script).read_bytes(), 0o755))
    entries.append(cpio.file("etc/standin.conf", conf))
    entries.append(cpio.file("etc/standin-modules", "".join(m + "\n" for m in modules).encode()))
    for mod in modules:
        parts = mod.split("/")
        for i in range(1, len(parts)):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in [e.name for e in entries]:
                entries.append(cpio.directory(d))
        entries.append(cpio.file("lib/modules/" + mod, (rootfs / "lib/modules" / kver / mod).read_bytes()))
    return entries


def parse_serials(text: str) -> Dict[str, str]:
    """SERIALS_SCRIPT's output -> {serial: /dev/node}."""
    out = {}
    for line in text.splitlines():
        dev, _, serial = line.strip().partition(" ")
        if dev and serial:
            out.setdefault(serial, "/dev/" + dev)
    return out


class StandIn(Machine):
    """A Machine that boots the stand-in rescue system instead of a disk (see module docstring)."""

    def __init__(self, image: GuestImage, name: str, workdir: Path, firmware: str = "bios",
                 udev: bool = True, network: bool = True, hostname: str = "rescue-standin",
                 memory_mb: int = 2048, ovmf_vars: Optional[Path] = None, lifetime: float = 1800,
                 mac: str = MAC):
        super().__init__(name, workdir, ssh_key=image.ssh_key, firmware=firmware, ovmf_vars=ovmf_vars,
                         memory_mb=memory_mb, network=network, lifetime=lifetime, mac=mac)
        self.image = image
        self.udev = udev
        self.hostname = hostname
        kver = image.recipe["kernel"]
        self.initrd = self.workdir / "standin-initrd.cpio"
        cpio.write(self.initrd, initramfs_entries(image.rootfs, kver, standin_conf(udev, network, hostname)))
        self.set_kernel_boot(image.kernel, self.initrd, STANDIN_APPEND)
        self.tools = super().add_disk(image.tools_img, TOOLS_SERIAL, fmt="raw", snapshot=True)

    def add_disk(self, path: Path, name: str, **options) -> Disk:
        if name == TOOLS_SERIAL:
            raise HarnessError("%s: the serial %r is the stand-in's own root disk" % (self.name, name))
        return super().add_disk(path, name, **options)

    def wait_ready(self, timeout: float = 180) -> float:
        """Wait until udev has settled, the NIC is up and sshd answers (or, without network,
        until stage 2 says so on the console); returns seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        m = self.wait_console(r"%s|%s" % (READY_MARK, FAILED_MARK), timeout)
        if m.group(0) == FAILED_MARK:
            raise GuestError("%s: the stand-in failed to start\n%s" % (self.name, self.console_tail()))
        if self.network:
            self.wait_ssh(max(10.0, deadline - time.monotonic()))
        self.timings["ready_s"] = round(self.elapsed(), 1)
        return self.timings["ready_s"]

    def wait_booted(self, timeout: float = 300) -> str:
        self.wait_ready(timeout)
        return "running"

    def disk_serials(self) -> Dict[str, str]:
        """{serial: /dev/node} of every block device with a serial, read from sysfs."""
        return parse_serials(self.run(SERIALS_SCRIPT, timeout=60, check=True).stdout)

    def disk_path(self, disk: Disk) -> str:
        """The /dev node of an attached disk, found by its serial (works without udev)."""
        found = self.disk_serials()
        if disk.name not in found:
            raise GuestError("%s: no block device with serial %s (have %s)" % (self.name, disk.name, found))
        return found[disk.name]

    def shutdown(self, timeout: float = 60) -> int:
        """Unmount, flush and power off (there is no init system to ask)."""
        if not self.running:
            return self._proc.returncode
        if self.ssh_port:
            try:
                self.run("sh /run/standin/poweroff.sh", timeout=30)
            except GuestError:
                pass  # the connection may die with the machine
        else:
            self.send_console("\nsh /run/standin/poweroff.sh\n")
        return self.wait_exit(timeout)


def rescue_standin(image: GuestImage, name: str, workdir: Path, firmware: str = "bios",
                   udev: bool = True, network: bool = True, **options) -> StandIn:
    """A stand-in rescue VM, not started yet: attach the target disks, then start()."""
    return StandIn(image, name, workdir, firmware=firmware, udev=udev, network=network, **options)
