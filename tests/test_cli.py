"""The command line as a user meets it: dump, help, version, errors, log file, Ctrl-C."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

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
