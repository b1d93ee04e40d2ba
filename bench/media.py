#!/usr/bin/env python3
"""What the rescue media are made of: an initramfs made by `rescue mkrescue`, unpacked, its bytes
summed by part (libraries, kernel modules, the Python standard library, udev, GRUB, …), with
the largest files.

    python3 bench/media.py INITRD [ISO] [--top N]

INITRD may be compressed with zstd (needs the zstd program), xz or gzip. The vm-tests media
test (vm-tests/test_media_vm.py) leaves one in its tmp_path, made inside the bios-lvm guest.
"""

import argparse
import collections
import gzip
import lzma
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rescue  # noqa: E402

PARTS = (("usr/lib/modules/", "kernel modules"), ("usr/lib/python3", "python3 standard library"),
         ("usr/lib/x86_64-linux-gnu/", "shared libraries"), ("usr/lib/udev/", "udev rules and helpers"),
         ("usr/lib/grub/", "GRUB modules (grub-install)"), ("usr/share/grub/", "GRUB data"),
         ("usr/lib/firmware/", "firmware"), ("usr/share/rescue/", "rescue.pyz"),
         ("usr/bin/python3", "python3 interpreter"), ("usr/bin/", "programs"), ("usr/sbin/", "programs"))


def uncompressed(data: bytes) -> bytes:
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return subprocess.run(["zstd", "-d", "-c"], input=data, capture_output=True, check=True).stdout
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def part_of(name: str) -> str:
    return next((label for prefix, label in PARTS if name.startswith(prefix)), "other")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("initrd", type=Path)
    parser.add_argument("iso", type=Path, nargs="?")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    packed = args.initrd.read_bytes()
    entries = rescue.read_cpio(uncompressed(packed))
    total = sum(len(e.data) for e in entries)
    print(f"initramfs: {rescue.human_size(len(packed))} compressed, {rescue.human_size(total)} in "
          f"{len(entries)} entries")
    if args.iso:
        print(f"ISO: {rescue.human_size(args.iso.stat().st_size)}")
    parts = collections.Counter()
    for entry in entries:
        parts[part_of(entry.name)] += len(entry.data)
    print("\nby part (uncompressed):")
    for label, size in parts.most_common():
        print(f"  {rescue.human_size(size):>10}  {100 * size / total:4.1f} %  {label}")
    print(f"\nthe {args.top} largest files:")
    for entry in sorted(entries, key=lambda e: -len(e.data))[:args.top]:
        print(f"  {rescue.human_size(len(entry.data)):>10}  /{entry.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
