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
from hypothesis import HealthCheck, event, given, settings, strategies as st

import rescue
from conftest import run_rescue
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
    wait = step(plan, "wait for partitions of /dev/nvme0n1")
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


# -- the plan: order, and every kind ----------------------------------------------------------------

RECORDINGS = ["bios-lvm", "uefi-gpt", "raid1-luks", "nvme-btrfs"]


def same_size_blanks(lay, prefix="/dev/sd"):
    arrays = {m.id for m in lay.md_arrays}
    return [blank(f"{prefix}{chr(97 + n)}", d.size) for n, d in enumerate(d for d in lay.disks if d.id not in arrays)]


def assert_ordered(plan):
    """Every step after the steps it names; ids unique; every device a step works on was made
    (or is a wiped disk) by an earlier step."""
    seen = set()
    for s in plan.steps:
        assert s.id not in seen, s.id
        assert set(s.after) <= seen, (s.id, set(s.after) - seen)
        seen.add(s.id)


def test_recordings_plan_in_dependency_order():
    for name in RECORDINGS:
        lay, vgcfg = replayed(name)
        plan = rescue.recreate_plan(lay, same_size_blanks(lay), mapped(lay, same_size_blanks(lay)),
                                    RecreateOptions(vgcfg=vgcfg))
        assert_ordered(plan)
        ids = [s.id for s in plan.steps]
        position = {i: n for n, i in enumerate(ids)}
        for fs in lay.filesystems:
            new = plan.mapping.new_name(fs.device, lay)
            mkfs = position[f"mkfs {new}"]
            makers = [position[i] for i in ids if i in (f"wipe new {new}", f"activate {fs.device.split('/')[-1].split('-')[0]}")]
            assert makers and max(makers) < mkfs, (name, fs.device)
        mounts = [i for i in ids if i.startswith("mount ")]
        assert mounts == sorted(mounts, key=lambda m: m.count("/") if m != "mount /" else 0)
        assert mounts[0] == "mount /"


def test_bios_lvm_recording_same_disk_commands():
    lay, vgcfg = replayed("bios-lvm")
    here = [blank("/dev/vdc", lay.disks[0].size)]
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    assert plan.wipe == ["/dev/vdc"]
    assert [s.id for s in plan.steps[:4]] == ["wipe /dev/vdc", "zero start of /dev/vdc", "zero end of /dev/vdc",
                                              "partition /dev/vdc"]
    rows = sfdisk_rows(plan, "/dev/vdc")
    parts = {p.number: p for p in lay.partitions}
    assert rows["/dev/vdc1"] == {"start": str(parts[1].start), "size": str(parts[1].size), "type": "83", "bootable": True}
    assert rows["/dev/vdc2"]["size"] == str(parts[2].size)
    assert "label-id: " + lay.disks[0].partition_table.id in step(plan, "partition /dev/vdc").input
    pv = lay.physical_volumes[0]
    assert step(plan, "pv /dev/vdc2").argv[-6:] == ["-y", "--uuid", pv.uuid, "--restorefile",
                                                     "/var/lib/rescue/layout/lvm/vg0.vgcfg", "/dev/vdc2"]
    assert step(plan, "vg vg0").argv[0:2] == ["lvm", "vgcfgrestore"]
    xfs = next(f for f in lay.filesystems if f.type == "xfs")
    argv = step(plan, "mkfs /dev/mapper/vg0-root").argv
    assert argv[:4] == ["mkfs.xfs", "-f", "-m", f"uuid={xfs.uuid},crc=1,finobt=1,rmapbt=0,reflink=1,bigtime=1,inobtcount=1"]
    ext4 = next(f for f in lay.filesystems if f.type == "ext4")
    argv = step(plan, "mkfs /dev/vdc1").argv
    assert argv[:7] == ["mke2fs", "-F", "-q", "-t", "ext4", "-U", ext4.uuid] and argv[-1] == "/dev/vdc1"
    swap = lay.swaps[0]
    assert step(plan, "mkswap").argv == ["mkswap", "-f", "-U", swap.uuid, "/dev/mapper/vg0-swap"]
    assert step(plan, "mount /boot").params == {"device": "/dev/vdc1", "path": "/mnt/local/boot", "type": "ext4",
                                                "options": "relatime"}
    assert not [s for s in plan.steps if s.id.startswith(("pvresize", "lvextend"))]


def test_uefi_gpt_recording_keeps_partuuids_names_and_the_vfat_id():
    lay, vgcfg = replayed("uefi-gpt")
    here = [blank("/dev/nvme0n1", lay.disks[0].size)]
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    rows = sfdisk_rows(plan, "/dev/nvme0n1")
    for p in lay.partitions:
        row = rows[rescue.partition_device("/dev/nvme0n1", p.number)]
        assert row["uuid"] == p.uuid and row["type"] == p.type
        if p.name:
            assert row["name"] == f'"{p.name}"'
    assert "label: gpt" in step(plan, "partition /dev/nvme0n1").input
    vfat = next(f for f in lay.filesystems if f.type == "vfat")
    argv = step(plan, f"mkfs {plan.mapping.new_name(vfat.device, lay)}").argv
    assert argv[0] == "mkfs.vfat" and argv[argv.index("-i") + 1] == vfat.uuid.replace("-", "")


def test_raid1_luks_recording_md_luks_and_lvm_commands():
    lay, vgcfg = replayed("raid1-luks")
    here = same_size_blanks(lay)
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    md1 = next(m for m in lay.md_arrays if m.id == "/dev/md1")
    argv = step(plan, "create /dev/md1").argv
    assert argv[:5] == ["mdadm", "--create", "/dev/md1", "--run", "--assume-clean"]
    assert f"--uuid={md1.uuid}" in argv and f"--metadata={md1.metadata}" in argv and argv[-2:] == ["/dev/sda2", "/dev/sdb2"]
    lk = lay.luks[0]
    fmt = step(plan, f"format {lk.id}")
    assert fmt.argv[fmt.argv.index("--uuid") + 1] == lk.uuid and fmt.argv[-2:] == ["--key-file=-", "/dev/md1"]
    assert fmt.secret == f"luks:{lk.name}" and fmt.env == {"DM_DISABLE_UDEV": "1"}
    assert step(plan, f"open {lk.id}").argv[-1] == lk.name
    assert plan.secrets == [(f"luks:{lk.name}", f"the LUKS device {lk.name} on /dev/md1")]
    assert step(plan, "pv /dev/mapper/cryptroot").after == [f"wipe new {lk.id}"]
    assert all(s.argv[2:4] == ["--config", rescue.LVM_CONFIG] for s in plan.steps if s.argv[:1] == ["lvm"])


def test_nvme_btrfs_recording_subvolumes_parent_first_then_the_default():
    lay, vgcfg = replayed("nvme-btrfs")
    here = same_size_blanks(lay)
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    fs = next(f for f in lay.filesystems if f.type == "btrfs")
    device = plan.mapping.new_name(fs.device, lay)
    creates = [s.argv[-1].split("/", 4)[-1] for s in plan.steps if s.argv[:3] == ["btrfs", "subvolume", "create"]]
    assert creates.index("@data") < creates.index("@data/nested")
    default = step(plan, f"btrfs default {device}")
    assert default.argv[-1].endswith("/@data")
    assert step(plan, f"mkfs {device}").argv == ["mkfs.btrfs", "-f", "-U", fs.uuid] + (["-L", fs.label] if fs.label else []) + [device]
    home2 = next(m for m in lay.mounts if m.mountpoint == "/srv/home2")
    assert step(plan, "mount /srv/home2").params["options"].split(",")[-1] == "subvol=" + home2.subvolume


def thin_and_raid_layout():
    d = gpt_disk("/dev/sda", 20 * GiB)
    p1 = part(d, 1, 1, 20 * 1024 - 2, type=LVM_GUID)
    vg = VolumeGroup("vgt", "vguuid-t", 4 * MiB, 20 * GiB - 4 * MiB, [p1.id])
    return layout(d, p1, PhysicalVolume(p1.id, "pvuuid-t", "vgt", p1.size * 512), vg,
                  LogicalVolume("/dev/mapper/vgt-pool", "vgt", "pool", "u-pool", 8 * GiB, "thin-pool", metadata_size=64 * MiB),
                  LogicalVolume("/dev/mapper/vgt-thin1", "vgt", "thin1", "u-thin1", 20 * GiB, "thin", pool="pool"),
                  LogicalVolume("/dev/mapper/vgt-str", "vgt", "str", "u-str", GiB, "striped", stripes=1),
                  LogicalVolume("/dev/mapper/vgt-mir", "vgt", "mir", "u-mir", GiB, "raid1", data_copies=2),
                  Filesystem("/dev/mapper/vgt-thin1", "ext4", "uuid-thin1", None, 20 * GiB, GiB),
                  Mount("/", "/dev/mapper/vgt-thin1", "ext4", "rw"))


def test_thin_pool_and_raid_lvs_are_made_with_lvcreate():
    lay = thin_and_raid_layout()
    plan = plan_for(lay, [blank("/dev/vda", 20 * GiB)], vgcfg={"vgt": ("/x/vgt.vgcfg", "vgt {\n}\n")})
    assert_ordered(plan)
    assert step(plan, "vg vgt").argv[:2] == ["lvm", "vgcreate"]
    assert "--physicalextentsize" in step(plan, "vg vgt").argv
    lvcreates = [s for s in plan.steps if s.id.startswith("lv ")]
    assert [s.id for s in lvcreates] == ["lv vgt/pool", "lv vgt/str", "lv vgt/mir", "lv vgt/thin1"]
    pool, _, mir, thin = (s.argv[3:] for s in lvcreates)
    assert pool[pool.index("--type"):] == ["--type", "thin-pool", "-l", str(8 * GiB // (4 * MiB)),
                                           "--poolmetadatasize", f"{64 * 1024}k", "vgt"]
    assert thin[thin.index("--type"):] == ["--type", "thin", "-V", f"{20 * GiB // 1024}k", "--thinpool", "pool", "vgt"]
    assert mir[mir.index("--type") + 1] == "raid1" and mir[mir.index("-m") + 1] == "1"
    assert any("new UUIDs" in n for n in plan.notes)


def test_lvm_on_a_whole_disk_and_a_filesystem_without_a_partition_table():
    d1, d2 = Disk("/dev/sdb", 8 * GiB), Disk("/dev/sdc", 4 * GiB)
    lay = layout(d1, d2, PhysicalVolume("/dev/sdb", "pvuuid-w", "vgw", 8 * GiB),
                 VolumeGroup("vgw", "vguuid-w", 4 * MiB, 8 * GiB - 4 * MiB, ["/dev/sdb"]),
                 LogicalVolume("/dev/mapper/vgw-data", "vgw", "data", "u-data", 4 * GiB),
                 Filesystem("/dev/mapper/vgw-data", "xfs", "uuid-data", "data", 4 * GiB, GiB),
                 Filesystem("/dev/sdc", "ext4", "uuid-sdc", "whole", 4 * GiB, GiB),
                 Mount("/data", "/dev/mapper/vgw-data", "xfs", "rw"), Mount("/whole", "/dev/sdc", "ext4", "rw"))
    here = [blank("/dev/vdb", 8 * GiB), blank("/dev/vdc", 4 * GiB)]
    plan = plan_for(lay, here)
    assert_ordered(plan)
    assert not [s for s in plan.steps if s.id.startswith("partition ")]
    assert step(plan, "pv /dev/vdb").argv[-1] == "/dev/vdb"
    assert step(plan, "mkfs /dev/vdc").argv[-1] == "/dev/vdc"
    assert step(plan, "mkfs /dev/vdc").after == ["zero end of /dev/vdc"]


def test_md_partitions_are_named_after_the_array():
    d1, d2 = gpt_disk("/dev/sda", 10 * GiB), gpt_disk("/dev/sdb", 10 * GiB)
    p1, p2 = part(d1, 1, 1, 9000, type="a19d880f-05fc-4d3b-a006-743f0f84911e"), part(d2, 1, 1, 9000, type="a19d880f-05fc-4d3b-a006-743f0f84911e")
    md = gpt_disk("/dev/md127", 9000 * MiB - 8 * MiB)
    mdp = part(md, 1, 1, 8000)
    lay = layout(d1, d2, p1, p2, MdArray("/dev/md127", "raid1", [p1.id, p2.id], "aa:bb:cc:dd", "host:127", "1.2", 2),
                 md, mdp, Filesystem("/dev/md127p1", "ext4", "uuid-mdp", None, 8000 * MiB, GiB),
                 Mount("/srv", "/dev/md127p1", "ext4", "rw"))
    plan = plan_for(lay, [blank("/dev/nvme0n1", 10 * GiB), blank("/dev/nvme1n1", 10 * GiB)])
    assert_ordered(plan)
    ids = [s.id for s in plan.steps]
    assert ids.index("create /dev/md127") < ids.index("partition /dev/md127") < ids.index("mkfs /dev/md127p1")
    assert step(plan, "create /dev/md127").argv[-2:] == ["/dev/nvme0n1p1", "/dev/nvme1n1p1"]
    assert "/dev/md127p1 : " in step(plan, "partition /dev/md127").input
    assert "/dev/md127" not in plan.wipe


def test_luks_on_lvm():
    d = gpt_disk("/dev/sda", 10 * GiB)
    p = part(d, 1, 1, 10 * 1024 - 2, type=LVM_GUID)
    lay = layout(d, p, PhysicalVolume(p.id, "pvu", "vg0", p.size * 512), VolumeGroup("vg0", "vgu", 4 * MiB, 10 * GiB - 8 * MiB, [p.id]),
                 LogicalVolume("/dev/mapper/vg0-sec", "vg0", "sec", "lvu", 2 * GiB),
                 Luks("/dev/mapper/secret", "secret", "/dev/mapper/vg0-sec", 1, "luks-uuid", "aes-xts-plain64", 256, "sha256"),
                 Filesystem("/dev/mapper/secret", "ext4", "fsu", None, 2 * GiB, MiB), Mount("/sec", "/dev/mapper/secret", "ext4", "rw"))
    plan = plan_for(lay, [blank("/dev/vda", 10 * GiB)])
    assert_ordered(plan)
    ids = [s.id for s in plan.steps]
    assert ids.index("activate vg0") < ids.index("format /dev/mapper/secret") < ids.index("mkfs /dev/mapper/secret")
    argv = step(plan, "format /dev/mapper/secret").argv
    assert argv[argv.index("--type") + 1] == "luks1" and "--label" not in argv and "--pbkdf" not in argv


def test_mbr_extended_and_logical_partitions():
    d = dos_disk("/dev/sda", 10 * GiB)
    parts = [part(d, 1, 1, 1024, type="83"), part(d, 2, 1025, 9000, type="5", role="extended"),
             part(d, 5, 1026, 4000, type="83", role="logical"), part(d, 6, 5027, 3998, type="82", role="logical")]
    lay = layout(d, *parts, Filesystem("/dev/sda1", "ext4", "u1", None, GiB, MiB), Filesystem("/dev/sda5", "ext4", "u5", None, GiB, MiB),
                 Swap("/dev/sda6", "u6"), Mount("/", "/dev/sda5", "ext4", "rw"), Mount("/boot", "/dev/sda1", "ext4", "rw", parent="/"))
    plan = plan_for(lay, [blank("/dev/vda", 10 * GiB)])
    rows = sfdisk_rows(plan, "/dev/vda")
    assert list(rows) == ["/dev/vda1", "/dev/vda2", "/dev/vda5", "/dev/vda6"]
    assert rows["/dev/vda2"]["type"] == "5"
    assert "wipe new /dev/vda2" not in [s.id for s in plan.steps]        # the extended one holds nothing


def test_gpt_with_gaps_and_numbers_out_of_order_keeps_numbers_and_starts():
    d = gpt_disk("/dev/sda", 10 * GiB)
    parts = [part(d, 3, 1, 100), part(d, 1, 200, 100), part(d, 7, 1000, 2000)]
    lay = layout(d, *parts, Filesystem("/dev/sda7", "ext4", "u7", None, 2000 * MiB, MiB), Mount("/", "/dev/sda7", "ext4", "rw"))
    plan = plan_for(lay, [blank("/dev/vda", 10 * GiB)])
    rows = sfdisk_rows(plan, "/dev/vda")
    assert {k: v["start"] for k, v in rows.items()} == {"/dev/vda3": str(MiB // 512), "/dev/vda1": str(200 * MiB // 512),
                                                         "/dev/vda7": str(1000 * MiB // 512)}
    assert [n for n, _ in step(plan, "wait for partitions of /dev/vda").params["partitions"]] == [3, 1, 7] or \
        sorted(n for n, _ in step(plan, "wait for partitions of /dev/vda").params["partitions"]) == [1, 3, 7]


# -- resizing ----------------------------------------------------------------------------------------

def test_onto_a_bigger_disk_the_last_partition_pv_and_lv_grow():
    lay, vgcfg = replayed("bios-lvm")
    here = [blank("/dev/nvme0n1", 2 * lay.disks[0].size)]
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    assert_ordered(plan)
    rows = sfdisk_rows(plan, "/dev/nvme0n1")
    assert "size" not in rows["/dev/nvme0n1p2"]        # to the end of the disk
    assert rows["/dev/nvme0n1p1"]["size"] == str(next(p.size for p in lay.partitions if p.number == 1))
    ids = [s.id for s in plan.steps]
    assert ids.index("vg vg0") < ids.index("pvresize /dev/nvme0n1p2") < ids.index("lvextend vg0/root") \
        < ids.index("mkfs /dev/mapper/vg0-root")
    assert step(plan, "lvextend vg0/root").argv[-3:] == ["-l", "+100%FREE", "vg0/root"]
    assert any("/dev/vda2 grows from" in n for n in plan.notes)
    assert "-d" not in step(plan, "mkfs /dev/mapper/vg0-root").argv     # agcount follows the new size


def test_onto_a_bigger_disk_a_named_lv_grows():
    lay = lvm_layout()
    plan = plan_for(lay, [blank("/dev/vda", 20 * GiB)], grow_lv="vg0/swap")
    assert "lvextend vg0/swap" in [s.id for s in plan.steps] or \
        step(plan, "lv vg0/swap").argv[step(plan, "lv vg0/swap").argv.index("-l") + 1] == "100%FREE"


def test_no_resize_when_autoresize_is_off():
    lay = lvm_layout()
    plan = plan_for(lay, [blank("/dev/vda", 20 * GiB)], resize=False)
    rows = sfdisk_rows(plan, "/dev/vda")
    assert rows["/dev/vda2"]["size"] == str(lay.partitions[1].size)
    message = refusal(plan_for, lay, [blank("/dev/vda", 8 * GiB)], None, False) if False else \
        refusal(lambda: plan_for(lay, [blank("/dev/vda", 8 * GiB)], resize=False))
    assert message.startswith("/dev/vda is too small for /dev/sda:") and "short" in message


def test_onto_a_smaller_disk_the_last_lv_shrinks_when_its_files_fit():
    lay = lvm_layout(10 * GiB, used=GiB)
    plan = plan_for(lay, [blank("/dev/vda", 6 * GiB)])
    assert_ordered(plan)
    rows = sfdisk_rows(plan, "/dev/vda")
    size = int(rows["/dev/vda2"]["size"]) * 512
    assert size % MiB == 0 and size + 513 * MiB <= 6 * GiB - 34 * 512
    root = step(plan, "lv vg0/root").argv
    extents = int(root[root.index("-l") + 1])
    swap = step(plan, "lv vg0/swap").argv
    assert int(swap[swap.index("-l") + 1]) == 512 // 4          # the other LVs keep their size
    assert (extents + 128) * 4 * MiB <= size - MiB               # fits the PV with its metadata
    assert extents * 4 * MiB >= GiB                              # and holds the files
    assert any("shrinks" in n for n in plan.notes)


def test_onto_a_too_small_disk_refused_saying_by_how_much():
    lay = lvm_layout(10 * GiB, used=7 * GiB)
    message = refusal(lambda: plan_for(lay, [blank("/dev/vda", 6 * GiB)]))
    assert message.startswith("/dev/vda is too small for /dev/sda: /dev/sda2 would shrink from")
    match = re.search(r"it needs ([\d.]+ GiB), ([\d.]+ GiB) more", message)
    assert match, message


def test_a_filesystem_of_unknown_usage_does_not_shrink():
    lay = lvm_layout(10 * GiB, used=None)
    message = refusal(lambda: plan_for(lay, [blank("/dev/vda", 6 * GiB)]))
    assert "cannot be made smaller" in message


def test_xfs_cannot_shrink_is_said():
    lay = lvm_layout(10 * GiB, root_fs="xfs", used=GiB)
    plan = plan_for(lay, [blank("/dev/vda", 6 * GiB)])
    assert any("XFS cannot shrink" in n for n in plan.notes)
    assert step(plan, "mkfs /dev/mapper/vg0-root").argv[0] == "mkfs.xfs"


def test_a_partition_before_the_last_never_shrinks():
    d = gpt_disk("/dev/sda", 10 * GiB)
    lay = layout(d, part(d, 1, 1, 8000), part(d, 2, 8001, 2000),
                 Filesystem("/dev/sda1", "ext4", "u1", None, 8000 * MiB, MiB), Filesystem("/dev/sda2", "ext4", "u2", None, GiB, MiB))
    message = refusal(lambda: plan_for(lay, [blank("/dev/vda", 7 * GiB)]))
    assert "is too small for /dev/sda" in message


# -- sectors, alignment, the GPT backup header ---------------------------------------------------------

@pytest.mark.parametrize("target_ss", [512, 4096])
def test_alignment_and_sector_size_of_the_target(target_ss):
    lay = lvm_layout(10 * GiB)
    plan = plan_for(lay, [blank("/dev/vda", 20 * GiB + 3 * 4096, logical_sector_size=target_ss, physical_sector_size=4096)])
    rows = sfdisk_rows(plan, "/dev/vda")
    for row in rows.values():
        assert int(row["start"]) * target_ss % MiB == 0
        if "size" in row:
            assert int(row["size"]) * target_ss % MiB == 0
    assert int(rows["/dev/vda1"]["start"]) == MiB // target_ss
    assert int(rows["/dev/vda1"]["size"]) == 512 * MiB // target_ss


def test_a_512_byte_start_that_is_no_4k_sector_moves_to_the_next_mib():
    d = gpt_disk("/dev/sda", 10 * GiB)
    p = Partition("/dev/sda1", "/dev/sda", 1, 34, 2 * GiB // 512, LINUX)
    lay = layout(d, p, Filesystem("/dev/sda1", "ext4", "u", None, 2 * GiB, MiB))
    plan = plan_for(lay, [blank("/dev/vda", 10 * GiB, logical_sector_size=4096)])
    assert sfdisk_rows(plan, "/dev/vda")["/dev/vda1"]["start"] == str(MiB // 4096)
    assert any("starts at 1 MiB instead" in n for n in plan.notes)


def test_grown_gpt_leaves_room_for_the_backup_header_at_the_new_end():
    lay = lvm_layout(10 * GiB)
    size = 20 * GiB
    plan = plan_for(lay, [blank("/dev/vda", size)], resize=True)
    script = step(plan, "partition /dev/vda").input
    assert "last-lba" not in script and "first-lba" not in script     # sfdisk writes the backup at the new end
    last = lay.partitions[-1]
    disk = rescue.PlanContext(lay, [blank("/dev/vda", size)], mapped(lay, [blank("/dev/vda", size)]), RecreateOptions())
    rows = rescue.partition_table_plan(disk, lay.disks[0])
    assert rows[-1][0] is last and rows[-1][2] is None


@needs_real
def test_real_4k_sector_disk_planned_onto_a_512_byte_disk():
    """curtin's probe of a real 4Kn disk: its table (in 4096-byte sectors) onto a 512e disk."""
    data = json.loads((REAL / "probert/06-curtin-probert-4k-sectors.json").read_text())
    blockdev = data.get("storage", data)["blockdev"]
    table = blockdev["/dev/sda"]["partitiontable"]
    pt, parts = rescue.parse_sfdisk(json.dumps({"partitiontable": table}), "/dev/sda")
    size = int(blockdev["/dev/sda"]["attrs"]["size"])
    lay = layout(Disk("/dev/sda", size, 4096, 4096, partition_table=pt), *parts)
    plan = plan_for(lay, [blank("/dev/vdb", size)], resize=False)
    rows = sfdisk_rows(plan, "/dev/vdb")
    for p in parts:
        row = rows[rescue.partition_device("/dev/vdb", p.number)]
        assert int(row["start"]) == p.start * 8 and int(row["size"]) == p.size * 8
    assert "label: " + pt.label in step(plan, "partition /dev/vdb").input


@needs_real
@pytest.mark.parametrize("name", ["01-curtin-probert-lvm.json", "03-curtin-probert-raid1-partitions.json",
                                  "05-curtin-probert-msdos-extended.json", "07-curtin-probert-nvme-multipath.json"])
def test_real_partition_tables_planned_onto_bigger_nvme_disks(name):
    data = json.loads((REAL / "probert" / name).read_text())
    blockdev = data.get("storage", data)["blockdev"]
    items = []
    for device, info in sorted(blockdev.items()):
        if not (info.get("partitiontable") or {}).get("partitions") or info.get("DEVTYPE") != "disk" \
                or device.startswith("/dev/sr"):
            continue
        pt, parts = rescue.parse_sfdisk(json.dumps({"partitiontable": info["partitiontable"]}), device)
        items += [Disk(device, int(info["attrs"]["size"]), pt.sector_size, pt.sector_size, partition_table=pt)] + parts
    lay = layout(*items)
    if not lay.disks:
        pytest.skip("no partitioned disk")
    here = [blank(f"/dev/nvme{n}n1", 2 * d.size) for n, d in enumerate(lay.disks)]
    plan = plan_for(lay, here)
    assert_ordered(plan)
    for old in lay.disks:
        new = plan.mapping.disks[old.id]
        rows = sfdisk_rows(plan, new)
        assert set(rows) == {rescue.partition_device(new, p.number) for p in lay.partitions if p.disk == old.id}
        assert all(re.fullmatch(r"/dev/nvme\d+n1p\d+", node) for node in rows)


# -- the review forms ----------------------------------------------------------------------------------

def test_plan_script_is_valid_bash_and_holds_every_command(tmp_path):
    for name in RECORDINGS:
        lay, vgcfg = replayed(name)
        here = same_size_blanks(lay)
        plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
        script = rescue.plan_script(plan, lay, here)
        path = tmp_path / f"{name}.sh"
        path.write_text(script)
        checked = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, (name, checked.stderr)
        assert script.startswith("#!/bin/bash\n") and "set -euo pipefail" in script
        for s in plan.steps:
            if s.argv:
                assert " ".join(shlex.quote(a) for a in s.argv) in script, s.id
        for name_, _ in plan.secrets:
            assert "read -r -s -p" in script and rescue.secret_variable(name_) in script


def test_plan_json_is_the_plan():
    lay, vgcfg = replayed("raid1-luks")
    here = same_size_blanks(lay)
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    data = json.loads(rescue.plan_json(plan, lay))
    assert data["mapping"] == plan.mapping.disks and data["wipe"] == plan.wipe
    assert [rescue.Step(**s) for s in data["steps"]] == plan.steps
    assert data["secrets"] == ["luks:cryptroot"]


def test_plan_text_shows_the_mapping_the_wipe_list_and_each_command():
    lay, vgcfg = replayed("bios-lvm")
    here = [blank("/dev/vdc", lay.disks[0].size), blank("/dev/vdd", 99 * GiB)]
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    text = rescue.describe_plan(plan, lay, here)
    assert "/dev/vda (4 GiB) -> /dev/vdc (4 GiB, the same size): the same size" in text
    assert "/dev/vdd: left alone: not needed" in text
    assert "Disks to be wiped completely: /dev/vdc\n" in text
    for s in plan.steps:
        assert rescue.step_command(s) in text


def test_mountonly_plan_creates_nothing():
    lay, _ = replayed("raid1-luks")
    steps = rescue.mountonly_plan(lay, "/mnt/local")
    creating = {"mkfs", "mke2fs", "mkfs.xfs", "mkswap", "sfdisk", "pvcreate", "vgcreate", "lvcreate", "wipefs", "dd"}
    assert not [s for s in steps if s.argv and (s.argv[0] in creating or "--create" in s.argv or
                                                 (s.argv[0] == "lvm" and s.argv[1] in creating))]
    root = next(f for f in lay.filesystems if any(m.device == f.device and m.mountpoint == "/" for m in lay.mounts))
    assert next(s for s in steps if s.id == "mount /").params["device"] == f"UUID={root.uuid}"
    kinds = [s.id.split()[0] for s in steps]
    assert kinds.index("assemble") < kinds.index("open") < kinds.index("activate") < kinds.index("mount")


# -- properties: random layouts onto random disk sets ----------------------------------------------------

@st.composite
def layouts_and_disks(draw):
    """A layout of 1-4 disks (GPT or MBR, 1-4 partitions each, some PVs of one VG with LVs,
    some RAID1 pairs, filesystems and mounts), and 1-6 disks here of random sizes, names,
    sector sizes and serials, some in use."""
    n_disks = draw(st.integers(1, 4))
    items, devices = [], []
    disks = []
    for n in range(n_disks):
        size = draw(st.sampled_from([8, 10, 16, 20])) * GiB
        serial = draw(st.sampled_from([None, f"SER{n}", "SAME"]))
        d = (gpt_disk if draw(st.booleans()) else dos_disk)(f"/dev/sd{chr(97 + n)}", size, serial=serial)
        disks.append(d)
        items.append(d)
        start = 1
        for number in range(1, draw(st.integers(1, 4)) + 1):
            size_mib = draw(st.sampled_from([256, 512, 1024]))
            p = part(d, number, start, size_mib, type=LINUX if d.partition_table.label == "gpt" else "83")
            start += size_mib
            items.append(p)
            devices.append((p.id, size_mib * MiB))
    pvs, free = [], []
    for device, size in devices:
        kind = draw(st.sampled_from(["fs", "pv", "swap", "raid", "none"]))
        if kind == "pv":
            pvs.append((device, size))
        elif kind == "raid":
            free.append((device, size))
        elif kind == "fs":
            items.append(Filesystem(device, draw(st.sampled_from(["ext4", "xfs", "vfat"])), f"uuid-{device}", None, size, MiB))
        elif kind == "swap":
            items.append(Swap(device, f"uuid-{device}"))
    for n in range(0, len(free) - 1, 2):
        md_id = f"/dev/md{n}"
        items.append(MdArray(md_id, "raid1", [free[n][0], free[n + 1][0]], f"md-{n}", None, "1.2", 2))
        items.append(Filesystem(md_id, "ext4", f"uuid-{md_id}", None, min(free[n][1], free[n + 1][1]), MiB))
    if pvs:
        vg_size = sum(size - 4 * MiB for _, size in pvs)
        items.append(VolumeGroup("vg0", "vguuid", 4 * MiB, vg_size, [d for d, _ in pvs]))
        items += [PhysicalVolume(d, f"pvuuid-{d}", "vg0", size) for d, size in pvs]
        for n in range(draw(st.integers(1, 3))):
            lv = LogicalVolume(f"/dev/mapper/vg0-lv{n}", "vg0", f"lv{n}", f"lvuuid{n}", 64 * MiB)
            items += [lv, Filesystem(lv.id, "ext4", f"uuid-{lv.id}", None, lv.size, MiB)]
    mounted = [x for x in items if isinstance(x, Filesystem)]
    for n, fs in enumerate(mounted):
        items.append(Mount("/" if n == 0 else f"/m{n}", fs.device, fs.type, "rw", parent=None if n == 0 else "/"))
    lay = layout(*items)
    here = []
    for n in range(draw(st.integers(1, 6))):
        name = draw(st.sampled_from(["/dev/sd", "/dev/vd", "/dev/nvme"]))
        path = f"/dev/nvme{n}n1" if name == "/dev/nvme" else f"{name}{chr(97 + n)}"
        here.append(DiskHere(path, draw(st.sampled_from([6, 8, 10, 16, 20, 40])) * GiB,
                             draw(st.sampled_from([512, 512, 4096])), 4096,
                             serial=draw(st.sampled_from([None, "SER0", "SER1", "SAME"])),
                             partitions=[f"{path}{'p' if path[-1].isdigit() else ''}1"],
                             in_use=draw(st.sampled_from([None, None, None, "mounted at /srv"]))))
    return lay, here


def kernel_partition_name(disk, number):
    """The kernel's rule (block/partitions/core.c): a 'p' after a disk name ending in a digit."""
    return f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"


def device_words(argv):
    for word in argv:
        for value in [word] + word.split("=", 1)[1:]:
            if value.startswith("/dev/") and not value.startswith("/dev/zero"):
                yield value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts_and_disks())
def test_property_bijection_order_and_nothing_outside_the_wipe_list(case):
    lay, here = case
    try:
        m = rescue.map_disks(lay, here, {})
    except RescueError as exc:
        event("no mapping")
        assert exc.message.startswith("no disk here can take the place of")
        assert len([d for d in here if not d.in_use]) < len(lay.disks)      # else a disk is always found
        return
    targets = list(m.disks.values())
    assert len(set(targets)) == len(targets) == len(lay.disks)            # a bijection onto disks here
    by_path = {d.path: d for d in here}
    assert not [t for t in targets if by_path[t].in_use]
    try:
        plan = rescue.recreate_plan(lay, here, m, RecreateOptions())
    except RescueError as exc:
        event("refused: too small")
        assert "too small" in exc.message or "cannot be made smaller" in exc.message or "short" in exc.message, exc.message
        return
    event("planned")
    assert_ordered(plan)
    assert sorted(plan.wipe) == sorted(targets)
    allowed = set(plan.wipe) | {d.id for d in lay.md_arrays} | {lv.id for lv in lay.logical_volumes}
    allowed |= {p for d in here if d.path in plan.wipe for p in d.partitions}        # their old partitions
    allowed |= {kernel_partition_name(m.disks[p.disk], p.number) for p in lay.partitions}
    untouchable = {d.path for d in here if d.path not in plan.wipe}
    untouchable |= {p for d in here if d.path not in plan.wipe for p in d.partitions}
    for s in plan.steps:
        words = set(device_words(s.argv)) | set(device_words([str(v) for v in s.params.values() if isinstance(v, str)]))
        assert words <= allowed, (s.id, words - allowed)
        assert not words & untouchable, (s.id, words & untouchable)
        assert s.input.count("/dev/") == 0 or all(w.split()[0] in allowed for w in s.input.splitlines() if " : " in w)
    for disk in (d for d in here if d.path in plan.wipe):
        assert_table_fits(plan, disk)


def assert_table_fits(plan, disk):
    """The partitions of a planned table lie on the disk (before a GPT's backup), in whole
    sectors of the disk, and do not overlap."""
    if not [s for s in plan.steps if s.id == f"partition {disk.path}"]:
        return
    ss = disk.logical_sector_size
    gpt = "label: gpt" in step(plan, f"partition {disk.path}").input
    last = disk.size // ss - 1 - (33 if gpt and ss == 512 else 5 if gpt else 0)
    spans = []
    for row in sfdisk_rows(plan, disk.path).values():
        start = int(row["start"])
        end = start + int(row["size"]) - 1 if "size" in row else last
        assert 0 < start <= end <= last, (disk, row)
        if row["type"] not in ("5", "f", "85"):
            spans.append((start, end))
    spans.sort()
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:])), spans


def test_uuids_and_labels_are_kept_in_every_mkfs_argv():
    lay = lvm_layout(root_fs="xfs")
    plan = plan_for(lay, [blank("/dev/vda", 10 * GiB)])
    for fs in lay.filesystems:
        argv = step(plan, f"mkfs {plan.mapping.new_name(fs.device, lay)}").argv
        uuid_option = {"ext4": "-U", "xfs": "-m"}[fs.type]
        assert fs.uuid in argv[argv.index(uuid_option) + 1] and argv[argv.index("-L") + 1] == fs.label
        fallback = step(plan, f"mkfs {plan.mapping.new_name(fs.device, lay)}").fallback
        assert not fallback or (fs.uuid in " ".join(fallback) and fs.label in fallback)
    swap = lay.swaps[0]
    assert step(plan, "mkswap").argv == ["mkswap", "-f", "-U", swap.uuid, "-L", swap.label, swap.device]


@pytest.mark.parametrize("holder,message", [
    (("md", "/dev/md0"), "the RAID /dev/md0"), (("crypt", "cryptroot"), "the LUKS device cryptroot"),
    (("lvm", "vg0"), "the VG vg0")])
def test_a_name_the_layout_needs_held_by_a_disk_that_is_not_wiped_is_refused(holder, message):
    """The plan would stop it ("a re-run") and recreate over it: mdadm --stop /dev/md0 or
    cryptsetup close of a device standing on a disk outside the wipe list."""
    lay, vgcfg = replayed("raid1-luks")
    other = blank("/dev/vdz", 100 * GiB, holders=[holder])
    here = same_size_blanks(lay) + [other]
    text = refusal(lambda: rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg)))
    assert text.startswith(f"{message} of the layout has the name of a device on /dev/vdz")
    # on the disks to be wiped, the same names are stale holders to stop: fine
    here = same_size_blanks(lay)
    here[0].holders = [holder]
    plan = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg))
    assert plan.steps[0].id == f"stop {holder[0]} {holder[1]}"


def test_a_smaller_disk_that_still_holds_everything_is_not_called_larger():
    d = gpt_disk("/dev/sda", 20 * GiB)
    lay = layout(d, part(d, 1, 1, 4096), Filesystem("/dev/sda1", "ext4", "u1", None, 4 * GiB, GiB))
    plan = plan_for(lay, [blank("/dev/vda", 10 * GiB)])
    [note] = [n for n in plan.notes if n.startswith("/dev/sda1")]
    assert "larger" not in note and "/dev/vda" in note


def test_a_resumed_run_repeats_the_stop_steps_before_the_step_it_resumes_at():
    """Killed after cryptsetup open (or mdadm --create) finished but before the journal said
    so: the resumed run closes (stops) it again first, else the command fails on its own work."""
    lay, vgcfg = replayed("raid1-luks")
    here = same_size_blanks(lay)
    steps = rescue.recreate_plan(lay, here, mapped(lay, here), RecreateOptions(vgcfg=vgcfg)).steps
    ids = [s.id for s in steps]
    for resumed_at, repeated in (("open /dev/mapper/cryptroot", ["close again /dev/mapper/cryptroot"]),
                                 ("create /dev/md1", ["stop old /dev/md1"]),
                                 ("partition /dev/sda", [])):
        done = ids[:ids.index(resumed_at)]
        todo = [s.id for s in rescue.steps_to_run(steps, done)]
        assert todo == repeated + ids[ids.index(resumed_at):]
    assert [s.id for s in rescue.steps_to_run(steps, [])] == ids
    assert rescue.steps_to_run(steps, ids) == []
    optional_last = steps + [rescue.Step("stop x", "x", ["true"], optional=True)]
    assert rescue.steps_to_run(optional_last, [s.id for s in optional_last]) == []


# -- the CLI's review, replayed (nothing runs) ---------------------------------------------------------

def saved_layout_file(tmp_path, name):
    out = tmp_path / "layout"
    conf = tmp_path / "host.conf"
    conf.write_text(f"LOGFILE={tmp_path}/savelayout.log\nLOCKFILE={tmp_path}/savelayout.lock\n")
    done = run_rescue("-C", conf, "savelayout", "--replay", LAYOUTS / name, "-o", out)
    assert done.returncode == 0, done.stderr
    return out / "layout.json", conf


def test_cli_plan_reads_rear_disk_mappings_and_refuses_a_disk_in_use_in_one_line(tmp_path, conf_dir):
    layout_file, _ = saved_layout_file(tmp_path, "bios-lvm")
    (conf_dir / "mappings").mkdir()
    (conf_dir / "mappings" / "disk_mappings").write_text("/dev/vda /dev/vda\n")
    done = run_rescue("-c", conf_dir, "layoutonly", "--plan", "--layout", layout_file, "--replay", LAYOUTS / "bios-lvm")
    assert done.returncode == 1
    assert f"Using the disk mapping in {conf_dir}/mappings/disk_mappings" in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("rescue: error:")]
    assert errors == ["rescue: error: /dev/vda cannot take the place of /dev/vda: it holds the running system "
                      "(/dev/mapper/vg0-root is mounted at /)"]
    assert "Traceback" not in done.stderr


def test_cli_plan_of_a_hand_changed_or_truncated_layout_is_refused(tmp_path, conf_dir):
    layout_file, _ = saved_layout_file(tmp_path, "uefi-gpt")
    data = json.loads(layout_file.read_text())
    data["partitions"][-1]["size"] -= 8
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    truncated = tmp_path / "truncated.json"
    truncated.write_text(layout_file.read_text()[:700])
    for path, expected in ((broken, "was changed after rescue savelayout wrote it"), (truncated, "is not a valid layout")):
        done = run_rescue("-c", conf_dir, "layoutonly", "--plan", "--layout", path, "--replay", LAYOUTS / "uefi-gpt")
        errors = [line for line in done.stderr.splitlines() if line.startswith("rescue: error:")]
        assert done.returncode != 0 and len(errors) == 1 and expected in errors[0], done.stderr


def test_cli_map_naming_a_disk_that_does_not_exist(tmp_path, conf_dir):
    layout_file, _ = saved_layout_file(tmp_path, "bios-lvm")
    done = run_rescue("-c", conf_dir, "layoutonly", "--json", "--layout", layout_file, "--replay", LAYOUTS / "bios-lvm",
                      "--map", "/dev/vda=/dev/sdq")
    assert done.returncode == 1 and done.stdout.count("{") == 0
    assert "rescue: error: the mapping names /dev/sdq, which is not a disk here" in done.stderr


@pytest.mark.parametrize("target_ss", [512, 4096])
def test_a_gpt_partition_before_1_mib_gets_its_first_lba(target_ss):
    """sfdisk 2.38 refuses 'start=34' ("Sector 34 already used") unless the script says
    first-lba: 34 (its default is 1 MiB); tried by hand on an image file."""
    d = gpt_disk("/dev/sda", 10 * GiB)
    grub = Partition("/dev/sda1", "/dev/sda", 1, 34 if target_ss == 512 else 48, 2014, "21686148-6449-6e6f-744e-656564454649")
    lay = layout(d, grub, part(d, 2, 1, 9000), Filesystem("/dev/sda2", "ext4", "u2", None, 9000 * MiB, MiB))
    plan = plan_for(lay, [blank("/dev/vda", 10 * GiB, logical_sector_size=target_ss)])
    script = step(plan, "partition /dev/vda").input
    first = int(sfdisk_rows(plan, "/dev/vda")["/dev/vda1"]["start"])
    assert first == (34 if target_ss == 512 else 6)
    assert f"first-lba: {first}\n" in script
    assert "first-lba" not in step(plan_for(lvm_layout(), [blank("/dev/vda", 10 * GiB)]), "partition /dev/vda").input


def test_a_vg_on_two_disks_resizes_the_pv_that_grew():
    a, b = gpt_disk("/dev/sda", 10 * GiB), gpt_disk("/dev/sdb", 10 * GiB)
    pa, pb = part(a, 1, 1, 10 * 1024 - 2, type=LVM_GUID), part(b, 1, 1, 10 * 1024 - 2, type=LVM_GUID)
    lay = layout(a, b, pa, pb, PhysicalVolume(pa.id, "pv-a", "vg0", pa.size * 512), PhysicalVolume(pb.id, "pv-b", "vg0", pb.size * 512),
                 VolumeGroup("vg0", "vgu", 4 * MiB, 20 * GiB - 16 * MiB, [pa.id, pb.id]),
                 LogicalVolume("/dev/mapper/vg0-data", "vg0", "data", "lvu", 19 * GiB),
                 Filesystem("/dev/mapper/vg0-data", "ext4", "fsu", None, 19 * GiB, GiB))
    here = [blank("/dev/vda", 10 * GiB), blank("/dev/vdb", 30 * GiB)]
    plan = plan_for(lay, here, vgcfg={"vg0": ("/x/vg0.vgcfg", "vg0 {\n}\n")})
    assert_ordered(plan)
    assert [s.argv[-1] for s in plan.steps if s.id.startswith("pvresize")] == ["/dev/vdb1"]
    assert step(plan, "lvextend vg0/data").after == ["pvresize /dev/vdb1"]
    here = [blank("/dev/vda", 20 * GiB), blank("/dev/vdb", 30 * GiB)]
    plan = plan_for(lay, here, vgcfg={"vg0": ("/x/vg0.vgcfg", "vg0 {\n}\n")})
    assert_ordered(plan)
    assert [s.argv[-1] for s in plan.steps if s.id.startswith("pvresize")] == ["/dev/vda1", "/dev/vdb1"]
    assert step(plan, "mkfs /dev/mapper/vg0-data").after == ["lvextend vg0/data"]


@settings(max_examples=120, deadline=None)
@given(st.integers(8, 40), st.integers(4, 80), st.sampled_from([512, 4096]), st.integers(0, 30),
       st.sampled_from(["gpt", "dos"]), st.booleans())
def test_property_resized_tables_and_lvs_fit_the_target(old_gib, new_gib, ss, used_gib, label, vgcfg):
    lay = lvm_layout(old_gib * GiB, used=min(used_gib, old_gib - 2) * GiB, label=label)
    here = [blank("/dev/vda", new_gib * GiB, logical_sector_size=ss, physical_sector_size=4096)]
    options = {"vgcfg": {"vg0": ("/x/vg0.vgcfg", "vg0 {\n}\n")}} if vgcfg else {}
    try:
        plan = plan_for(lay, here, **options)
    except RescueError as exc:
        event("refused")
        assert new_gib < old_gib and "too small" in exc.message, exc.message
        return
    event("grown" if new_gib > old_gib else "shrunk" if new_gib < old_gib else "same")
    assert_ordered(plan)
    assert_table_fits(plan, here[0])
    row = sfdisk_rows(plan, "/dev/vda")["/dev/vda2"]
    pv_bytes = (int(row["size"]) if "size" in row else (new_gib * GiB // ss - 34 - int(row["start"]))) * ss
    creates = [s for s in plan.steps if s.id.startswith("lv ")]
    extents = [int(s.argv[s.argv.index("-l") + 1]) for s in creates if s.argv[s.argv.index("-l") + 1].isdigit()]
    assert sum(extents) * 4 * MiB <= pv_bytes - MiB
    if new_gib < old_gib:
        root = next(s for s in creates if s.id == "lv vg0/root")
        assert int(root.argv[root.argv.index("-l") + 1]) * 4 * MiB >= min(used_gib, old_gib - 2) * GiB


def test_serials_from_sysfs_when_lsblk_has_none():
    """Without udev (the helper VM, a minimal rescue system) lsblk prints no SERIAL."""
    nodes = lsblk_json(("/dev/vdc", "disk", 4 * GiB, {}, [("/dev/vdc1", "part", GiB, {})]),
                       ("/dev/nvme0n1", "disk", 8 * GiB, {}), ("/dev/sda", "disk", GiB, {"serial": "FROM-UDEV"}),
                       ("/dev/sdb", "disk", GiB, {}))
    sysfs = {"/sys/block/vdc/serial": "disk0", "/sys/block/nvme0n1/device/serial": "big                 \n",
             "/sys/block/sda/serial": "never read", "/sys/block/vdc1/serial": "not a disk"}
    rescue.fill_serials(nodes, sysfs.get)
    assert {n: nodes[n].serial for n in nodes} == {"/dev/vdc": "disk0", "/dev/vdc1": None, "/dev/nvme0n1": "big",
                                                   "/dev/sda": "FROM-UDEV", "/dev/sdb": None}
    lay, _ = replayed("uefi-gpt")
    m = mapped(lay, here_from(nodes))
    assert m.disks == {"/dev/vda": "/dev/vdc"} and m.reasons == {"/dev/vda": "the same serial"}


def test_recordings_without_sysfs_answers_still_replay():
    here = rescue.probe_disks_here(rescue.Probe(replay_dir=LAYOUTS / "bios-lvm"), default_config())
    assert [d.serial for d in here if d.path == "/dev/vda"] == ["disk0"]


def test_a_layout_needing_a_tool_this_system_lacks_is_refused_before_anything_runs(monkeypatch):
    lay, vgcfg = replayed("raid1-luks")
    here = [blank(d.id, d.size) for d in lay.disks]
    plan = plan_for(lay, here, vgcfg=vgcfg)
    lacking = {"mdadm", "cryptsetup"}
    monkeypatch.setattr(rescue, "shutil_which", lambda p: None if p in lacking else "/usr/sbin/" + p)
    with pytest.raises(rescue.RescueError) as caught:
        rescue.check_programs(plan.steps)
    assert caught.value.message == "this system lacks what the layout needs: cryptsetup, mdadm"
    assert "mdadm" in caught.value.hint and "cryptsetup" in caught.value.hint


def test_the_disk_of_a_file_backup_is_in_use_by_its_uuid_even_unmounted():
    """--plan in a rescue system that has not mounted the backup's disk yet: the layout's
    record of its filesystem (the UUID) keeps that disk out of the plan all the same."""
    nodes = rescue_machine_nodes()
    nodes["/dev/vda1"].uuid = "b4c6d1e2-0000-4000-8000-000000000001"
    fs = rescue.BackupFilesystem("/media/backup", "b4c6d1e2-0000-4000-8000-000000000001", "ext4")
    here = {d.path: d for d in rescue.disks_here(nodes, [], [], {}, {}, "/media/backup/rescue", fs)}
    assert here["/dev/vda"].in_use == ("it holds the backup (/dev/vda1, filesystem UUID "
                                       "b4c6d1e2-0000-4000-8000-000000000001, was mounted at /media/backup "
                                       "when the layout was saved)")
    assert here["/dev/vdb"].in_use is None
    assert {d.path: d for d in here_from(nodes)}["/dev/vda"].in_use is None   # without the record: blank
