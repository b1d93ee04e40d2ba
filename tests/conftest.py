"""Shared helpers for rescue's tests: run the CLI as a user would, with an isolated config."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESCUE = REPO / "rescue.py"
sys.path.insert(0, str(REPO))


def run_rescue(*args, env=None, input=None, timeout=120, cmd=None):
    """Run rescue as a subprocess (never in-process: exit codes and stderr are what users see)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    argv = (cmd or [sys.executable, str(RESCUE)]) + [str(a) for a in args]
    return subprocess.run(argv, env=full_env, input=input, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def conf_dir(tmp_path):
    """An empty CONFIG_DIR whose local.conf keeps the log and lock inside tmp_path."""
    directory = tmp_path / "etc-rescue"
    directory.mkdir()
    (directory / "local.conf").write_text(
        f'LOGFILE="{tmp_path}/log/rescue.log"\nLOCKFILE="{tmp_path}/rescue.lock"\n')
    return directory


def pyenv_python(minor):
    """The interpreter python3.<minor> if this machine has it (pyenv or system), else None."""
    candidates = sorted(Path("/root/.pyenv/versions").glob(f"3.{minor}.*/bin/python3.{minor}"))
    candidates += [Path(p) for p in (f"/usr/bin/python3.{minor}", f"/usr/local/bin/python3.{minor}")]
    return next((str(p) for p in candidates if p.is_file()), None)

# The backup tests' real gpg keys and sshd (session-wide).
from backup_fixtures import gnupg_keys, sshd_server  # noqa: E402,F401


# -- every program rescue ran in this session is in its table of tools ---------------------------

RUN_LINE = re.compile(r"^\S+ \S+ INFO  running(?: (\S+) as)?: (.*)$")


def programs_run(log_text):
    """argv[0] of every command a rescue log says it ran (environment assignments skipped)."""
    for line in log_text.splitlines():
        match = RUN_LINE.match(line)
        if not match:
            continue
        if match.group(1):
            yield match.group(1)
            continue
        try:
            words = shlex.split(match.group(2))
        except ValueError:
            continue
        words = [w for w in words if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w)][:1]
        if words:
            yield words[0]


def tool_name(argv0):
    import rescue
    name = os.path.basename(argv0)
    return "python3" if re.fullmatch(r"python3(\.\d+)?", name) else rescue.tool_of(argv0)


@pytest.fixture(scope="session", autouse=True)
def every_program_run_is_in_tools(tmp_path_factory):
    """After the session: the logs of every rescue run the tests made name only programs that
    TOOLS lists (the one table mkrescue copies from and errors take their hints from)."""
    yield
    import rescue
    seen = {}
    for log in Path(tmp_path_factory.getbasetemp()).rglob("*.log*"):
        if log.is_file() and log.name.startswith("rescue"):
            for argv0 in programs_run(log.read_text(errors="replace")):
                seen.setdefault(tool_name(argv0), str(log))
    unknown = {name: where for name, where in seen.items() if name not in rescue.TOOLS}
    assert not unknown, f"programs run but not in TOOLS: {unknown}"
