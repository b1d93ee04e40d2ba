"""Parallel chains: the backup split into the main chain and a few large directories ("parts")
with chains of their own, backed up and restored side by side. Pure planning first, then the
real thing (duplicity, gpg, file:// and rsync over ssh) round trips."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rescue
from backup_fixtures import assert_same_tree
from conftest import RESCUE
from test_restore import duplicity_children, restored
from test_backup import Site, assert_clean_error, differences_inside, public_key

MB = 1024 * 1024


# -- which rules a part's chain gets ------------------------------------------------------------

def test_part_rules_keep_what_is_inside_drop_the_rest_and_stop_at_the_covering_include():
    args = ["--exclude", "/root/.cache/duplicity", "--exclude", "/srv/data/tmp",
            "--exclude", "/srv/data/**/*.o", "--exclude", "/var/cache", "--include", "/srv",
            "--exclude", "/srv/data/late", "--exclude", "**"]
    assert rescue.part_selection(args, "/srv/data") == [
        "--exclude", "/srv/data/tmp", "--exclude", "/srv/data/**/*.o"]


def test_a_part_that_is_excluded_or_under_a_wildcard_or_a_relative_pattern_is_refused():
    assert rescue.part_selection(["--exclude", "/srv"], "/srv/data") is None
    assert rescue.part_selection(["--exclude", "/srv/data"], "/srv/data") is None
    assert rescue.part_selection(["--exclude", "/srv/*/tmp"], "/srv/data") is None
    assert rescue.part_selection(["--exclude", "**/.cache"], "/srv/data") is None
    assert rescue.part_selection(["--exclude", "ignorecase:/SRV"], "/srv/data") is None
    # only reached when nothing before included it: everything else is excluded
    assert rescue.part_selection(["--include", "/home", "--exclude", "**"], "/srv/data") is None
    # the default (no includes): everything is backed up
    assert rescue.part_selection(["--exclude", "/proc"], "/srv/data") == []


def test_subtree_sizes_add_up_to_each_ancestor():
    direct = {"/": 1, "/a": 10, "/a/b": 100, "/a/b/c": 1000, "/d": 5}
    assert rescue.subtree_sizes(direct) == {"/": 1116, "/a": 1110, "/a/b": 1100, "/a/b/c": 1000, "/d": 5}


def tree(**sizes):
    return rescue.subtree_sizes({path.replace("_", "/"): n for path, n in sizes.items()})


def test_plan_splits_the_largest_directories_until_the_main_chain_is_half_a_share():
    # the benchmark's shape: four directories of 200-300 MB under one root
    direct = {"/d": 0, "/d/random": 308 * MB, "/d/text": 308 * MB, "/d/small": 1 * MB,
              "/d/small/a": 125 * MB, "/d/small/b": 126 * MB, "/d/blocks": 205 * MB}
    totals = rescue.subtree_sizes(direct)
    parts = rescue.plan_parts(totals, ["/d"], 2, lambda p: True, 64 * MB)
    assert parts == ["/d/random", "/d/small", "/d/text"]
    # what is left for the main chain: /d/blocks, at most half of one worker's share
    assert totals["/d"] - sum(totals[p] for p in parts) <= totals["/d"] / 2 / 2


def test_plan_is_empty_for_one_worker_small_data_or_nothing_eligible():
    totals = rescue.subtree_sizes({"/d": 0, "/d/a": 500 * MB, "/d/b": 500 * MB})
    assert rescue.plan_parts(totals, ["/d"], 1, lambda p: True, 64 * MB) == []
    assert rescue.plan_parts(totals, ["/d"], 2, lambda p: True, 600 * MB) == []
    assert rescue.plan_parts(totals, ["/d"], 2, lambda p: False, 64 * MB) == []


def test_plan_looks_below_an_ineligible_directory_and_takes_a_big_leaf_whole():
    totals = rescue.subtree_sizes({"/": 0, "/mnt": 0, "/mnt/x": 900 * MB, "/big": 1000 * MB})
    eligible = lambda p: p != "/mnt"      # e.g. a mountpoint below it   # noqa: E731
    assert rescue.plan_parts(totals, ["/"], 2, eligible, 64 * MB) == ["/big", "/mnt/x"]


def test_part_eligibility_refuses_mountpoints_and_rescues_own_files():
    args = ["--exclude", "/proc"]
    assert rescue.part_eligible("/srv", args, ["/", "/srv/mnt"], []) is False
    assert rescue.part_eligible("/srv/mnt", args, ["/", "/srv/mnt"], []) is False
    assert rescue.part_eligible("/root/.cache/duplicity/x", args, ["/"], ["/root/.cache/duplicity"]) is False
    assert rescue.part_eligible("/srv/data", args, ["/", "/srv/mnt"], []) is True


def test_chains_the_main_one_excludes_the_parts_each_part_is_its_own_source():
    selection = rescue.Selection("/", ["--exclude", "/proc"], [], ["/"])
    totals = {"/": 1000, "/srv/a*b": 300, "/home/x": 200}
    chains = rescue.backup_chains("rsync://h//b/host", selection, ["/home/x", "/srv/a*b"], totals)
    assert [c.label for c in chains] == ["main", "/home/x", "/srv/a*b"]
    assert chains[0].selection.args == ["--exclude", "/home/x", "--exclude", "/srv/a[*]b", "--exclude", "/proc"]
    assert chains[0].url == "rsync://h//b/host" and chains[0].size == 500
    part = chains[2]
    assert part.selection.source == "/srv/a*b" and part.selection.args == []
    assert part.url == "rsync://h//b/host/" + rescue.part_id("/srv/a*b") and part.name_suffix == "-" + rescue.part_id("/srv/a*b")


@pytest.mark.parametrize("text", ['["/srv"]', '{"parts": "/srv"}', '{"parts": [1]}', '{"workers": "2"}', "null"])
def test_a_parts_plan_of_the_wrong_shape_is_a_clear_error(tmp_path, text):
    """Issue 11 B: valid JSON of the wrong shape ended in 'internal error'."""
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(rescue.RescueError, match="not a plan of chains as rescue writes it"):
        rescue.read_parts_plan(tmp_path / "plan.json")


def test_statistics_of_chains_side_by_side_add_up_and_span_all_of_them():
    merged = rescue.merge_statistics([
        {"StartTime": 100.0, "EndTime": 110.0, "ElapsedTime": 10.0, "SourceFiles": 3, "Errors": 0},
        {"StartTime": 101.0, "EndTime": 115.5, "ElapsedTime": 14.5, "SourceFiles": 4, "Errors": 1}])
    assert merged == {"StartTime": 100.0, "EndTime": 115.5, "ElapsedTime": 15.5, "SourceFiles": 7, "Errors": 1}


def test_parallel_workers_auto_is_the_cpus_at_most_four_and_bad_values_are_refused():
    config = rescue.config_from_values({"BACKUP_DUPLICITY_PARALLEL": "auto"})
    assert rescue.parallel_workers(config) == max(1, min(os.cpu_count(), 4))
    assert rescue.parallel_workers(rescue.config_from_values({"BACKUP_DUPLICITY_PARALLEL": "3"})) == 3
    with pytest.raises(rescue.ConfigError, match="BACKUP_DUPLICITY_PARALLEL"):
        rescue.config_from_values({"BACKUP_DUPLICITY_PARALLEL": "0"})


def test_tasks_run_side_by_side_in_order_of_results_and_the_first_error_is_raised():
    log = rescue.Log()
    runner = rescue.Runner(log)
    started = time.monotonic()
    results = rescue.in_parallel(runner, [lambda n=n: runner.run(["sleep", "1"]) and n for n in range(4)], 2)
    assert results == [0, 1, 2, 3]
    assert time.monotonic() - started < 3.5          # two at a time: 2 s, not 4

    def boom():
        raise rescue.RescueError("chain 2 failed")
    with pytest.raises(rescue.RescueError, match="chain 2 failed"):
        rescue.in_parallel(runner, [lambda: 1, boom, lambda: 3], 2)


# -- the real thing ---------------------------------------------------------------------------

def add_parts(src):
    """Two directories big enough (by file size: sparse, so cheap) to get chains of their own."""
    for name, size in (("part-a", 8), ("part-b/sub", 9)):
        directory = src / name
        directory.mkdir(parents=True)
        with open(directory / "blob", "wb") as f:
            f.truncate(size * MB)
            f.seek(MB)
            f.write(name.encode() * 1000)
        (directory / "small.txt").write_text(f"{name}\n")
        os.utime(directory / "blob", (1_600_000_000, 1_500_000_000))
    os.link(src / "part-a/small.txt", src / "part-a/hardlink.txt")
    os.utime(src / "part-b", (1_600_000_000, 1_500_000_000))
    os.utime(src, (1_600_000_000, 1_500_000_000))


@pytest.fixture
def split_site(tmp_path, conf_dir, gnupg_keys):
    site = Site(tmp_path, conf_dir, gnupg_keys)
    add_parts(site.src)
    site.settings.update(BACKUP_DUPLICITY_PARALLEL="2", BACKUP_DUPLICITY_PART_MIN_MB="0", **public_key(site))
    return site


def test_split_backup_restores_every_attribute_and_keeps_each_part_in_its_own_chain(split_site):
    site = split_site
    proc = site.run("mkbackuponly")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((site.var / "backup-parts.json").read_text())
    parts = [str(site.src / "part-a"), str(site.src / "part-b")]
    assert plan["parts"] == parts and plan["workers"] == 2
    assert "Backing up in 3 chains side by side" in proc.stdout
    for part in parts:
        assert any(n.startswith("duplicity-full.") for n in os.listdir(site.target_dir() / rescue.part_id(part)))
    record = json.loads((site.var / "last-backup.json").read_text())
    assert record["kind"] == "full" and len(record["chains"]) == 3
    status = site.status()
    assert [p["path"] for p in status["parts"]] == parts
    assert all(p["chains"][0]["sets"][0]["type"] == "full" for p in status["parts"])
    run_times = {p["chains"][0]["sets"][0]["time"] for p in status["parts"] + [status]}
    assert len(run_times) == 1                       # one run, one time in every chain

    target = site.tmp / "restored"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert "The backup has 2 more chains (parts), restored alongside" in proc.stdout
    assert_same_tree(site.src, restored(site, target))
    assert not [p for p in os.listdir(target) if p.startswith(".rescue")]

    proc = site.run("verify", "--compare-data")
    assert differences_inside(proc.stdout, site.src) == [], proc.stdout    # (its parents' mtimes differ)
    (site.src / "part-b/sub/small.txt").write_text("changed after the backup\n")
    proc = site.run("verify", "--compare-data")
    assert proc.returncode == 1, proc.stdout
    assert differences_inside(proc.stdout, site.src) == [str(site.src / "part-b/sub/small.txt").lstrip("/")]


def test_parts_go_on_with_incrementals_and_a_retired_part_restores_as_of_its_time(split_site):
    site = split_site
    assert site.run("mkbackuponly").returncode == 0
    first = site.status()["chains"][0]["sets"][0]["time"]
    time.sleep(1.1)
    (site.src / "part-a/small.txt").write_text("second version\n")
    assert site.run("mkbackuponly").returncode == 0
    status = site.status()
    part_a = status["parts"][0]
    assert [s["type"] for s in part_a["chains"][0]["sets"]] == ["full", "incremental"]
    time.sleep(1.1)
    old_b = site.src.parent / "old-part-b"
    os.rename(site.src / "part-b", old_b)                # part-b is gone: its chain is retired
    assert site.run("mkbackuponly").returncode == 0
    plan = json.loads((site.var / "backup-parts.json").read_text())
    assert plan["parts"] == [str(site.src / "part-a")] and plan["retired"] == [str(site.src / "part-b")]

    latest = site.tmp / "latest"
    assert site.run("restoreonly", "--target", latest).returncode == 0
    assert not (restored(site, latest) / "part-b").exists()
    assert (restored(site, latest) / "part-a/small.txt").read_text() == "second version\n"

    as_of_first = site.tmp / "as-of-first"
    proc = site.run("restoreonly", "--target", as_of_first, "--restore-time", first)
    assert proc.returncode == 0, proc.stderr
    tree = restored(site, as_of_first)
    assert (tree / "part-a/small.txt").read_text() == "part-a\n"
    assert (tree / "part-b/sub/small.txt").read_text() == "part-b/sub\n"
    assert (tree / "part-b/sub/blob").stat().st_size == 9 * MB


def set_seconds(chain):
    return [datetime.datetime.fromisoformat(s["time"]).timestamp() for s in chain["sets"]]


def test_a_restore_as_of_a_time_a_part_has_no_set_for_fails_naming_the_part(split_site):
    """Issue 11 A.3: a restore as of a time one part's chain no longer kept restored the main
    chain and left the part out (exit 0)."""
    site = split_site
    assert site.run("mkbackuponly").returncode == 0
    first = site.status()["chains"][0]["sets"][0]["time"]
    time.sleep(1.1)
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN="1s").returncode == 0
    part_a = site.target_dir() / rescue.part_id(str(site.src / "part-a"))
    oldest_full = sorted(part_a.glob("duplicity-full.*.manifest.gpg"))[0].name.split(".")[1]
    for path in part_a.glob(f"duplicity-full*.{oldest_full}.*"):
        path.unlink()                                   # part-a's first chain is gone
    second = site.status()["parts"][0]["chains"][0]["sets"][0]["time"]
    proc = site.run("restoreonly", "--target", site.tmp / "as-of-first", "--restore-time", first)
    assert_clean_error(proc, f"the part {site.src / 'part-a'} has no backup as old as",
                       f"the whole backup can be restored as of is {second}")
    assert not [p for p in os.listdir(site.tmp / "as-of-first") if p != "lost+found"] if (
        site.tmp / "as-of-first").exists() else True


def test_retention_keeps_what_a_restore_of_every_kept_time_takes_from_each_part(split_site):
    """Issue 11 A.3: the retention rules, counted chain by chain, removed a part's sets that
    a restore as of a time the main chain still kept needed."""
    site = split_site
    small = site.src / "part-a/small.txt"
    small.write_text("run 1\n")
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_PARALLEL="1").returncode == 0     # main: full
    time.sleep(15)
    small.write_text("run 2\n")
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_PARALLEL="2").returncode == 0     # parts: full; main: inc
    time.sleep(15)
    t1, t2 = set_seconds(site.status()["chains"][0])
    between = int(time.time() - (t1 + t2) / 2)            # older than main's full, younger than the parts'
    small.write_text("run 3\n")
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN=f"{between}s").returncode == 0
    time.sleep(15)
    status = site.status()
    t3 = set_seconds(status["chains"][-1])[0]
    assert [len(c["sets"]) for c in status["chains"]] == [2, 1]
    between = int(time.time() - (t2 + t3) / 2)            # older than the parts' full, younger than main's
    small.write_text("run 4\n")
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN=f"{between}s").returncode == 0
    status = site.status()
    assert [len(c["sets"]) for c in status["chains"]] == [2, 2]
    assert [len(c["sets"]) for c in status["parts"][0]["chains"]] == [2, 1]
    small.write_text("run 5\n")
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN="", BACKUP_DUPLICITY_MAX_SETS="1")
    assert proc.returncode == 0, proc.stderr
    status = site.status()
    assert set_seconds(status["chains"][0])[0] == t3           # main: its last chain, from run 3
    as_of = rescue.iso_time(t3 + 5)                             # (the chains of one run start apart)
    target = site.tmp / "as-of-run-3"
    proc = site.run("restoreonly", "--target", target, "--restore-time", as_of)
    assert proc.returncode == 0, proc.stderr
    assert (restored(site, target) / "part-a/small.txt").read_text() == "run 3\n"


def test_retention_keeps_the_plan_and_the_retired_part_a_restore_of_the_oldest_time_needs(split_site):
    """Issue 11 A.3, the layout chain: remove-older-than on it, by itself, took the stored plan
    of the main chain's oldest time (and the retired part's chain went by the same rule), so
    a restore as of that time silently left the retired part out."""
    site = split_site
    assert site.run("mkbackuponly").returncode == 0
    first = site.status()["chains"][0]["sets"][0]["time"]
    time.sleep(1.1)
    os.rename(site.src / "part-b", site.src.parent / "old-part-b")      # retired: a new plan is stored
    assert site.run("mkbackuponly").returncode == 0
    second = site.status()["chains"][0]["sets"][1]["time"]
    time.sleep(1.1)
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_MAX_TIME=second)
    assert proc.returncode == 0, proc.stderr
    assert site.status()["chains"][0]["sets"][0]["time"] == first         # main still has the first run
    target = site.tmp / "as-of-first"
    proc = site.run("restoreonly", "--target", target, "--restore-time", first)
    assert proc.returncode == 0, proc.stderr
    assert (restored(site, target) / "part-b/sub/small.txt").read_text() == "part-b/sub\n"


def test_verify_as_of_a_time_checks_the_chains_of_that_backup_not_todays_plan(split_site):
    site = split_site
    assert site.run("mkbackuponly").returncode == 0
    first = site.status()["chains"][0]["sets"][0]["time"]
    time.sleep(1.1)
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_PARALLEL="1").returncode == 0     # one chain now
    assert json.loads((site.var / "backup-parts.json").read_text())["parts"] == []
    src = str(site.src).lstrip("/") + "/"
    for args in (["--time", first], []):
        proc = site.run("verify", *args)
        # with this machine's plan (no parts) the parts' files would be new to the first backup
        lines = [line for line in proc.stdout.splitlines() if "Difference found" in line and src in line]
        assert lines == [], proc.stdout
        assert "Verify: 0 files" not in proc.stdout


def test_split_backup_over_rsync_and_ssh_shares_one_connection_and_leaves_no_ssh_behind(
        tmp_path, conf_dir, gnupg_keys, sshd_server):
    port, ssh_options = sshd_server.port, sshd_server.ssh_options
    before = ssh_sharing_now()
    site = Site(tmp_path, conf_dir, gnupg_keys, url=f"rsync://root@127.0.0.1:{port}/{tmp_path}/target")
    add_parts(site.src)
    site.settings.update(BACKUP_DUPLICITY_PARALLEL="2", BACKUP_DUPLICITY_PART_MIN_MB="0",
                         BACKUP_DUPLICITY_SSH_OPTIONS=ssh_options, **public_key(site))
    proc = site.run("mkbackuponly")
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "r"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(site.src, restored(site, target))
    log = (tmp_path / "log/rescue.log").read_text()
    assert "-oControlMaster=auto -oControlPath=/tmp/rescue-ssh-" in log      # it was shared
    assert ssh_sharing_now() == before                  # and ended: no socket directory, no master


def ssh_sharing_now():
    """rescue's ssh connection-sharing directories, and the ssh masters using them."""
    directories = {p for p in os.listdir("/tmp") if p.startswith("rescue-ssh-")}
    masters = {line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
               if "rescue-ssh-" in line}
    return directories, masters


def test_sigterm_during_a_split_backup_stops_every_duplicity_and_a_rerun_completes(split_site):
    site = split_site
    (site.src / "part-a/random").write_bytes(os.urandom(6 * MB))    # something to be busy with
    site.settings.update(BACKUP_DUPLICITY_OPTIONS="--volsize 1")
    site.write_conf()
    env = dict(os.environ, HOME=str(site.home), GNUPGHOME=str(site.gnupghome), TMPDIR=str(site.work))
    proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(site.conf_dir), "mkbackuponly"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part_a = site.target_dir() / rescue.part_id(str(site.src / "part-a"))
    deadline = time.monotonic() + 120
    while not list(part_a.glob("duplicity-full.*.vol1.difftar.gpg")):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    children = duplicity_children(proc.pid)
    assert children
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "rescue: error: stopped by SIGTERM" in err and "Traceback" not in err
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert alive == []
    assert not list(site.work.glob("rescue-backup-*"))                # its work directory is gone
    assert not list((site.home / ".cache/duplicity").glob("*/duplicity-*-tempdir"))   # and duplicity's (issue 11 C)
    rerun = site.run("mkbackuponly")
    assert rerun.returncode == 0, rerun.stderr
    target = site.tmp / "after-sigterm"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(site.src, restored(site, target))


def test_split_restore_into_a_tree_of_mounted_filesystems_puts_each_part_onto_its_own(split_site):
    site = split_site
    os.unlink(site.src / "hardlink-at-top")          # hard links never span filesystems
    assert site.run("mkbackuponly").returncode == 0
    target = site.tmp / "mnt-local"
    first = Path(str(target) + str(site.tmp))        # holds the whole tree, parts included
    inner = Path(str(target) + str(site.src / "part-b"))   # part-b's parent is on first; this is deeper
    mounts = []
    try:
        for mountpoint in (first, Path(str(target) + str(site.src / "dir"))):
            mountpoint.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mountpoint)], check=True)
            mounts.append(mountpoint)
            (mountpoint / "lost+found").mkdir()
        (target / "lost+found").mkdir()
        proc = site.run("restoreonly", "--target", target)
        assert proc.returncode == 0, proc.stderr
        tree = restored(site, target)
        for part in ("part-a", "part-b/sub"):
            assert os.stat(tree / part / "small.txt").st_dev == os.stat(first).st_dev
        assert os.stat(inner).st_dev == os.stat(first).st_dev
        assert not [p for p in os.listdir(first) if p.startswith(".rescue")]
        os.rmdir(mounts[1] / "lost+found")               # the original has none there
        assert_same_tree(site.src, tree)
    finally:
        for mountpoint in reversed(mounts):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("guess", [["part-a"], ["part-a", "dir"]], ids=["fewer-parts", "a-part-without-chain"])
def test_a_restore_that_guessed_the_wrong_plan_restores_the_stored_one(split_site, guess):
    """restoreonly starts this machine's own parts at once, beside reading the stored plan;
    when the two differ (another machine backed up last, the plan was edited), the stored
    plan decides and what was restored for the guess is thrown away."""
    site = split_site
    assert site.run("mkbackuponly").returncode == 0
    plan_file = site.var / "backup-parts.json"
    plan = json.loads(plan_file.read_text())
    plan["parts"] = [str(site.src / name) for name in guess]
    plan_file.write_text(json.dumps(plan))
    target = site.tmp / "restored"
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    assert "The stored plan of chains differs from this machine's" in proc.stdout
    assert not [p for p in os.listdir(target) if p.startswith(".rescue")]
    assert_same_tree(site.src, restored(site, target))


def test_chains_asking_for_ssh_options_at_once_share_one_connection_directory():
    """The restore's first duplicity runs start in threads at the same moment: each asks for
    the ssh options; a lazily made directory must be made once (it leaked, empty, before)."""
    import threading
    sharing = rescue.SshSharing()
    config = rescue.config_from_values({"BACKUP_DUPLICITY_URL": "rsync://root@backup.example//srv/b",
                            "BACKUP_DUPLICITY_SSH_OPTIONS": ""})
    barrier = threading.Barrier(16)
    seen = []

    def ask():
        barrier.wait()
        seen.append(sharing.options(config))

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    directory = sharing.directory
    assert len(set(seen)) == 1 and f"-oControlPath={directory}/%C" in seen[0]
    sharing.close(rescue.Runner(rescue.Log()))
    assert not os.path.exists(directory) and sharing.directory is None


def test_a_restore_that_failed_restores_only_its_unfinished_chains_when_run_again(split_site):
    """The main chain cannot be read (a volume is away): the parts, restored completely, stay
    with their record; the next run takes them and restores the main chain alone. A part
    whose chain changed since (a new backup) is restored again."""
    site = split_site
    assert site.run("mkbackuponly").returncode == 0
    volume = next(p for p in (site.target_dir()).iterdir() if p.name.startswith("duplicity-full.")
                  and ".vol1." in p.name)
    away = site.tmp / volume.name
    target = site.tmp / "restored"
    (target / ".rescue-restore-killed").mkdir(parents=True)            # left by a killed run
    os.rename(volume, away)
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    kept = sorted(p for p in os.listdir(target) if p.startswith(".rescue"))
    assert len(kept) == 4 and all(p.startswith(".rescue-part-") for p in kept), kept    # 2 parts, 2 records
    assert not (restored(site, target) / "part-a").exists()

    os.rename(away, volume)
    proc = site.run("restoreonly", "--target", target)
    assert proc.returncode == 0, proc.stderr
    for part in ("part-a", "part-b"):
        assert f"{site.src / part}: restored completely by an interrupted run, taken as it is" in proc.stdout
    run_log = (site.tmp / "log/rescue.log").read_text()        # this run's
    restores = [line for line in run_log.splitlines() if "' restore -v" in line]     # duplicity's argv
    assert len(restores) == 2, restores         # the layout chain (the stored plan) and the main chain
    assert not [line for line in restores for part in ("part-a", "part-b")
                if rescue.part_id(str(site.src / part)) in line]
    assert_same_tree(site.src, restored(site, target))
    assert not [p for p in os.listdir(target) if p.startswith(".rescue")]

    # a record of a part whose chain has another set now is not taken
    again = site.tmp / "again"
    assert site.run("restoreonly", "--target", again).returncode == 0
    staging = rescue.part_staging(str(again), str(site.src / "part-a"))
    staging.mkdir()
    (staging / "stale").write_text("from an older backup\n")
    record = {"part": str(site.src / "part-a"), "url": "elsewhere", "time": None, "sets": []}
    Path(str(staging) + rescue.PART_DONE).write_text(json.dumps(record))
    shutil_target = site.tmp / "third"
    os.rename(again, shutil_target)
    for entry in os.listdir(shutil_target):
        if not entry.startswith(".rescue"):
            subprocess.run(["rm", "-rf", str(shutil_target / entry)], check=True)
    proc = site.run("restoreonly", "--target", shutil_target)
    assert proc.returncode == 0, proc.stderr
    assert "taken as it is" not in proc.stdout
    assert not (restored(site, shutil_target) / "part-a/stale").exists()
    assert_same_tree(site.src, restored(site, shutil_target))
