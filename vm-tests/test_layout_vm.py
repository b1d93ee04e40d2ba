"""savelayout / checklayout inside real guests: the layout agrees with blkid, sfdisk and lvs,
and checklayout notices a change (0, then 1 after an lvcreate, then 0 after savelayout)."""

import json
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST_CONF = "LAYOUT_DIR=/root/layout\nLOGFILE=/root/rescue.log\nLOCKFILE=/root/rescue.lock\n"
RESCUE = "python3 /root/rescue/rescue.py -C /root/test.conf"
EXTRA = "/dev/disk/by-id/virtio-extra"
LVM = "lvm"


def install_rescue(m, rescue_py):
    m.run("mkdir -p /root/rescue/conf", check=True)
    m.put(rescue_py, "/root/rescue/rescue.py")
    m.put(REPO / "conf" / "default.conf", "/root/rescue/conf/default.conf")
    m.run("printf %s > /root/test.conf" % shlex.quote(GUEST_CONF), check=True)


def blkid(m, device):
    out = m.run("blkid -o export %s" % device, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def assert_agrees_with_the_tools(m, layout):
    for fs in layout["filesystems"] + layout["swaps"]:
        info = blkid(m, fs["device"])
        assert info["UUID"] == fs["uuid"], fs
        assert info["TYPE"] == fs.get("type", "swap")
    for disk in (d for d in layout["disks"] if d["partition_table"]):
        table = json.loads(m.run("sfdisk -J %s" % disk["id"], check=True).stdout)["partitiontable"]
        assert table["label"] == disk["partition_table"]["label"]
        assert table["id"] == disk["partition_table"]["id"]
        ours = [(p["start"], p["size"], p["type"].lower()) for p in layout["partitions"] if p["disk"] == disk["id"]]
        assert ours == [(p["start"], p["size"], p["type"].lower()) for p in table["partitions"]]
    lvs = json.loads(m.run("lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_uuid,lv_size",
                           check=True).stdout)["report"][0]["lv"]
    assert sorted((lv["vg_name"], lv["lv_name"], lv["lv_uuid"], int(lv["lv_size"])) for lv in lvs) == \
        sorted((lv["vg"], lv["name"], lv["uuid"], lv["size"]) for lv in layout["logical_volumes"])
    root = m.run("findmnt -n -o SOURCE /", check=True).stdout.strip()
    assert next(x for x in layout["mounts"] if x["mountpoint"] == "/")["device"] == root


def checklayout(m):
    return m.run("%s checklayout" % RESCUE)


CASES = [("bios-lvm", "bios"), ("uefi-gpt", "uefi"),
         pytest.param("raid1-luks", "bios", marks=pytest.mark.slow)]


@pytest.mark.vm
@pytest.mark.parametrize("spec,firmware", CASES)
def test_savelayout_and_checklayout_in_a_guest(make_machine, rescue_py, spec, firmware):
    m = make_machine(spec)
    m.add_blank_disk("extra", "256M")
    m.start()
    m.wait_booted()
    install_rescue(m, rescue_py)
    saved = m.run("%s savelayout --json" % RESCUE, check=True)
    layout = json.loads(saved.stdout)
    assert layout["boot"]["firmware"] == firmware
    assert layout["boot"]["family"] == "debian" and layout["boot"]["bootloader"] == "grub2"
    assert_agrees_with_the_tools(m, layout)
    assert json.loads(m.run("cat /root/layout/layout.json", check=True).stdout) == layout
    for vg in layout["volume_groups"]:
        m.run("grep -q 'id = \"%s\"' /root/layout/lvm/%s.vgcfg" % (vg["uuid"], vg["name"]), check=True)
    assert [e["reason"] for e in layout["excluded"] if e["kind"] == "disk"] == \
        ["not used by any filesystem or swap in scope"]     # the blank extra disk

    first = checklayout(m)
    assert first.returncode == 0, first.stdout + first.stderr

    if layout["volume_groups"]:
        vg = layout["volume_groups"][0]["name"]
        m.run("lvcreate -q -y -Wy -L 8M -n extra %s" % vg, check=True)
        expected = "LV %s/extra added" % vg
    else:
        m.run("vgcreate -q vgx %s && lvcreate -q -y -Wy -L 8M -n extra vgx && mkfs.ext4 -q /dev/vgx/extra "
              "&& mount /dev/vgx/extra /mnt" % EXTRA, check=True)
        expected = "LV vgx/extra added"
    changed = checklayout(m)
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert expected in changed.stdout

    m.run("%s savelayout" % RESCUE, check=True)
    again = checklayout(m)
    assert again.returncode == 0, again.stdout + again.stderr
    m.shutdown()
