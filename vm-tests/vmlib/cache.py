"""The build cache: content-keyed directories that appear atomically and are built under a lock.

Layout of the cache directory (RESCUE_VM_CACHE, else /var/cache/rescue-vm-tests):
    image-<key>/            a finished guest image (see image.py)
    golden-<spec>-<key>/    a finished golden disk set (see provision.py)
    <name>.lock             flock(2) held while <name> is being built
    <name>.tmp-<pid>/       a build in progress; leftovers of killed builds are removed
    failed/<name>-<time>/   the *.log files of builds that failed
A finished directory is only ever created by rename(2), so a reader either sees a complete
entry or none; a killed build leaves only a .tmp-* directory that the next builder deletes.
"""

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

from .procs import HarnessError, run

log = logging.getLogger("vmlib")

DEFAULT_CACHE_DIR = Path("/var/cache/rescue-vm-tests")
# Entries unused for this long are deleted when a new entry of any kind is built.
PRUNE_AFTER_DAYS = 14


def cache_dir() -> Path:
    path = Path(os.environ.get("RESCUE_VM_CACHE") or DEFAULT_CACHE_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (the cache key of a recipe)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextmanager
def locked(path: Path, wait_message: str) -> Iterator[None]:
    """Hold an exclusive flock on path; the kernel drops it if the holder dies."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s: waiting for %s", wait_message, path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(root: Path, name: str, builder: Callable[[Path], None]) -> Path:
    """Return root/name, building it with builder(tmpdir) first unless it already exists."""
    final = root / name
    if final.is_dir():
        _touch_used(final)
        return final
    with locked(root / (name + ".lock"), "another process is building " + name):
        if final.is_dir():  # built by the process we waited for
            _touch_used(final)
            return final
        for stale in root.glob(name + ".tmp-*"):
            log.warning("removing leftover of an interrupted build: %s", stale)
            remove_tree(stale)
        tmp = root / ("%s.tmp-%d" % (name, os.getpid()))
        tmp.mkdir()
        try:
            builder(tmp)
            os.rename(tmp, final)
        except BaseException:
            kept = _keep_logs(tmp, root / "failed" / ("%s-%s" % (name, time.strftime("%Y%m%d-%H%M%S"))))
            log.error("building %s failed; its logs are in %s", name, kept)
            remove_tree(tmp)
            raise
    _touch_used(final)
    prune(root, keep=final)
    return final


def _keep_logs(tmp: Path, dest: Path) -> Path:
    """Save the *.log files of a failed build (the build directory itself is deleted)."""
    for path in list(tmp.glob("*.log")) + list(tmp.glob("*/*.log")):
        target = dest / path.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return dest


def _touch_used(entry: Path) -> None:
    (entry / "last-used").write_text(time.strftime("%Y-%m-%dT%H:%M:%S\n"))


def prune(root: Path, keep: Path, days: float = PRUNE_AFTER_DAYS) -> List[Path]:
    """Delete entries not used for `days`, skipping any another process is building or using."""
    removed = []
    limit = time.time() - days * 86400
    for entry in root.iterdir():
        used = entry / "last-used"
        if entry == keep or not used.is_file() or used.stat().st_mtime > limit:
            continue
        with open(root / (entry.name + ".lock"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            log.info("pruning unused cache entry %s", entry)
            remove_tree(entry)
            removed.append(entry)
    return removed


def mounts_under(path: Path) -> List[str]:
    """Mount points at or below path (a killed chroot step could have left some)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mnt = line.split()[4].replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return found


def remove_tree(path: Path) -> None:
    """rm -rf that first unmounts anything below path, so it never deletes through a mount."""
    if not path.exists():
        return
    for mnt in sorted(mounts_under(path), key=len, reverse=True):
        run(["umount", "-l", mnt], timeout=60, check=False)
    left = mounts_under(path)
    if left:
        raise HarnessError("refusing to delete %s: still mounted: %s" % (path, left))
    shutil.rmtree(path)


def entry_name(kind: str, key: str, label: Optional[str] = None) -> str:
    return "-".join(p for p in (kind, label, key) if p)
