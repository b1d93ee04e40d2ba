#!/usr/bin/env python3
"""Startup cost of dist/rescue.pyz: its size, and median wall times of cold and warm starts.

    python3 bench/startup.py [--runs N] [--pyz dist/rescue.pyz] [--python PYTHON]

cold  every run unpacks into a fresh SHIV_ROOT: the first run on a machine, or after a rebuild.
warm  the runs share one unpacked tree: every later run.

duplicity is timed the way rescue.py starts it: PYTHON -m duplicity with PYTHONPATH set to the
unpacked site-packages. Its cold run is the first one after unpacking, before Python has written
bytecode caches for it. The pyz is started as `PYTHON dist/rescue.pyz` rather than through its
shebang, so that a PATH wrapper (pyenv's shims cost ~30 ms) does not blur the figures, and
without PYTHONDONTWRITEBYTECODE, so that warm runs use bytecode caches as they would in the field.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
BASE_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(argv: List[str], env: Dict[str, str]) -> float:
    """Seconds one command takes; it must succeed, or the figure would mean nothing."""
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-500:]!r}")
    return elapsed


def site_packages(pyz: Path, shiv_root: Path) -> Path:
    """Where shiv unpacked PYZ's site-packages under SHIV_ROOT (named by the build id)."""
    with zipfile.ZipFile(pyz) as archive:
        build_id = json.loads(archive.read("environment.json"))["build_id"]
    return shiv_root / f"{pyz.name}_{build_id}" / "site-packages"


def median_ms(samples: List[float]) -> str:
    return f"{statistics.median(samples) * 1000:7.0f} ms  (min {min(samples) * 1000:.0f}, max {max(samples) * 1000:.0f})"


def cold(runs: int, measure: Callable[[Dict[str, str]], float]) -> List[float]:
    """MEASURE once per fresh unpack root."""
    samples = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as root:
            samples.append(measure(dict(BASE_ENV, SHIV_ROOT=root)))
    return samples


def bench(pyz: Path, python: str, runs: int) -> None:
    rescue = [python, str(pyz)]
    duplicity = [python, "-m", "duplicity", "--version"]

    def duplicity_env(env: Dict[str, str]) -> Dict[str, str]:
        return dict(env, PYTHONPATH=str(site_packages(pyz, Path(env["SHIV_ROOT"]))))

    def first_duplicity(env: Dict[str, str]) -> float:
        timed(rescue + ["--version"], env)  # unpack, untimed
        return timed(duplicity, duplicity_env(env))

    print(f"{pyz}: {pyz.stat().st_size / 1e6:.2f} MB; "
          f"{subprocess.run([python, '-VV'], capture_output=True, text=True).stdout.strip()}")
    print(f"median of {runs} runs")
    print(f"rescue.pyz --version, cold        {median_ms(cold(runs, lambda env: timed(rescue + ['--version'], env)))}")
    print(f"python3 -m duplicity --version, cold {median_ms(cold(runs, first_duplicity))}")
    with tempfile.TemporaryDirectory() as root:
        env = dict(BASE_ENV, SHIV_ROOT=root)
        first_duplicity(env)  # unpack and write bytecode caches
        unpacked = site_packages(pyz, Path(root))
        size = sum(p.stat().st_size for p in unpacked.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        print(f"rescue.pyz --version, warm        {median_ms([timed(rescue + ['--version'], env) for _ in range(runs)])}")
        print(f"python3 -m duplicity --version, warm {median_ms([timed(duplicity, duplicity_env(env)) for _ in range(runs)])}")
        try:
            samples = [timed(rescue + ["duplicity", "--version"], env) for _ in range(runs)]
            print(f"rescue.pyz duplicity --version, warm {median_ms(samples)}")
        except RuntimeError as error:
            print(f"rescue.pyz duplicity --version: n/a ({error})")
        print(f"unpacked site-packages: {size / 1e6:.2f} MB")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--pyz", type=Path, default=REPO / "dist" / "rescue.pyz")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    if not args.pyz.is_file():
        print(f"{args.pyz} does not exist; run: python3 build_zipapp.py", file=sys.stderr)
        return 1
    bench(args.pyz, args.python, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
