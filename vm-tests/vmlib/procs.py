"""Starting and reaping host processes: the only place the harness calls subprocess.

Two guarantees live here:
  * every command is logged, runs with a pinned locale and a hard timeout, and a failure becomes
    one HarnessError that carries the command line and the tail of its output;
  * every long-lived child (QEMU) runs in its own process group, dies with the test process
    (PR_SET_PDEATHSIG), carries a session marker in its environment so the session can prove
    none survived, and is killed by an atexit hook if a test forgot it.
"""

import atexit
import ctypes
import logging
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

log = logging.getLogger("vmlib")

SESSION_ENV = "RESCUE_VM_SESSION"
# One id per Python process: every QEMU started by this process carries it in its environment.
SESSION_ID = uuid.uuid4().hex

Argv = Sequence[Union[str, Path]]


class HarnessError(Exception):
    """A harness step failed; the message says which and shows the evidence."""


class CommandFailed(HarnessError):
    def __init__(self, argv: Argv, returncode: int, output: str):
        self.argv = [str(a) for a in argv]
        self.returncode = returncode
        self.output = output
        tail = "\n".join(output.splitlines()[-40:])
        super().__init__("command failed (exit %d): %s\n%s" % (returncode, " ".join(self.argv), tail))


def base_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A small explicit environment: tools behave the same on every machine and in CI."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "DEBIAN_FRONTEND": "noninteractive",
        SESSION_ENV: SESSION_ID,
    }
    env.update(extra or {})
    return env


def run(argv: Argv, timeout: float, log_file: Optional[Path] = None, check: bool = True,
        env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
        input: Optional[bytes] = None) -> subprocess.CompletedProcess:
    """Run a host command to completion; stdout+stderr go to log_file (appended) or are captured.

    The process gets its own process group so a timeout kills helpers it started too
    (debootstrap runs dpkg, apt, chroot...).
    """
    argv = [str(a) for a in argv]
    log.info("run: %s", " ".join(argv))
    start = time.monotonic()
    out = open(log_file, "ab") if log_file else subprocess.PIPE
    try:
        if log_file:
            out.write(("\n$ %s\n" % " ".join(argv)).encode())
            out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=env or base_env(),
                                cwd=str(cwd) if cwd else None, start_new_session=True,
                                preexec_fn=_die_with_parent)
        try:
            stdout, _ = proc.communicate(input=input, timeout=timeout)
        except BaseException:
            kill_group(proc)
            raise
    except subprocess.TimeoutExpired:
        raise HarnessError("timed out after %.0f s: %s" % (timeout, " ".join(argv)))
    finally:
        if log_file:
            out.close()
    text = stdout.decode(errors="replace") if stdout is not None else _tail(log_file)
    log.info("exit %d after %.1f s", proc.returncode, time.monotonic() - start)
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, text)
    return subprocess.CompletedProcess(argv, proc.returncode, text, None)


def _tail(path: Optional[Path], size: int = 8192) -> str:
    if not path or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel SIGKILLs it when the harness dies, even by SIGKILL.

    PDEATHSIG fires when the parent *thread* exits, so long-lived children must be started from
    the main thread (pytest runs tests there).
    """
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def spawn(argv: Argv, stdin, stdout, stderr, env: Dict[str, str]) -> subprocess.Popen:
    """Start a long-lived child (QEMU) in its own process group and register it for cleanup."""
    argv = [str(a) for a in argv]
    log.info("spawn: %s", " ".join(argv))
    proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)
    _LIVE[proc.pid] = proc
    return proc


def kill_group(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """SIGTERM (if grace) then SIGKILL the child's whole process group, and reap the child."""
    if proc.poll() is not None:  # already exited and reaped: its pid may belong to someone else
        _LIVE.pop(proc.pid, None)
        return
    if grace > 0:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        log.error("pid %d did not die after SIGKILL", proc.pid)
    _LIVE.pop(proc.pid, None)


def forget(proc: subprocess.Popen) -> None:
    """The child exited by itself and was reaped: stop tracking it."""
    _LIVE.pop(proc.pid, None)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


_LIVE: Dict[int, subprocess.Popen] = {}


@atexit.register
def kill_all_live() -> List[int]:
    """Kill every child spawn() started that is still tracked; returns their pids."""
    pids = list(_LIVE)
    for pid in pids:
        log.warning("killing leftover child pid %d", pid)
        kill_group(_LIVE[pid])
    return pids


def session_qemu_pids(session_id: str = SESSION_ID) -> List[int]:
    """Pids of running qemu-system processes whose environment carries this session's marker.

    Looks at /proc rather than at our own bookkeeping, so it also catches QEMUs started by a
    code path that forgot to register them.
    """
    marker = ("%s=%s" % (SESSION_ENV, session_id)).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("qemu-system"):
                continue
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def which(name: str) -> Optional[str]:
    for d in base_env()["PATH"].split(":"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None
