"""The command line as a user meets it: dump, help, version, errors, log file, Ctrl-C."""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import REPO, RESCUE, pyenv_python, run_rescue

SEED = REPO / "conf" / "examples" / "duplicity-rsync-local.conf"


def test_version_and_help_need_no_config():
    proc = run_rescue("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("rescue ")
    proc = run_rescue("help")
    assert proc.returncode == 0
    for name in ("dump", "duplicity", "help"):
        assert name in proc.stdout


def test_no_workflow_prints_usage_and_fails():
    proc = run_rescue()
    assert proc.returncode == 2 and "usage: rescue" in proc.stdout


def test_unknown_workflow_is_one_clear_error():
    proc = run_rescue("recoverr")
    assert proc.returncode == 2
    assert proc.stderr.startswith("rescue: error: argument WORKFLOW: invalid choice: 'recoverr'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv,option", [(["dump", "-C", "f"], "-C"), (["status", "-v"], "-v")])
def test_a_global_option_after_the_workflow_gets_the_hint_to_put_it_before(argv, option):
    """Issue 11 C: `rescue dump -C f` said only "unrecognized arguments"."""
    proc = run_rescue(*argv)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[1] == (f"rescue: hint: {option} is an option of rescue itself: "
                                           f"put it before the workflow (rescue {option} … WORKFLOW …)")


def test_dump_of_the_seed_config_hides_secrets(conf_dir):
    proc = run_rescue("-c", conf_dir, "-C", SEED, "dump")
    assert proc.returncode == 0, proc.stderr
    assert "BACKUP_DUPLICITY_URL=rsync://root@192.168.122.1//apps/export/ReaR" in proc.stdout.splitlines()
    for secret in ("r00t@alma", "relax", "72B27A3F5F5D09347B74D9ED18A6F5D8C7945A62"):
        assert secret not in proc.stdout + proc.stderr
    assert "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=***" in proc.stdout.splitlines()
    assert "SSH_ROOT_PASSWORD=***" in proc.stdout.splitlines()
    assert proc.stderr == ""        # the seed uses only known variables


def test_dump_expose_secrets_shows_them(conf_dir):
    proc = run_rescue("-c", conf_dir, "-C", SEED, "--expose-secrets", "dump")
    assert proc.returncode == 0
    assert "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=r00t@alma" in proc.stdout.splitlines()
    assert "SSH_ROOT_PASSWORD=relax" in proc.stdout.splitlines()


def test_dump_json_is_one_object_of_every_variable(conf_dir):
    proc = run_rescue("-c", conf_dir, "-C", SEED, "dump", "--json")
    data = json.loads(proc.stdout)
    assert data["BACKUP_DUPLICITY_URL"] == "rsync://root@192.168.122.1//apps/export/ReaR"
    assert data["BACKUP_DUPLICITY_EXCLUDE"][:3] == ["/proc", "/sys", "/run"]
    assert data["BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE"] == "***"
    assert data["MODULES"] == ["loaded_modules"]
    assert all(isinstance(v, (str, list)) for v in data.values())
    assert "r00t@alma" not in proc.stdout


def test_a_secret_inside_another_value_is_redacted(tmp_path, conf_dir):
    conf = tmp_path / "url.conf"
    conf.write_text('{ DUPLICITY_SECRET_PW="CANARY-url-7781" ; } 2>>/dev/$SECRET_OUTPUT_DEV\n'
                    'BACKUP_DUPLICITY_URL="sftp://u:$DUPLICITY_SECRET_PW@host/x"\n')
    proc = run_rescue("-c", conf_dir, "-C", conf, "dump")
    assert "CANARY-url-7781" not in proc.stdout + proc.stderr
    assert "BACKUP_DUPLICITY_URL=sftp://u:***@host/x" in proc.stdout


def test_config_dir_falls_back_to_etc_rear_layout(tmp_path):
    # -c names the directory; site.conf then local.conf are read from it, then -C files.
    directory = tmp_path / "rear"
    directory.mkdir()
    (directory / "site.conf").write_text("OUTPUT=USB\nBACKUP_DUPLICITY_NAME=site\n")
    (directory / "local.conf").write_text("BACKUP_DUPLICITY_NAME=local\n")
    (directory / "extra.conf").write_text("OUTPUT_URL=file:///x\n")
    proc = run_rescue("-c", directory, "-C", "extra", "dump", "--json")
    data = json.loads(proc.stdout)
    assert (data["OUTPUT"], data["BACKUP_DUPLICITY_NAME"], data["OUTPUT_URL"]) == ("USB", "local", "file:///x")


def test_missing_config_dir_and_file_are_clear_errors(tmp_path):
    proc = run_rescue("-c", tmp_path / "nope", "dump")
    assert proc.returncode == 2 and "configuration directory" in proc.stderr and "does not exist" in proc.stderr
    proc = run_rescue("-c", tmp_path, "-C", "missing.conf", "dump")
    assert proc.returncode == 2 and "configuration file missing.conf not found" in proc.stderr


def test_missing_duplicity_names_the_program_and_package(tmp_path, conf_dir):
    conf = tmp_path / "prog.conf"
    conf.write_text("DUPLICITY_PROG=/nonexistent/duplicity\n")
    proc = run_rescue("-c", conf_dir, "-C", conf, "duplicity", "--version")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "rescue: error: program '/nonexistent/duplicity' not found",
        "rescue: hint: install it: Debian/Ubuntu package duplicity, RHEL/Alma/Rocky duplicity (EPEL), SUSE duplicity"]


def test_duplicity_passthrough_returns_the_exit_code_and_logs_redacted(tmp_path, conf_dir):
    conf = tmp_path / "prog.conf"
    conf.write_text('DUPLICITY_PROG=/bin/sh\n{ BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="CANARY-pp-0042" ; } 2>>/dev/$SECRET_OUTPUT_DEV\n')
    log = tmp_path / "log" / "rescue.log"
    log.parent.mkdir()
    log.write_text("previous run\n")
    proc = run_rescue("-c", conf_dir, "-C", conf, "duplicity", "-c", "echo out; echo CANARY-pp-0042; exit 7")
    assert proc.returncode == 7                       # truthful: the tool's own exit code
    assert proc.stdout == "out\nCANARY-pp-0042\n"     # the tool's own output is its business
    text = log.read_text()
    assert "running duplicity as: /bin/sh -c 'echo out; echo *** ; exit 7'".replace(" ;", ";") in text
    assert "CANARY-pp-0042" not in text
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert (tmp_path / "log" / "rescue.log.old").read_text() == "previous run\n"


def test_ctrl_c_stops_cleanly_and_kills_the_child(tmp_path, conf_dir):
    conf = tmp_path / "prog.conf"
    marker = tmp_path / "child-alive"
    conf.write_text("DUPLICITY_PROG=/bin/sh\n")
    script = f"echo $$ > {marker}; exec sleep 60"
    proc = subprocess.Popen([sys.executable, str(RESCUE), "-c", str(conf_dir), "-C", str(conf),
                             "duplicity", "-c", script], stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.1)
    child = int(marker.read_text())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert err.startswith("rescue: error: interrupted by Ctrl-C") and "Traceback" not in err
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or "zombie" in open(f"/proc/{child}/status").read().lower()


def test_debug_flag_shows_a_traceback_for_errors(tmp_path):
    proc = run_rescue("-d", "-c", tmp_path / "nope", "dump")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    proc = run_rescue("-c", tmp_path / "nope", "dump")
    assert "Traceback" not in proc.stderr


def test_dump_runs_as_an_unprivileged_user(conf_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to nobody")
    proc = run_rescue("-C", SEED, "dump", cmd=["setpriv", "--reuid=65534", "--regid=65534",
                                               "--clear-groups", sys.executable, str(RESCUE)])
    assert proc.returncode == 0, proc.stderr
    assert "rsync://root@192.168.122.1//apps/export/ReaR" in proc.stdout


def test_runs_on_python_3_9():
    python = pyenv_python(9)
    if python is None:
        pytest.skip("python3.9 is not installed here")
    proc = run_rescue("-C", SEED, "dump", "--json", cmd=[python, str(RESCUE)])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["BACKUP_DUPLICITY_NAME"] == "rear-backup"


def test_vermin_finds_nothing_newer_than_3_9():
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -r requirements-dev.txt)")
    proc = subprocess.run([vermin, "--no-tips", "--violations", "--target=3.9-",
                           "--eval-annotations", str(RESCUE), str(REPO / "build_zipapp.py")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- issue 11 B: every bad input is one line with the right exit code --------------------------

def bad_input_site(tmp_path):
    """A configuration of a machine that backed up before (an empty target directory)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src/f").write_text("data\n")
    (tmp_path / "target" / socket.gethostname()).mkdir(parents=True)
    (tmp_path / "var/layout").mkdir(parents=True)
    (tmp_path / "not-a-dir").write_text("someone's file\n")
    return [f"VAR_DIR={tmp_path}/var", f"LAYOUT_DIR={tmp_path}/var/layout",
            f"BACKUP_DUPLICITY_URL=file://{tmp_path}/target", f"BACKUP_DUPLICITY_INCLUDE=( {tmp_path}/src )",
            "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=a-test-passphrase"]


BAD_INPUTS = [
    # (id, workflow and arguments, configuration lines, state files {path below tmp: bytes}, exit, the line)
    ("lockfile-in-proc", ["mkbackuponly"], ["LOCKFILE=/proc/nope/rescue.lock"], {}, 1,
     "cannot create the lock file /proc/nope/rescue.lock: No such file or directory"),
    ("savelayout-into-proc", ["savelayout", "-o", "/proc/rescue-layout"], [], {}, 1,
     "cannot write the layout into /proc/rescue-layout"),
    ("savelayout-onto-a-file", ["savelayout", "-o", "{tmp}/not-a-dir"], [], {}, 1,
     "cannot write the layout into {tmp}/not-a-dir"),
    ("layout-binary", ["checklayout"], [], {"var/layout/layout.json": b"\xa5\xff\x00binary"}, 2,
     "layout.json is not a valid layout: not text"),
    ("layout-truncated", ["checklayout"], [], {"var/layout/layout.json": b'{"version": 1'}, 2,
     "layout.json is not a valid layout: Expecting"),
    ("layout-wrong-shape", ["checklayout"], [], {"var/layout/layout.json": b"[1]"}, 2,
     "layout.json is not a valid layout: not a JSON object"),
    ("parts-plan-wrong-shape", ["mkbackuponly"], [], {"var/backup-parts.json": b'{"parts": "/srv"}'}, 1,
     "backup-parts.json: not a plan of chains as rescue writes it"),
    ("parts-plan-binary", ["mkbackuponly"], [], {"var/backup-parts.json": b"\xa5\xff"}, 1,
     "cannot read {tmp}/var/backup-parts.json"),
    ("count-not-a-number", ["dump"], ["BACKUP_DUPLICITY_MAX_SETS=three"], {}, 2,
     'BACKUP_DUPLICITY_MAX_SETS: expected a whole number of 1 or more, got "three"'),
    ("count-negative", ["dump"], ["BACKUP_DUPLICITY_MAX_SETS=-1"], {}, 2, "BACKUP_DUPLICITY_MAX_SETS: expected a whole number"),
    ("count-arabic-digit", ["dump"], ["BACKUP_DUPLICITY_MAX_SETS=\u0663"], {}, 2, "BACKUP_DUPLICITY_MAX_SETS: expected a whole number"),
    ("bare-file-url", ["dump"], ["BACKUP_DUPLICITY_URL=file://"], {}, 2, "expected file:// with an absolute directory"),
    ("bare-rsync-url", ["dump"], ["BACKUP_DUPLICITY_URL=rsync://"], {}, 2, "expected rsync://[user@]host/path"),
    ("unknown-scheme", ["dump"], ["BACKUP_DUPLICITY_URL=gopher://h/x"], {}, 2, "a scheme duplicity has"),
    ("relative-file-url", ["dump"], ["BACKUP_DUPLICITY_URL=file://relative/x"], {}, 2, "expected file:// with an absolute"),
    ("url-query", ["dump"], ["BACKUP_DUPLICITY_URL=file:///b/x?x=1#f"], {}, 2, "without ?… or #…"),
    ("hostname-path", ["dump"], ["HOSTNAME=../../etc"], {}, 2, "HOSTNAME: expected a name"),
    ("name-path", ["dump"], ["BACKUP_DUPLICITY_NAME=../../evil"], {}, 2, "BACKUP_DUPLICITY_NAME: expected a name"),
    ("restore-time-month-13", ["restoreonly", "--target", "{tmp}/r", "--restore-time", "2026-13-45"], [], {}, 2,
     "--restore-time 2026-13-45: expected a real date and time"),
    ("restore-time-1900", ["restoreonly", "--target", "{tmp}/r", "--restore-time", "1900-01-01"], [], {}, 2,
     "expected a date after 1970"),
    ("no-backup-sets", ["restoreonly", "--target", "{tmp}/r", "--restore-time", "0"], [], {}, 1,
     "there is no backup at file://"),
    ("no-backup-sets-verify", ["verify"], [], {}, 2, "there is no backup at file://"),
    ("empty-target", ["restoreonly", "--target", ""], [], {}, 2, "--target is empty"),
    ("include-missing", ["mkbackuponly"], ["BACKUP_DUPLICITY_INCLUDE=( /nonexistent-rescue-x )"], {}, 2,
     "nothing to back up: none of BACKUP_DUPLICITY_INCLUDE exists"),
    ("unknown-duplicity-option", ["mkbackuponly"], ['BACKUP_DUPLICITY_OPTIONS="--no-such-option"'], {}, 1,
     "duplicity rejected its command line (an option in BACKUP_DUPLICITY_OPTIONS?)"),
    ("non-utf8-url-in-config", ["dump"], [b"BACKUP_DUPLICITY_URL=file:///b/t\xff"], {}, 2,
     "not a text file (not UTF-8 at byte"),
    ("non-utf8-restore-target", ["restoreonly", "--target", "{tmp}/r\udcff"], [], {}, 2,
     "--target {tmp}/r\\xff: the name is not UTF-8"),
]


@pytest.mark.parametrize("workflow,lines,files,code,needle", [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_every_bad_input_is_one_line_with_its_exit_code(tmp_path, conf_dir, workflow, lines, files, code, needle):
    site = bad_input_site(tmp_path)
    (conf_dir / "site.conf").write_text("\n".join(site) + "\n")
    (conf_dir / "case.conf").write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n"
                                                  for line in lines))     # after local.conf
    for path, data in files.items():
        (tmp_path / path).write_bytes(data)
    args = [a.replace("{tmp}", str(tmp_path)) for a in workflow]
    proc = run_rescue("-c", conf_dir, "-C", "case", *args, env={"HOME": str(tmp_path), "TMPDIR": str(tmp_path)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rescue: error: ")]
    assert len(errors) == 1 and needle.replace("{tmp}", str(tmp_path)) in errors[0], proc.stderr
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "internal error" not in proc.stderr
    assert not any(line.startswith('  File "') for line in proc.stderr.splitlines()), proc.stderr


def delete_manifests(target):
    for manifest in target.glob("duplicity-full.*.manifest.gpg"):
        manifest.unlink()


def delete_part_chains(target):
    parts = list(target.glob("part-*"))
    assert parts
    for part in parts:
        shutil.rmtree(part)


AFTER_A_BACKUP = [
    # (id, extra configuration, what is deleted on the target, the error line, status' warning)
    ("deleted-manifest", [], delete_manifests, "the backup has no complete set",
     "warning: there are orphaned or incomplete backup sets"),
    ("deleted-part-chain", ["BACKUP_DUPLICITY_PARALLEL=2", "BACKUP_DUPLICITY_PART_MIN_MB=0"], delete_part_chains,
     "has no complete set (its backups were interrupted, or files of them were deleted)",
     "has no complete set: a restore of the whole backup fails"),
]


@pytest.mark.parametrize("lines,damage,needle,warning", [row[1:] for row in AFTER_A_BACKUP],
                         ids=[row[0] for row in AFTER_A_BACKUP])
def test_a_damaged_target_is_one_line_for_restore_and_verify_and_a_warning_in_status(
        tmp_path, conf_dir, lines, damage, needle, warning):
    site = bad_input_site(tmp_path)
    (tmp_path / "src/sub").mkdir()
    (tmp_path / "src/sub/g").write_text("more\n")
    (conf_dir / "site.conf").write_text("\n".join(site + lines) + "\n")
    env = {"HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    proc = run_rescue("-c", conf_dir, "mkbackuponly", env=env)
    assert proc.returncode == 0, proc.stderr
    damage(tmp_path / "target" / socket.gethostname())
    for workflow, code in ((["restoreonly", "--target", str(tmp_path / "r")], 1), (["verify"], 2)):
        proc = run_rescue("-c", conf_dir, *workflow, env=env)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("rescue: error: ")]
        assert len(errors) == 1 and needle in errors[0], proc.stderr
        assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr
    proc = run_rescue("-c", conf_dir, "status", env=env)
    assert proc.returncode == 0 and warning in proc.stdout, proc.stdout + proc.stderr


def test_a_restore_into_a_read_only_mount_is_one_line(tmp_path, conf_dir):
    site = bad_input_site(tmp_path)
    (conf_dir / "site.conf").write_text("\n".join(site) + "\n")
    env = {"HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    assert run_rescue("-c", conf_dir, "mkbackuponly", env=env).returncode == 0
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], check=True)
    try:
        proc = run_rescue("-c", conf_dir, "restoreonly", "--target", read_only, env=env)
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"rescue: error: cannot create a working directory in {read_only}: "
                                  "Read-only file system"), proc.stderr


# The same, fuzzed: whatever a state file or a setting holds, rescue answers with its own error.

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=12)
STATE_BYTES = st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()) | st.fixed_dictionaries(
    {"parts": JSON_VALUES, "retired": JSON_VALUES, "workers": JSON_VALUES}).map(lambda v: json.dumps(v).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=STATE_BYTES)
def test_fuzzed_state_files_give_rescues_errors_only(tmp_path, data):
    import rescue
    (tmp_path / "state").write_bytes(data)
    try:
        plan = rescue.read_parts_plan(tmp_path / "state")
        assert all(isinstance(p, str) for p in plan.parts + plan.retired)
    except rescue.RescueError:
        pass
    conf = rescue.config_from_values({"VAR_DIR": str(tmp_path), "LAYOUT_DIR": str(tmp_path)})
    (tmp_path / "last-backup.json").write_bytes(data)
    assert isinstance(rescue.previous_record(conf), dict)
    (tmp_path / "layout.json").write_bytes(data)
    try:
        rescue.saved_layout(conf)
    except rescue.RescueError:
        pass


FUZZED_SETTINGS = ["BACKUP_DUPLICITY_MAX_SETS", "BACKUP_DUPLICITY_MAX_TIME", "BACKUP_DUPLICITY_RESTORE_TIME",
                   "BACKUP_DUPLICITY_PARALLEL", "BACKUP_DUPLICITY_PART_MIN_MB", "BACKUP_DUPLICITY_URL", "HOSTNAME",
                   "BACKUP_DUPLICITY_NAME", "USER_INPUT_TIMEOUT", "PROGRESS_WAIT_SECONDS", "LOCKFILE"]


@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(FUZZED_SETTINGS), value=st.text(max_size=30))
def test_fuzzed_setting_values_are_taken_or_refused_as_config_errors(name, value):
    import rescue
    try:
        config = rescue.config_from_values({name: value})
    except rescue.ConfigError as exc:
        assert exc.message.startswith(f"the environment's {name}: ") or name in exc.message
        return
    if name.endswith("_TIME") and config.setting(name):
        rescue.time_seconds(config.setting(name), 0.0)        # a time rescue took, it can compute
