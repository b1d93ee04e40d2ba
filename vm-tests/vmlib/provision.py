"""Golden disk sets: a spec installed onto blank qcow2 disks by the helper VM, cached.

Building one (cold: ~1-2 min, see README):
  1. host: copy the image rootfs, write fstab/crypttab/mdadm.conf/hostname/LUKS keyfiles, and
     run update-initramfs in a chroot (natively: ~8 s, versus ~130 s inside a TCG guest) so the
     initramfs knows how to assemble md, unlock LUKS with the embedded keyfile and find root;
  2. host: tar that tree (the "payload") and create blank disks;
  3. helper VM (image kernel + busybox initramfs, chroot into tools.img): partition, md, LUKS,
     LVM, mkfs with the precomputed UUIDs, untar, grub-install (BIOS or UEFI), update-grub.
A golden directory holds disk<N>.qcow2 (named after the spec's disks), OVMF_VARS.fd for UEFI
specs (with the NVRAM boot entry grub-install created), LUKS keyfiles, golden.json and logs.
"""

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from . import cache, install
from .image import GuestImage, chroot_run, get_image
from .machine import Disk, GuestError, Machine, create_disk_image
from .procs import run
from .spec import Spec, load_spec

log = logging.getLogger("vmlib")

HELPER_TIMEOUT = 900
HELPER_APPEND = "console=ttyS0,115200 panic=-1 quiet"


@dataclass(frozen=True)
class Golden:
    path: Path
    spec: Spec
    image: GuestImage

    def disk_path(self, name: str) -> Path:
        return self.path / (name + ".qcow2")

    @property
    def ovmf_vars(self) -> Optional[Path]:
        return self.path / "OVMF_VARS.fd" if self.spec.firmware == "uefi" else None

    def luks_keyfile(self, name: str) -> Path:
        return self.path / (name + ".key")

    @property
    def info(self) -> Dict:
        """golden.json: spec, UUIDs, the helper's lsblk of the fresh disks, build timings."""
        return json.loads((self.path / "golden.json").read_text())

    def machine(self, name: str, workdir: Path, **options) -> Machine:
        """A Machine booting throw-away overlays of this golden's disks, like the spec says."""
        m = Machine(name, workdir, ssh_key=self.image.ssh_key, firmware=self.spec.firmware,
                    ovmf_vars=self.ovmf_vars, **options)
        for index, d in enumerate(self.spec.disks):
            m.add_overlay(self.disk_path(d.name), d.name, bus=d.bus,
                          bootindex=index if d.boot else None)
        return m


def golden_key(spec: Spec, image: GuestImage) -> str:
    sources = [Path(install.__file__), Path(__file__), install.LIB_SCRIPT]
    return cache.digest(image.key, spec.canonical(), [p.read_text() for p in sources])


def get_golden(spec_name: str, image: Optional[GuestImage] = None) -> Golden:
    """The cached golden disk set for a spec, provisioned first if needed."""
    spec = load_spec(spec_name)
    image = image or get_image()
    name = cache.entry_name("golden", golden_key(spec, image), spec.name)
    path = cache.build_once(cache.cache_dir(), name, lambda out: _build(spec, image, out))
    return Golden(path, spec, image)


def _build(spec: Spec, image: GuestImage, out: Path) -> None:
    t0 = time.monotonic()
    ids = install.stable_uuids(spec)
    job = out / "job"
    (job / "keys").mkdir(parents=True)
    for x in spec.luks:
        key = job / "keys" / (x.name + ".key")
        key.write_bytes(os.urandom(64))
        shutil.copyfile(key, out / (x.name + ".key"))
        # a key file is read byte for byte: no trailing newline
        (job / "keys" / (x.name + ".pass")).write_text(x.passphrase)
    payload = out / "payload.tar"
    _make_payload(spec, image, ids, job / "keys", out / "payload-root", payload, out / "host.log")
    (job / "run.sh").write_text(install.job_script(spec, ids))
    t_host = time.monotonic() - t0
    disks = [Disk(d.name, create_disk_image(out / (d.name + ".qcow2"), "%dM" % d.size_mib))
             for d in spec.disks]
    disks.append(Disk("payload", payload, fmt="raw", readonly=True))
    vars_out = out / "OVMF_VARS.fd" if spec.firmware == "uefi" else None
    helper = run_helper(image, out / "helper", job, disks, spec.firmware, vars_out)
    payload.unlink()
    shutil.rmtree(job)
    info = {"spec": spec.canonical(), "uuids": ids, "image": image.key,
            "lsblk": json.loads((helper / "out" / "lsblk.json").read_text()),
            "timings": {"host_s": round(t_host, 1), "helper_s": round(time.monotonic() - t0 - t_host, 1),
                        "total_s": round(time.monotonic() - t0, 1)}}
    (out / "golden.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("golden %s provisioned in %.0f s", spec.name, info["timings"]["total_s"])


def _make_payload(spec: Spec, image: GuestImage, ids: Dict[str, str], keys: Path, root: Path,
                  payload: Path, host_log: Path) -> None:
    """The installed system as a tar: image rootfs + layout files + a matching initramfs."""
    run(["cp", "-a", "--reflink=auto", image.rootfs, root], timeout=300, log_file=host_log)
    for rel, text in install.etc_files(spec, ids).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    for x in spec.luks:
        target = root / "etc/cryptsetup-keys.d" / (x.name + ".key")
        shutil.copyfile(keys / (x.name + ".key"), target)
        target.chmod(0o600)
    chroot_run(root, ["update-initramfs", "-u", "-k", "all"], log_file=host_log)
    run(["tar", "-C", root, "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls",
         "-cf", payload, "."], timeout=600, log_file=host_log)
    cache.remove_tree(root)


def run_helper(image: GuestImage, workdir: Path, job_dir: Path, disks: List[Disk],
               firmware: str = "bios", vars_out: Optional[Path] = None,
               timeout: float = HELPER_TIMEOUT) -> Path:
    """Run job_dir/run.sh as root in the helper VM with `disks` attached; returns workdir.

    The script runs chrooted into a throw-away copy of the guest rootfs (every Debian tool, no
    udev). A disk's virtio serial (/sys/block/vdX/serial) is its Disk.name; prepend
    install.LIB_SCRIPT for disk_by_serial and the no-udev LVM settings. Files the script
    leaves in /job/out end up in workdir/out. Fails unless the script exits 0.
    """
    job_img = workdir / "job.img"
    workdir.mkdir(parents=True, exist_ok=True)
    (job_dir / "out").mkdir(exist_ok=True)
    size_mb = 64 + sum(f.stat().st_size for f in job_dir.rglob("*") if f.is_file()) * 2 // 2**20
    run(["mke2fs", "-q", "-t", "ext4", "-L", "job", "-d", job_dir, job_img, "%dM" % size_mb],
        timeout=120)
    m = Machine("helper", workdir, firmware=firmware, network=False, lifetime=timeout + 60)
    m.add_disk(image.tools_img, "tools", fmt="raw", snapshot=True)
    m.add_disk(job_img, "job", fmt="raw")
    for d in disks:
        m.disks.append(d)
    m.set_kernel_boot(image.kernel, image.helper_initrd, HELPER_APPEND)
    with m:
        m.start()
        m.wait_exit(timeout)
        if vars_out is not None:
            shutil.copyfile(m.workdir / "OVMF_VARS.fd", vars_out)
    rc = m.wait_console(r"HELPER-RC=(\d+)", 1)
    if rc.group(1) != "0":
        raise GuestError("helper job %s failed (HELPER-RC=%s)\n%s"
                         % (job_dir / "run.sh", rc.group(1), m.console_tail(60)))
    run(["debugfs", "-R", "rdump /out %s" % workdir, job_img], timeout=120)
    job_img.unlink()
    return workdir
