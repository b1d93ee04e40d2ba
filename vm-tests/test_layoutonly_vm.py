"""layoutonly for real, in the helper VM: the image's kernel with a busybox initramfs that
chroots into the Debian tools disk, no udev, no systemd (a stand-in for the rescue system until
rescue media exist), and only blank disks besides its own.

The layouts are the savelayout recordings of the golden guests (tests/data/layouts, made with
`savelayout --record` in bios-lvm, uefi-gpt and raid1-luks), turned into layout.json on the host
with `savelayout --replay -o`. Their filesystem, LUKS and md UUIDs are the golden's own
(golden.info["uuids"]), which the tests check first. In the helper: `layoutonly --yes` onto blank
disks, then the facts a user would check (blkid, sfdisk -J, lvs/pvs, mdadm --detail, cryptsetup
luksDump, findmnt) go back to the host, which compares them with the layout.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from vmlib.machine import Disk, create_disk_image
from vmlib.provision import run_helper

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = REPO / "tests" / "data" / "layouts"
PASSPHRASE = "rescue-layoutonly-test"
CONF = """LOGFILE=/job/out/rescue.log
LOCKFILE=/run/rescue.lock
VAR_DIR=/var/lib/rescue
LAYOUT_DIR=/var/lib/rescue/layout
LUKS_KEY_FILE=/job/luks.pass
TARGET_FS_ROOT=/mnt/local
"""

# The prelude of every job: rescue as the user runs it, a record of each run, the disks'
# signatures (the first and the last 16 MiB), and the facts to compare at the end.
PRELUDE = r"""
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export DM_DISABLE_UDEV=1
LVM_CONFIG='devices { obtain_device_list_from_udev=0 } activation { udev_sync=0 udev_rules=0 } backup { backup=0 archive=0 }'
O=/job/out
RESCUE="python3 /job/rescue/rescue.py -C /job/test.conf"
mkdir -p /run /var/lib/rescue

disk_by_serial() {     # virtio: /sys/block/X/serial; NVMe: /sys/block/X/device/serial (padded)
    local d s
    for d in /sys/block/*; do
        s=$(cat "$d/serial" 2>/dev/null || cat "$d/device/serial" 2>/dev/null)
        if [ "$(echo $s)" = "$1" ]; then echo "/dev/${d##*/}"; return 0; fi
    done
    return 1
}

# run NAME ARGS...: rescue with ARGS; its stdout+stderr and exit code kept as NAME.*
run() {
    local name=$1; shift
    $RESCUE "$@" >"$O/$name.out" 2>&1
    echo $? >"$O/$name.rc"
}

signatures() {
    local s dev mib
    for s in $DISKS; do
        dev=$(disk_by_serial "$s")
        mib=$(( $(blockdev --getsize64 "$dev") / 1048576 ))
        echo "$s $(dd if="$dev" bs=1M count=16 status=none | sha256sum | cut -c1-16)" \
             "$(dd if="$dev" bs=1M skip=$((mib - 16)) count=16 status=none | sha256sum | cut -c1-16)" \
             "$(wipefs -n "$dev" 2>/dev/null | tail -n +2 | awk '{print $4}' | tr '\n' ,)"
    done
}

facts() {
    local s dev
    for s in $DISKS; do
        dev=$(disk_by_serial "$s")
        echo "$s $dev" >>"$O/disks.txt"
        sfdisk -J "$dev" >"$O/sfdisk-$s.json" 2>/dev/null || echo '{}' >"$O/sfdisk-$s.json"
    done
    for dev in $(lsblk -lnpo NAME); do
        echo "== $dev"
        blkid -p -o export "$dev" 2>/dev/null
    done >"$O/blkid.txt"
    lsblk -J -b -p -o NAME,TYPE,SIZE,FSTYPE,UUID,LABEL,PARTUUID,PARTLABEL >"$O/lsblk.json"
    lvm lvs --config "$LVM_CONFIG" --reportformat json --units b --nosuffix \
        -o lv_name,vg_name,lv_uuid,lv_size >"$O/lvs.json" 2>/dev/null
    lvm pvs --config "$LVM_CONFIG" --reportformat json --units b --nosuffix \
        -o pv_name,pv_uuid,pv_size,vg_name >"$O/pvs.json" 2>/dev/null
    for md in /dev/md[0-9]*; do
        [ -b "$md" ] && mdadm --detail --export "$md" >"$O/mdadm-${md##*/}.txt"
    done
    for dev in $(blkid -t TYPE=crypto_LUKS -o device 2>/dev/null); do
        cryptsetup luksDump "$dev" >"$O/luksdump-${dev##*/}.txt"
    done
    findmnt -J -l -o TARGET,SOURCE,FSTYPE,OPTIONS >"$O/findmnt.json"
}

# The VM dies by poweroff -f: leave the disks clean anyway.
release() {
    umount -R /mnt/local 2>/dev/null
    lvm vgchange --config "$LVM_CONFIG" -an >/dev/null 2>&1
    for m in /dev/mapper/*; do [ "$m" = /dev/mapper/control ] || cryptsetup close "${m##*/}" 2>/dev/null; done
    mdadm --stop --scan >/dev/null 2>&1
    sync
}
"""


# -- on the host --------------------------------------------------------------------------------

def saved_layout(spec, directory):
    """layout.json + lvm/*.vgcfg of the recording of a golden guest, as savelayout writes them."""
    conf = directory / "host.conf"
    conf.write_text(f"LOGFILE={directory}/host.log\nLOCKFILE={directory}/host.lock\n")
    out = directory / "layout"
    subprocess.run([sys.executable, str(REPO / "rescue.py"), "-C", str(conf), "savelayout", "--replay",
                    str(LAYOUTS / spec), "-o", str(out)], check=True, capture_output=True, timeout=120)
    return out, json.loads((out / "layout.json").read_text())


def job(tmp_path, spec, script, disks):
    """A job directory: rescue.py and conf/, the layout, the config, the passphrase, run.sh."""
    job_dir = tmp_path / "job"
    (job_dir / "rescue" / "conf").mkdir(parents=True)
    (job_dir / "rescue" / "rescue.py").write_bytes((REPO / "rescue.py").read_bytes())
    (job_dir / "rescue" / "conf" / "default.conf").write_bytes((REPO / "conf" / "default.conf").read_bytes())
    layout_dir, layout = saved_layout(spec, tmp_path)
    subprocess.run(["cp", "-r", str(layout_dir), str(job_dir / "layout")], check=True)
    (job_dir / "test.conf").write_text(CONF)
    (job_dir / "luks.pass").write_text(PASSPHRASE + "\n")
    serials = " ".join(d.name for d in disks)
    (job_dir / "run.sh").write_text("#!/bin/bash\nDISKS=%s\n%s\n%s\nrelease\nexit 0\n"
                                    % (shlex.quote(serials), PRELUDE, script))
    return job_dir, layout


def blank_disks(tmp_path, sizes, bus="virtio"):
    return [Disk(name, create_disk_image(tmp_path / f"{name}.qcow2", size), bus=bus) for name, size in sizes]


def run_job(guest_image, tmp_path, job_dir, disks):
    run_helper(guest_image, tmp_path / "helper", job_dir, disks, timeout=900)
    return tmp_path / "helper" / "out"


def result(out, name):
    return int((out / f"{name}.rc").read_text()), (out / f"{name}.out").read_text()


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("rescue: error:")]


def blkid_by_device(out):
    devices, current = {}, None
    for line in (out / "blkid.txt").read_text().splitlines():
        if line.startswith("== "):
            current = devices.setdefault(line[3:], {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current[key] = value
    return devices


def new_disks(out):
    return dict(line.split() for line in (out / "disks.txt").read_text().splitlines())


def assert_golden_uuids(layout, golden_uuids):
    """The recording is of this golden: its UUIDs are the golden's stable ones."""
    ours = {fs["uuid"].lower() for fs in layout["filesystems"] + layout["swaps"]}
    ours |= {lk["uuid"] for lk in layout["luks"]} | {md["uuid"] for md in layout["md_arrays"]}
    assert {u.lower() for u in golden_uuids.values()} == ours


def assert_recreated(out, layout, serials=None, grown=()):
    """Every filesystem, swap, LUKS and md device with its UUID and label; every partition with
    its start, size, type, PARTUUID and name; PVs and LVs with their UUIDs; the tree mounted
    under /mnt/local. serials: layout disk -> the serial of the disk that took its place (else
    its own); grown: the layout disks whose last partition, and the "VG/LV"s, that grew."""
    found = blkid_by_device(out)
    by_uuid = {info["UUID"].lower(): (dev, info) for dev, info in found.items() if "UUID" in info}
    for fs in layout["filesystems"] + [dict(s, type="swap") for s in layout["swaps"]]:
        dev, info = by_uuid[fs["uuid"].lower()]
        assert info["TYPE"] == fs["type"], (fs, info)
        assert info.get("LABEL") == fs.get("label"), (fs, info)
    for lk in layout["luks"]:
        dev, info = by_uuid[lk["uuid"]]
        assert info["TYPE"] == "crypto_LUKS" and info["VERSION"] == str(lk["version"])
        dump = (out / f"luksdump-{dev.split('/')[-1]}.txt").read_text()
        assert lk["uuid"] in dump and lk["cipher"] in dump
    for md in layout["md_arrays"]:
        detail = (out / f"mdadm-{md['id'].split('/')[-1]}.txt").read_text()
        assert f"MD_UUID={md['uuid']}" in detail and f"MD_LEVEL={md['level']}" in detail
        assert f"MD_DEVICES={md['raid_devices'] or len(md['devices'])}" in detail
    for disk in (d for d in layout["disks"] if d["partition_table"]):
        serial = (serials or {}).get(disk["id"], disk.get("serial"))
        table = json.loads((out / f"sfdisk-{serial}.json").read_text())["partitiontable"]
        assert table["label"] == disk["partition_table"]["label"]
        assert table["id"].lower() == disk["partition_table"]["id"].lower()
        parts = sorted((p for p in layout["partitions"] if p["disk"] == disk["id"]), key=lambda p: p["number"])
        theirs = {int(re.search(r"(\d+)$", p["node"]).group(1)): p for p in table["partitions"]}
        assert sorted(theirs) == [p["number"] for p in parts]
        for p in parts:
            t = theirs[p["number"]]
            assert (t["start"], t["type"].lower()) == (p["start"], p["type"].lower()), (p, t)
            assert (t.get("uuid") or "").lower() == (p.get("uuid") or "").lower() and t.get("name") == p.get("name")
            assert bool(t.get("bootable")) == p["bootable"]
            if p is parts[-1] and disk["id"] in grown:
                assert t["size"] > 1.9 * p["size"], (p, t)
            else:
                assert t["size"] == p["size"], (p, t)
    pvs = json.loads((out / "pvs.json").read_text())["report"][0]["pv"]
    assert sorted(pv["pv_uuid"] for pv in pvs) == sorted(pv["uuid"] for pv in layout["physical_volumes"])
    lvs = {(lv["vg_name"], lv["lv_name"]): lv for lv in json.loads((out / "lvs.json").read_text())["report"][0]["lv"]}
    assert sorted(lvs) == sorted((lv["vg"], lv["name"]) for lv in layout["logical_volumes"])
    for lv in layout["logical_volumes"]:
        theirs = lvs[(lv["vg"], lv["name"])]
        assert theirs["lv_uuid"] == lv["uuid"]
        if f"{lv['vg']}/{lv['name']}" in grown:
            assert int(theirs["lv_size"]) > lv["size"] + GROWN_AT_LEAST, (lv, theirs)
        else:
            assert int(theirs["lv_size"]) == lv["size"], (lv, theirs)
    mounted = {m["target"]: m for m in json.loads((out / "findmnt.json").read_text())["filesystems"]}
    for m in layout["mounts"]:
        target = "/mnt/local" + (m["mountpoint"] if m["mountpoint"] != "/" else "")
        assert target in mounted and mounted[target]["fstype"] == m["type"], (m, sorted(mounted))


GROWN_AT_LEAST = 3 * 1024 ** 3      # a 4G disk onto an 8G one: the root LV gains about 4 GiB


# -- the tests ---------------------------------------------------------------------------------------

BAD_INPUT = r"""
T=$(disk_by_serial disk0)
signatures >"$O/sig-before.txt"
python3 - <<'EOF'
import json
data = json.load(open("/job/layout/layout.json"))
data["partitions"][0]["size"] += 2048               # changed by hand: the digest no longer matches
json.dump(data, open("/job/broken.json", "w"), indent=2)
open("/job/truncated.json", "w").write(open("/job/layout/layout.json").read()[:900])
EOF
run broken layoutonly --yes --layout /job/broken.json
run truncated layoutonly --yes --layout /job/truncated.json
run nosuch layoutonly --yes --layout /job/layout/layout.json --map /dev/vda=/dev/nosuch
signatures >"$O/sig-after.txt"
mkdir -p /mnt/x && mkfs.ext4 -q -F -L busy "$T" && mount -o ro "$T" /mnt/x    # ro: nothing else writes
signatures >"$O/sig-mounted-before.txt"
run mounted layoutonly --yes --layout /job/layout/layout.json
run mounted-map layoutonly --yes --layout /job/layout/layout.json --map /dev/vda=$T
signatures >"$O/sig-mounted-after.txt"
umount /mnt/x
"""

KILL_AND_RESUME = r"""
run plan layoutonly --plan --layout /job/layout/layout.json
total=$(grep -c '^ *[0-9]*\. ' "$O/plan.out")
half=$((total / 2))
setsid $RESCUE layoutonly --yes --layout /job/layout/layout.json >"$O/killed.out" 2>&1 &
pid=$!
for i in $(seq 1200); do
    grep -q "^\[$half/" "$O/killed.out" && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
done
kill -9 -- -$pid
wait $pid
echo $? >"$O/killed.rc"
echo "$half $total" >"$O/killed-at.txt"
cp /var/lib/rescue/recreate.json "$O/journal-after-kill.json"
run resumed layoutonly --yes --layout /job/layout/layout.json
run again layoutonly --yes --layout /job/layout/layout.json
facts
"""

TWICE = r"""
signatures >"$O/sig-blank.txt"
run script layoutonly --layout /job/layout/layout.json --script "$O/plan.sh"
run json layoutonly --layout /job/layout/layout.json --json
signatures >"$O/sig-reviewed.txt"
run first layoutonly --yes --layout /job/layout/layout.json
run again layoutonly --yes --layout /job/layout/layout.json
facts
"""


@pytest.mark.vm
def test_bios_lvm_bad_input_refused_then_killed_run_resumes(golden, guest_image, tmp_path):
    disks = blank_disks(tmp_path, [("disk0", "4G")])
    job_dir, layout = job(tmp_path, "bios-lvm", BAD_INPUT + KILL_AND_RESUME, disks)
    assert_golden_uuids(layout, golden("bios-lvm").info["uuids"])
    out = run_job(guest_image, tmp_path, job_dir, disks)

    for name, expected in (("broken", "was changed after rescue savelayout wrote it (its digest does not match)"),
                           ("truncated", "is not a valid layout"),
                           ("nosuch", "the mapping names /dev/nosuch, which is not a disk here"),
                           ("mounted", "no disk here can take the place of /dev/vda"),
                           ("mounted-map", "cannot take the place of /dev/vda")):
        rc, text = result(out, name)
        assert rc != 0 and len(error_lines(text)) == 1 and expected in error_lines(text)[0], (name, text)
        assert "Traceback" not in text
    assert "is mounted at /mnt/x" in result(out, "mounted")[1]
    assert "it holds the running system" in result(out, "mounted")[1]          # the helper's own disk
    assert (out / "sig-before.txt").read_text() == (out / "sig-after.txt").read_text()
    assert (out / "sig-mounted-before.txt").read_text() == (out / "sig-mounted-after.txt").read_text()

    half, total = map(int, (out / "killed-at.txt").read_text().split())
    assert int((out / "killed.rc").read_text()) == 137, (out / "killed.out").read_text()
    journal = json.loads((out / "journal-after-kill.json").read_text())
    assert half - 2 <= len(journal["done"]) < total
    rc, text = result(out, "resumed")
    assert rc == 0, text
    assert "Using the layout of vm in /job/layout/layout.json (given with --layout)" in text
    assert "/dev/vda (4 GiB) -> /dev/vdc (4 GiB, the same size): the same serial" in result(out, "plan")[1]
    assert f"Resuming the interrupted run at step {len(journal['done']) + 1} of {total}" in text
    rc, text = result(out, "again")
    assert rc == 0 and "Nothing to do" in text, text
    assert_recreated(out, layout)
    found = blkid_by_device(out)
    assert not any(info.get("LABEL") == "busy" for info in found.values())       # the old signature is gone


@pytest.mark.vm
def test_uefi_gpt_onto_a_blank_disk_twice(golden, guest_image, tmp_path):
    disks = blank_disks(tmp_path, [("disk0", "4G")])
    job_dir, layout = job(tmp_path, "uefi-gpt", TWICE, disks)
    assert_golden_uuids(layout, golden("uefi-gpt").info["uuids"])
    out = run_job(guest_image, tmp_path, job_dir, disks)
    assert (out / "sig-blank.txt").read_text() == (out / "sig-reviewed.txt").read_text()   # review touches nothing
    assert result(out, "script")[0] == 0 and result(out, "json")[0] == 0
    checked = subprocess.run(["bash", "-n", str(out / "plan.sh")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    plan = json.loads(result(out, "json")[1][result(out, "json")[1].index("{"):])
    assert plan["mapping"] == {"/dev/vda": plan["wipe"][0]} and plan["rules"] == {"/dev/vda": "the same serial"}
    assert [line for _, line in plan["left_out"]][:1] == ["it holds the running system (/dev/vda is mounted at /)"]
    rc, text = result(out, "first")
    assert rc == 0, text
    assert "the same serial" in text
    for s in plan["steps"]:
        assert f"] {s['title']}" in text
    rc, text = result(out, "again")
    assert rc == 0 and "Nothing to do" in text, text
    assert_recreated(out, layout)


@pytest.mark.vm
@pytest.mark.slow
def test_raid1_luks_onto_two_blank_disks_twice(golden, guest_image, tmp_path):
    disks = blank_disks(tmp_path, [("disk0", "4G"), ("disk1", "4G")])
    job_dir, layout = job(tmp_path, "raid1-luks", TWICE + r"""
printf %s "$(cat /job/luks.pass)" | cryptsetup open --test-passphrase --key-file=- "$(blkid -t TYPE=crypto_LUKS -o device)"
echo $? >"$O/passphrase.rc"
""", disks)
    assert_golden_uuids(layout, golden("raid1-luks").info["uuids"])
    out = run_job(guest_image, tmp_path, job_dir, disks)
    rc, text = result(out, "first")
    assert rc == 0, text
    assert PASSPHRASE not in text and PASSPHRASE not in (out / "rescue.log").read_text()
    rc, text = result(out, "again")
    assert rc == 0 and "Nothing to do" in text, text
    assert_recreated(out, layout)
    assert (out / "passphrase.rc").read_text().strip() == "0"        # the configured passphrase opens it


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.parametrize("spec,grown", [("bios-lvm", {"/dev/vda", "vg0/root"}), ("uefi-gpt", {"/dev/vda"})])
def test_onto_a_twice_as_big_nvme_disk_the_last_partition_grows(golden, guest_image, tmp_path, spec, grown):
    disks = blank_disks(tmp_path, [("big", "8G")], bus="nvme")
    job_dir, layout = job(tmp_path, spec, TWICE, disks)
    assert_golden_uuids(layout, golden(spec).info["uuids"])
    out = run_job(guest_image, tmp_path, job_dir, disks)
    rc, text = result(out, "first")
    assert rc == 0, text
    assert "/dev/vda (4 GiB) -> /dev/nvme0n1 (8 GiB, larger): the smallest disk that is large enough" in text
    assert new_disks(out) == {"big": "/dev/nvme0n1"}
    assert_recreated(out, layout, serials={"/dev/vda": "big"}, grown=grown)
    table = json.loads((out / "sfdisk-big.json").read_text())["partitiontable"]
    assert all(p["node"].startswith("/dev/nvme0n1p") for p in table["partitions"])
    if table["label"] == "gpt":                    # the backup header at the new end
        assert table["lastlba"] == 8 * 1024 ** 3 // 512 - 34
