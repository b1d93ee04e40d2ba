"""The one runner: argv only, explicit environment, redacted log lines, truthful errors."""

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rescue


@pytest.fixture
def log(tmp_path):
    log = rescue.Log()
    log.open_file(tmp_path / "runner.log")     # not rescue*.log: these run programs of their own
    yield log
    log.close()


def test_environment_is_explicit_and_pinned_to_C(log, monkeypatch):
    monkeypatch.setenv("RANDOM_CALLER_VARIABLE", "leak")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    result = rescue.Runner(log).run(["env"], env={"EXTRA": "1"})
    env = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert env["LC_ALL"] == "C" and env["LANG"] == "C" and env["EXTRA"] == "1"
    assert "RANDOM_CALLER_VARIABLE" not in env
    assert env["PATH"]


def test_secret_in_environment_and_argv_is_redacted_in_the_log(log, tmp_path):
    log.add_secret("CANARY-arg-5150")
    rescue.Runner(log).run(["echo", "CANARY-arg-5150"], env={"PASSPHRASE": "CANARY-env-9911"})
    text = (tmp_path / "runner.log").read_text()
    assert "running: PASSPHRASE=*** echo ***" in text
    assert "CANARY" not in text


def test_failure_names_command_exit_code_and_stderr_tail(log):
    script = "for i in $(seq 1 30); do echo line$i >&2; done; exit 3"
    with pytest.raises(rescue.CommandError) as info:
        rescue.Runner(log).run(["sh", "-c", script])
    err = info.value
    assert err.returncode == 3
    assert err.message.startswith("command failed with exit code 3: sh -c ")
    assert err.hint.splitlines()[1:] == [f"line{i}" for i in range(21, 31)]


def test_check_false_returns_the_exit_code(log):
    result = rescue.Runner(log).run(["sh", "-c", "echo hi; exit 4"], check=False)
    assert (result.returncode, result.stdout) == (4, "hi\n")


def test_missing_program_says_what_provides_it(log):
    with pytest.raises(rescue.RescueError) as info:
        rescue.Runner(log).run(["/nonexistent/gpg"])
    assert info.value.message == "program '/nonexistent/gpg' not found"
    assert "gnupg" in info.value.hint


def test_timeout_kills_the_whole_process_group(log, tmp_path):
    pidfile = tmp_path / "grandchild"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    started = time.monotonic()
    with pytest.raises(rescue.RescueError) as info:
        rescue.Runner(log).run(["sh", "-c", script], timeout=1)
    assert "timed out after 1s" in info.value.message
    assert time.monotonic() - started < 15
    grandchild = int(pidfile.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]


def test_input_is_passed_on_stdin(log):
    assert rescue.Runner(log).run(["cat"], input="héllo\n").stdout == "héllo\n"


def test_non_utf8_output_survives(log):
    result = rescue.Runner(log).run(["printf", "a\\377b"])
    assert result.stdout.encode("utf-8", "surrogateescape") == b"a\xffb"


def test_log_file_rotation_mode_and_redaction(tmp_path, capsys):
    path = tmp_path / "sub" / "rescue.log"
    first = rescue.Log()
    first.open_file(path)
    first.say("first run")
    first.close()
    second = rescue.Log()
    second.add_secret("CANARY-log-3141")
    second.open_file(path)
    second.say("value CANARY-log-3141 here")
    second.warn("warn CANARY-log-3141")
    second.error("error CANARY-log-3141", "hint CANARY-log-3141")
    second.close()
    out = capsys.readouterr()
    assert "CANARY" not in out.out + out.err
    assert "value *** here" in out.out and "rescue: hint: hint ***" in out.err
    assert "CANARY" not in path.read_text() and "first run" in Path(str(path) + ".old").read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
import rescue
with rescue.Lock(rescue.Path({path!r}), "mkbackuponly"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_names_the_pid_that_holds_it(tmp_path):
    path = tmp_path / "rescue.lock"
    repo = str(Path(rescue.__file__).parent)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER.format(repo=repo, path=str(path))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rescue.RescueError) as info:
            with rescue.Lock(path, "mkbackuponly"):
                pass
        assert info.value.message == f"another rescue process (PID {holder.pid}) is running mkbackuponly"
    finally:
        holder.kill()
        holder.wait()
    with rescue.Lock(path, "savelayout"):      # released by the kernel when the holder died
        assert path.read_text() == f"{os.getpid()} savelayout\n"


def test_streamed_output_comes_line_by_line_merged_and_redacted(log):
    log.add_secret("CANARY-stream-77")
    log.add_secret("KEYID1234", "<GPG_KEY>")
    lines = []
    script = "import sys,time; print('one CANARY-stream-77', flush=True); time.sleep(0.2); " \
             "print('two KEYID1234', file=sys.stderr, flush=True); print('three')"
    result = rescue.Runner(log).run([sys.executable, "-c", script], on_line=lines.append)
    assert lines == ["one ***", "two <GPG_KEY>", "three"]
    assert result.stdout == "one ***\ntwo <GPG_KEY>\nthree" and result.returncode == 0


def test_streamed_command_that_fails_reports_the_tail_and_one_that_hangs_is_stopped(log):
    with pytest.raises(rescue.CommandError) as failed:
        rescue.Runner(log).run([sys.executable, "-c", "print('last words'); raise SystemExit(3)"],
                               on_line=lambda line: None)
    assert failed.value.returncode == 3 and "last words" in failed.value.hint
    started = time.monotonic()
    with pytest.raises(rescue.RescueError, match="timed out after 1s"):
        rescue.Runner(log).run(["sleep", "30"], on_line=lambda line: None, timeout=1)
    assert time.monotonic() - started < 10


def test_busy_time_counts_commands_running_side_by_side_once_and_waits_apart(tmp_path):
    runner = rescue.Runner(rescue.Log())
    threads = [threading.Thread(target=runner.run, args=(["sleep", "0.5"],)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0.45 < runner.kinds["other"] < 0.95   # two at once: about one half second, not one
    runner.wait(0.1)
    assert runner.waited == pytest.approx(0.1)
    split = rescue.time_split(runner)
    total, own, other = re.match(r"Time: ([0-9.]+) s: waiting for devices 0.1 s, orchestration ([0-9.]+) s "
                                 r"\([0-9.]+ %; other tools ([0-9.]+) s of it\)", split).groups()
    assert float(total) >= 0.6 and float(own) < float(total) and 0.45 < float(other) <= float(own)


def test_time_goes_to_the_kind_of_the_program_a_chroot_runs_and_the_rest_is_orchestration(tmp_path):
    assert rescue.tool_kind(["chroot", "/mnt/local", "update-initramfs", "-u"]) == "initramfs"
    assert rescue.tool_kind([sys.executable, "-m", "duplicity"], program="duplicity") == "duplicity"
    assert rescue.tool_kind(["/usr/sbin/mkfs.xfs", "-f", "/dev/sda1"]) == "mkfs"
    assert rescue.tool_kind(["chroot", "/mnt/local", "/usr/sbin/grub-install", "/dev/sda"]) == "bootloader"
    assert rescue.tool_kind(["sfdisk", "/dev/sda"]) == "other"
    runner = rescue.Runner(rescue.Log())
    mkfs = tmp_path / "mkswap"          # a program named like a heavy tool: its time is its kind's
    mkfs.write_text("#!/bin/sh\nsleep 0.4\n")
    mkfs.chmod(0o755)
    runner.run([str(mkfs)])
    runner.run(["sleep", "0.2"])
    assert 0.35 < runner.kinds["mkfs"] < 0.9 and 0.15 < runner.kinds["other"] < 0.6
    split = rescue.time_split(runner)
    seconds = float(re.search(r"orchestration ([0-9.]+) s", split).group(1))
    assert "mkfs 0." in split and seconds < (time.monotonic() - runner.started) - 0.35
