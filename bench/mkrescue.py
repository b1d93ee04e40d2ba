#!/usr/bin/env python3
"""How long `rescue mkrescue` takes on this machine, natively (no QEMU): it runs in a chroot of
a Debian 12 root with a kernel, its modules and every tool, by default the vm-tests guest
image's root (the bios-lvm guest's own system), under an overlay so that root stays unchanged.

    python3 bench/mkrescue.py [--root DIR] [--runs N] [--pyz PYZ] [--compression zstd|xz|gzip]

Needs root (mounts, chroot). Prints each run's wall time, rescue's own "made in" figure and the
sizes of the initramfs and the ISO, then the median. The running kernel here is not the root's:
KERNEL_FILE names the root's kernel and rescue takes its release from the image's header. The
layout mkrescue records is this machine's (what lsblk sees through the chroot), and the kernel
modules loaded here are not the root kernel's: MODULES names those the bios-lvm guest's own
rescue image carries (its loaded ones and its layout's; their dependencies follow), so the
image holds what it holds on that machine. Each run starts from a fresh overlay; the zipapp is
unpacked by an untimed `rescue --version` first (as on a host where rescue ran before; the
first run ever adds about 1 s). --compression picks the kernel config the build sees
(CONFIG_RD_<X>), to time each compression rescue can write.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAMESPACE_FLAG = "RESCUE_BENCH_IN_NAMESPACE"
# What the bios-lvm guest's rescue image holds as modules, less what they pull in themselves.
GUEST_MODULES = ("virtio_blk", "virtio_net", "virtio_pci", "virtio-rng", "ata_piix", "ata_generic", "serio_raw",
                 "evdev", "button", "qemu_fw_cfg", "loop", "fuse", "configfs", "autofs4", "ip_tables", "xfs",
                 "btrfs", "dm-mod", "md-mod", "linear", "multipath", "raid0", "raid1", "raid10", "raid456",
                 "aesni-intel", "crc32-pclmul", "crc32c-intel", "crct10dif-pclmul", "ghash-clmulni-intel",
                 "sha1-ssse3", "sha256-ssse3", "sha512-ssse3", "blake2b_generic", "xxhash_generic")


def guest_root() -> Path:
    sys.path.insert(0, str(REPO / "vm-tests"))
    from vmlib.image import get_image
    return get_image().rootfs


def build_pyz(out: Path) -> Path:
    pyz = out / "rescue.pyz"
    subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "-o", str(pyz)], check=True,
                   capture_output=True, timeout=600)
    return pyz


def mount(*argv: str) -> None:
    subprocess.run(["mount"] + list(argv), check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a root with kernel, modules and tools (default: the vm-tests guest image's)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pyz", type=Path, help="the zipapp (default: built now from this checkout)")
    parser.add_argument("--compression", choices=("zstd", "xz", "gzip"), help="(default: what the root's kernel config says)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/mkrescue.py needs root (it mounts an overlay and runs chroot)", file=sys.stderr)
        return 2
    if os.environ.get(NAMESPACE_FLAG) != "1":
        # a private mount namespace: every mount below ends with this process, however it ends
        env = dict(os.environ, **{NAMESPACE_FLAG: "1"})
        return subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable] + sys.argv,
                              env=env).returncode
    root = (args.root or guest_root()).resolve()
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        print(f"{root}: no /boot/vmlinuz-*", file=sys.stderr)
        return 2
    kernel = "/boot/" + kernels[-1].name
    release = kernels[-1].name[len("vmlinuz-"):]
    with tempfile.TemporaryDirectory(prefix="bench-mkrescue-") as tmp:
        work = Path(tmp)
        pyz = args.pyz or build_pyz(work)
        figures = []
        for run in range(1, args.runs + 1):
            upper, scratch, merged = work / f"upper{run}", work / f"work{run}", work / f"merged{run}"
            for d in (upper, scratch, merged):
                d.mkdir()
            mount("-t", "overlay", "overlay", "-o", f"lowerdir={root},upperdir={upper},workdir={scratch}", str(merged))
            for d in ("proc", "sys", "dev"):
                mount("--rbind", f"/{d}", str(merged / d))
            shutil.copyfile(pyz, merged / "root" / "rescue.pyz")
            (merged / "etc" / "rescue").mkdir(parents=True, exist_ok=True)
            (merged / "etc" / "rescue" / "local.conf").write_text(
                f"BACKUP_DUPLICITY_URL=file:///var/backup\nKERNEL_FILE={kernel}\n"
                f"MODULES=( {' '.join(GUEST_MODULES)} )\n")
            if args.compression:
                config = merged / "boot" / f"config-{release}"
                text = re.sub(r"^CONFIG_RD_\w+=y\n", "", config.read_text(), flags=re.M)
                config.write_text(text + f"CONFIG_RD_{args.compression.upper()}=y\n")
            subprocess.run(["chroot", str(merged), "python3", "/root/rescue.pyz", "--version"], check=True,
                           capture_output=True, timeout=300)
            started = time.monotonic()
            r = subprocess.run(["chroot", str(merged), "python3", "/root/rescue.pyz", "mkrescue"],
                               capture_output=True, text=True, timeout=1800)
            wall = time.monotonic() - started
            if r.returncode != 0:
                print(r.stdout + r.stderr, file=sys.stderr)
                return 1
            made = re.search(r"initramfs ([0-9.]+ MiB) \((\w+)\), made in ([0-9.]+) s", r.stdout + r.stderr)
            out = merged / "var" / "lib" / "rescue" / "output"
            iso = next(out.glob("*.iso"), None)
            initrd = next(out.glob("*-initrd.cgz"))
            figures.append(wall)
            modules = re.search(r"(\d+) kernel modules", r.stdout + r.stderr)
            print(f"run {run}: {wall:.1f} s wall; rescue: made in {made.group(3) if made else '?'} s; "
                  f"{modules.group(1) if modules else '?'} kernel modules; "
                  f"initramfs {initrd.stat().st_size / 2**20:.1f} MiB ({made.group(2) if made else '?'})"
                  + (f", ISO {iso.stat().st_size / 2**20:.1f} MiB" if iso else ""), flush=True)
            subprocess.run(["umount", "-R", str(merged)], check=True)
        print(f"mkrescue of {root} ({release}), {args.runs} runs: median {statistics.median(figures):.1f} s, "
              f"min {min(figures):.1f} s, max {max(figures):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
