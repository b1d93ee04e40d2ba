"""Capture parsers against real outputs of util-linux, LVM2 and curtin's probes of real machines
(../shared/realdata, read in place when present; never copied into this repository)."""

import json
from pathlib import Path

import pytest

import rescue
from conftest import REPO

REAL = REPO.parent / "shared" / "realdata" / "tool-output"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/realdata is not present")


def real(path):
    return (REAL / path).read_text()


def probert(name):
    data = json.loads(real(f"probert/{name}"))
    return data.get("storage", data)


PROBERT = sorted(p.name for p in (REAL / "probert").glob("*.json")) if REAL.is_dir() else []


@pytest.mark.parametrize("name", PROBERT)
def test_every_real_partition_table_parses(name):
    for device, info in probert(name)["blockdev"].items():
        table = info.get("partitiontable")
        if not table:
            continue
        pt, parts = rescue.parse_sfdisk(json.dumps({"partitiontable": table}), device)
        assert pt.label in ("dos", "gpt")
        assert [p.number for p in parts] == [rescue.partition_number(e["node"]) for e in table["partitions"]]
        assert all(p.id.startswith(device) and p.disk == device for p in parts)
        assert pt.sector_size == table.get("sectorsize", 512)


def test_msdos_extended_and_logical_roles():
    pt, parts = rescue.parse_sfdisk(real("sfdisk/09-ul-dos-write-json-extended.json"), "/dev/sdz")
    assert pt.label == "dos" and pt.id == "0x1ddc8a79"
    assert [(p.number, p.role) for p in parts] == [
        (1, "primary"), (2, "primary"), (3, "primary"), (4, "extended"), (5, "logical"), (6, "logical")]
    assert parts[0].bootable and parts[0].id == "/dev/sdz1"


def test_probert_msdos_extended_partition_type_f():
    table = probert("01-curtin-probert-lvm.json")["blockdev"]["/dev/vda"]["partitiontable"]
    _, parts = rescue.parse_sfdisk(json.dumps({"partitiontable": table}), "/dev/vda")
    assert {p.number: p.role for p in parts}[2] == "extended"
    assert all(p.role == "logical" for p in parts if p.number > 4)


def test_4k_sector_table_keeps_its_sector_size():
    table = probert("06-curtin-probert-4k-sectors.json")["blockdev"]["/dev/sda"]["partitiontable"]
    pt, parts = rescue.parse_sfdisk(json.dumps({"partitiontable": table}), "/dev/sda")
    assert pt.sector_size == 4096 and pt.first_lba == 6 and parts[0].start == 256


def test_nvme_partition_names_get_the_p_separator():
    table = probert("07-curtin-probert-nvme-multipath.json")["blockdev"]["/dev/nvme0n1"]["partitiontable"]
    _, parts = rescue.parse_sfdisk(json.dumps({"partitiontable": table}), "/dev/nvme0n1")
    assert parts[0].id == "/dev/nvme0n1p1"
    assert rescue.partition_device("/dev/nvme0n1", 3) == "/dev/nvme0n1p3"
    assert rescue.partition_device("/dev/sda", 3) == "/dev/sda3"


def test_gpt_json_and_numbers_only_nodes():
    pt, parts = rescue.parse_sfdisk(real("sfdisk/08-ul-gpt-write-json.json"), "/dev/vdx")
    assert (pt.label, pt.first_lba, pt.last_lba) == ("gpt", 2048, 102366)
    assert parts[3].name == "GPT is the best" and parts[0].uuid == "4DD6948A-44F8-4E6C-8BDC-064F740704F8"
    _, parts = rescue.parse_sfdisk(real("sfdisk/10-ul-json-no-device-names.json"), "/dev/vdy")
    assert [p.id for p in parts][:2] == ["/dev/vdy1", "/dev/vdy2"]


@pytest.mark.parametrize("name", PROBERT)
def test_real_mount_trees_flatten(name):
    mounts = probert(name).get("mount")
    if not mounts:
        pytest.skip("no mount section")

    def count(entries):
        return sum(1 + count(e.get("children") or []) for e in entries)

    flat = rescue.parse_findmnt(json.dumps({"filesystems": mounts}))
    assert len(flat) == count(mounts)
    assert any(m["target"] == "/" for m in flat) or all("/" != m["target"] for m in flat)


def test_findmnt_json_from_util_linux():
    flat = rescue.parse_findmnt(real("findmnt/01-ul-findmnt-all-json.json"))
    targets = [m["target"] for m in flat]
    assert "/" in targets and "/proc/sys/fs/binfmt_misc" in targets


def test_lsblk_multi_parent_device_appears_once_with_every_parent():
    nodes = rescue.parse_lsblk(real("lsblk/derived/simple-lvm.lsblk-rear-cols.json"))
    lv = nodes["vg_foo.4059-lv_foo.4059"]
    assert lv.type == "lvm" and sorted(lv.parents) == ["loop0", "loop1", "loop2", "loop3"]
    assert all("vg_foo.4059-lv_foo.4059" in nodes[p].children for p in lv.parents)


def test_lsblk_nvme_tree():
    nodes = rescue.parse_lsblk(real("lsblk/derived/simple-nvme.lsblk-J-O-b.json"))
    disks = [n for n in nodes.values() if n.type == "disk"]
    assert any(n.name.startswith("nvme") for n in disks)
    part = next(n for n in nodes.values() if n.type == "part" and n.name.startswith("nvme"))
    assert part.parents and nodes[part.parents[0]].type == "disk"


def test_lvm_report_with_a_trailing_comma_is_tolerated():
    text = real("lvm/03-lvm2-man-fullreport-json-INVALID-trailing-comma.json")
    with pytest.raises(ValueError):
        json.loads(text)
    assert [r["lv_name"] for r in rescue.parse_lvm_report(text, "lv")] == ["lvol0", "lvol1"]
    assert [r["pv_name"] for r in rescue.parse_lvm_report(text, "pv")] == ["/dev/sda", "/dev/sdb"]


def test_lvm_reports_from_the_lvm2_test_suite():
    rows = rescue.parse_lvm_report(real("lvm/04-lvm2-test-lvs-json-tags.json"), "lv")
    assert [r["lv_name"] for r in rows] == ["lvol1", "lvol2", "lvol3"]
    rows = rescue.parse_lvm_report(real("lvm/02-lvm2-man-lvs-json.json"), "lv")
    assert rows and all("lv_name" in r for r in rows)


def test_blkid_export_unescapes_values():
    info = rescue.parse_blkid_export(real("blkid/01-ul-export-probe-escaped-label.export"))
    assert info["TYPE"] == "cramfs"
    # blkid itself writes non-ASCII and control bytes in cat -v notation (M-CM-) is é, ^J a
    # newline); the shell escapes (\" \' \ ) are what export adds, and what we remove.
    assert info["LABEL"] == "tM-CM-)s\"'^J t"
