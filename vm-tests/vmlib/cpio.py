"""A minimal writer for the newc cpio format the kernel unpacks as an initramfs.

Written in Python rather than driving cpio(1) so the archive can hold device nodes
(/dev/console) without mknod on the host, and is byte-for-byte reproducible (mtime 0, uid 0).
"""

import stat
from pathlib import Path
from typing import BinaryIO, List, NamedTuple


class Entry(NamedTuple):
    name: str          # path inside the archive, without leading "/"
    mode: int          # full st_mode: type bits | permission bits
    data: bytes = b""  # file content, or the target of a symlink
    rdev: int = 0      # (major << 8) | minor for device nodes


def directory(name: str) -> Entry:
    return Entry(name, stat.S_IFDIR | 0o755)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def chardev(name: str, major: int, minor: int) -> Entry:
    return Entry(name, stat.S_IFCHR | 0o600, rdev=(major << 8) | minor)


def write(out: Path, entries: List[Entry]) -> None:
    with open(out, "wb") as f:
        for ino, entry in enumerate(entries, start=1):
            _write_entry(f, ino, entry)
        _write_entry(f, 0, Entry("TRAILER!!!", 0))


def _write_entry(f: BinaryIO, ino: int, entry: Entry) -> None:
    name = entry.name.encode() + b"\0"
    major, minor = entry.rdev >> 8, entry.rdev & 0xFF
    fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, major, minor, len(name), 0)
    f.write(b"070701" + b"".join(b"%08X" % v for v in fields))
    f.write(name)
    f.write(b"\0" * (-(110 + len(name)) % 4))
    f.write(entry.data)
    f.write(b"\0" * (-len(entry.data) % 4))
