#!/usr/bin/env python3
"""Benchmark: rescue's own time to map and plan the recreation of a big layout.

The layout is bench/layout.py's recorded machine (64 disks, 320 partitions, 200 LVs in 4 volume
groups, 200 filesystems), captured from its replay once. The disks here are 64 blank disks of
another naming (NVMe) whose sizes force every rule: the same size, larger, and by serial. Times,
without running any tool: map_disks, recreate_plan, and the three review forms (text, script,
JSON). Prints the median of several runs. Usage: python3 bench/plan.py [runs]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import layout as layout_bench  # noqa: E402
import rescue  # noqa: E402


def disks_here(lay):
    here = []
    for n, disk in enumerate(lay.disks):
        size = disk.size * (2 if n % 3 == 1 else 1)
        serial = disk.serial if n % 3 == 2 else None
        here.append(rescue.DiskHere(f"/dev/nvme{n}n1", size, 512, 4096, serial=serial))
    return here


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    config = rescue.load_config([rescue.DEFAULT_CONF], {"PATH": "/usr/bin"}, rescue.Log())
    with tempfile.TemporaryDirectory() as tmp:
        layout_bench.write_recording(Path(tmp))
        captured = rescue.capture_layout(rescue.Probe(replay_dir=Path(tmp)), config, "bench")
    lay = captured.layout
    here = disks_here(lay)
    options = rescue.RecreateOptions(vgcfg={vg: (f"/tmp/{vg}.vgcfg", text) for vg, text in captured.vgcfg.items()})
    timings = {"map_disks": [], "recreate_plan": [], "plan text": [], "plan script": [], "plan JSON": []}
    for _ in range(runs):
        start = time.perf_counter()
        mapping = rescue.map_disks(lay, here, {})
        t1 = time.perf_counter()
        plan = rescue.recreate_plan(lay, here, mapping, options)
        t2 = time.perf_counter()
        rescue.describe_plan(plan, lay, here)
        t3 = time.perf_counter()
        rescue.plan_script(plan, lay, here)
        t4 = time.perf_counter()
        rescue.plan_json(plan, lay)
        t5 = time.perf_counter()
        for name, value in zip(timings, (t1 - start, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            timings[name].append(value)
    print(f"layout: {len(lay.disks)} disks, {len(lay.partitions)} partitions, {len(lay.logical_volumes)} LVs, "
          f"{len(lay.filesystems)} filesystems; plan: {len(plan.steps)} steps, {len(plan.wipe)} disks wiped")
    total = 0.0
    for name, values in timings.items():
        median = statistics.median(values)
        total += median if name in ("map_disks", "recreate_plan") else 0
        print(f"{name:14} median {median * 1000:8.1f} ms  (min {min(values) * 1000:.1f}, {runs} runs)")
    print(f"{'map + plan':14} median {total * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
