"""One QEMU guest: disks, firmware, boot source, serial console log, ssh command channel.

    m = Machine("src", workdir, ssh_key=image.ssh_key)
    m.add_overlay(golden.disks[0], "disk0", bootindex=0)     # throw-away copy of a golden disk
    m.add_blank_disk("spare", "8G", bus="nvme")              # e.g. a bigger replacement disk
    m.start()
    m.wait_booted()                                          # ssh answers, systemd settled
    r = m.run("lsblk -J")                                    # GuestResult(returncode, stdout, stderr)
    m.put("dist/rescue.pyz", "/root/")                       # scp in; m.get(...) copies out
    m.shutdown()                                             # clean poweroff (m.close() kills)

Every wait has a timeout, and a watchdog kills QEMU once `lifetime` seconds have passed no
matter what the test does. The serial console goes to workdir/console.log, QEMU's own
messages to workdir/qemu.log, every guest command and its result to workdir/commands.log.
"""

import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

from . import procs
from .procs import HarnessError, run

log = logging.getLogger("vmlib")

# TCG only (KVM does not work on the CI hosts). Not "max,vmx=off": with that CPUID, static
# glibc binaries (busybox-static) abort in _dl_get_origin under TCG. The guest image
# blacklists kvm instead (udev would spend ~13 s loading it for the VMX flag).
CPU = "max"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# firmware "uefi-secboot": OVMF built with Secure Boot (its variables in SMM, hence q35 with
# smm=on and a secure flash), its VARS with Microsoft's keys enrolled and Secure Boot on, as on
# a PC from the shop: only loaders signed by Microsoft's UEFI CA (shim) start.
OVMF_SECBOOT_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
OVMF_SECBOOT_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
FIRMWARES = ("bios", "uefi", "uefi-secboot")
MAC = "52:54:00:12:34:56"       # QEMU's own default: every guest's NIC unless told otherwise
# Console output after which a guest will never come up by itself: fail now, not at the timeout.
FATAL_CONSOLE = re.compile(r"Dropping to a shell|Kernel panic - not syncing|You are in emergency mode"
                           r"|Give root password for maintenance|No bootable device")
ANSI_ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class GuestError(HarnessError):
    """The guest misbehaved: it died, did not boot in time, or a command failed with check=True."""


@dataclass
class GuestResult:
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def check(self) -> "GuestResult":
        if self.returncode != 0:
            raise GuestError("guest command failed (exit %d): %s\nstdout: %s\nstderr: %s"
                             % (self.returncode, self.command, self.stdout[-2000:], self.stderr[-2000:]))
        return self


@dataclass
class Disk:
    """A drive attached to the guest. `name` is also its serial number inside the guest."""
    name: str
    path: Path
    fmt: str = "qcow2"
    bus: str = "virtio"          # virtio | scsi | nvme | ide (ide: cdrom only)
    media: str = "disk"          # disk | cdrom
    readonly: bool = False
    snapshot: bool = False       # writes go to a temp file QEMU throws away
    bootindex: Optional[int] = None
    cache: str = "unsafe"        # fast; contents are only guaranteed after a clean QEMU exit
    owned: bool = False          # created by this Machine: deleted by close()

    @property
    def guest_path(self) -> str:
        """The stable /dev/disk/by-id path udev gives this disk inside a Debian guest."""
        if self.bus == "virtio":
            return "/dev/disk/by-id/virtio-" + self.name
        if self.bus == "nvme":
            return "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_" + self.name
        kind = "CD-ROM" if self.media == "cdrom" else "HARDDISK"
        return "/dev/disk/by-id/scsi-0QEMU_QEMU_%s_%s" % (kind, self.name)


def create_disk_image(path: Path, size: str, fmt: str = "qcow2", backing: Optional[Path] = None) -> Path:
    """A blank (sparse) disk image, or a qcow2 overlay on `backing` (size may then be None)."""
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-b", str(Path(backing).resolve()), "-F", _image_format(backing)]
    argv.append(str(path))
    if size:
        argv.append(size)
    run(argv, timeout=60)
    return path


def _image_format(path: Path) -> str:
    out = run(["qemu-img", "info", "--output=json", "-U", path], timeout=60).stdout
    return json.loads(out)["format"]


def disk_args(disk: Disk) -> List[str]:
    """-drive/-device arguments for one disk (a scsi disk needs the scsi0 controller)."""
    drive = "if=none,id=d-%s,file=%s,format=%s,cache=%s" % (disk.name, disk.path, disk.fmt, disk.cache)
    if disk.readonly:
        drive += ",readonly=on"
    if disk.snapshot:
        drive += ",snapshot=on"
    if disk.media == "cdrom":
        drive += ",media=cdrom"
    kind = {("virtio", "disk"): "virtio-blk-pci", ("scsi", "disk"): "scsi-hd",
            ("scsi", "cdrom"): "scsi-cd", ("nvme", "disk"): "nvme", ("ide", "cdrom"): "ide-cd"}
    if (disk.bus, disk.media) not in kind:
        raise HarnessError("disk %s: %s %s is not supported" % (disk.name, disk.bus, disk.media))
    device = "%s,drive=d-%s" % (kind[(disk.bus, disk.media)], disk.name)
    if disk.bus == "scsi":
        device += ",bus=scsi0.0"
    if disk.bus != "ide":
        device += ",serial=" + disk.name
    if disk.bootindex is not None:
        device += ",bootindex=%d" % disk.bootindex
    return ["-drive", drive, "-device", device]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machine:
    """A QEMU/TCG guest. Configure (disks, firmware, boot source), start(), use, close()."""

    def __init__(self, name: str, workdir: Path, ssh_key: Optional[Path] = None,
                 firmware: str = "bios", ovmf_vars: Optional[Path] = None, memory_mb: int = 1024,
                 cpus: int = 2, network: bool = True, lifetime: float = 1800, mac: str = MAC):
        self.name = name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ssh_key = ssh_key
        self.firmware = firmware
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.network = network
        self.mac = mac
        self.lifetime = lifetime
        self.disks: List[Disk] = []
        self.kernel_boot: Optional[Sequence] = None
        self.ssh_port: Optional[int] = None
        self.timings = {}
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.commands_log = self.workdir / "commands.log"
        # Unix sockets need a short path (108 bytes); pytest's tmp paths can be longer.
        self._sockdir = Path(tempfile.mkdtemp(prefix="rvm-"))
        # removed by close(), or at garbage collection / interpreter exit if close() never ran
        self._remove_sockdir = weakref.finalize(self, shutil.rmtree, str(self._sockdir), True)
        self._vars = None
        if firmware not in FIRMWARES:
            raise HarnessError("firmware must be one of %s, not %r" % (", ".join(FIRMWARES), firmware))
        if firmware != "bios":
            self._vars = self.workdir / "OVMF_VARS.fd"
            shutil.copyfile(ovmf_vars or (OVMF_VARS if firmware == "uefi" else OVMF_SECBOOT_VARS), self._vars)
        self._proc: Optional[subprocess.Popen] = None
        self._console_file = None
        self._ssh_master: Optional[subprocess.Popen] = None
        self._console = bytearray()
        self._console_cond = threading.Condition()
        self._reader: Optional[threading.Thread] = None
        self._watchdog: Optional[threading.Timer] = None
        self._started = 0.0
        self.killed_by_watchdog = False

    # ------------------------------------------------------------------ configuration

    def add_disk(self, path: Path, name: str, **options) -> Disk:
        if any(d.name == name for d in self.disks):
            raise HarnessError("%s: a disk named %s is already attached" % (self.name, name))
        if len(name) > 20 or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise HarnessError("disk name %r: up to 20 letters, digits, - or _ (it is the serial)" % name)
        disk = Disk(name, Path(path), **options)
        self.disks.append(disk)
        return disk

    def add_blank_disk(self, name: str, size: str, bus: str = "virtio", fmt: str = "qcow2",
                       **options) -> Disk:
        """A new empty disk (sparse file in workdir, deleted by close())."""
        path = create_disk_image(self.workdir / ("%s.%s" % (name, fmt)), size, fmt)
        return self.add_disk(path, name, fmt=fmt, bus=bus, owned=True, **options)

    def add_overlay(self, base: Path, name: str, bus: str = "virtio", **options) -> Disk:
        """A qcow2 overlay on `base` (base is never written), deleted by close()."""
        path = create_disk_image(self.workdir / (name + ".qcow2"), None, backing=base)
        return self.add_disk(path, name, bus=bus, owned=True, **options)

    def set_kernel_boot(self, kernel: Path, initrd: Path, append: str) -> None:
        """Boot this kernel+initrd directly (firmware still runs, bootloaders are skipped)."""
        self.kernel_boot = (kernel, initrd, append)

    def add_cdrom(self, iso: Path, name: str = "cdrom", bus: str = "scsi", bootindex: Optional[int] = 0) -> Disk:
        return self.add_disk(iso, name, fmt="raw", bus=bus, media="cdrom", readonly=True,
                             bootindex=bootindex)

    def qemu_argv(self) -> List[str]:
        secboot = self.firmware == "uefi-secboot"
        argv = ["qemu-system-x86_64", "-name", self.name, "-accel", "tcg,thread=multi",
                "-cpu", CPU, "-machine", "q35,smm=on" if secboot else "pc", "-m", str(self.memory_mb), "-smp", str(self.cpus),
                "-nodefaults", "-display", "none", "-no-reboot", "-rtc", "base=utc",
                "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
                "-qmp", "unix:%s,server=on,wait=off" % self._qmp_path,
                "-device", "virtio-rng-pci"]
        if secboot:
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        if self.firmware != "bios":
            argv += ["-drive", "if=pflash,format=raw,unit=0,readonly=on,file=%s"
                     % (OVMF_SECBOOT_CODE if secboot else OVMF_CODE),
                     "-drive", "if=pflash,format=raw,unit=1,file=%s" % self._vars]
        if any(d.bus == "scsi" for d in self.disks):
            argv += ["-device", "virtio-scsi-pci,id=scsi0"]
        for disk in self.disks:
            argv += disk_args(disk)
        if self.network:
            fwd = ",hostfwd=tcp:127.0.0.1:%d-:22" % self.ssh_port if self.ssh_port else ""
            argv += ["-netdev", "user,id=net0" + fwd, "-device", "virtio-net-pci,netdev=net0,mac=" + self.mac]
        if self.kernel_boot:
            kernel, initrd, append = self.kernel_boot
            argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
        return argv

    @property
    def _qmp_path(self) -> Path:
        return self._sockdir / "qmp.sock"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start QEMU; with ssh, retry on a new port if another process took the chosen one.

        A machine that has exited (shutdown, wait_exit) can be started again on the same disks,
        e.g. to boot a system after recovering it; logs are appended to.
        """
        if self.running:
            raise HarnessError("%s: already running" % self.name)
        self._console = bytearray()
        self.timings = {}
        for _ in range(3):
            if self.network and self.ssh_key:
                self.ssh_port = free_tcp_port()
            log_start = self.qemu_log.stat().st_size if self.qemu_log.exists() else 0
            self._spawn()
            if self._wait_started():
                return
            rc = self._proc.wait()
            self._reap()
            errors = self.qemu_log.read_bytes()[log_start:].decode(errors="replace")
            if "host forwarding" not in errors:
                break
            log.warning("%s: port %d was taken meanwhile, retrying", self.name, self.ssh_port)
        raise GuestError("%s: QEMU did not start (exit %s):\n%s" % (self.name, rc, errors[-3000:]))

    def _spawn(self) -> None:
        argv = self.qemu_argv()
        with open(self.qemu_log, "a") as f:
            f.write("$ %s\n" % " ".join(shlex.quote(a) for a in argv))
        if self._qmp_path.exists():  # left by a previous run of this machine
            self._qmp_path.unlink()
        stderr = open(self.qemu_log, "ab")
        self._console_file = open(self.console_log, "ab")
        self._proc = procs.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=stderr, env=procs.base_env())
        stderr.close()
        self._started = time.monotonic()
        self._reader = threading.Thread(target=self._read_console, name="console-" + self.name,
                                        daemon=True)
        self._reader.start()
        self._watchdog = threading.Timer(self.lifetime, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _wait_started(self, timeout: float = 30) -> bool:
        """True once QEMU is up (QMP socket, and the ssh port forward if any, accept connections)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if self._qmp_path.exists() and (not self.ssh_port or _port_open(self.ssh_port)):
                return True
            time.sleep(0.05)
        raise GuestError("%s: QEMU did not come up within %d s" % (self.name, timeout))

    def _read_console(self) -> None:
        """Thread: copy the serial console to memory and to console.log, each log line prefixed
        with the seconds since QEMU started (that is how boot phases get timed)."""
        fd = self._proc.stdout.fileno()
        line_start = True
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            for piece in chunk.splitlines(keepends=True):
                if line_start:
                    self._console_file.write(b"[%7.2f] " % self.elapsed())
                self._console_file.write(piece)
                line_start = piece.endswith(b"\n")
            self._console_file.flush()
            with self._console_cond:
                self._console += chunk
                self._console_cond.notify_all()
        self._console_file.close()
        with self._console_cond:
            self._console_cond.notify_all()

    def _expire(self) -> None:
        log.error("%s: lifetime of %d s exceeded, killing QEMU", self.name, self.lifetime)
        self.killed_by_watchdog = True
        procs.kill_group(self._proc)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (guest powered off); kill it and fail on timeout."""
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestError("%s: still running after %d s:\n%s" % (self.name, timeout, self.console_tail()))
        self._reap()
        self.timings["exit_s"] = round(self.elapsed(), 1)
        return rc

    def _reap(self) -> None:
        procs.forget(self._proc)
        if self._ssh_master is not None:
            procs.kill_group(self._ssh_master)
        if self._watchdog:
            self._watchdog.cancel()
        if self._reader:
            self._reader.join(10)

    def kill(self) -> None:
        if self._proc is not None:
            procs.kill_group(self._proc)
            self._reap()

    def shutdown(self, timeout: float = 60) -> int:
        """Clean poweroff (via ssh if possible, else ACPI), so disk contents are complete."""
        if not self.running:
            return self._proc.returncode
        if self.ssh_port:
            self.run("systemctl --no-block poweroff", timeout=30, check=False)
        else:
            self.qmp("system_powerdown")
        return self.wait_exit(timeout)

    def close(self) -> None:
        """Kill QEMU if still running, delete disk files this Machine created; logs stay."""
        self.kill()
        for disk in self.disks:
            if disk.owned and disk.path.exists():
                disk.path.unlink()
        self._remove_sockdir()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ serial console

    def console_text(self) -> str:
        with self._console_cond:
            raw = bytes(self._console)
        return ANSI_ESCAPE.sub(b"", raw).decode(errors="replace")

    def console_tail(self, lines: int = 40) -> str:
        return "--- %s console (last %d lines of %s):\n%s" % (
            self.name, lines, self.console_log, "\n".join(self.console_text().splitlines()[-lines:]))

    def wait_console(self, pattern: str, timeout: float) -> "re.Match":
        """Wait until the console output (ANSI escapes removed) matches the regex."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._console_cond:
            while True:
                m = regex.search(ANSI_ESCAPE.sub(b"", bytes(self._console)).decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (not self.running and not self._reader.is_alive()):
                    break
                self._console_cond.wait(min(left, 1.0))
        raise GuestError("%s: console never showed %r within %d s\n%s"
                         % (self.name, pattern, timeout, self.console_tail()))

    def send_console(self, text: str) -> None:
        """Type on the serial console (e.g. at a login prompt or a rescue shell)."""
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    # ------------------------------------------------------------------ QMP

    def qmp(self, command: str, **arguments) -> object:
        """Run one QMP command (e.g. "system_powerdown", "query-block") and return its result."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(str(self._qmp_path))
            f = s.makefile("rw")
            json.loads(f.readline())  # greeting
            for msg in ({"execute": "qmp_capabilities"}, {"execute": command, "arguments": arguments}):
                f.write(json.dumps(msg) + "\n")
                f.flush()
                reply = _qmp_reply(f)
            return reply

    # ------------------------------------------------------------------ ssh

    def _ssh_options(self) -> List[str]:
        if not (self.ssh_key and self.ssh_port):
            raise HarnessError("%s: started without ssh (no key or no network)" % self.name)
        # -F /dev/null: neither ~/.ssh/config nor /etc/ssh/ssh_config can change behaviour.
        # ControlPath: commands ride on the master connection if it is up (~0.1 s instead of
        # ~0.9 s for a new handshake under TCG), else ssh connects directly.
        return ["-F", "/dev/null", "-i", str(self.ssh_key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=6", "-o", "ControlPath=%s" % self._ssh_mux,
                "-o", "ControlMaster=no"]

    @property
    def _ssh_mux(self) -> Path:
        return self._sockdir / "ssh.mux"

    def _start_ssh_master(self) -> None:
        """One long-lived ssh connection that later commands and copies multiplex over."""
        # ssh uses the first value given for an option: ControlMaster=yes must precede ours.
        argv = ["ssh", "-o", "ControlMaster=yes", "-o", "ControlPersist=no", "-p", str(self.ssh_port)
                ] + self._ssh_options() + ["-N", "root@127.0.0.1"]
        with open(self.workdir / "ssh-master.log", "ab") as err:
            self._ssh_master = procs.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=err, env=procs.base_env())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self._ssh_master.poll() is None:
            if self._ssh_mux.exists():
                return
            time.sleep(0.05)
        log.warning("%s: ssh master connection did not come up; using one connection per command",
                    self.name)

    def run(self, command: Union[str, Sequence[str]], timeout: float = 120, check: bool = False,
            input: Optional[bytes] = None) -> GuestResult:
        """Run a command as root in the guest (a string goes through the guest's shell)."""
        if not isinstance(command, str):
            command = " ".join(shlex.quote(str(c)) for c in command)
        argv = ["ssh", "-p", str(self.ssh_port)] + self._ssh_options() + ["root@127.0.0.1", command]
        start = time.monotonic()
        try:
            p = subprocess.run(argv, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                               capture_output=True, timeout=timeout, env=procs.base_env())
        except subprocess.TimeoutExpired:
            self._log_command(command, "TIMEOUT after %d s" % timeout)
            raise GuestError("%s: guest command timed out after %d s: %s" % (self.name, timeout, command))
        result = GuestResult(command, p.returncode, p.stdout.decode(errors="replace"),
                             p.stderr.decode(errors="replace"), round(time.monotonic() - start, 2))
        self._log_command(command, "exit %d in %.2f s\n--- stdout\n%s--- stderr\n%s"
                          % (result.returncode, result.seconds, result.stdout, result.stderr))
        if result.returncode == 255 and not self._ssh_alive():
            raise GuestError("%s: ssh connection failed running %r: %s\n%s"
                             % (self.name, command, result.stderr.strip(), self.console_tail()))
        return result.check() if check else result

    def _ssh_alive(self) -> bool:
        """Distinguishes "the command exited 255" from "ssh could not reach the guest"."""
        if not self.running:
            return False
        argv = ["ssh", "-p", str(self.ssh_port)] + self._ssh_options() + ["root@127.0.0.1", "true"]
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                                  env=procs.base_env()).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _log_command(self, command: str, outcome: str) -> None:
        with open(self.commands_log, "a") as f:
            f.write("[%7.1f s] $ %s\n%s\n" % (self.elapsed(), command, outcome))

    def put(self, local: Union[str, Path], remote: str, timeout: float = 300) -> None:
        """Copy a file or directory into the guest (scp -r)."""
        self._scp([str(local), "root@127.0.0.1:" + remote], timeout)

    def get(self, remote: str, local: Union[str, Path], timeout: float = 300) -> None:
        """Copy a file or directory out of the guest (scp -r)."""
        self._scp(["root@127.0.0.1:" + remote, str(local)], timeout)

    def _scp(self, paths: List[str], timeout: float) -> None:
        argv = ["scp", "-q", "-r", "-P", str(self.ssh_port)] + self._ssh_options() + paths
        try:
            run(argv, timeout=timeout)
        except HarnessError as e:
            raise GuestError("%s: copy failed: %s" % (self.name, e))
        self._log_command("scp " + " ".join(paths), "ok")

    def wait_ssh(self, timeout: float = 300) -> float:
        """Wait until ssh logs in; returns seconds since QEMU started. Fails fast if QEMU dies."""
        deadline = time.monotonic() + timeout
        argv = ["ssh", "-p", str(self.ssh_port)] + self._ssh_options() + [
            "-o", "ConnectTimeout=5", "root@127.0.0.1", "true"]
        while time.monotonic() < deadline:
            if not self.running:
                raise GuestError("%s: QEMU exited (%s) before ssh came up\n%s"
                                 % (self.name, self._proc.returncode, self.console_tail()))
            fatal = FATAL_CONSOLE.search(self.console_text())
            if fatal:
                raise GuestError("%s: boot failed (console: %r)\n%s"
                                 % (self.name, fatal.group(0), self.console_tail()))
            try:
                if subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
                                  env=procs.base_env()).returncode == 0:
                    self.timings["ssh_s"] = round(self.elapsed(), 1)
                    self._start_ssh_master()
                    return self.timings["ssh_s"]
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        raise GuestError("%s: no ssh after %d s\n%s" % (self.name, timeout, self.console_tail()))

    def wait_booted(self, timeout: float = 300) -> str:
        """Wait for ssh, then for systemd to finish booting; returns the system state.

        "running" means every unit started; "degraded" means some failed (see `systemctl
        --failed`). Tests that care should assert on it.
        """
        self.wait_ssh(timeout)
        left = max(30.0, timeout - self.elapsed())
        state = self.run("systemctl is-system-running --wait", timeout=left).stdout.strip()
        self.timings["booted_s"] = round(self.elapsed(), 1)
        log.info("%s: ssh after %.1f s, systemd %s after %.1f s", self.name, self.timings["ssh_s"],
                 state, self.timings["booted_s"])
        return state


def _qmp_reply(f) -> object:
    while True:
        msg = json.loads(f.readline())
        if "error" in msg:
            raise GuestError("QMP error: %s" % msg["error"])
        if "return" in msg:
            return msg["return"]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
