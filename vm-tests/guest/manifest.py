"""A manifest of every file of some filesystems, to compare a recovered system with its source.

    python3 manifest.py [--skip PATH ...] MOUNTPOINT [MOUNTPOINT ...] > manifest.json

Walks each mountpoint without crossing into other filesystems (like the backup) and skips
the given paths (and everything below them). A directory where another filesystem is mounted
is recorded as a mountpoint (type, mode, owner of what is seen there), not entered. For every
other path it records
    type, mode (permission and set-id bits), uid, gid, mtime (whole seconds: duplicity keeps
    no more), size and sha256 (regular files), target (symlinks), rdev (devices),
    xattrs (every namespace root can read: user, trusted, security.capability, the POSIX
    ACLs as system.posix_acl_*), blocks_allocated (regular files, to see holes come back)
and the hard-link groups (paths sharing an inode), as one JSON object on stdout.
"""

import argparse
import hashlib
import json
import os
import stat
import sys


def kind(mode):
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "chardev"),
                       (stat.S_ISBLK, "blockdev")):
        if test(mode):
            return name
    return "unknown"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry(path, st):
    e = {"type": kind(st.st_mode), "mode": "%04o" % stat.S_IMODE(st.st_mode), "uid": st.st_uid,
         "gid": st.st_gid, "mtime": int(st.st_mtime)}
    if stat.S_ISREG(st.st_mode):
        e["size"] = st.st_size
        e["sha256"] = sha256(path)
        e["sparse"] = st.st_blocks * 512 < st.st_size
    elif stat.S_ISLNK(st.st_mode):
        e["target"] = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        e["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        names = []
    attrs = {}
    for name in names:
        try:
            attrs[name] = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError as exc:
            attrs[name] = "unreadable: %s" % exc.strerror
    if attrs:
        e["xattrs"] = attrs
    return e


def below(path, prefixes):
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def walk(root, skip):
    dev = os.lstat(root).st_dev
    pending = [root]
    while pending:
        directory = pending.pop()
        yield directory, os.lstat(directory)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if below(path, skip):
                continue
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode):
                if st.st_dev == dev:
                    pending.append(path)
                else:
                    yield path, None   # a mountpoint: its own filesystem, walked as a root or not at all
                continue
            yield path, st


def manifest(roots, skip):
    files, inodes = {}, {}
    for root in roots:
        for path, st in walk(root, skip):
            if st is None:
                if path not in files:
                    mounted = os.lstat(path)
                    files[path] = {"type": "dir", "mountpoint": True, "mode": "%04o" % stat.S_IMODE(mounted.st_mode),
                                   "uid": mounted.st_uid, "gid": mounted.st_gid}
                continue
            files[path] = entry(path, st)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    links = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return {"roots": list(roots), "skipped": list(skip), "files": files, "hardlinks": links}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("roots", nargs="+")
    args = parser.parse_args()
    json.dump(manifest(args.roots, args.skip), sys.stdout, sort_keys=True)
