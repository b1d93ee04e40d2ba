"""Known test data for the recovery drills, written in the source guest before the backup.

    python3 drill-data.py ROOT [ROOT ...]     e.g. /srv/drill /boot/drill

Under each ROOT: what a restore tends to lose. Every kind is here because a backup tool or a
restore path has been seen to drop it: user xattrs, POSIX ACLs (access and default, written as
the kernel's xattr format: the image has no setfacl), a file capability (setcap on a copy of
ping, else of true), hard links (in one directory and across directories), a sparse file with
data at both ends, symbolic links (absolute, relative, dangling), a fifo, odd owners (ids no
user has), setuid/setgid/sticky modes, old mtimes, names with spaces, newlines and UTF-8,
an empty file, a random incompressible file and a deep tree. Prints what it made as JSON.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
NO_ID = 0xFFFFFFFF


def acl(*entries):
    """The system.posix_acl_* xattr value: version 2, then (tag, perm, id), sorted."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in sorted(entries))


def make(root):
    made = []
    os.makedirs(root, exist_ok=True)
    j = lambda *p: os.path.join(root, *p)  # noqa: E731

    with open(j("xattrs.txt"), "w") as f:
        f.write("a file with extended attributes\n")
    os.setxattr(j("xattrs.txt"), "user.drill.text", b"hello")
    os.setxattr(j("xattrs.txt"), "user.drill.binary", bytes(range(256)))
    os.setxattr(j("xattrs.txt"), "trusted.drill", b"only root sees this")
    made.append("xattrs.txt")

    with open(j("acl.txt"), "w") as f:
        f.write("user 1001 may read, group 2002 may write\n")
    os.setxattr(j("acl.txt"), "system.posix_acl_access",
                acl((ACL_USER_OBJ, 6, NO_ID), (ACL_USER, 4, 1001), (ACL_GROUP_OBJ, 4, NO_ID),
                    (ACL_GROUP, 6, 2002), (ACL_MASK, 6, NO_ID), (ACL_OTHER, 0, NO_ID)))
    os.mkdir(j("acl-dir"))
    os.setxattr(j("acl-dir"), "system.posix_acl_default",
                acl((ACL_USER_OBJ, 7, NO_ID), (ACL_USER, 5, 1001), (ACL_GROUP_OBJ, 5, NO_ID),
                    (ACL_MASK, 5, NO_ID), (ACL_OTHER, 0, NO_ID)))
    with open(j("acl-dir", "inherits.txt"), "w") as f:
        f.write("gets the directory's default ACL\n")
    made += ["acl.txt", "acl-dir"]

    source = shutil.which("ping") or "/usr/bin/true"
    shutil.copy2(source, j("ping-copy"))
    subprocess.run(["setcap", "cap_net_raw+ep", j("ping-copy")], check=True)
    made.append("ping-copy (from %s)" % source)

    with open(j("linked-a"), "w") as f:
        f.write("three names, one inode\n")
    os.link(j("linked-a"), j("linked-b"))
    os.makedirs(j("other-dir"))
    os.link(j("linked-a"), j("other-dir", "linked-c"))
    made.append("linked-a = linked-b = other-dir/linked-c")

    with open(j("sparse.img"), "wb") as f:
        f.write(b"head" * 1024)
        f.seek(64 * 1024 * 1024)
        f.write(b"tail" * 1024)
    made.append("sparse.img (64 MiB, 8 KiB of data)")

    os.symlink("/etc/hostname", j("abs-link"))
    os.symlink("xattrs.txt", j("rel-link"))
    os.symlink("does/not/exist", j("dangling-link"))
    os.mkfifo(j("fifo"))
    made += ["abs-link", "rel-link", "dangling-link", "fifo"]

    with open(j("odd-owner"), "w") as f:
        f.write("owned by ids with no user\n")
    os.chown(j("odd-owner"), 4242, 4343)
    os.chown(j("rel-link"), 4242, 4343, follow_symlinks=False)
    with open(j("setuid"), "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(j("setuid"), 0o4755)
    os.mkdir(j("setgid-dir"))
    os.chmod(j("setgid-dir"), 0o2775)
    os.mkdir(j("sticky-dir"))
    os.chmod(j("sticky-dir"), 0o1777)
    made += ["odd-owner", "setuid", "setgid-dir", "sticky-dir"]

    for name in ("name with spaces", "new\nline", "ünïcödé-€", "empty"):
        with open(j(name), "w") as f:
            f.write("" if name == "empty" else name + "\n")
    with open(j("random.bin"), "wb") as f:
        f.write(os.urandom(4 * 1024 * 1024))
    deep = j(*["d%d" % i for i in range(12)])
    os.makedirs(deep)
    with open(os.path.join(deep, "leaf"), "w") as f:
        f.write("deep\n")
    made += ["names", "random.bin", "d0/.../d11/leaf"]

    # Old times last (every write above moves a directory's mtime), the deepest first.
    os.utime(j("odd-owner"), (1000000000, 1000000000))
    os.utime(j("rel-link"), (1100000000, 1100000000), follow_symlinks=False)
    for dirpath, dirnames, filenames in sorted(os.walk(root), key=lambda w: -len(w[0])):
        os.utime(dirpath, (1200000000, 1200000000))
    return made


if __name__ == "__main__":
    print(json.dumps({root: make(root) for root in sys.argv[1:]}, indent=1))
