#!/usr/bin/env python3
"""Backup and restore speed: rescue's defaults against the duplicity command line ReaR builds.

    python3 bench/backup.py [--size-mb 1024] [--target rsync|file] [--repeat N] [--candidates] [--json OUT]

On a generated dataset (mixed small and large files, partly compressible; cached in
--data-dir), same machine, same run:
  (a) rescue: `rescue mkbackuponly` / `rescue restoreonly` with conf/default.conf's settings
      (everything included: the layout upload, rescue's metadata walk, the restore fix-ups),
  (b) ReaR:   the seed's lines, `duplicity -v5 --name rear-backup --encrypt-key KEY … SRC URL`
      and `duplicity -v 5 --encrypt-key KEY --force --tempdir=DIR URL/ TARGET`,
for a full backup, an incremental after changing 5 % of the data, and a full restore. It
prints seconds, MB/s (of the dataset) and the ratio a/b, and the bytes stored on the target.

--candidates also times full backup + restore of plain duplicity with single settings
(the choice behind BACKUP_DUPLICITY_TUNING). Run it while the machine is otherwise idle:
it refuses to start while a qemu-system process runs (another job's VM would skew figures).

The target is rsync over ssh to an sshd of our own on 127.0.0.1 (as in ReaR's walkthrough),
or file:// on the local disk. Both duplicitys are the same one: what differs is the options.
The server's side (sshd, rsync --server) runs on the same 2 cores, but not root's ~/.bashrc
(see sshd_config in tests/backup_fixtures.py): on the machine these figures come from it ran
pyenv init, 0.12 s of CPU for each rsync call (a split restore makes about 40, ReaR's 10).
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from backup_fixtures import start_sshd  # noqa: E402

PASSPHRASE = "bench-passphrase"
REAR_EXCLUDES = ["/proc", "/sys", "/run", "/var/lib/ntp/proc", "/root/.cache", "/tmp", "/var/tmp",
                 "/app", "/var/app"]
IGNORE_LOAD = False
WORDS = (b"the quick brown fox jumps over lazy dog error warning info debug kernel systemd "
         b"session opened closed user root connection from port ssh2 accepted publickey for").split()


# -- the dataset ------------------------------------------------------------------------------

def text_block(rng: random.Random, size: int) -> bytes:
    """Log-like text: compresses about 3-4x, like /var/log or source code."""
    out, total = [], 0
    while total < size:
        line = b" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        line = b"%d.%06d " % (rng.randint(1e9, 2e9), rng.randint(0, 999999)) + line + b"\n"
        out.append(line)
        total += len(line)
    return b"".join(out)[:size]


def make_dataset(root: Path, size_mb: int) -> None:
    """~size_mb MB: 30 % random (media, archives), 30 % text, 20 % half-zero blocks (databases,
    images), 20 % small files of 1-16 KB (configuration, code) — about 13 % of the files' count."""
    rng = random.Random(42)
    mb = 1024 * 1024
    text = text_block(rng, 8 * mb)
    budget = {"random": 0.3, "text": 0.3, "blocks": 0.2}
    for kind, share in budget.items():
        directory = root / kind
        directory.mkdir(parents=True)
        remaining, n = int(size_mb * share * mb), 0
        while remaining > 0:
            size = min(remaining, rng.choice((4, 8, 16, 32)) * mb)
            with open(directory / f"{kind}{n:04d}.dat", "wb") as f:
                for _ in range(size // mb):
                    if kind == "random":
                        f.write(os.urandom(mb))
                    elif kind == "text":
                        start = rng.randrange(0, 7 * mb)
                        f.write(text[start:start + mb])
                    else:
                        f.write(os.urandom(mb // 2) + bytes(mb // 2))
            remaining, n = remaining - size, n + 1
    small, remaining, n = root / "small", int(size_mb * 0.2 * mb), 0
    while remaining > 0:
        directory = small / f"d{n // 500:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(1024, 16 * 1024)
        start = rng.randrange(0, 7 * mb)
        data = text[start:start + size] if n % 3 else os.urandom(size)
        (directory / f"f{n:06d}.txt").write_bytes(data)
        remaining, n = remaining - size, n + 1


def change_dataset(root: Path, fraction: float = 0.05) -> int:
    """Rewrite regions of about fraction of the bytes (every 20th file), add a few new files."""
    rng = random.Random(7)
    changed = 0
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for n, path in enumerate(files):
        if n % int(1 / fraction):
            continue
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(rng.randrange(0, max(1, size // 2)))
            chunk = os.urandom(max(1, size // 2))
            f.write(chunk)
        changed += len(chunk)
    extra = root / "new"
    extra.mkdir(exist_ok=True)
    for n in range(20):
        (extra / f"new{rng.random()}.dat").write_bytes(os.urandom(256 * 1024))
        changed += 256 * 1024
    return changed


def dataset_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# -- the machinery: a gpg key, an sshd, timing -------------------------------------------------

def make_key(home: Path) -> str:
    home.mkdir(mode=0o700)
    (home / "gpg-agent.conf").write_text("allow-loopback-pinentry\n")
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", PASSPHRASE,
                    "--quick-gen-key", "bench <bench@test>", "rsa3072", "default", "never"],
                   env=env, check=True, capture_output=True)
    subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", PASSPHRASE,
                    "--quick-add-key", fingerprint(env), "rsa3072", "encr", "never"],
                   env=env, check=True, capture_output=True)
    return fingerprint(env)


def fingerprint(env: Dict[str, str]) -> str:
    listing = subprocess.run(["gpg", "--with-colons", "--list-keys"], env=env, capture_output=True,
                             check=True, text=True).stdout
    return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))


def vm_running() -> bool:
    return subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True).returncode == 0


class LoadWatch:
    """Notices a VM (another job's) that runs at any time during a measurement."""

    def __init__(self) -> None:
        self.seen = False
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self) -> None:
        while not self.done.wait(1.0):
            self.seen = self.seen or vm_running()

    def __enter__(self) -> "LoadWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.seen = self.seen or vm_running()


def wait_for_idle_machine() -> None:
    while vm_running():
        print("  (a VM is running: waiting for it to finish)", flush=True)
        time.sleep(30)


TAINTED: List[str] = []     # measurements during which a VM ran
FIGURES: Dict[str, object] = {}


def timed(argv: List[str], env: Dict[str, str], stdin: str = "") -> float:
    """Seconds the command takes, on an idle machine (a VM that runs meanwhile taints it)."""
    if not IGNORE_LOAD:
        wait_for_idle_machine()
    with LoadWatch() as watch:
        started = time.perf_counter()
        result = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
    if watch.seen and not IGNORE_LOAD:
        TAINTED.append(" ".join(argv[:4]))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}… failed ({result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    return elapsed


def stored_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and "layout" not in p.parts)


def clear_caches() -> None:
    """Restores and backups read cold data in real life: drop the page cache between runs."""
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


# -- the two contenders ------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, data: Path, target: str):
        self.work, self.data = work, data
        self.gnupg = work / "gnupg"
        self.key = make_key(self.gnupg)
        self.sshd = None
        self.ssh_options = ""
        if target == "rsync":
            (work / "sshd").mkdir()
            self.sshd, port, self.ssh_options = start_sshd(work / "sshd")
            self.url = lambda name: f"rsync://root@127.0.0.1:{port}/{work}/target-{name}"
        else:
            self.url = lambda name: f"file://{work}/target-{name}"

    def env(self, name: str) -> Dict[str, str]:
        home = self.work / f"home-{name}"
        home.mkdir(exist_ok=True)
        return dict(os.environ, HOME=str(home), GNUPGHOME=str(self.gnupg), TMPDIR=str(self.work),
                    PASSPHRASE=PASSPHRASE)

    def duplicity(self, name: str, args: List[str]) -> float:
        env = self.env(name)
        env["PYTHONPATH"] = str(REPO)
        ssh = [f"--ssh-options={self.ssh_options}"] if self.ssh_options else []
        (self.work / f"target-{name}").mkdir(exist_ok=True)
        return timed([sys.executable, "-m", "duplicity"] + ssh + args, env)

    def rear_backup(self, name: str = "rear", extra: List[str] = ()) -> float:
        # ReaR backs up / with its excludes; here / is narrowed to the dataset (which lives in
        # /var/tmp, one of ReaR's excludes, hence the --include first).
        excludes = [w for e in REAR_EXCLUDES for w in ("--exclude", e)]
        return self.duplicity(name, ["-v5", "--name", "rear-backup", "--encrypt-key", self.key] + list(extra)
                              + ["--include", str(self.data)] + excludes + ["--exclude", "**", "/", self.url(name)])

    def rear_restore(self, name: str = "rear", extra: List[str] = ()) -> float:
        target, tempdir = self.work / f"restore-{name}", self.work / f"restore-{name}-tmp"
        tempdir.mkdir()
        seconds = self.duplicity(name, ["-v", "5", "--encrypt-key", self.key] + list(extra)
                                 + ["--force", f"--tempdir={tempdir}", self.url(name) + "/", str(target)])
        shutil.rmtree(target)
        shutil.rmtree(tempdir)
        return seconds

    def rescue(self, *args: str) -> float:
        conf = self.work / "rescue-etc"
        conf.mkdir(exist_ok=True)
        url = self.url("rescue")
        (conf / "local.conf").write_text(
            f"LOGFILE={self.work}/rescue.log\nLOCKFILE={self.work}/rescue.lock\nVAR_DIR={self.work}/var\n"
            f"LAYOUT_DIR={self.work}/var/layout\n"
            f"BACKUP_DUPLICITY_URL='{url}'\nBACKUP_DUPLICITY_INCLUDE=( '{self.data}' )\n"
            f"BACKUP_DUPLICITY_GPG_ENC_KEY={self.key}\nBACKUP_DUPLICITY_GPG_ENC_PASSPHRASE={PASSPHRASE}\n"
            f"BACKUP_DUPLICITY_SSH_OPTIONS='{self.ssh_options}'\n")
        env = self.env("rescue")
        del env["PASSPHRASE"]
        return timed([sys.executable, str(REPO / "rescue.py"), "-c", str(conf)] + list(args), env)

    def rescue_target(self) -> Path:
        import socket
        return self.work / "target-rescue" / socket.gethostname()

    def close(self) -> None:
        if self.sshd:
            self.sshd.terminate()
            self.sshd.wait()
        subprocess.run(["gpgconf", "--kill", "all"], env=dict(os.environ, GNUPGHOME=str(self.gnupg)))


def compare(bench: Bench, size: int, changed: "callable") -> Dict[str, Dict[str, float]]:
    """Full, incremental after 5 % change, restore: (a) rescue then (b) ReaR, each phase."""
    results: Dict[str, Dict[str, float]] = {}
    clear_caches()
    results["full"] = {"a": bench.rescue("mkbackuponly")}
    clear_caches()
    results["full"]["b"] = bench.rear_backup()
    results["full"]["stored_a"] = stored_bytes(bench.rescue_target())
    results["full"]["stored_b"] = stored_bytes(bench.work / "target-rear")
    changed_bytes = changed()
    clear_caches()
    results["incremental"] = {"a": bench.rescue("mkbackuponly"), "changed_bytes": changed_bytes}
    clear_caches()
    results["incremental"]["b"] = bench.rear_backup()
    results["incremental"]["stored_a"] = stored_bytes(bench.rescue_target()) - results["full"]["stored_a"]
    results["incremental"]["stored_b"] = stored_bytes(bench.work / "target-rear") - results["full"]["stored_b"]
    target = bench.work / "restore-rescue"
    clear_caches()
    results["restore"] = {"a": bench.rescue("restoreonly", "--target", str(target))}
    shutil.rmtree(target)
    clear_caches()
    results["restore"]["b"] = bench.rear_restore()
    return results


def candidates(bench: Bench, settings: Dict[str, List[str]]) -> Dict[str, Dict[str, float]]:
    """Plain duplicity full backup + restore with each candidate setting."""
    out = {}
    for label, extra in settings.items():
        name = re.sub(r"\W+", "-", label).strip("-")     # duplicity's rsync backend cannot quote
        for attempt in range(5):
            del TAINTED[:]
            for leftover in (bench.work / f"target-{name}", bench.work / f"home-{name}"):
                shutil.rmtree(leftover, ignore_errors=True)
            clear_caches()
            backup = bench.rear_backup(name, extra)
            stored = stored_bytes(bench.work / f"target-{name}")
            clear_caches()
            restore = bench.rear_restore(name, extra)
            if not TAINTED:
                break
        out[label] = {"backup": backup, "restore": restore, "stored": stored}
        print(f"  {label:<28} backup {backup:6.1f} s  restore {restore:6.1f} s  stored {stored / 1e6:7.1f} MB",
              flush=True)
        shutil.rmtree(bench.work / f"target-{name}")
    return out


CANDIDATES = {
    "duplicity defaults (ReaR)": [],
    "compress-level 1": ["--gpg-options=--compress-level 1"],
    "volsize 1000": ["--volsize", "1000"],
    "concurrency 1": ["--concurrency", "1"],
    "no-files-changed": ["--no-files-changed"],
    "level 1 + volsize 500": ["--gpg-options=--compress-level 1", "--volsize", "500"],
    "level 1 + concurrency 1": ["--gpg-options=--compress-level 1", "--concurrency", "1"],
}


def report(results: Dict[str, Dict[str, float]], size: int) -> None:
    print(f"\ndataset: {size / 1e6:.0f} MB;  a = rescue defaults, b = ReaR's duplicity command line")
    print(f"{'phase':<12} {'a s':>7} {'b s':>7} {'a MB/s':>8} {'b MB/s':>8} {'b/a (speed-up)':>15}")
    for phase, r in results.items():
        mb = size / 1e6
        print(f"{phase:<12} {r['a']:7.1f} {r['b']:7.1f} {mb / r['a']:8.1f} {mb / r['b']:8.1f} {r['b'] / r['a']:15.2f}")
    for phase in ("full", "incremental"):
        r = results[phase]
        print(f"stored ({phase}): a {r['stored_a'] / 1e6:.1f} MB, b {r['stored_b'] / 1e6:.1f} MB, "
              f"a/b {r['stored_a'] / r['stored_b']:.2f}")


def run_once(data: Path, args: argparse.Namespace) -> Dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="rescue-bench-", dir="/var/tmp"))
    pristine = work / "data"
    shutil.copytree(data, pristine)
    size = dataset_bytes(pristine)
    bench = Bench(work, pristine, args.target)
    figures: Dict[str, object] = {"size_bytes": size, "target": args.target}
    try:
        if (args.candidates or args.only) and "candidates" not in FIGURES:
            print("candidates (plain duplicity, full backup + restore):", flush=True)
            chosen = {k: v for k, v in CANDIDATES.items() if not args.only or k in args.only.split(",")}
            FIGURES["candidates"] = candidates(bench, chosen)
            del TAINTED[:]
        figures.update(FIGURES)
        if not args.no_compare:
            figures["compare"] = compare(bench, size, lambda: change_dataset(pristine))
            report(figures["compare"], size)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--target", choices=("rsync", "file"), default="rsync")
    parser.add_argument("--data-dir", default="/var/tmp/rescue-bench-data")
    parser.add_argument("--candidates", action="store_true", help="also time single duplicity settings")
    parser.add_argument("--only", help="comma-separated candidate names to time (implies --candidates)")
    parser.add_argument("--no-compare", action="store_true", help="skip the rescue/ReaR comparison")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the comparison N times and print the median of each figure too")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--ignore-load", action="store_true", help="run even while a VM runs (to test this script)")
    args = parser.parse_args()
    global IGNORE_LOAD
    IGNORE_LOAD = args.ignore_load
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))     # clean up (sshd, gpg-agent) when stopped
    data = Path(args.data_dir) / f"{args.size_mb}MB"
    if not data.is_dir():
        print(f"generating {args.size_mb} MB in {data} …", flush=True)
        make_dataset(data, args.size_mb)
    runs = []
    for _ in range(max(1, args.repeat)):
        for attempt in range(1, 6):
            del TAINTED[:]
            figures = run_once(data, args)
            if not TAINTED:
                break
            print(f"a VM ran during {len(TAINTED)} measurements: running the whole comparison again", flush=True)
        figures["vm_ran_during"] = list(TAINTED)
        runs.append(figures)
    if len(runs) > 1 and all("compare" in f for f in runs):
        median = {phase: {key: statistics.median(f["compare"][phase][key] for f in runs)
                          for key in runs[0]["compare"][phase]}
                  for phase in runs[0]["compare"]}
        print(f"\nmedian of {len(runs)} runs:")
        report(median, runs[0]["size_bytes"])
        figures = {"runs": runs, "median": median}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
