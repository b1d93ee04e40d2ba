"""The guest image: a customised Debian 12 rootfs built with debootstrap, cached by recipe hash.

An image directory holds:
    rootfs/          the customised tree (read-only by convention: copy before changing)
    vmlinuz, initrd.img    the rootfs kernel and its debootstrap-time initramfs (MODULES=most)
    tools.img        ext4 image of rootfs/, the root of the helper VM (attach with snapshot=on)
    helper-initrd.cpio     busybox + virtio modules + guest/helper-init.sh as /init
    id_ed25519[.pub] the ssh key that logs in as root on every guest made from this image
    recipe.json      what went into the key, the kernel version, the mirror, build timings
The key covers the package list, the guest/ scripts and this module's source; the mirror is
deliberately not part of it (any Debian mirror serves the same packages).
"""

import json
import logging
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from . import cache, cpio
from .procs import HarnessError, run, which

log = logging.getLogger("vmlib")

SUITE = "bookworm"
GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
# The scripts that shape the image (provision-lib.sh only affects golden disks).
IMAGE_SCRIPTS = ("customize.sh", "helper-init.sh")
HOST_BUSYBOX = Path("/bin/busybox")
# Enough to reach the tools disk; everything else is modprobe'd from the tools rootfs.
HELPER_MODULES = ["virtio_pci", "virtio_blk"]
TOOLS_IMG_SIZE = "2G"
MODPROBE_WRAPPER = b"""#!/bin/sh
[ -e /tools/proc/self/exe ] || exit 1
exec /bin/chroot /tools /sbin/modprobe "$@"
"""
DEBOOTSTRAP_TIMEOUT = 1800


@dataclass(frozen=True)
class GuestImage:
    path: Path
    key: str

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    @property
    def tools_img(self) -> Path:
        return self.path / "tools.img"

    @property
    def helper_initrd(self) -> Path:
        return self.path / "helper-initrd.cpio"

    @property
    def ssh_key(self) -> Path:
        return self.path / "id_ed25519"

    @property
    def recipe(self) -> Dict:
        return json.loads((self.path / "recipe.json").read_text())


def packages() -> List[str]:
    lines = (GUEST_DIR / "packages.txt").read_text().splitlines()
    return [w for w in (line.split("#")[0].strip() for line in lines) if w]


def recipe_key() -> str:
    scripts = {name: (GUEST_DIR / name).read_text() for name in IMAGE_SCRIPTS}
    return cache.digest(SUITE, packages(), scripts, Path(__file__).read_text())


def get_image() -> GuestImage:
    """The cached image for the current recipe, built first if needed (~2 min cold)."""
    key = recipe_key()
    path = cache.build_once(cache.cache_dir(), cache.entry_name("image", key), _build)
    return GuestImage(path, key)


def apt_mirror(sources_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt already uses (deb822 or one-line format); RESCUE_VM_MIRROR wins."""
    if os.environ.get("RESCUE_VM_MIRROR"):
        return os.environ["RESCUE_VM_MIRROR"]
    texts = [p.read_text() for p in sorted((sources_dir / "sources.list.d").glob("*.sources"))]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    lists = [sources_dir / "sources.list"] + sorted((sources_dir / "sources.list.d").glob("*.list"))
    for path in lists:
        if path.is_file():
            m = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+%s\s" % SUITE, path.read_text(), re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def _build(out: Path) -> None:
    for tool in ("debootstrap", "ssh-keygen", "mke2fs", "unshare", "chroot"):
        if not which(tool):
            raise HarnessError("%s is missing on the host: run vm-tests/ci-setup.sh" % tool)
    if not HOST_BUSYBOX.is_file():
        raise HarnessError("%s is missing: apt-get install busybox-static" % HOST_BUSYBOX)
    blog = out / "build.log"
    mirror = apt_mirror()
    timings = {}
    t0 = time.monotonic()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rescue-vm-tests",
         "-f", out / "id_ed25519"], timeout=60, log_file=blog)
    # A private mount namespace: whatever debootstrap mounts in the target (proc, sys) vanishes
    # with the process, even if it is killed half-way.
    run(["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
         "--include=" + ",".join(packages()), SUITE, out / "rootfs", mirror],
        timeout=DEBOOTSTRAP_TIMEOUT, log_file=blog)
    timings["debootstrap_s"] = round(time.monotonic() - t0, 1)
    run(["sh", GUEST_DIR / "customize.sh", out / "rootfs", out / "id_ed25519.pub"],
        timeout=300, log_file=blog)
    kver = _kernel_version(out / "rootfs")
    shutil.copy2(out / "rootfs/boot" / ("vmlinuz-" + kver), out / "vmlinuz")
    shutil.copy2(out / "rootfs/boot" / ("initrd.img-" + kver), out / "initrd.img")
    run(["mke2fs", "-q", "-t", "ext4", "-L", "tools", "-d", out / "rootfs", out / "tools.img",
         TOOLS_IMG_SIZE], timeout=300, log_file=blog)
    _write_helper_initrd(out / "rootfs", kver, out / "helper-initrd.cpio")
    timings["total_s"] = round(time.monotonic() - t0, 1)
    recipe = {"suite": SUITE, "packages": packages(), "mirror": mirror, "kernel": kver,
              "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "timings": timings}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    log.info("guest image built in %.0f s (kernel %s)", timings["total_s"], kver)


def chroot_run(root: Path, argv: List[str], log_file: Optional[Path] = None, timeout: float = 600,
               binds: Optional[Dict[Path, str]] = None) -> None:
    """Run argv natively in a chroot of root with /proc, /sys, /dev and a fresh tmpfs /tmp.

    Everything is mounted in a private mount namespace, so nothing stays mounted when the
    command ends or is killed, and nothing is written to root's /tmp (the image rootfs can be
    used read-only). binds maps host directories to paths inside the chroot (e.g. /mnt).
    """
    setup = ['mount -t proc proc "$R/proc"', 'mount -t sysfs sys "$R/sys"',
             'mount --rbind /dev "$R/dev"', 'mount -t tmpfs tmpfs "$R/tmp"']
    for host, inside in (binds or {}).items():
        setup.append('mount --bind %s "$R"%s' % (shlex.quote(str(host)), shlex.quote(inside)))
    script = 'R=$1; shift; %s; exec chroot "$R" "$@"' % "; ".join(setup)
    run(["unshare", "--mount", "--propagation", "private", "sh", "-euc", script, "sh", root] + argv,
        timeout=timeout, log_file=log_file)


def _kernel_version(rootfs: Path) -> str:
    versions = sorted(p.name for p in (rootfs / "lib/modules").iterdir())
    if len(versions) != 1:
        raise HarnessError("expected exactly one kernel in the image, found %s" % versions)
    return versions[0]


def module_load_order(rootfs: Path, kver: str, names: List[str]) -> List[str]:
    """Module paths (relative to /lib/modules/KVER) to insmod, dependencies first.

    modules.dep lists every transitive dependency of a module, the one to load last first.
    """
    deps = {}
    for line in (rootfs / "lib/modules" / kver / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[_module_name(mod)] = (mod, rest.split())
    order: List[str] = []
    for name in names:
        if name.replace("-", "_") not in deps:
            raise HarnessError("kernel %s has no module %s" % (kver, name))
        mod, needs = deps[name.replace("-", "_")]
        for path in list(reversed(needs)) + [mod]:
            if path not in order:
                order.append(path)
    return order


def _module_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


def _write_helper_initrd(rootfs: Path, kver: str, out: Path) -> None:
    modules = module_load_order(rootfs, kver, HELPER_MODULES)
    entries = [cpio.directory(d) for d in ("bin", "sbin", "dev", "etc", "proc", "sys", "tools",
                                           "lib", "lib/modules")]
    entries.append(cpio.chardev("dev/console", 5, 1))
    entries.append(cpio.file("bin/busybox", HOST_BUSYBOX.read_bytes(), 0o755))
    entries.append(cpio.file("init", (GUEST_DIR / "helper-init.sh").read_bytes(), 0o755))
    # The kernel loads modules on demand (crypto for dm-crypt, fs-*) by running /sbin/modprobe
    # in the initramfs root, which has no modules: forward to the tools rootfs that has them,
    # once it is mounted with its /proc (earlier requests fail fast instead of crashing kmod).
    entries.append(cpio.file("sbin/modprobe", MODPROBE_WRAPPER, 0o755))
    entries.append(cpio.file("etc/helper-modules", "".join(m + "\n" for m in modules).encode()))
    for mod in modules:
        parts = mod.split("/")
        for i in range(1, len(parts)):
            d = "lib/modules/" + "/".join(parts[:i])
            if d not in [e.name for e in entries]:
                entries.append(cpio.directory(d))
        data = (rootfs / "lib/modules" / kver / mod).read_bytes()
        entries.append(cpio.file("lib/modules/" + mod, data))
    cpio.write(out, entries)
