"""The restore primitive (rescue restoreonly) with the real duplicity: every attribute comes
back, into an empty directory or a tree of mounted filesystems, as of any point in the chain,
after a backup killed halfway; and it fails truthfully on a wrong or missing passphrase."""

import hashlib
import os
import random
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rescue
from backup_fixtures import assert_same_tree
from conftest import RESCUE
from test_backup import Site, assert_clean_error, differences_inside, public_key


@pytest.fixture
def site(tmp_path, conf_dir, gnupg_keys):
    return Site(tmp_path, conf_dir, gnupg_keys)


def left_behind(parent, prefix, before=()):
    """Work directories of rescue runs that have exited (a live run's, e.g. of a test running
    beside this one, are its own business)."""
    out = []
    for name in os.listdir(parent):
        if name.startswith(prefix) and name not in before:
            try:
                owner = (Path(parent) / name / rescue.OWNER_FILE).read_text().strip()
            except OSError:
                owner = ""
            if not owner or rescue.process_identity(int(owner.split()[0])) != owner:
                out.append(name)
    return out


def restored(site, target):
    """Where the backed-up tree lands inside a restore target (paths are kept absolute)."""
    return Path(str(target) + str(site.src))


def test_every_attribute_comes_back_hard_links_sparse_xattrs_acls_capabilities(site):
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    target = site.tmp / "restored"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^Restore done: [0-9.]+ [KMGT]?i?B written into ", proc.stdout, re.M), proc.stdout
    assert_same_tree(site.src, restored(site, target))
    assert " of type reg" not in (site.tmp / "log/rescue.log").read_text()     # no line per file
    leftovers = [p for p in os.listdir(target) if p.startswith(".rescue")] + left_behind("/run", "rescue-home-")
    assert leftovers == []


@pytest.fixture
def mounted_tree(site):
    """A target like /mnt/local during recovery: filesystems already mounted below it, each
    with its lost+found."""
    target = site.tmp / "mnt-local"
    first = Path(str(target) + str(site.tmp))         # a filesystem holding the tree's parent
    inner = Path(str(target) + str(site.src / "dir"))  # and one deeper inside the tree
    mounts = []
    for mountpoint in (first, inner):
        mountpoint.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mountpoint)], check=True)
        mounts.append(mountpoint)
        (mountpoint / "lost+found").mkdir()
    if not inner.exists():
        inner.mkdir(parents=True)
    (target / "lost+found").mkdir()
    yield target, mounts
    for mountpoint in reversed(mounts):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_restore_into_a_tree_of_mounted_filesystems_writes_each_file_onto_its_own(site, mounted_tree):
    target, (first, inner) = mounted_tree
    os.unlink(site.src / "hardlink-at-top")     # hard links never span filesystems
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    tree = restored(site, target)
    assert os.stat(tree / "dir/text.txt").st_dev == os.stat(inner).st_dev
    assert os.stat(tree / "owned").st_dev == os.stat(first).st_dev
    for lost_found in (target, first, inner):
        assert (lost_found / "lost+found").is_dir()
    os.rmdir(inner / "lost+found")              # the original has none there
    assert_same_tree(site.src, tree)


def test_restore_refuses_a_target_with_other_files(site):
    target = site.tmp / "busy"
    (target / "etc").mkdir(parents=True)
    (target / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    proc = site.run("restoreonly", "--target", target, **public_key(site))
    assert_clean_error(proc, "is not empty: etc")


def test_a_target_that_is_a_file_or_below_one_gets_a_clear_error(site):
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    (site.tmp / "a-file").write_text("keep me\n")
    proc = site.run("restoreonly", "--target", site.tmp / "a-file")
    assert_clean_error(proc, "the restore target", "a-file is not a directory")
    proc = site.run("restoreonly", "--target", site.tmp / "a-file/below")
    assert_clean_error(proc, "cannot create the restore target", "a-file/below: Not a directory")
    assert (site.tmp / "a-file").read_text() == "keep me\n"


def test_point_in_time_restore_across_full_and_incrementals(site):
    text = site.src / "dir/random.bin"
    versions = []
    for n in range(3):
        text.write_bytes(f"version {n}\n".encode() * 1000)
        versions.append(text.read_bytes())
        assert site.run("mkbackuponly", **public_key(site)).returncode == 0
        time.sleep(1.1)
    sets = site.status()["chains"][0]["sets"]
    assert [s["type"] for s in sets] == ["full", "incremental", "incremental"]
    for n in (0, 1):
        target = site.tmp / f"as-of-{n}"
        proc = site.run("restoreonly", "--target", target, "--restore-time", sets[n]["time"])
        assert proc.returncode == 0, proc.stderr
        assert (restored(site, target) / "dir/random.bin").read_bytes() == versions[n]
    target = site.tmp / "latest"
    proc = site.run("restoreonly", "--target", target, BACKUP_DUPLICITY_TEMP_RAMDISK="true")
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(site.src, restored(site, target))
    assert not left_behind("/dev/shm", "rescue-restore-")


def test_a_restore_time_before_the_first_backup_is_refused_naming_the_oldest(site):
    """Issue 11 A.3: --restore-time 0, or a time before the first backup, restored the oldest
    backup (exit 0) instead of saying there is none that old."""
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    first = site.status()["chains"][0]["sets"][0]["time"]
    for when in ("0", "2020-01-01"):
        target = site.tmp / f"as-of-{when}"
        proc = site.run("restoreonly", "--target", target, "--restore-time", when)
        assert_clean_error(proc, "there is no backup as old as", f"can be restored as of is {first}")
        assert not target.exists()
    proc = site.run("verify", "--time", "0")
    assert_clean_error(proc, "there is no backup as old as 1970-01-01")
    proc = site.run("restoreonly", "--target", site.tmp / "as-of-first", "--restore-time", first)
    assert proc.returncode == 0, proc.stderr


def test_an_unencrypted_backup_restores_its_latest_and_an_earlier_time(site):
    """--no-encryption: the sets' files have no .gpg, and are sets all the same."""
    settings = dict(BACKUP_DUPLICITY_OPTIONS="--no-encryption")
    assert site.run("mkbackuponly", **settings).returncode == 0
    time.sleep(1.1)
    (site.src / "dir/text.txt").write_text("second\n")
    assert site.run("mkbackuponly").returncode == 0
    first = site.status()["chains"][0]["sets"][0]["time"]
    proc = site.run("restoreonly", "--target", site.tmp / "latest")
    assert proc.returncode == 0, proc.stderr
    assert (restored(site, site.tmp / "latest") / "dir/text.txt").read_text() == "second\n"
    proc = site.run("restoreonly", "--target", site.tmp / "first", "--restore-time", first)
    assert proc.returncode == 0, proc.stderr
    assert (restored(site, site.tmp / "first") / "dir/text.txt").read_text() == "hello world\n" * 100


def test_asked_passphrase_wrong_or_empty_fails_truthfully(site):
    settings = dict(BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one")
    assert site.run("mkbackuponly", **settings).returncode == 0
    asking = dict(BACKUP_DUPLICITY_ASK_PASSPHRASE="true")
    proc = site.run("restoreonly", "--target", site.tmp / "wrong", input="not-the-right-one\n", **asking)
    assert_clean_error(proc, "restore failed (duplicity exit code", "wrong passphrase")
    assert "Enter the duplicity passphrase for the restore [300 secs]:" in proc.stderr
    proc = site.run("restoreonly", "--target", site.tmp / "empty", input="\n")
    assert_clean_error(proc, "no passphrase given: the restore is aborted")
    proc = site.run("--non-interactive", "restoreonly", "--target", site.tmp / "right")
    assert proc.returncode == 0, proc.stderr


def test_a_wrong_configured_passphrase_fails_the_restore_of_a_public_key_backup(site):
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    proc = site.run("restoreonly", "--target", site.tmp / "r", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="wrong-one")
    assert_clean_error(proc, "restore failed", "passphrase")


def duplicity_children(pid):
    """PIDs of the duplicity processes rescue started (they run in a session of their own)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat_fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{entry.name}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat_fields[1]) == pid and b"duplicity" in cmdline:
                found.append(int(entry.name))
    return found


def test_a_backup_killed_halfway_is_resumed_and_restores_completely(site):
    (site.src / "big").mkdir()
    for n in range(12):
        (site.src / "big" / f"chunk{n}").write_bytes(os.urandom(1024 * 1024))
    settings = dict(BACKUP_DUPLICITY_OPTIONS="--volsize 1", **public_key(site))
    site.settings.update(settings)
    site.write_conf()
    env = dict(os.environ, HOME=str(site.home), GNUPGHOME=str(site.gnupghome), TMPDIR=str(site.work))
    proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(site.conf_dir), "mkbackuponly"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(site.target_dir().glob("duplicity-full.*.vol*.difftar.gpg"))) < 4:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    children = duplicity_children(proc.pid)
    for pid in [proc.pid] + children:      # a crash: everything dies at once (rescue first, so it
        os.kill(pid, signal.SIGKILL)       # cannot see duplicity die and exit on its own)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rerun = site.run("mkbackuponly")
    assert rerun.returncode == 0, rerun.stderr
    assert "Resuming the interrupted backup" in rerun.stdout
    target = site.tmp / "after-crash"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(site.src, restored(site, target))


def kill_backup_after(site, pattern, volumes):
    """Start mkbackuponly and SIGKILL it and its duplicity once `volumes` files matching
    pattern are on the target (a crash in the middle of a set)."""
    env = dict(os.environ, HOME=str(site.home), GNUPGHOME=str(site.gnupghome), TMPDIR=str(site.work))
    proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(site.conf_dir), "mkbackuponly"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(site.target_dir().glob(pattern))) < volumes:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    for pid in [proc.pid] + duplicity_children(proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def test_an_interrupted_incremental_restores_the_last_complete_set_with_a_warning(site):
    """Issue 11 A.2: an incremental killed halfway left volumes without a manifest, and a
    restore of the latest backup died in duplicity (AssertionError: No remote manifest name)."""
    site.settings.update(BACKUP_DUPLICITY_OPTIONS="--volsize 1", **public_key(site))
    assert site.run("mkbackuponly").returncode == 0
    complete = site.status()["chains"][0]["sets"][-1]["time"]
    original = site.tmp / "original"
    subprocess.run(["cp", "-a", str(site.src), str(original)], check=True)
    (site.src / "big").mkdir()
    for n in range(8):
        (site.src / "big" / f"chunk{n}").write_bytes(os.urandom(1024 * 1024))
    kill_backup_after(site, "duplicity-inc.*.vol*.difftar.gpg", 2)
    assert not list(site.target_dir().glob("duplicity-inc.*.manifest.gpg"))
    status = site.status()
    assert status["orphaned_or_incomplete"] is True
    target = site.tmp / "restored"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert f"restoring the last complete one, of {complete}" in proc.stderr
    assert_same_tree(original, restored(site, target))
    subprocess.run(["rm", "-rf", str(site.src / "big")], check=True)
    os.utime(site.src, ns=(os.stat(original).st_atime_ns, os.stat(original).st_mtime_ns))
    proc = site.run("verify")
    assert f"verifying the last complete one, of {complete}" in proc.stderr
    inside = str(site.src).lstrip("/")                   # (VAR_DIR changed with the killed run)
    assert [f for f in differences_inside(proc.stdout, site.src) if f.startswith(inside)] == [], proc.stdout
    assert proc.returncode in (0, 1), proc.stderr


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def interrupted_set_after(chain_dir):
    """What a run killed while it stored a set leaves: a volume of a later set, no manifest."""
    volume = sorted(chain_dir.glob("duplicity-full.*.vol1.difftar.gpg"))[-1]
    stamp = volume.name.split(".")[1]
    later = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.mktime(time.strptime(stamp, "%Y%m%dT%H%M%SZ")) + 30))
    (chain_dir / volume.name.replace(stamp, later)).write_bytes(volume.read_bytes())


def test_an_interrupted_layout_set_does_not_stop_a_restore_or_the_layout_fetch(site):
    """Issue 11 A.2, the layout chain: a run stopped while storing the layout leaves a full set
    without a manifest there; duplicity takes it for an orphan (unlike an incremental without
    one), so every restore, which reads the stored plan first, still works."""
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    interrupted_set_after(site.target_dir() / "layout")
    proc = site.run("restoreonly", "--layout-only", "--target", site.tmp / "layout")
    assert proc.returncode == 0, proc.stderr
    assert (site.tmp / "layout/layout/layout.json").is_file()
    proc = site.run("restoreonly", "--target", site.tmp / "restored")
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(site.src, restored(site, site.tmp / "restored"))


def test_duplicity_dies_with_a_killed_rescue_and_a_surviving_one_stops_the_next_run(site):
    """Issue 11 A.5: SIGKILL of rescue left its duplicity children running (sessions of their
    own) with the lock free, and a second run started beside them."""
    (site.src / "big").mkdir()
    for n in range(40):
        (site.src / "big" / f"chunk{n}").write_bytes(os.urandom(1024 * 1024))
    site.settings.update(BACKUP_DUPLICITY_OPTIONS="--volsize 1", **public_key(site))
    site.write_conf()
    env = dict(os.environ, HOME=str(site.home), GNUPGHOME=str(site.gnupghome), TMPDIR=str(site.work))
    proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(site.conf_dir), "mkbackuponly"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(site.target_dir().glob("duplicity-full.*.vol*.difftar.gpg"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    children = duplicity_children(proc.pid)
    assert children
    os.kill(proc.pid, signal.SIGKILL)          # rescue alone
    proc.wait()
    deadline = time.monotonic() + 3
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in children if alive(pid)]
    assert len(list(site.target_dir().glob("duplicity-full.*.vol*.difftar.gpg"))) < 40

    stray = subprocess.Popen([sys.executable, "-m", "duplicity", "full", "--no-encryption", "--archive-dir",
                              str(site.tmp / "stray-cache"), str(site.src / "big"),
                              f"file://{site.target_dir()}/stray"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.kill(stray.pid, signal.SIGSTOP)     # a duplicity of some earlier run, still there
        proc = site.run("mkbackuponly")
        assert_clean_error(proc, f"a duplicity (PID {stray.pid}) is still at work on file://", f"kill {stray.pid}")
    finally:
        stray.kill()
        stray.wait()
    proc = site.run("mkbackuponly")
    assert proc.returncode == 0, proc.stderr
    assert "Resuming the interrupted backup" in proc.stdout


def test_killed_at_five_points_then_every_restore_is_complete_and_status_truthful(site):
    """Issue 11, acceptance: SIGKILL at random points of backups, then a backup and a restore
    of the latest and of each earlier time: every restore complete, status truthful."""
    rng = random.Random(11)
    site.settings.update(BACKUP_DUPLICITY_OPTIONS="--volsize 1", **public_key(site))
    assert site.run("mkbackuponly").returncode == 0
    env = dict(os.environ, HOME=str(site.home), GNUPGHOME=str(site.gnupghome), TMPDIR=str(site.work))
    for n in range(5):
        (site.src / f"chunk{n}").write_bytes(os.urandom(3 << 20))
        proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(site.conf_dir), "mkbackuponly"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 5.0))
        children = duplicity_children(proc.pid)
        proc.kill()                                    # rescue alone: its children die with it
        proc.wait()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if alive(pid)]
    proc = site.run("mkbackuponly")
    assert proc.returncode == 0, proc.stderr
    status = site.status()
    assert status["orphaned_or_incomplete"] is False, status
    assert all(s.get("complete", True) for chain in status["chains"] for s in chain["sets"])
    times = [s["time"] for chain in status["chains"] for s in chain["sets"]]
    assert len(times) >= 2
    latest = site.tmp / "latest"
    proc = site.run("restoreonly", "--target", latest)
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(site.src, restored(site, latest))
    for n, when in enumerate(times[:-1]):
        target = site.tmp / f"as-of-{n}"
        proc = site.run("restoreonly", "--target", target, "--restore-time", when)
        assert proc.returncode == 0, proc.stderr
        assert "incomplete" not in proc.stderr
        tree = restored(site, target)
        assert (tree / "dir/text.txt").read_text() == "hello world\n" * 100
        for chunk in tree.glob("chunk*"):              # what a set has, it has whole
            assert chunk.read_bytes() == (site.src / chunk.name).read_bytes()


def keyring_files(home):
    """The secret keys of a gpg home (how they are protected) and the public keyring, hashed."""
    paths = list((Path(home) / "private-keys-v1.d").iterdir()) + [Path(home) / "pubring.kbx"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def test_the_restore_reprotects_only_its_own_copy_of_the_keyring(site):
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    before = keyring_files(site.gnupghome)
    proc = site.run("restoreonly", "--target", site.tmp / "r")
    assert proc.returncode == 0, proc.stderr
    log = (site.tmp / "log/rescue.log").read_text()
    assert "--passphrase-fd 0 --passwd <GPG_KEY>" in log       # the copy's key, cheaper to unlock
    assert keyring_files(site.gnupghome) == before              # the keyring itself: untouched
    assert not left_behind("/run", "rescue-home-")


def test_with_debug_the_log_names_every_restored_file(site):
    """ReaR's restore logs each file (-v5); rescue does with -d (it costs time)."""
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    proc = site.run("-d", "restoreonly", "--target", site.tmp / "restored")
    assert proc.returncode == 0, proc.stderr
    log = (site.tmp / "log/rescue.log").read_text()
    assert re.search(r"DEBUG Writing .*hardlink-at-top of type reg", log), log[-3000:]


def test_write_progress_tells_what_the_filesystems_gained(tmp_path, capsys):
    log = rescue.Log()
    with rescue.WriteProgress(log, "Restoring", [str(tmp_path)], ansi=False, interval=1, every=0.05) as progress:
        with open(tmp_path / "data", "wb") as f:
            f.write(os.urandom(4 << 20))
        time.sleep(0.3)
    assert progress.written() >= 4 << 20
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(re.match(r"Restoring: [0-9.]+ \w+ written, [0-9.]+ \w+/s, \d+ s$", line) for line in lines)
    with rescue.WriteProgress(log, "Restoring", [str(tmp_path)], ansi=True, interval=0.05):
        time.sleep(0.3)
    log.say("next message")
    out = capsys.readouterr().out
    assert out.startswith("\r\033[KRestoring: ") and out.endswith("\r\033[Knext message\n")


def test_a_killed_runs_work_directories_are_removed_by_the_next_run(tmp_path):
    """SIGKILL leaves the keyring copy in /run; the next run that makes one removes it, and
    leaves alone what belongs to a live run or is not rescue's."""
    dead = tmp_path / "rescue-home-dead"
    live = tmp_path / "rescue-home-live"
    foreign = tmp_path / "rescue-home-foreign"
    for d in (dead, live, foreign):
        (d / ".gnupg").mkdir(parents=True)
    child = subprocess.Popen(["sleep", "30"])
    identity = rescue.process_identity(child.pid)
    child.kill()
    child.wait()
    (dead / rescue.OWNER_FILE).write_text(identity + "\n")
    (live / rescue.OWNER_FILE).write_text(rescue.process_identity(os.getpid()) + "\n")
    with rescue.work_directory("rescue-home-", str(tmp_path)) as mine:
        assert (mine / rescue.OWNER_FILE).read_text().strip() == rescue.process_identity(os.getpid())
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rescue-home-live", "rescue-home-foreign", mine.name])
    assert not mine.exists()


def test_what_the_backup_left_out_is_made_again_empty_with_its_mode_owner_and_times(site):
    cache = site.src / "dir" / "cache"
    cache.mkdir()
    (cache / "big.tmp").write_bytes(b"x" * 1000)
    os.chown(str(cache), 123, 456)
    os.chmod(str(cache), 0o1750)
    os.utime(str(cache), (1_600_000_000, 1_600_000_000))
    os.utime(str(cache.parent), (1_500_000_000, 1_500_000_000))
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_EXCLUDE=[str(cache)], **public_key(site)).returncode == 0
    target = site.tmp / "restored"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    again = restored(site, target) / "dir" / "cache"
    st = os.lstat(str(again))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o1750, 123, 456, 1_600_000_000)
    assert os.listdir(str(again)) == []
    assert os.lstat(str(again.parent)).st_mtime == 1_500_000_000     # making it did not touch its directory
    assert not (target / "proc").exists()           # outside BACKUP_DUPLICITY_INCLUDE: not this backup's
