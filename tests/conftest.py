"""Shared helpers for rescue's tests: run the CLI as a user would, with an isolated config."""

import os
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
