"""recover, part 1, pure: which disk here takes the place of each disk of the layout (the
mapping and its refusals), and the plan made from the layout, the disks and the mapping (the
order, every kind's commands, resizing, sector sizes, the review forms). No process runs
here: layouts are replayed recordings of real guests (tests/data/layouts), real tool outputs
of ../shared/realdata when present, and hand-made ones."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import rescue
from rescue import (Boot, Disk, DiskHere, Filesystem, Layout, LogicalVolume, Luks, MdArray, Mount, Partition,
                    PartitionTable, PhysicalVolume, RecreateOptions, RescueError, Swap, VolumeGroup)

LAYOUTS = Path(__file__).resolve().parent / "data" / "layouts"
REAL = Path(__file__).resolve().parent.parent.parent / "shared" / "realdata" / "tool-output"
GiB, MiB = 1024 ** 3, 1024 ** 2
LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
LVM_GUID = "e6d6d379-f507-44c2-a23c-238f2a3df928"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/realdata is not present")


# -- building blocks ----------------------------------------------------------------------------

def default_config():
    return rescue.load_config([rescue.DEFAULT_CONF], {"PATH": "/usr/bin"}, rescue.Log())


def replayed(name):
    """(layout, vgcfg options) of a recording made by savelayout --record in a real guest."""
    captured = rescue.capture_layout(rescue.Probe(replay_dir=LAYOUTS / name), default_config(), "guest")
    vgcfg = {vg: (f"/var/lib/rescue/layout/lvm/{vg}.vgcfg", text) for vg, text in captured.vgcfg.items()}
    return captured.layout, vgcfg


def blank(path, size, **kw):
    return DiskHere(path, size, **kw)


def gpt_disk(id, size, ss=512, **kw):
    return Disk(id, size, ss, ss, partition_table=PartitionTable("gpt", "8d2a2d4c-3a44-4f5e-9b57-0c1e8e0d0a11",
                                                                  2048, size // ss - 34, ss), **kw)


def dos_disk(id, size, **kw):
    return Disk(id, size, partition_table=PartitionTable("dos", "0x1234abcd", None, None, 512), **kw)


def part(disk, number, start_mib, size_mib, type=LINUX, ss=512, **kw):
    return Partition(rescue.partition_device(disk.id, number), disk.id, number,
                     start_mib * MiB // ss, size_mib * MiB // ss, type, **kw)


def layout(*items, firmware="bios"):
    lay = Layout("host", Boot(firmware))
    rescue.add_items(lay, items)
    return lay


def lvm_layout(disk_size=10 * GiB, root_fs="ext4", used=GiB, ss=512, label="gpt"):
    """One disk: p1 /boot ext4, p2 a PV of vg0 with swap and root (the last LV)."""
    d = gpt_disk("/dev/sda", disk_size, ss) if label == "gpt" else dos_disk("/dev/sda", disk_size)
    boot = part(d, 1, 1, 512, ss=ss, type=LINUX if label == "gpt" else "83")
    pv_mib = disk_size // MiB - 513 - 1
    pv = part(d, 2, 513, pv_mib, ss=ss, type=LVM_GUID if label == "gpt" else "8e")
    vg_size = (pv_mib - 1) * MiB // (4 * MiB) * 4 * MiB
    root_size = vg_size - 512 * MiB - 256 * MiB
    return layout(
        d, boot, pv,
        PhysicalVolume(pv.id, "pvuuid-0000-0000-0000-0000-0000-000001", "vg0", pv_mib * MiB),
        VolumeGroup("vg0", "vguuid-0000-0000-0000-0000-0000-000001", 4 * MiB, vg_size, [pv.id]),
        LogicalVolume("/dev/mapper/vg0-swap", "vg0", "swap", "lvuuid-swap", 512 * MiB),
        LogicalVolume("/dev/mapper/vg0-root", "vg0", "root", "lvuuid-root", root_size),
        Filesystem(boot.id, "ext4", "11111111-2222-3333-4444-555555555555", "boot", 512 * MiB, 100 * MiB),
        Filesystem("/dev/mapper/vg0-root", root_fs, "66666666-7777-8888-9999-000000000000", "root", root_size, used),
        Swap("/dev/mapper/vg0-swap", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "swap"),
        Mount("/", "/dev/mapper/vg0-root", root_fs, "rw,relatime"),
        Mount("/boot", boot.id, "ext4", "rw,relatime", parent="/"))


def mapped(lay, here, explicit=None):
    return rescue.map_disks(lay, here, explicit or {})


def plan_for(lay, here, explicit=None, **options):
    return rescue.recreate_plan(lay, here, mapped(lay, here, explicit), RecreateOptions(**options))


def refusal(call, *args):
    with pytest.raises(RescueError) as caught:
        call(*args)
    return caught.value.message


def step(plan, prefix):
    found = [s for s in plan.steps if s.id.startswith(prefix)]
    assert found, (prefix, [s.id for s in plan.steps])
    return found[0]


def sfdisk_rows(plan, disk):
    """The partition lines of a disk's sfdisk script: {node: {field: value}}."""
    rows = {}
    for line in step(plan, f"partition {disk}").input.splitlines():
        if " : " in line:
            node, fields = line.split(" : ")
            rows[node] = dict(f.split("=", 1) if "=" in f else (f, True) for f in fields.split(", "))
    return rows


def lsblk_json(*devices):
    """lsblk -J -b -p as parsed, for hand-made trees: (name, type, size[, extra[, children]])."""
    def entry(name, kind, size, extra=None, children=()):
        extra = dict(extra or {})
        out = {"name": name, "kname": extra.pop("kname", name), "type": kind, "size": size, **extra}
        if children:
            out["children"] = [entry(*c) for c in children]
        return out
    return rescue.parse_lsblk(json.dumps({"blockdevices": [entry(*d) for d in devices]}))


def here_from(nodes, mounts=(), swaps=(), by_id=None, vg_of_pv=None, backup_dir=None):
    return rescue.disks_here(nodes, list(mounts), list(swaps), by_id or {}, vg_of_pv or {}, backup_dir)


# -- the mapping ----------------------------------------------------------------------------------

def test_identical_disks_map_one_to_one_by_name_and_size():
    lay, _ = replayed("raid1-luks")
    here = [blank(d.id, d.size) for d in lay.disks]
    m = mapped(lay, here)
    assert m.disks == {"/dev/vda": "/dev/vda", "/dev/vdb": "/dev/vdb"}
    assert set(m.reasons.values()) == {"the same name and size"} and not m.guessed


def test_identity_comes_before_size_wwn_serial_by_id():
    lay = layout(gpt_disk("/dev/sda", 100 * GiB, wwn="0x5000c500a1b2c3d4"),
                 gpt_disk("/dev/sdb", 100 * GiB, serial="S3Z9NB0K"),
                 gpt_disk("/dev/sdc", 100 * GiB, by_id=["ata-Samsung_SSD_860_S3Z9X"]))
    here = [blank("/dev/sda", 100 * GiB), blank("/dev/sdb", 100 * GiB, serial="S3Z9NB0K"),
            blank("/dev/sdc", 100 * GiB), blank("/dev/sdd", 200 * GiB, wwn="0x5000c500a1b2c3d4"),
            blank("/dev/sde", 300 * GiB, by_id=["ata-Samsung_SSD_860_S3Z9X"])]
    m = mapped(lay, here)
    assert m.disks == {"/dev/sda": "/dev/sdd", "/dev/sdb": "/dev/sdb", "/dev/sdc": "/dev/sde"}
    assert m.reasons == {"/dev/sda": "the same WWN", "/dev/sdb": "the same serial",
                         "/dev/sdc": "the same /dev/disk/by-id name"}
    assert not m.guessed


def test_size_then_the_smallest_that_fits():
    lay = layout(gpt_disk("/dev/sda", 100 * GiB), gpt_disk("/dev/sdb", 50 * GiB))
    here = [blank("/dev/nvme0n1", 400 * GiB), blank("/dev/nvme1n1", 120 * GiB), blank("/dev/nvme2n1", 50 * GiB)]
    m = mapped(lay, here)
    assert m.disks == {"/dev/sda": "/dev/nvme1n1", "/dev/sdb": "/dev/nvme2n1"}
    assert m.reasons == {"/dev/sda": "the smallest disk that is large enough", "/dev/sdb": "the same size"}
    assert m.left_out == [("/dev/nvme0n1", "not needed")]


def test_the_mapping_is_a_bijection_two_old_disks_never_share_one():
    lay = layout(gpt_disk("/dev/sda", 10 * GiB), gpt_disk("/dev/sdb", 10 * GiB), gpt_disk("/dev/sdc", 10 * GiB))
    here = [blank("/dev/vdb", 10 * GiB), blank("/dev/vda", 10 * GiB)]
    message = refusal(mapped, lay, here)
    assert "no disk here can take the place of /dev/sdc" in message
    assert "/dev/vda: taken by another disk of the layout" in message


def test_several_same_size_disks_are_chosen_by_name_and_never_preset_confirmed():
    lay = layout(gpt_disk("/dev/sda", 10 * GiB))
    here = [blank("/dev/vdc", 10 * GiB), blank("/dev/vdb", 10 * GiB)]
    m = mapped(lay, here)
    assert m.disks == {"/dev/sda": "/dev/vdb"} and m.guessed       # the first by name: predictable
    assert mapped(lay, list(reversed(here))).disks == m.disks       # whatever order lsblk gave
    assert not mapped(lay, here[:1]).guessed


def test_equal_larger_disks_count_as_a_guess():
    lay = layout(gpt_disk("/dev/sda", 10 * GiB))
    m = mapped(lay, [blank("/dev/vdc", 20 * GiB), blank("/dev/vdb", 20 * GiB), blank("/dev/vdd", 30 * GiB)])
    assert m.disks == {"/dev/sda": "/dev/vdb"} and m.guessed


def test_explicit_map_and_by_id_names_override_the_rules():
    lay = layout(gpt_disk("/dev/sda", 10 * GiB), gpt_disk("/dev/sdb", 10 * GiB))
    here = [blank("/dev/vda", 10 * GiB), blank("/dev/vdb", 10 * GiB, by_id=["virtio-target"])]
    m = mapped(lay, here, {"/dev/sda": "/dev/disk/by-id/virtio-target"})
    assert m.disks == {"/dev/sda": "/dev/vdb", "/dev/sdb": "/dev/vda"}
    assert m.reasons["/dev/sda"] == "explicit --map or the mapping file"


def test_rear_disk_mappings_file():
    text = "# made by hand\n/dev/sda /dev/vdb\n\n/dev/sdb   /dev/vda  # the old second disk\n"
    assert rescue.parse_mapping_file(text, "disk_mappings") == {"/dev/sda": "/dev/vdb", "/dev/sdb": "/dev/vda"}
    message = refusal(rescue.parse_mapping_file, "/dev/sda\n", "disk_mappings")
    assert message.startswith("disk_mappings:1: expected 'OLD-DISK NEW-DISK'")


@pytest.mark.parametrize("explicit,expected", [
    ({"/dev/sdx": "/dev/vda"}, "the mapping names /dev/sdx, which is not a disk of the layout"),
    ({"/dev/sda": "/dev/nosuch"}, "the mapping names /dev/nosuch, which is not a disk here"),
    ({"/dev/sda": "/dev/vda", "/dev/sdb": "/dev/vda"}, "the mapping puts two disks onto /dev/vda"),
])
def test_bad_explicit_mappings_are_refused(explicit, expected):
    lay = layout(gpt_disk("/dev/sda", 10 * GiB), gpt_disk("/dev/sdb", 10 * GiB))
    assert refusal(mapped, lay, [blank("/dev/vda", 10 * GiB), blank("/dev/vdb", 10 * GiB)], explicit) == expected


def test_a_partitioned_md_array_is_not_a_disk_to_map():
    lay = layout(gpt_disk("/dev/sda", 10 * GiB), gpt_disk("/dev/sdb", 10 * GiB), gpt_disk("/dev/md127", 9 * GiB))
    rescue.add_items(lay, [MdArray("/dev/md127", "raid1", ["/dev/sda1", "/dev/sdb1"], raid_devices=2)])
    m = mapped(lay, [blank("/dev/vda", 10 * GiB), blank("/dev/vdb", 10 * GiB), blank("/dev/vdc", 9 * GiB)])
    assert set(m.disks) == {"/dev/sda", "/dev/sdb"} and "/dev/vdc" not in m.disks.values()


# -- what may not be used, and why ----------------------------------------------------------------

def rescue_machine_nodes():
    """A rescue system's view: vda holds the backup, vdb is blank, vdc has the rescue ISO,
    vdd is mounted, vde swaps on an LV, vdf has an md member in use under LVM, vdg blank USB."""
    return lsblk_json(
        ("/dev/vda", "disk", 20 * GiB, {"maj:min": "252:0"}, [("/dev/vda1", "part", 20 * GiB - MiB, {"maj:min": "252:1", "fstype": "ext4"})]),
        ("/dev/vdb", "disk", 10 * GiB, {"maj:min": "252:16"}),
        ("/dev/sr0", "rom", GiB, {"maj:min": "11:0", "fstype": "iso9660"}),
        ("/dev/vdc", "disk", 10 * GiB, {"maj:min": "252:32", "fstype": "iso9660"}),
        ("/dev/vdd", "disk", 10 * GiB, {"maj:min": "252:48"}, [("/dev/vdd1", "part", 5 * GiB, {"maj:min": "252:49"})]),
        ("/dev/vde", "disk", 10 * GiB, {"maj:min": "252:64"}, [
            ("/dev/vde1", "part", 10 * GiB - MiB, {"maj:min": "252:65", "fstype": "LVM2_member"}, [
                ("/dev/mapper/vgs-swap", "lvm", GiB, {"kname": "/dev/dm-3", "maj:min": "253:3"})])]),
        ("/dev/vdf", "disk", 10 * GiB, {"maj:min": "252:80"}, [
            ("/dev/vdf1", "part", 10 * GiB - MiB, {"maj:min": "252:81", "fstype": "linux_raid_member"}, [
                ("/dev/md0", "raid1", 10 * GiB - 2 * MiB, {"maj:min": "9:0", "fstype": "ext4"})])]),
        ("/dev/vdg", "disk", 16 * GiB, {"maj:min": "252:96", "tran": "usb", "rm": True}),
        ("/dev/mmcblk0", "disk", 32 * GiB, {"maj:min": "179:0"}),
        ("/dev/mmcblk0boot0", "disk", 4 * MiB, {"maj:min": "179:8"}),
        ("/dev/mmcblk0rpmb", "disk", 4 * MiB, {"maj:min": "179:24"}),
        ("/dev/loop0", "loop", 100 * MiB, {"maj:min": "7:0", "fstype": "squashfs"}),
    )


RESCUE_MOUNTS = [{"target": "/", "source": "tmpfs", "fstype": "tmpfs"},
                 {"target": "/media/backup", "source": "/dev/vda1", "maj:min": "252:1", "fstype": "ext4"},
                 {"target": "/mnt/old", "source": "/dev/vdd1", "maj:min": "252:49", "fstype": "ext4"},
                 {"target": "/srv", "source": "/dev/md0", "maj:min": "9:0", "fstype": "ext4"}]


def test_disks_in_use_or_not_disks_are_left_out_with_the_reason():
    here = {d.path: d for d in here_from(rescue_machine_nodes(), RESCUE_MOUNTS, [("/dev/dm-3", "partition")],
                                          backup_dir="/media/backup/rescue")}
    assert here["/dev/vda"].in_use == "it holds the backup (/dev/vda1 is mounted at /media/backup)"
    assert here["/dev/vdd"].in_use == "/dev/vdd1 is mounted at /mnt/old"
    assert here["/dev/vdf"].in_use == "/dev/md0 is mounted at /srv"          # an md member in use
    assert here["/dev/vdb"].in_use is None and here["/dev/vdb"].excluded is None
    assert here["/dev/vdg"].excluded == "removable/USB media"
    assert here["/dev/mmcblk0boot0"].excluded == here["/dev/mmcblk0rpmb"].excluded == \
        "an eMMC boot or RPMB area, not a disk"
    assert here["/dev/loop0"].excluded == "a loop device" and here["/dev/sr0"].excluded == "an optical drive"


def test_swap_on_an_lv_makes_its_disk_busy():
    """/proc/swaps names an LV by its kernel name (/dev/dm-3), lsblk -p by /dev/mapper/…"""
    here = {d.path: d for d in here_from(rescue_machine_nodes(), swaps=[("/dev/dm-3", "partition")])}
    assert here["/dev/vde"].in_use == "/dev/mapper/vgs-swap is in use as swap"


def test_swap_in_the_recording_of_a_real_guest_makes_its_disk_busy():
    nodes = rescue.parse_lsblk(next((LAYOUTS / "bios-lvm").glob("lsblk_*")).read_text())
    swaps = rescue.parse_proc_swaps((LAYOUTS / "bios-lvm" / "file_proc_swaps").read_text())
    assert swaps == [("/dev/dm-0", "partition")]
    [vda] = [d for d in here_from(nodes, swaps=swaps) if d.path == "/dev/vda"]
    assert vda.in_use == "/dev/mapper/vg0-swap is in use as swap"


def test_the_running_system_of_a_real_guest_is_in_use():
    probe = rescue.Probe(replay_dir=LAYOUTS / "raid1-luks")
    here = {d.path: d for d in rescue.probe_disks_here(probe, default_config())}
    assert here["/dev/vda"].in_use and here["/dev/vdb"].in_use
    assert here["/dev/vda"].in_use == "it holds the running system (/dev/mapper/vg0-root is mounted at /)"
    lay, _ = replayed("raid1-luks")
    assert "no disk here can take the place of /dev/vda" in refusal(mapped, lay, list(here.values()))


def test_never_mapped_onto_a_disk_in_use_even_explicitly():
    here = here_from(rescue_machine_nodes(), RESCUE_MOUNTS, backup_dir="/media/backup")
    lay = layout(gpt_disk("/dev/sda", 10 * GiB))
    assert refusal(mapped, lay, here, {"/dev/sda": "/dev/vdd"}) == \
        "/dev/vdd cannot take the place of /dev/sda: /dev/vdd1 is mounted at /mnt/old"
    assert refusal(mapped, lay, here, {"/dev/sda": "/dev/vda"}).endswith(
        "it holds the backup (/dev/vda1 is mounted at /media/backup)")
    m = mapped(lay, here)
    assert m.disks == {"/dev/sda": "/dev/vdb"}
    assert dict(m.left_out)["/dev/vdf"] == "/dev/md0 is mounted at /srv"


def test_the_rescue_medium_is_never_wiped_even_explicitly():
    here = here_from(rescue_machine_nodes(), RESCUE_MOUNTS)
    lay = layout(gpt_disk("/dev/sda", 10 * GiB))
    message = refusal(mapped, lay, here, {"/dev/sda": "/dev/vdc"})
    assert message.startswith("/dev/vdc cannot take the place of /dev/sda:") and "ISO 9660" in message


def test_a_removable_disk_only_when_named():
    here = here_from(rescue_machine_nodes(), RESCUE_MOUNTS)
    lay = layout(gpt_disk("/dev/sda", 16 * GiB))
    assert mapped(lay, here).disks == {"/dev/sda": "/dev/mmcblk0"}
    assert mapped(lay, here, {"/dev/sda": "/dev/vdg"}).disks == {"/dev/sda": "/dev/vdg"}


def test_the_running_system_mounted_at_root_is_named_as_such():
    nodes = lsblk_json(("/dev/sda", "disk", 10 * GiB, {"maj:min": "8:0"}, [("/dev/sda2", "part", 9 * GiB, {"maj:min": "8:2"})]))
    [disk] = here_from(nodes, [{"target": "/", "source": "/dev/sda2", "maj:min": "8:2"}])
    assert disk.in_use == "it holds the running system (/dev/sda2 is mounted at /)"


def test_stale_holders_are_stopped_deepest_first():
    nodes = lsblk_json(("/dev/vdb", "disk", 10 * GiB, {}, [
        ("/dev/vdb1", "part", 9 * GiB, {}, [("/dev/md1", "raid1", 9 * GiB, {}, [
            ("/dev/mapper/cryptold", "crypt", 9 * GiB, {}, [("/dev/mapper/vgold-root", "lvm", GiB, {})])])])]))
    [disk] = here_from(nodes, vg_of_pv={"/dev/mapper/cryptold": "vgold"})
    assert disk.in_use is None
    assert disk.holders == [("lvm", "vgold"), ("crypt", "cryptold"), ("md", "/dev/md1")]
    assert disk.partitions == ["/dev/vdb1"]


# -- partition names, from the kernel's naming of the disk ----------------------------------------

@pytest.mark.parametrize("disk,number,expected", [
    ("/dev/sda", 1, "/dev/sda1"), ("/dev/vdb", 12, "/dev/vdb12"), ("/dev/nvme0n1", 1, "/dev/nvme0n1p1"),
    ("/dev/mmcblk0", 1, "/dev/mmcblk0p1"), ("/dev/md127", 1, "/dev/md127p1"), ("/dev/loop3", 2, "/dev/loop3p2")])
def test_partition_names(disk, number, expected):
    assert rescue.partition_device(disk, number) == expected


def test_partitions_are_renamed_by_the_target_disk_sda_to_nvme():
    """ReaR #1301: sda1 became nvme0n11 by string surgery."""
    lay = lvm_layout()
    plan = plan_for(lay, [blank("/dev/nvme0n1", 10 * GiB)])
    assert set(sfdisk_rows(plan, "/dev/nvme0n1")) == {"/dev/nvme0n1p1", "/dev/nvme0n1p2"}
    assert step(plan, "mkfs /dev/nvme0n1p1").argv[-1] == "/dev/nvme0n1p1"
    assert "--uuid" in step(plan, "pv /dev/nvme0n1p2").argv
    wait = step(plan, "wait for /dev/nvme0n1")
    assert wait.params == {"disk": "/dev/nvme0n1", "partitions": [[1, "/dev/nvme0n1p1"], [2, "/dev/nvme0n1p2"]]}
    assert all("/dev/sda" not in " ".join(s.argv) for s in plan.steps)


@needs_real
def test_real_lsblk_partition_names_are_what_the_plan_names():
    """util-linux's recorded sysfs of an NVMe machine: the kernel's partition names equal
    partition_device(parent, number) of the plan."""
    nodes = rescue.parse_lsblk((REAL / "lsblk/derived/simple-nvme.lsblk-rear-cols.json").read_text())
    disks = [d for d in here_from(nodes) if d.partitions]
    assert disks
    for disk in disks:
        for name in disk.partitions:
            assert rescue.partition_device(disk.path, rescue.partition_number(name)) == name


def test_emmc_boot_areas_are_never_candidates():
    nodes = lsblk_json(("/dev/mmcblk0", "disk", 8 * GiB, {}), ("/dev/mmcblk0boot0", "disk", 8 * GiB, {}),
                       ("/dev/mmcblk0boot1", "disk", 8 * GiB, {}), ("/dev/mmcblk0rpmb", "disk", 8 * GiB, {}))
    lay = layout(gpt_disk("/dev/mmcblk1", 8 * GiB), gpt_disk("/dev/sda", 8 * GiB))
    message = refusal(mapped, lay, here_from(nodes))
    assert "no disk here can take the place of /dev/sda" in message
    assert "/dev/mmcblk0boot0: an eMMC boot or RPMB area, not a disk" in message
