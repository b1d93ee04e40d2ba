#!/usr/bin/env python3
"""Benchmark: rescue's own time to turn a big recorded layout into layout.json.

Generates a recording (the files `savelayout --record` writes) of a large machine — 64 disks,
300 partitions, 200 LVs in 4 volume groups, 200 mounted filesystems — and times, without running
any tool: capture from the replay, layout.json serialisation, the tree view, and checklayout's
diff. Prints the median of several runs. Usage: python3 bench/layout.py [runs]
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rescue  # noqa: E402

DISKS, PARTS_PER_DISK, VGS, LVS = 64, 5, 4, 200   # 64 * 5 = 320 partitions (>= 300)
GiB = 1024 ** 3


def lsblk_and_tables():
    nodes, tables, pvs = [], {}, []
    for d in range(DISKS):
        disk = f"/dev/sd{chr(97 + d // 26) if d >= 26 else ''}{chr(97 + d % 26)}"
        children, parts = [], []
        for p in range(1, PARTS_PER_DISK + 1):
            name = f"{disk}{p}"
            is_pv = p == PARTS_PER_DISK
            children.append({"name": name, "kname": name, "type": "part", "size": 2 * GiB,
                             "maj:min": f"8:{d * 16 + p}", "fstype": "LVM2_member" if is_pv else "ext4",
                             "uuid": f"{d:04x}{p:04x}-0000-4000-8000-000000000000"})
            parts.append({"node": name, "start": 2048 + (p - 1) * 4194304, "size": 4194304,
                          "type": "0FC63DAF-8483-4772-8E79-3D69D8477DE4", "uuid": f"P-{d}-{p}"})
            if is_pv:
                pvs.append(name)
        nodes.append({"name": disk, "kname": disk, "type": "disk", "size": 12 * GiB, "maj:min": f"8:{d * 16}",
                      "log-sec": 512, "phy-sec": 4096, "tran": "sas", "serial": f"SER{d}", "children": children})
        tables[disk] = {"partitiontable": {"label": "gpt", "id": f"GUID-{d}", "firstlba": 2048,
                                           "lastlba": 25165790, "sectorsize": 512, "partitions": parts}}
    return nodes, tables, pvs


def lvm_reports(pvs):
    per_vg = len(pvs) // VGS
    pv_rows = [{"pv_name": pv, "pv_uuid": f"pvuuid-{i}", "pv_size": str(2 * GiB), "vg_name": f"vg{i // per_vg}"}
               for i, pv in enumerate(pvs)]
    vg_rows = [{"vg_name": f"vg{v}", "vg_uuid": f"vguuid-{v}", "vg_extent_size": "4194304",
                "vg_size": str(per_vg * 2 * GiB)} for v in range(VGS)]
    lv_rows = [{"lv_name": f"lv{n}", "vg_name": f"vg{n % VGS}", "lv_uuid": f"lvuuid-{n}", "lv_size": str(GiB // 4),
                "segtype": "linear", "stripes": "1", "stripe_size": "0", "data_copies": "1", "pool_lv": "",
                "lv_metadata_size": "", "lv_attr": "-wi-ao----"} for n in range(LVS)]
    return ({"report": [{"pv": pv_rows}]}, {"report": [{"vg": vg_rows}]}, {"report": [{"lv": lv_rows}]},
            pv_rows)


def write_recording(directory: Path):
    nodes, tables, pvs = lsblk_and_tables()
    pv_json, vg_json, lv_json, pv_rows = lvm_reports(pvs)
    lv_nodes = [{"name": rescue.dm_name(r["vg_name"], r["lv_name"]), "kname": f"/dev/dm-{n}", "type": "lvm",
                 "size": GiB // 4, "maj:min": f"253:{n}", "fstype": "xfs", "uuid": f"lvfs-{n}"}
                for n, r in enumerate(lv_json["report"][0]["lv"])]
    for pv in pv_rows:   # each LV hangs below every PV of its VG, as lsblk prints it
        part = next(c for d in nodes for c in d["children"] if c["name"] == pv["pv_name"])
        part["children"] = [n for n in lv_nodes if f"/dev/mapper/{pv['vg_name']}-" in n["name"]]
    mounts = [{"target": "/", "source": "/dev/sda1", "maj:min": "8:1", "fstype": "ext4", "options": "rw",
               "size": 2 * GiB, "used": GiB, "fsroot": "/"}]
    mounts += [{"target": f"/data/{n['name'].split('/')[-1]}", "source": n["name"], "maj:min": n["maj:min"],
                "fstype": "xfs", "options": "rw,relatime", "size": GiB // 4, "used": 1024, "fsroot": "/"}
               for n in lv_nodes]
    answers = {
        "run: lsblk -J -b -p -o " + rescue.LSBLK_COLUMNS: json.dumps({"blockdevices": nodes}),
        "run: findmnt -J -l -b -o " + rescue.FINDMNT_COLUMNS: json.dumps({"filesystems": mounts}),
        f"run: lvm pvs {' '.join(rescue.LVM_REPORT)} -o {rescue.PV_FIELDS}": json.dumps(pv_json),
        f"run: lvm vgs {' '.join(rescue.LVM_REPORT)} -o {rescue.VG_FIELDS}": json.dumps(vg_json),
        f"run: lvm lvs {' '.join(rescue.LVM_REPORT)} -o {rescue.LV_FIELDS}": json.dumps(lv_json),
    }
    answers.update({f"run: sfdisk -J {d}": json.dumps(t) for d, t in tables.items()})
    answers.update({f"run: dumpe2fs -h {d['name']}1": "Block size: 4096\nBlock count: 524288\nInode count: 131072\n"
                    for d in nodes[:1]})
    answers.update({f"run: xfs_info /data/{n['name'].split('/')[-1]}": "data     =  bsize=4096   blocks=65536\n"
                    for n in lv_nodes})
    answers.update({f"run: vgcfgbackup -f OUTPUT vg{v}": f"vg{v} {{\n}}\n" for v in range(VGS)})
    answers.update({f"read: {d['name']} [512]": "" for d in nodes})
    answers["read: /proc/swaps"] = "Filename Type Size Used Priority\n"
    answers["read: /etc/os-release"] = 'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n'
    answers["read: /etc/crypttab"] = ""
    manifest = {}
    for n, (key, text) in enumerate(sorted(answers.items())):
        name = f"answer{n}"
        (directory / name).write_text(text)
        manifest[key] = {"file": name, "returncode": 0} if key.startswith("run: ") else {"file": name}
    values = {"which: lvm": "/sbin/lvm", "which: sfdisk": "/sbin/sfdisk", "exists: /sys/firmware/efi": False,
              "links: /dev/disk/by-id": {}, "exists: /boot/grub/grub.cfg": True}
    for key, value in values.items():
        manifest[key] = {"value": value}
    for prog in ("grub2-install", "grub-install", "grub2-mkconfig", "grub-mkconfig", "dracut",
                 "update-initramfs", "mkinitrd"):
        manifest[f"which: {prog}"] = {"value": None}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    config = rescue.load_config([rescue.DEFAULT_CONF], {"PATH": "/usr/bin"}, rescue.Log())
    with tempfile.TemporaryDirectory() as tmp:
        write_recording(Path(tmp))
        timings = {"capture (replay)": [], "layout.json": [], "tree view": [], "diff": []}
        for _ in range(runs):
            start = time.perf_counter()
            captured = rescue.capture_layout(rescue.Probe(replay_dir=Path(tmp)), config, "bench")
            t1 = time.perf_counter()
            text = rescue.layout_to_json(captured.layout)
            t2 = time.perf_counter()
            rescue.format_layout(captured.layout)
            t3 = time.perf_counter()
            assert rescue.diff_layouts(rescue.layout_from_json(text), captured.layout) == []
            t4 = time.perf_counter()
            for name, value in zip(timings, (t1 - start, t2 - t1, t3 - t2, t4 - t3)):
                timings[name].append(value)
    lay = captured.layout
    print(f"layout: {len(lay.disks)} disks, {len(lay.partitions)} partitions, {len(lay.logical_volumes)} LVs, "
          f"{len(lay.filesystems)} filesystems, {len(lay.mounts)} mounts; layout.json {len(text) / 1024:.0f} KiB")
    total = 0.0
    for name, values in timings.items():
        median = statistics.median(values)
        total += median
        print(f"{name:18} median {median * 1000:8.1f} ms  (min {min(values) * 1000:.1f}, {runs} runs)")
    print(f"{'total':18} median {total * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
