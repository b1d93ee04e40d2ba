"""Backups with the real duplicity, gpg, rsync and an sshd of our own: the pure command
builders without processes first, then mkbackuponly / status / verify end to end."""

import fcntl
import json
import os
import stat
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import rescue
from backup_fixtures import ENC_PASSPHRASE, SIGN_PASSPHRASE, make_tree
from conftest import RESCUE, run_rescue

HOST = socket.gethostname()
DATA = Path(__file__).parent / "data"


def config(text="", **values):
    """A Config as load_config would give, from KEY=value pairs (lists stay arrays)."""
    merged = {"BACKUP_DUPLICITY_NAME": "rear-backup", "VAR_DIR": "/var/lib/rescue"}
    merged.update(values)
    return rescue.config_from_values(merged)


# -- selection --------------------------------------------------------------------------------

def test_scope_is_the_layouts_mounts_and_every_other_mount_is_left_out_with_a_reason():
    mounted = [{"target": "/", "fstype": "xfs"}, {"target": "/proc", "fstype": "proc"},
               {"target": "/boot", "fstype": "xfs"}, {"target": "/mnt/nfs", "fstype": "nfs4"},
               {"target": "/proc", "fstype": "proc"}]
    in_scope, excluded = rescue.backup_scope(["/boot", "/"], {"/mnt/nfs": "network filesystem (nfs4)"}, mounted)
    assert in_scope == ["/", "/boot"]
    assert excluded == [("/mnt/nfs", "network filesystem (nfs4)"), ("/proc", "proc filesystem, not in the layout")]


def test_mount_rules_are_deepest_first_and_skip_nested_exclusions():
    rules = rescue.mount_rules(["/", "/srv/data", "/boot"],
                               [("/proc", "proc"), ("/sys", "sysfs"), ("/sys/fs/cgroup", "cgroup"),
                                ("/srv", "nfs"), ("/srv/data/tmp", "tmpfs")])
    assert rules == ["--exclude", "/srv/data/tmp", "--include", "/srv/data",
                     "--exclude", "/proc", "--exclude", "/srv", "--exclude", "/sys"]


def test_selection_orders_own_files_layout_user_patterns_mounts_and_includes():
    conf = config(BACKUP_DUPLICITY_EXCLUDE=["/tmp", "**/.cache"], VAR_DIR="/var/lib/rescue",
                  LAYOUT_DIR="/var/lib/rescue/layout")
    selection = rescue.backup_selection(["/", "/bo*t"], [("/proc", "proc")], conf,
                                        ["/root/.cache/duplicity", "/srv/back[up]"])
    assert selection.source == "/"
    assert selection.args == [
        "--exclude", "/root/.cache/duplicity", "--exclude", "/srv/back[[]up]",
        "--include", "/var/lib/rescue", "--include", "/var/lib/rescue/layout",
        "--exclude", "/tmp", "--exclude", "**/.cache",
        "--exclude", "/proc"]
    assert ("/proc", "proc") in selection.excluded


def test_selection_with_includes_backs_up_only_them_and_the_layout():
    conf = config(BACKUP_DUPLICITY_INCLUDE=["/etc", "/home/*/work"], LAYOUT_DIR="/srv/layout")
    selection = rescue.backup_selection(["/"], [], conf, [])
    assert selection.args[-6:] == ["--include", "/etc", "--include", "/home/*/work", "--exclude", "**"]
    assert selection.roots == ["/etc", "/home", "/var/lib/rescue", "/srv/layout"]


def test_glob_escape_matches_only_the_path_itself():
    assert rescue.glob_escape("/mnt/a*b?[c]") == "/mnt/a[*]b[?][[]c]"


# -- encryption, retention, command lines -----------------------------------------------------

def test_public_key_encryption_with_several_keys_hidden_key_and_signing():
    conf = config(BACKUP_DUPLICITY_GPG_ENC_KEY="AAAA BBBB", BACKUP_DUPLICITY_GPG_HIDDEN_ENC_KEY="CCCC",
                  BACKUP_DUPLICITY_GPG_SIGN_KEY="DDDD", BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE="s3")
    crypt = rescue.encryption(conf, "p1")
    assert crypt.args == ["--encrypt-key", "AAAA", "--encrypt-key", "BBBB",
                          "--hidden-encrypt-key", "CCCC", "--sign-key", "DDDD"]
    assert crypt.env == {"PASSPHRASE": "p1", "SIGN_PASSPHRASE": "s3"}
    assert "p1" not in crypt.args and "s3" not in crypt.args


def test_symmetric_encryption_has_no_key_options_and_nothing_configured_is_refused():
    assert rescue.encryption(config(), "pw").args == []
    with pytest.raises(rescue.ConfigError, match="no encryption is configured"):
        rescue.encryption(config(), "")
    unencrypted = rescue.encryption(config(BACKUP_DUPLICITY_OPTIONS="--no-encryption"), "")
    assert unencrypted.args == [] and unencrypted.env == {}


def test_symmetric_signing_needs_the_same_passphrase_as_duplicity_demands():
    conf = config(BACKUP_DUPLICITY_GPG_SIGN_KEY="DDDD", BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE="other")
    with pytest.raises(rescue.ConfigError, match="symmetric encryption"):
        rescue.encryption(conf, "pw")
    assert rescue.encryption(config(BACKUP_DUPLICITY_GPG_SIGN_KEY="DDDD"), "pw").env["SIGN_PASSPHRASE"] == "pw"


def test_retention_commands_in_order_each_only_when_set():
    assert rescue.retention_commands(config()) == []
    conf = config(BACKUP_DUPLICITY_MAX_SETS="4", BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL="3",
                  BACKUP_DUPLICITY_MAX_TIME="1Y")
    assert rescue.retention_commands(conf) == [
        ["remove-all-but-n-full", "4", "--force"], ["remove-all-inc-of-but-n-full", "3", "--force"],
        ["remove-older-than", "1Y", "--force"]]


@pytest.mark.parametrize("name,value", [("BACKUP_DUPLICITY_MAX_SETS", "three"),
                                        ("BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL", "0"),
                                        ("BACKUP_DUPLICITY_MAX_TIME", "1 year")])
def test_bad_retention_values_are_refused_naming_the_variable(name, value):
    with pytest.raises(rescue.ConfigError, match=name):
        rescue.retention_commands(config(**{name: value}))


def test_restore_time_accepts_rears_form_and_duplicity_times():
    assert rescue.restore_time(config(BACKUP_DUPLICITY_RESTORE_TIME="--restore-time=1D"), None) == "1D"
    assert rescue.restore_time(config(), "2026-01-05T17:56:18+01:00") == "2026-01-05T17:56:18+01:00"
    assert rescue.restore_time(config(), None) is None


def test_backup_command_matches_rears_shape_with_tuning_before_user_options():
    conf = config(BACKUP_DUPLICITY_TUNING="--volsize 200", BACKUP_DUPLICITY_OPTIONS="--volsize 50",
                  BACKUP_DUPLICITY_FULL_IF_OLDER_THAN="1M", BACKUP_DUPLICITY_SSH_OPTIONS="-p 22 -i /k")
    selection = rescue.Selection("/", ["--exclude", "/proc"], [], ["/"])
    crypt = rescue.Encryption(["--encrypt-key", "KEY"], {"PASSPHRASE": "x"}, ["KEY"])
    opts = rescue.duplicity_options(conf, crypt, "/a", "-p 22 -i /k", "rsync://u@h//b/host")
    argv = rescue.backup_command(opts, selection, "rsync://u@h//b/host", "/t",
                                 full_if_older=conf.setting("BACKUP_DUPLICITY_FULL_IF_OLDER_THAN"))
    key = rescue.target_key("rsync://u@h//b/host")
    assert argv == ["-v5", "--name", f"rear-backup-{key}", "--archive-dir", "/a", "--tempdir", "/t",
                    "--ssh-options=-p 22 -i /k", "--volsize", "200", "--volsize", "50",
                    "--encrypt-key", "KEY", "--full-if-older-than", "1M",
                    "--exclude", "/proc", "/", "rsync://u@h//b/host"]


def test_every_other_command_line_is_built_from_the_same_options():
    crypt = rescue.Encryption(["--encrypt-key", "KEY"], {"PASSPHRASE": "x"}, ["KEY"])
    opts = rescue.duplicity_options(config(BACKUP_DUPLICITY_TUNING=[]), crypt, "/a", "", "file:///b/h")
    common = ["--name", f"rear-backup-{rescue.target_key('file:///b/h')}-x", "--archive-dir", "/a",
              "--encrypt-key", "KEY"]
    assert rescue.status_command(opts, "file:///b/h", "-x") == ["collection-status", "-v4"] + common + ["file:///b/h"]
    assert rescue.retention_command(opts, ["remove-older-than", "1Y", "--force"], "file:///b/h", "-x") == \
        ["remove-older-than", "1Y", "--force", "-v4"] + common + ["file:///b/h"]
    selection = rescue.Selection("/srv", ["--exclude", "/srv/x"], [], ["/srv"])
    verify = rescue.verify_command(opts, selection, "file:///b/h", "/t", "2D", "-x")
    assert verify[:5] == ["verify", "-v4", "--compare-data", "--restore-time", "2D"]
    assert verify[-4:] == ["--exclude", "/srv/x", "file:///b/h", "/srv"]
    store = rescue.layout_store_command(opts, "/stage", "file:///b/h", "/t")
    assert store[:3] == ["full", "-v4", "--allow-source-mismatch"] and store[-2:] == ["/stage", "file:///b/h/layout"]
    assert f"rear-backup-{rescue.target_key('file:///b/h')}-layout" in store
    other = rescue.duplicity_options(config(BACKUP_DUPLICITY_TUNING=[]), crypt, "/a", "", "file:///c/h")
    assert other.name != opts.name                   # each target its own cache


def test_options_as_an_array_keep_spaces_inside_one_option():
    conf = config(BACKUP_DUPLICITY_OPTIONS=["--ssh-options=-i /root/my key", "--num-retries=2"])
    assert conf.setting("BACKUP_DUPLICITY_OPTIONS") == ["--ssh-options=-i /root/my key", "--num-retries=2"]


def test_restore_command_forces_numeric_owners_and_renames_mountpoints():
    crypt = rescue.Encryption([], {"PASSPHRASE": "x"}, [])
    opts = rescue.duplicity_options(config(), crypt, "/w/a", "", "file:///b/h")
    argv = rescue.restore_command(opts, "file:///b/h", "/mnt/local/.s", "/w", "1D", [("boot", "../boot")])
    assert argv[:4] == ["restore", "-v4", "--force", "--numeric-owner"]
    assert argv[-7:] == ["--restore-time", "1D", "--rename", "boot", "../boot", "file:///b/h", "/mnt/local/.s"]
    each_file = rescue.restore_command(opts, "file:///b/h", "/t", "/w", None, each_file=True)
    assert each_file[:2] == ["restore", "-v5"]


def test_ssh_mkdir_uses_the_url_itself():
    assert rescue.ssh_mkdir_command("rsync://root@192.168.122.1//apps/export/ReaR/alma", "") == [
        "ssh", "-oBatchMode=yes", "root@192.168.122.1", "mkdir -p -- /apps/export/ReaR/alma"]
    assert rescue.ssh_mkdir_command("sftp://bk@host:2222/rel dir/x", "-F /c") == [
        "ssh", "-oBatchMode=yes", "-p", "2222", "-F", "/c", "bk@host", "mkdir -p -- 'rel dir/x'"]
    assert rescue.ssh_mkdir_command("rsync://host::module/x", "") is None
    assert rescue.ssh_mkdir_command("s3://bucket/x", "") is None


def test_backup_url_is_per_host_and_must_be_set():
    assert rescue.backup_url(config(BACKUP_DUPLICITY_URL="file:///b/", HOSTNAME="alma")) == "file:///b/alma"
    assert rescue.backup_url(config(BACKUP_DUPLICITY_URL="sftp://u@h/x", HOSTNAME="a")) == "pexpect+sftp://u@h/x/a"
    with pytest.raises(rescue.ConfigError, match="BACKUP_DUPLICITY_URL is not set"):
        rescue.backup_url(config())


# -- reading duplicity and gpg ----------------------------------------------------------------

SEED_STATISTICS = """\
--------------[ Backup Statistics ]--------------
StartTime 1767632242.98 (Mon Jan  5 17:57:22 2026)
EndTime 1767632257.14 (Mon Jan  5 17:57:37 2026)
ElapsedTime 14.17 (14.17 seconds)
SourceFiles 47785
SourceFileSize 2340805120 (2.18 GB)
NewFiles 613
TotalDestinationSizeChange 134573979 (128 MB)
Errors 0
-------------------------------------------------
"""


def test_statistics_block_of_the_seed_is_parsed_and_described():
    stats = rescue.parse_backup_statistics(SEED_STATISTICS.splitlines())
    assert stats["SourceFiles"] == 47785 and stats["ElapsedTime"] == 14.17
    assert stats["TotalDestinationSizeChange"] == 134573979 and stats["Errors"] == 0
    text = rescue.describe_statistics(stats, "incremental")
    assert "47785 files, 2.2 GiB in scope" in text and "128.3 MiB stored in 14.2 s" in text


COLLECTION_STATUS = """\
Last full backup date: Sun Nov 29 00:43:55 2026
Collection Status
-----------------
Found 1 secondary backup chain(s).
Secondary chain 1 of 1:
-------------------------
Chain start time: Sat Nov 28 10:00:00 2026
 Type of backup set:                            Time:      Num volumes:
                Full         Sat Nov 28 10:00:00 2026                 3
-------------------------

Found primary backup chain with matching signature chain:
-------------------------
 Type of backup set:                            Time:      Num volumes:
                Full         Sun Nov 29 00:43:55 2026                 1
         Incremental         Sun Nov 29 00:43:57 2026                 1
-------------------------
No orphaned or incomplete backup sets found.
"""


def test_collection_status_is_parsed_into_chains_in_time_order():
    status = rescue.parse_collection_status(COLLECTION_STATUS)
    assert [c["primary"] for c in status["chains"]] == [False, True]
    assert [s["type"] for s in status["chains"][1]["sets"]] == ["full", "incremental"]
    assert status["chains"][0]["sets"][0]["volumes"] == 3
    assert status["chains"][1]["end"].startswith("2026-11-29T00:43:57")
    assert status["orphaned_or_incomplete"] is False


def colons(validity="u", capabilities="scESC"):
    return f"pub:{validity}:255:22:ABCD:1700000000:::u:::{capabilities}::::::ed25519:::0:\n"


def test_a_set_is_complete_only_with_its_manifest():
    names = ["duplicity-full.20261202T100000Z.manifest.gpg", "duplicity-full.20261202T100000Z.vol1.difftar.gpg",
             "duplicity-full-signatures.20261202T100000Z.sigtar.gpg",
             "duplicity-inc.20261202T100000Z.to.20261202T110000Z.vol1.difftar.gpg", "layout"]
    full, inc = rescue.time_seconds("2026-12-02T10:00:00Z", 0), rescue.time_seconds("2026-12-02T11:00:00Z", 0)
    assert rescue.stored_sets(names) == {full: True, inc: False}
    plain = ["duplicity-full.20261202T100000Z.manifest", "duplicity-full.20261202T100000Z.vol1.difftar.gz",
             "duplicity-inc.20261202T100000Z.to.20261202T110000Z.vol1.difftar.gz"]     # --no-encryption
    assert rescue.stored_sets(plain) == {full: True, inc: False}
    assert rescue.time_seconds("0", 99) == 0 and rescue.time_seconds("1D", 86400 * 3) == 86400 * 2


def test_restore_point_falls_back_to_a_time_every_chain_has_complete_and_refuses_too_old():
    main = {10.0: True, 20.0: True, 30.0: False}
    part = {10.0: True, 20.0: False, 30.0: True}
    assert rescue.restore_point({"main": main}, None) == (20.0, True)
    assert rescue.restore_point({"main": main, "/srv": part}, None) == (10.0, True)
    assert rescue.restore_point({"main": main, "/srv": part}, 15.0) == (15.0, False)
    assert rescue.restore_point({"main": {10.0: True}}, None) == (None, False)
    skewed = {"main": {100.0: True, 200.0: False}, "/srv": {102.0: True, 201.0: True}}   # one run, chains apart
    assert rescue.restore_point(skewed, None) == (102.0, True)
    for wanted in (0.0, 5.0):
        with pytest.raises(rescue.RescueError, match="there is no backup as old as"):
            rescue.restore_point({"main": main}, wanted)
    with pytest.raises(rescue.RescueError, match=r"the part /srv has no backup as old as .*00:00:15.* whole "
                                                 r"backup can be restored as of is .*00:00:20"):
        rescue.restore_point({"main": main, "/srv": {20.0: True}}, 15.0)
    with pytest.raises(rescue.RescueError, match="the part /srv has no complete set"):
        rescue.restore_point({"main": main, "/srv": {}}, None)


def test_a_duplicity_at_work_on_the_chain_or_below_it_is_found_by_its_argv():
    url = "file:///srv/b/alma"
    processes = [(10, ["python3", "-c", "C = 'duplicity launcher'", "full", "--name", "x", "/", url]),
                 (11, ["python3", "-m", "duplicity", "restore", url + "/part-1234", "/mnt"]),
                 (12, ["/usr/bin/duplicity", "cleanup", "file:///srv/b/alma2"]),
                 (13, ["vi", url]), (14, ["duplicity", "full", "/", "file:///srv/b/alma/layout"])]
    assert rescue.duplicity_working_on(processes, url) == [10, 11, 14]


def test_key_problems_are_explained_with_the_fix():
    assert rescue.key_problem("encrypt", colons()) is None
    assert "not in the keyring" in rescue.key_problem("encrypt", "")[0]
    what, fix = rescue.key_problem("encrypt", colons(validity="-"))
    assert "not trusted" in what and "#1668" in what and "--import-ownertrust" in fix
    assert "expired" in rescue.key_problem("encrypt", colons(validity="e"))[0]
    assert "no usable encryption subkey" in rescue.key_problem("encrypt", colons(capabilities="scSC"))[0]


def test_known_duplicity_failures_are_diagnosed():
    assert "wrong passphrase" in rescue.diagnose("gpg: decryption failed: Bad session key")[0]
    assert "full" in rescue.diagnose("OSError: [Errno 28] No space left on device")[0]
    assert rescue.diagnose("all fine") is None


def test_prometheus_metrics_keep_the_last_success_after_a_failure():
    stats = rescue.parse_backup_statistics(SEED_STATISTICS.splitlines())
    ok = rescue.backup_record(stats, "full", "file:///b", 100.0, 160.0, 0, {})
    failed = rescue.backup_record({}, "unknown", "file:///b", 200.0, 210.0, 23, ok)
    text = rescue.prometheus_text(failed, 'al"ma')
    assert 'rescue_backup_last_run_success{host="al\\"ma"} 0' in text
    assert 'rescue_backup_last_success_timestamp_seconds{host="al\\"ma"} 160.0' in text
    assert "# TYPE rescue_backup_duration_seconds gauge" in text


def test_stored_configuration_has_no_secrets_and_loads_again(tmp_path):
    conf = rescue.config_from_values({"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE": "CANARY-x1", "SSH_ROOT_PASSWORD": "pw",
                          "BACKUP_DUPLICITY_EXCLUDE": ["/a b", "/c"], "BACKUP": "DUPLICITY"})
    text = rescue.config_without_secrets(conf)
    assert "CANARY-x1" not in text and "pw'" not in text
    path = tmp_path / "rescue.conf"
    path.write_text(text)
    loaded = rescue.load_config([rescue.DEFAULT_CONF, path], {}, rescue.Log())
    assert loaded.values["BACKUP_DUPLICITY_EXCLUDE"] == ["/a b", "/c"]
    assert loaded.values["BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE"] == ""


def test_restore_redirects_only_names_that_hold_mountpoints():
    mounts = ["/", "/mnt/local", "/mnt/local/boot", "/mnt/local/boot/efi", "/mnt/local/var/log", "/proc"]
    assert rescue.redirected_names("/mnt/local", mounts) == ["boot", "var"]
    entries = {"boot": False, "var": False, "lost+found": True, "etc": False, ".rescue-tmp-x": False}
    assert rescue.unexpected_entries(entries, ["boot", "var"]) == ["etc"]


# -- end to end -------------------------------------------------------------------------------

class Site:
    """One machine's view for a test: its config dir, HOME (duplicity's cache), GNUPGHOME."""

    def __init__(self, tmp_path, conf_dir, keys, url=None):
        self.tmp, self.conf_dir, self.keys = tmp_path, conf_dir, keys
        self.src = make_tree(tmp_path / "src")
        self.var = tmp_path / "var"
        self.url = url or f"file://{tmp_path}/target"
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.work = tmp_path / "work"         # TMPDIR: not a parent of src, whose mtimes verify compares
        self.work.mkdir()
        self.gnupghome = keys.home
        self.layout = tmp_path / "var/layout"
        self.settings = {"VAR_DIR": str(self.var), "LAYOUT_DIR": str(self.layout), "BACKUP_DUPLICITY_URL": self.url,
                         "BACKUP_DUPLICITY_INCLUDE": [str(self.src)]}

    def write_conf(self):
        lines = []
        for name, value in self.settings.items():
            if isinstance(value, list):
                lines.append(f"{name}=( " + " ".join(f"'{v}'" for v in value) + " )")
            else:
                lines.append(f"{name}='{value}'")
        (self.conf_dir / "site.conf").write_text("\n".join(lines) + "\n")

    def run(self, *args, input=None, timeout=180, **settings):
        self.settings.update(settings)
        self.write_conf()
        env = {"HOME": str(self.home), "GNUPGHOME": str(self.gnupghome), "TMPDIR": str(self.work)}
        return run_rescue("-c", self.conf_dir, *args, env=env, input=input, timeout=timeout)

    def target_dir(self):
        return Path(self.url[len("file://"):]) / HOST

    def status(self):
        proc = self.run("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


def public_key(site):
    return {"BACKUP_DUPLICITY_GPG_ENC_KEY": site.keys.enc,
            "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE": ENC_PASSPHRASE}


@pytest.fixture
def site(tmp_path, conf_dir, gnupg_keys):
    return Site(tmp_path, conf_dir, gnupg_keys)


def test_backup_prints_statistics_keeps_json_and_prometheus_metrics(site):
    metrics = site.tmp / "textfile"
    metrics.mkdir()
    proc = site.run("mkbackuponly", NODE_EXPORTER_TEXTFILE_DIR=str(metrics), **public_key(site))
    assert proc.returncode == 0, proc.stderr
    assert "Backup done (full):" in proc.stdout and "0 errors" in proc.stdout
    assert re.search(r"^Backup: \d+ files, 1 volumes, \d+ s$", proc.stdout, re.M)     # progress
    assert "--encrypt-key <GPG_KEY>" in proc.stdout and site.keys.enc not in proc.stdout
    record = json.loads((site.var / "last-backup.json").read_text())
    assert record["success"] is True and record["kind"] == "full"
    assert record["statistics"]["SourceFiles"] > 10
    prom = (metrics / "rescue_backup.prom").read_text()
    assert 'rescue_backup_last_run_success{host="%s"}' % HOST + ' 1' in prom
    names = sorted(p.name for p in site.target_dir().iterdir())
    assert "layout" in names and any(n.startswith("duplicity-full.") and n.endswith(".gpg") for n in names)
    proc = site.run("mkbackuponly")
    assert "Backup done (incremental)" in proc.stdout
    assert "Storing the layout" not in proc.stdout          # unchanged: stored once is enough


def test_layout_and_config_are_fetched_from_the_target_without_the_cache(site):
    proc = site.run("mkbackuponly", **public_key(site))
    assert proc.returncode == 0, proc.stderr
    assert "Saved the disk layout in" in proc.stdout
    saved = json.loads((site.layout / "layout.json").read_text())
    site.home = site.tmp / "bare-home"          # a bare machine: no duplicity cache
    site.home.mkdir()
    fetched = site.tmp / "fetched"
    proc = site.run("restoreonly", "--layout-only", "--target", fetched)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((fetched / "layout/layout.json").read_text()) == saved
    stored = (fetched / "rescue.conf").read_text()
    assert f"BACKUP_DUPLICITY_URL={site.url}" in stored
    assert ENC_PASSPHRASE not in stored and "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=''" in stored


def test_rsync_over_our_sshd_with_a_real_signature_by_its_own_key(tmp_path, conf_dir, gnupg_keys,
                                                                   sshd_server):
    remote = tmp_path / "server" / "backups"
    site = Site(tmp_path, conf_dir, gnupg_keys, url=sshd_server.url(str(remote)))
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_SSH_OPTIONS=sshd_server.ssh_options,
                    BACKUP_DUPLICITY_GPG_SIGN_KEY=gnupg_keys.sign,
                    BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE=SIGN_PASSPHRASE, **public_key(site))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    manifest = next((remote / HOST).glob("duplicity-full.*.manifest.gpg"))
    decrypted = subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase-fd", "0",
                                "--decrypt", str(manifest)], input=ENC_PASSPHRASE.encode() + b"\n",
                               capture_output=True, env=dict(os.environ, GNUPGHOME=str(gnupg_keys.home)))
    assert b'Good signature from "rescue sign <sign@test>"' in decrypted.stderr
    assert (remote / HOST / "layout").is_dir()


def test_sftp_goes_through_the_systems_ssh(tmp_path, conf_dir, gnupg_keys, sshd_server):
    remote = tmp_path / "sftp-server"
    site = Site(tmp_path, conf_dir, gnupg_keys,
                url=f"sftp://root@127.0.0.1:{sshd_server.port}/{remote}")
    settings = dict(BACKUP_DUPLICITY_SSH_OPTIONS=sshd_server.ssh_options, **public_key(site))
    proc = site.run("mkbackuponly", **settings)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert any((remote / HOST).glob("duplicity-full.*.vol1.difftar.gpg"))
    proc = site.run("restoreonly", "--target", tmp_path / "restored")
    assert proc.returncode == 0, proc.stderr


def differences_inside(output, root):
    """The paths verify reports as different, leaving out the ancestors of `root` (/tmp and the
    like: duplicity records the parents of an included tree, and other processes touch them)."""
    ancestors = {str(p).lstrip("/") for p in root.parents if str(p) != "/"}
    found = re.findall(r"Difference found: File (.+?) has ", output)
    return [f for f in found if f not in ancestors]


def test_verify_reports_no_differences_then_the_changed_file(site):
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    proc = site.run("verify", "--compare-data")
    assert differences_inside(proc.stdout, site.src) == [], proc.stdout
    if proc.returncode != 0:        # only an ancestor of the tree differed
        assert re.search(r"Verify: \d+ files compared, \d+ differences found", proc.stdout)
    else:
        assert re.search(r"Verify: \d+ files compared, 0 differences found", proc.stdout)
    (site.src / "owned").write_text("changed")
    for args in (["--compare-data"], []):       # duplicity 3 alone compares nothing without it
        proc = site.run("verify", *args)
        assert proc.returncode == 1
        assert differences_inside(proc.stdout, site.src) == [str(site.src / "owned").lstrip("/")], proc.stdout


def test_verify_leaves_out_the_directories_above_the_backed_up_trees():
    lines = ["Difference found: File srv has mtime Wed Dec  2 18:41:20 2026, expected Wed Dec  2 18:41:01 2026",
             "Difference found: File . has mtime Wed Dec  2 18:41:20 2026, expected Wed Dec  2 18:41:01 2026",
             "Difference found: File srv/data has mtime Wed Dec  2 18:41:19 2026, expected Fri Jul 14 02:40:00 2017",
             "Difference found: File srv/data/x has data",
             "Difference found: File srv/database has mtime Wed Dec  2 18:41:19 2026, expected Fri Jul 14 2017"]
    assert rescue.in_scope_differences(lines, ["/srv/data", "/etc"]) == lines[2:]
    assert rescue.in_scope_differences(lines, ["/"]) == lines


def test_verify_right_after_a_backup_finds_nothing_and_says_when_it_could_not_verify(site):
    """Issue 11 C: verify exited 1 right after every backup (the parents of the backed-up tree
    changed their mtimes), and 1 also when it could not verify at all."""
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    os.utime(site.tmp)                                # above the tree: not backed up
    (site.tmp / "elsewhere").write_text("next to the tree\n")
    proc = site.run("verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"Verify: \d+ files compared, 0 differences found", proc.stdout)
    proc = site.run("verify", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="wrong-one")
    assert_clean_error(proc, "verify")
    assert proc.returncode == 2


def set_times(status):
    return [[s["time"] for s in chain["sets"]] for chain in status["chains"]]


def test_retention_rules_each_do_what_they_say(site):
    for _ in range(2):                              # chain 1: full + incremental
        assert site.run("mkbackuponly", **public_key(site)).returncode == 0
        time.sleep(1.1)
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN="1s").returncode == 0
    time.sleep(1.1)
    assert [len(c) for c in set_times(site.status())] == [2, 1]
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN="", BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL="1")
    assert "remove-all-inc-of-but-n-full 1" in proc.stdout
    assert [len(c) for c in set_times(site.status())] == [1, 2]      # chain 1 lost its incremental
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_MAX_SETS_KEEP_FULL="", BACKUP_DUPLICITY_MAX_SETS="1")
    assert [len(c) for c in set_times(site.status())] == [3]         # chain 1 is gone
    time.sleep(1.1)
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_MAX_SETS="", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN="1s").returncode == 0
    newest_full = set_times(site.status())[-1][0]
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_FULL_IF_OLDER_THAN="", BACKUP_DUPLICITY_MAX_TIME=newest_full)
    assert proc.returncode == 0, proc.stderr
    chains = set_times(site.status())
    assert len(chains) == 1 and chains[0][0] == newest_full


def test_status_text_shows_chains_and_the_last_backup(site):
    assert site.run("mkbackuponly", **public_key(site)).returncode == 0
    proc = site.run("status")
    assert proc.returncode == 0, proc.stderr
    assert "chain 1 (primary): 1 sets" in proc.stdout and "full" in proc.stdout
    assert "Last backup from this machine: full, succeeded" in proc.stdout


# -- failures ---------------------------------------------------------------------------------

def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert [line for line in proc.stderr.splitlines() if line.startswith("rescue: error: ")], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_a_key_missing_from_the_keyring_is_named_before_anything_runs(site):
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_KEY="0123456789ABCDEF0123456789ABCDEF01234567")
    assert_clean_error(proc, "BACKUP_DUPLICITY_GPG_ENC_KEY", "is not in the keyring", "gpg --import")
    assert not site.target_dir().exists()


def test_an_untrusted_key_gets_the_fix_not_a_traceback(site):
    site.gnupghome = site.keys.public_only
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_KEY=site.keys.enc)
    assert_clean_error(proc, "is not trusted", "#1668", "--import-ownertrust")


def test_an_unreachable_server_fails_fast_and_clearly(site, sshd_server):
    closed = sshd_server.port + 1 if sshd_server.port < 65535 else sshd_server.port - 1
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_URL=f"rsync://root@127.0.0.1:{closed}//tmp/nowhere",
                    BACKUP_DUPLICITY_SSH_OPTIONS=sshd_server.ssh_options + " -o ConnectTimeout=5",
                    **{"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE": "a-test-passphrase"})
    assert_clean_error(proc, "cannot create the backup directory on the server", "refused")


@pytest.mark.parametrize("workflow", ["status", "verify", "restoreonly"])
def test_reading_from_an_unreachable_server_fails_at_once_and_says_so(site, sshd_server, workflow):
    closed = sshd_server.port + 1 if sshd_server.port < 65535 else sshd_server.port - 1
    target = site.tmp / "restored"
    started = time.monotonic()
    proc = site.run(workflow, *(["--target", target] if workflow == "restoreonly" else []), BACKUP_DUPLICITY_URL=f"rsync://root@127.0.0.1:{closed}//tmp/nowhere",
                    BACKUP_DUPLICITY_SSH_OPTIONS=sshd_server.ssh_options,
                    BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    assert_clean_error(proc, "cannot reach the backup server 127.0.0.1", "refused the connection")
    assert time.monotonic() - started < 30          # duplicity alone retried for 2.5 minutes
    assert not target.exists()


def test_a_backup_directory_missing_on_the_server_is_named_and_status_says_none_yet(site, sshd_server):
    remote = site.tmp / "server"
    settings = dict(BACKUP_DUPLICITY_URL=sshd_server.url(str(remote)), BACKUP_DUPLICITY_SSH_OPTIONS=sshd_server.ssh_options,
                    BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    for workflow in (["verify"], ["restoreonly", "--target", str(site.tmp / "restored")],
                     ["restoreonly", "--layout-only", "--target", str(site.tmp / "layout")]):
        proc = site.run(*workflow, **settings)
        assert_clean_error(proc, f"there is no backup at rsync://root@127.0.0.1:{sshd_server.port}/",
                           f"127.0.0.1:{remote}/{HOST} does not exist", "the original machine's name")
    proc = site.run("status", **settings)
    assert proc.returncode == 0, proc.stderr
    assert "none yet" in proc.stdout
    proc = site.run("restoreonly", "--target", site.tmp / "restored", BACKUP_DUPLICITY_URL=site.url)   # file://
    assert_clean_error(proc, "there is no backup at file://", f"{site.target_dir()} does not exist")


def test_a_full_target_fails_the_backup_with_the_tail_of_duplicitys_output(site):
    full = site.tmp / "small-disk"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(full)], check=True)
    metrics = site.tmp / "textfile"
    metrics.mkdir()
    try:
        proc = site.run("mkbackuponly", BACKUP_DUPLICITY_URL=f"file://{full}",
                        NODE_EXPORTER_TEXTFILE_DIR=str(metrics), BACKUP_DUPLICITY_OPTIONS="--num-retries 1",
                        BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    finally:
        subprocess.run(["umount", "-l", str(full)], check=True)
    assert_clean_error(proc, "failed (duplicity exit code", "disk is full", "duplicity's last output:")
    assert json.loads((site.var / "last-backup.json").read_text())["success"] is False
    assert 'rescue_backup_last_run_success{host="%s"}' % HOST + ' 0' in (metrics / "rescue_backup.prom").read_text()


def target_files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("over", ["file", "ssh"])
def test_a_mistyped_passphrase_writes_nothing_and_the_next_good_run_restores(tmp_path, conf_dir, gnupg_keys,
                                                                             sshd_server, over):
    """Issue 11 A.1: the config edited (so the layout's digest changes) and the passphrase
    mistyped stored a layout set in the wrong passphrase; the next good run skipped the layout
    (same digest) and every restore of the layout failed from then on."""
    remote = tmp_path / "server"
    site = Site(tmp_path, conf_dir, gnupg_keys, url=sshd_server.url(str(remote)) if over == "ssh" else None)
    directory = remote / HOST if over == "ssh" else site.target_dir()
    right = dict(BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one", BACKUP_DUPLICITY_MAX_SETS="1",
                 BACKUP_DUPLICITY_SSH_OPTIONS=sshd_server.ssh_options)
    assert site.run("mkbackuponly", **right).returncode == 0
    before = target_files(directory)
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="mistyped", PROGRESS_MODE="plain")
    assert_clean_error(proc, "wrong passphrase", "nothing was written")
    assert target_files(directory) == before
    assert "remove-all-but-n-full" not in proc.stdout               # retention did not run either
    proc = site.run("mkbackuponly", PROGRESS_MODE="ANSI", **right)
    assert proc.returncode == 0, proc.stderr
    fetched = site.tmp / "fetched"
    proc = site.run("restoreonly", "--layout-only", "--target", fetched)
    assert proc.returncode == 0, proc.stderr
    assert (fetched / "layout/layout.json").is_file()
    proc = site.run("restoreonly", "--target", site.tmp / "restored")
    assert proc.returncode == 0, proc.stderr


def test_a_layout_stored_by_a_failed_run_is_stored_again_by_the_next(site):
    """The layout digest of a failed run does not let the next run skip the layout."""
    settings = dict(BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    assert site.run("mkbackuponly", **settings).returncode == 0
    record = json.loads((site.var / "last-backup.json").read_text())
    record["success"] = False              # as a run leaves it whose chain failed after the layout
    (site.var / "last-backup.json").write_text(json.dumps(record))
    proc = site.run("mkbackuponly")
    assert proc.returncode == 0, proc.stderr
    assert "Storing the layout" in proc.stdout


def test_an_incremental_that_fills_the_target_leaves_no_incomplete_set(site):
    """Issue 11 A.2: a volume without a manifest stayed after the target filled up during an
    incremental, and status listed the broken set as a normal one."""
    full = site.tmp / "small-disk"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(full)], check=True)
    try:
        settings = dict(BACKUP_DUPLICITY_URL=f"file://{full}", BACKUP_DUPLICITY_OPTIONS="--volsize 1 --num-retries 1",
                        BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
        assert site.run("mkbackuponly", **settings).returncode == 0
        (site.src / "big.bin").write_bytes(os.urandom(4 << 20))
        proc = site.run("mkbackuponly")
        assert_clean_error(proc, "disk is full")
        sets = rescue.stored_sets(os.listdir(full / HOST))
        assert len(sets) == 1 and all(sets.values()), sorted(os.listdir(full / HOST))
        assert "Removing the incomplete backup set" in proc.stdout
        status = site.status()
        assert status["orphaned_or_incomplete"] is False
        assert [s["type"] for s in status["chains"][0]["sets"]] == ["full"]
        proc = site.run("restoreonly", "--target", site.tmp / "restored")
        assert proc.returncode == 0, proc.stderr
        assert "incomplete" not in proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(full)], check=True)


def test_a_backup_killed_on_another_target_does_not_touch_this_targets_cache(site):
    """Issue 11 A.6: a stale .part left in duplicity's archive dir by a failed backup to
    another target broke this target's verify (one --name, one cache, for every target)."""
    settings = dict(BACKUP_DUPLICITY_OPTIONS="--volsize 1", **public_key(site))
    assert site.run("mkbackuponly", **settings).returncode == 0
    for n in range(30):
        (site.src / f"chunk{n}").write_bytes(os.urandom(1 << 20))
    other = site.tmp / "other-target"
    site.settings["BACKUP_DUPLICITY_URL"] = f"file://{other}"
    site.write_conf()
    env = dict(os.environ, HOME=str(site.home), GNUPGHOME=str(site.gnupghome), TMPDIR=str(site.work))
    proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(site.conf_dir), "mkbackuponly"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((other / HOST).glob("duplicity-full.*.vol*.difftar.gpg"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    time.sleep(1)                                   # its duplicity dies with it
    proc = site.run("verify", BACKUP_DUPLICITY_URL=site.url)
    assert "Verify: " in proc.stdout and proc.returncode in (0, 1), proc.stderr
    for n in range(30):
        (site.src / f"chunk{n}").unlink()
    proc = site.run("mkbackuponly")
    assert proc.returncode == 0, proc.stderr
    assert "Backup done (incremental)" in proc.stdout
    caches = sorted(p.name for p in (site.home / ".cache/duplicity").iterdir())
    assert len([c for c in caches if not c.endswith("-layout")]) == 2, caches     # one per target


def test_a_stopped_or_failed_run_is_recorded_with_its_reason(site):
    """Issue 11 C: after SIGINT/SIGTERM (or a failure before the chains ran), last-backup.json
    still showed the previous success, with nothing of the failed run."""
    metrics = site.tmp / "textfile"
    metrics.mkdir()
    settings = dict(BACKUP_DUPLICITY_OPTIONS="--volsize 1", NODE_EXPORTER_TEXTFILE_DIR=str(metrics),
                    BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one")
    assert site.run("mkbackuponly", **settings).returncode == 0
    success = json.loads((site.var / "last-backup.json").read_text())
    for n in range(20):
        (site.src / f"chunk{n}").write_bytes(os.urandom(1 << 20))
    env = dict(os.environ, HOME=str(site.home), GNUPGHOME=str(site.gnupghome), TMPDIR=str(site.work))
    proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(site.conf_dir), "mkbackuponly"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(site.target_dir().glob("duplicity-inc.*.vol1.difftar.gpg")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    record = json.loads((site.var / "last-backup.json").read_text())
    assert record["success"] is False and record["exit_code"] == 143
    assert record["reason"] == "stopped by SIGTERM" and record["start_time"] > success["end_time"]
    assert record["last_success_time"] == success["last_success_time"]
    assert 'rescue_backup_last_run_success{host="%s"} 0' % HOST in (metrics / "rescue_backup.prom").read_text()
    proc = site.run("status")
    assert "Last backup from this machine: none, FAILED (exit code 143: stopped by SIGTERM)" in proc.stdout
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="mistyped")
    assert proc.returncode == 1
    record = json.loads((site.var / "last-backup.json").read_text())
    assert record["success"] is False and record["reason"].startswith("wrong passphrase")


def test_an_include_that_does_not_exist_warns_and_nothing_to_back_up_is_an_error(site):
    """Issue 11 C: BACKUP_DUPLICITY_INCLUDE=( /nonexistent ) gave "Backup done"."""
    exists = {"/etc", "/home"}.__contains__
    assert rescue.missing_includes(["/etc", "/nonexistent", "/home/*/work", "/nope/*/x"], exists) == \
        ["/nonexistent", "/nope/*/x"]
    missing = str(site.tmp / "nonexistent")
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_INCLUDE=[missing],
                    BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    assert_clean_error(proc, "nothing to back up: none of BACKUP_DUPLICITY_INCLUDE exists")
    assert f"warning: BACKUP_DUPLICITY_INCLUDE: {missing} does not exist" in proc.stderr
    assert proc.returncode == 2 and not site.target_dir().exists()
    proc = site.run("mkbackuponly", BACKUP_DUPLICITY_INCLUDE=[str(site.src), missing])
    assert proc.returncode == 0, proc.stderr
    assert f"warning: BACKUP_DUPLICITY_INCLUDE: {missing} does not exist" in proc.stderr


def test_an_empty_restore_target_is_refused(site):
    """Issue 11 C: --target '' restored into the current directory."""
    proc = site.run("restoreonly", "--target", "", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    assert_clean_error(proc, "--target is empty")
    assert proc.returncode == 2


def agents_of(home):
    """PIDs of the gpg-agents serving the keyring in home."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                argv = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"gpg-agent") and str(home).encode() in argv:
                found.append(int(entry.name))
    return found


def test_the_gpg_agent_a_run_started_is_stopped_and_one_that_ran_before_is_left(site):
    """Issue 11 C: a gpg-agent per backup stayed running."""
    site.gnupghome = site.tmp / "fresh-gnupg"
    site.gnupghome.mkdir(mode=0o700)
    settings = dict(BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    for workflow in (["mkbackuponly"], ["status"], ["verify"], ["mkbackuponly"]):
        proc = site.run(*workflow, **settings)
        assert proc.returncode in (0, 1), proc.stderr
        deadline = time.monotonic() + 5
        while agents_of(site.gnupghome) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agents_of(site.gnupghome) == [], workflow
    env = dict(os.environ, GNUPGHOME=str(site.gnupghome))
    subprocess.run(["gpg-connect-agent", "/bye"], env=env, check=True, capture_output=True)
    users = agents_of(site.gnupghome)
    try:
        assert users and site.run("mkbackuponly").returncode == 0
        assert agents_of(site.gnupghome) == users                 # the user's own agent stays
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env)


def test_a_second_backup_waits_for_the_lock_holder(site):
    site.write_conf()
    lockfile = site.tmp / "rescue.lock"
    with open(lockfile, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242 mkbackuponly\n")
        held.flush()
        proc = site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-test-passphrase")
    assert_clean_error(proc, "PID 4242")


# -- secrets ----------------------------------------------------------------------------------

class ArgvWatcher(threading.Thread):
    """Polls every process's command line while a test runs."""

    def __init__(self, needle):
        super().__init__(daemon=True)
        self.needle, self.seen, self.polls, self.stopped = needle.encode(), [], 0, threading.Event()

    def run(self):
        while not self.stopped.is_set():
            for entry in os.scandir("/proc"):
                if entry.name.isdigit():
                    try:
                        with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                            cmdline = f.read()
                    except OSError:
                        continue
                    if self.needle in cmdline:
                        self.seen.append(cmdline)
            self.polls += 1
            time.sleep(0.005)


def files_containing(root, needle):
    found = []
    for path, _, names in os.walk(root):
        for name in names:
            full = os.path.join(path, name)
            if os.path.isfile(full) and not os.path.islink(full):
                with open(full, "rb") as f:
                    if needle.encode() in f.read():
                        found.append(full)
    return found


def test_canary_passphrase_is_in_no_argv_log_output_or_file(tmp_path, conf_dir, gnupg_keys, sshd_server):
    canary = f"CANARY-{uuid.uuid4().hex}"
    remote = tmp_path / "server"
    site = Site(tmp_path, conf_dir, gnupg_keys, url=sshd_server.url(str(remote)))
    watcher = ArgvWatcher(canary)
    watcher.start()
    try:
        settings = dict(BACKUP_DUPLICITY_SSH_OPTIONS=sshd_server.ssh_options,
                        BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=canary)
        outputs = [site.run("mkbackuponly", **settings), site.run("status"), site.run("dump"),
                   site.run("-v", "mkbackuponly"), site.run("verify")]
        outputs.append(site.run("restoreonly", "--target", tmp_path / "restored", input=canary + "\n",
                                BACKUP_DUPLICITY_ASK_PASSPHRASE="true"))
    finally:
        watcher.stopped.set()
        watcher.join()
    verify = outputs[4]
    assert verify.returncode in (0, 1) and differences_inside(verify.stdout, site.src) == [], verify.stdout
    for proc in outputs:
        assert proc.returncode == 0 or proc is verify, proc.stderr      # verify: /tmp's mtime changes
        assert canary not in proc.stdout + proc.stderr
    assert watcher.polls > 20 and watcher.seen == []
    assert files_containing(tmp_path, canary) == [str(conf_dir / "site.conf")]


def test_a_gpg_failure_names_what_gpg_said_not_only_the_end_of_its_log():
    """duplicity -v5 prints a traceback, then the GnuPG log inside the exception's message
    (real output: tests/data/duplicity/gpg-error-v5.txt); the hint keeps the log's lines."""
    output = rescue.DuplicityOutput(rescue.Log(), "Backup", False, 1.0)
    for line in (DATA / "duplicity/gpg-error-v5.txt").read_text().splitlines():
        output(line)
    error = rescue.duplicity_failure("the backup", 31, output, rescue.Log())
    assert "gpg: DEADBEEFDEADBEEF: skipped: No public key" in error.hint
    assert 'File "' not in error.hint and "^^^" not in error.hint and "Traceback" not in error.hint
    assert error.hint.splitlines()[-1] == "===== End GnuPG log ====="


def test_a_run_starts_the_keyrings_agent_before_its_chains_and_stops_it_after(tmp_path):
    """Chains side by side would each start an agent at once (and gpg waits only seconds for
    one another gpg is starting): the run's agent is up before anything runs in it."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    old = os.environ.get("GNUPGHOME")
    os.environ["GNUPGHOME"] = str(home)
    try:
        runner = rescue.Runner(rescue.Log())
        assert not rescue.gpg_agent_running(runner)
        with rescue.own_gpg_agent(runner):
            assert rescue.gpg_agent_running(runner)
        assert not rescue.gpg_agent_running(runner)
    finally:
        if old is None:
            del os.environ["GNUPGHOME"]
        else:
            os.environ["GNUPGHOME"] = old


def test_a_run_makes_the_keyrings_directory_before_its_chains_race_to_make_it(tmp_path, monkeypatch):
    """Without ~/.gnupg each gpg of the chains side by side makes it, and the loser stops with
    "gpg: Fatal: can't create directory '/root/.gnupg': File exists" (exit 31 in a drill)."""
    home = tmp_path / "root"
    home.mkdir()
    monkeypatch.delenv("GNUPGHOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    runner = rescue.Runner(rescue.Log())
    with rescue.own_gpg_agent(runner):
        assert stat.S_IMODE((home / ".gnupg").stat().st_mode) == 0o700
    # a HOME that is not there is not made (gpg says what is wrong)
    monkeypatch.setenv("HOME", str(tmp_path / "nowhere"))
    with rescue.own_gpg_agent(runner):
        assert not (tmp_path / "nowhere").exists()
