"""savelayout by replay of recordings made inside real QEMU guests (tests/data/layouts/, see
its README): the layout is what the guest had, deterministic, and checklayout sees changes."""

import json
import shutil
from pathlib import Path

import pytest

import rescue
from conftest import run_rescue

LAYOUTS = Path(__file__).resolve().parent / "data" / "layouts"


def default_config():
    return rescue.load_config([rescue.DEFAULT_CONF], {"PATH": "/usr/bin"}, rescue.Log())


def replay(name, conf=None, directory=LAYOUTS):
    return rescue.capture_layout(rescue.Probe(replay_dir=directory / name), conf or default_config(), "guest")


def by(items, attr, value):
    found = [x for x in items if getattr(x, attr) == value]
    assert len(found) == 1, (attr, value, items)
    return found[0]


def test_bios_lvm():
    captured = replay("bios-lvm")
    lay = captured.layout
    disk = by(lay.disks, "id", "/dev/vda")
    assert disk.partition_table.label == "dos" and disk.serial == "disk0" and disk.transport is None
    boot_part, pv_part = [p for p in lay.partitions if p.disk == "/dev/vda"]
    assert (boot_part.number, boot_part.type, boot_part.bootable, boot_part.start) == (1, "83", True, 2048)
    assert pv_part.type == "8e" and pv_part.role == "primary"
    assert [pv.device for pv in lay.physical_volumes] == ["/dev/vda2"]
    assert {lv.name for lv in lay.logical_volumes} >= {"root", "swap"}
    root = by(lay.mounts, "mountpoint", "/")
    assert root.device == "/dev/mapper/vg0-root" and root.type == "xfs" and root.parent is None
    assert by(lay.mounts, "mountpoint", "/boot").parent == "/"
    xfs = by(lay.filesystems, "device", "/dev/mapper/vg0-root")
    assert xfs.options["meta-data"]["crc"] == "1" and xfs.options["data"]["bsize"] == "4096"
    ext4 = by(lay.filesystems, "device", "/dev/vda1")
    assert "has_journal" in ext4.options["features"] and ext4.options["inode_size"] in (128, 256)
    assert [s.device for s in lay.swaps] == ["/dev/mapper/vg0-swap"]
    assert lay.boot.firmware == "bios" and lay.boot.grub_disks == ["/dev/vda"]
    assert lay.boot.family == "debian" and lay.boot.tools["bootloader_install"] == "grub-install"
    assert lay.boot.tools["initramfs"] == "update-initramfs"
    assert "vg0" in captured.vgcfg and 'id = "' in captured.vgcfg["vg0"]
    assert lay.unsupported == []


def test_uefi_gpt():
    lay = replay("uefi-gpt").layout
    disk = by(lay.disks, "id", "/dev/vda")
    assert disk.partition_table.label == "gpt" and disk.partition_table.first_lba == 2048
    esp = by(lay.partitions, "id", lay.boot.esp)
    assert esp.type == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" and esp.uuid
    assert by(lay.mounts, "mountpoint", "/boot/efi").device == esp.id
    vfat = by(lay.filesystems, "device", esp.id)
    assert vfat.type == "vfat" and vfat.options["fat_size"] in (16, 32)
    assert by(lay.mounts, "mountpoint", "/").type == "ext4"
    assert len(lay.swaps) == 1 and lay.swaps[0].device.startswith("/dev/vda")
    assert lay.boot.firmware == "uefi" and lay.boot.efi_entries
    assert lay.physical_volumes == [] and lay.volume_groups == []


def test_raid1_luks_lvm():
    lay = replay("raid1-luks").layout
    boot_md, md = lay.md_arrays
    assert by(lay.mounts, "mountpoint", "/boot").device == boot_md.id == "/dev/md0"
    assert md.id == "/dev/md1" and md.devices == ["/dev/vda2", "/dev/vdb2"]
    assert md.level == "raid1" and md.metadata == "1.2" and md.raid_devices == 2 and md.uuid.count(":") == 3
    (luks,) = lay.luks
    assert luks.device == md.id and luks.version in (1, 2) and luks.cipher and luks.key_size
    assert [pv.device for pv in lay.physical_volumes] == [luks.id]
    assert by(lay.mounts, "mountpoint", "/").device.startswith("/dev/mapper/")
    assert {d.id for d in lay.disks} == {"/dev/vda", "/dev/vdb"}


def test_nvme_disk_with_btrfs_subvolumes():
    lay = replay("nvme-btrfs").layout
    nvme = by(lay.disks, "id", "/dev/nvme0n1")
    assert nvme.serial == "nvme0" and nvme.transport == "nvme"
    assert [p.id for p in lay.partitions if p.disk == nvme.id] == ["/dev/nvme0n1p1", "/dev/nvme0n1p2"]
    btrfs = by(lay.filesystems, "device", "/dev/nvme0n1p1")
    paths = {s["path"]: s for s in btrfs.options["subvolumes"]}
    assert set(paths) == {"@data", "@home2", "@data/nested"}
    assert paths["@data/nested"]["parent"] == paths["@data"]["id"]
    assert btrfs.options["default_subvolume"] == paths["@data"]["id"] and btrfs.label == "data"
    assert by(lay.mounts, "mountpoint", "/srv/data").subvolume == "@data"
    assert by(lay.mounts, "mountpoint", "/srv/home2").subvolume == "@home2"
    assert by(lay.mounts, "mountpoint", "/srv/scratch").type == "ext4"
    reasons = {e.what: e.reason for e in lay.excluded}
    assert reasons["/srv/tmp"].startswith("tmpfs")
    assert reasons["/srv/bind"] == "bind mount of /dev/nvme0n1p2 (mounted at /srv/scratch)"


@pytest.mark.parametrize("name", ["bios-lvm", "uefi-gpt", "raid1-luks", "nvme-btrfs"])
def test_replay_is_deterministic_and_round_trips(name):
    first = rescue.layout_to_json(replay(name).layout)
    assert rescue.layout_to_json(replay(name).layout) == first
    assert rescue.layout_to_json(rescue.layout_from_json(first)) == first
    assert rescue.diff_layouts(rescue.layout_from_json(first), replay(name).layout) == []


def copy_recording(name, tmp_path):
    dest = tmp_path / name
    shutil.copytree(LAYOUTS / name, dest)
    return dest


def edit_answer(recording, key, edit):
    manifest = json.loads((recording / "manifest.json").read_text())
    entry = manifest[key]
    path = recording / entry["file"]
    path.write_text(edit(path.read_text()))


LVS_KEY = f"run: lvm lvs {' '.join(rescue.LVM_REPORT)} -o {rescue.LV_FIELDS}"


def add_lv(text, name="extra", attr="-wi-a-----"):
    data = json.loads(text)
    rows = data["report"][0]["lv"]
    rows.append(dict(rows[0], lv_name=name, lv_uuid=f"{name}-uuid", lv_size="8388608", lv_attr=attr))
    return json.dumps(data)


def test_checklayout_exit_codes_and_readable_diff(tmp_path, conf_dir):
    layout_dir = tmp_path / "layout"
    conf = tmp_path / "t.conf"
    conf.write_text(f"LAYOUT_DIR={layout_dir}\n")
    saved = run_rescue("-c", conf_dir, "-C", conf, "savelayout", "--replay", LAYOUTS / "bios-lvm", "-o", layout_dir)
    assert saved.returncode == 0, saved.stderr
    assert "/dev/vda" in saved.stdout and "-> /boot" in saved.stdout and "vg0/root" in saved.stdout
    assert (layout_dir / "layout.json").is_file() and (layout_dir / "lvm" / "vg0.vgcfg").is_file()
    same = run_rescue("-c", conf_dir, "-C", conf, "checklayout", "--replay", LAYOUTS / "bios-lvm")
    assert same.returncode == 0, same.stdout + same.stderr
    changed = copy_recording("bios-lvm", tmp_path)
    edit_answer(changed, LVS_KEY, add_lv)
    differs = run_rescue("-c", conf_dir, "-C", conf, "checklayout", "--replay", changed)
    assert differs.returncode == 1
    assert "  LV vg0/extra added" in differs.stdout.splitlines()
    broken = run_rescue("-c", conf_dir, "-C", conf, "checklayout", "--replay", tmp_path / "nope")
    assert broken.returncode == 2 and "is not a rescue recording" in broken.stderr


def test_a_grown_filesystem_is_reported_by_its_mountpoint():
    old = replay("bios-lvm").layout
    new = rescue.layout_from_json(rescue.layout_to_json(old))
    fs = by(new.filesystems, "device", "/dev/mapper/vg0-root")
    fs.size = fs.size * 2
    assert rescue.diff_layouts(old, new) == [
        f"/ grew from {rescue.human_size(fs.size // 2)} to {rescue.human_size(fs.size)}"]


def test_snapshot_is_recorded_as_unsupported_with_a_warning(tmp_path, conf_dir):
    recording = copy_recording("bios-lvm", tmp_path)
    edit_answer(recording, LVS_KEY, lambda t: add_lv(t, "rootsnap", "swi-a-s---"))
    proc = run_rescue("-c", conf_dir, "savelayout", "--replay", recording, "--json")
    assert proc.returncode == 0
    unsupported = json.loads(proc.stdout)["unsupported"]
    assert unsupported == [{"kind": "lvm", "what": "vg0/rootsnap", "reason": "LVM snapshot: will not be recreated"}]
    assert "rescue: warning: vg0/rootsnap: LVM snapshot: will not be recreated" in proc.stderr


def test_missing_lvm_tools_mean_no_lvm_not_a_crash(tmp_path):
    recording = copy_recording("bios-lvm", tmp_path)
    manifest = json.loads((recording / "manifest.json").read_text())
    manifest["which: lvm"] = {"value": None}
    (recording / "manifest.json").write_text(json.dumps(manifest))
    lay = replay("bios-lvm", directory=tmp_path).layout
    assert lay.logical_volumes == [] and lay.volume_groups == []
    assert {u.what for u in lay.unsupported} >= {"/dev/mapper/vg0-root"}


def test_config_exclusions_have_reasons(tmp_path):
    conf = tmp_path / "x.conf"
    conf.write_text("EXCLUDE_MOUNTPOINTS=( /srv/scratch )\nEXCLUDE_DISKS=( nvme0n1 )\n")
    cfg = rescue.load_config([rescue.DEFAULT_CONF, conf], {"PATH": "/bin"}, rescue.Log())
    lay = replay("nvme-btrfs", cfg).layout
    reasons = {e.what: e.reason for e in lay.excluded}
    assert reasons["/srv/data"] == "on /dev/nvme0n1, excluded by EXCLUDE_DISKS"
    assert not any(m.mountpoint.startswith("/srv/") for m in lay.mounts)
    assert "/dev/nvme0n1" not in {d.id for d in lay.disks}


def test_a_failed_dumpe2fs_and_an_unknown_uuid_are_warnings_naming_the_device(tmp_path, conf_dir):
    """issue 11 C: a broken ext4 superblock (dumpe2fs fails, lsblk knows no UUID) printed UUID=None
    and exit 0 in silence; now each is a warning that names /dev/vda1 and the layout has no "None"."""
    recording = copy_recording("bios-lvm", tmp_path)
    manifest = json.loads((recording / "manifest.json").read_text())
    entry = manifest["run: dumpe2fs -h /dev/vda1"]
    entry["returncode"] = 1
    (recording / entry["file"]).write_text("")
    (recording / (entry["file"] + ".stderr")).write_text(
        "dumpe2fs 1.47.0 (5-Feb-2023)\ndumpe2fs: Bad magic number in super-block while trying to open /dev/vda1\n")
    (recording / "manifest.json").write_text(json.dumps(manifest))
    lsblk = next(k for k in manifest if k.startswith("run: lsblk -J"))
    edit_answer(recording, lsblk, lambda t: t.replace('"uuid": "c5811322-b69c-5061-8d15-b6a01dc42ffe"', '"uuid": null'))
    out = tmp_path / "out"
    tree = run_rescue("-c", conf_dir, "savelayout", "--replay", recording, "-o", out)
    assert tree.returncode == 0, tree.stderr
    warnings = [line for line in tree.stderr.splitlines() if line.startswith("rescue: warning: /dev/vda1: ")]
    assert any("dumpe2fs failed: dumpe2fs: Bad magic number in super-block" in w for w in warnings), tree.stderr
    assert any("no filesystem UUID" in w for w in warnings), tree.stderr
    assert "None" not in tree.stdout and "UUID unknown" in tree.stdout
    saved = (out / "layout.json").read_text()
    assert "None" not in saved
    fs = by(rescue.layout_from_json(saved).filesystems, "device", "/dev/vda1")
    assert fs.uuid is None and fs.options == {}


BACKUP_UUID = "0f5e4a4c-2b1d-4c53-9a3e-7d8b1c2e3f40"


def with_backup_disk(recording):
    """The recording with a second disk whose one ext4 filesystem is mounted at /backup."""
    manifest = json.loads((recording / "manifest.json").read_text())

    def add_disk(text):
        data = json.loads(text)
        disk = dict(data["blockdevices"][0], name="/dev/vdb", kname="/dev/vdb", serial="backup")
        part = dict(disk["children"][0], name="/dev/vdb1", kname="/dev/vdb1", pkname="/dev/vdb",
                    uuid=BACKUP_UUID, label="drill-backup", partflags=None, **{"maj:min": "254:17"})
        disk.update(children=[part], **{"maj:min": "254:16"})
        data["blockdevices"].append(disk)
        return json.dumps(data)

    def add_mount(text):
        data = json.loads(text)
        data["filesystems"].append({"target": "/backup", "source": "/dev/vdb1", "maj:min": "254:17", "fstype": "ext4",
                                    "options": "rw,relatime", "size": 3 << 30, "used": 1 << 30, "fsroot": "/"})
        return json.dumps(data)
    edit_answer(recording, next(k for k in manifest if k.startswith("run: lsblk -J")), add_disk)
    edit_answer(recording, next(k for k in manifest if k.startswith("run: findmnt -J")), add_mount)
    return recording


@pytest.mark.parametrize("url, recorded", [("file:///backup", True), ("file:///backup/hosts", True),
                                           ("file:///var/backup", False), ("rsync://h/backup", False)])
def test_the_filesystem_of_a_file_backup_on_its_own_disk_is_recorded_by_its_uuid(tmp_path, url, recorded):
    """The rescue system mounts it from there (and no plan wipes its disk); a backup on the
    root filesystem or on a server records nothing."""
    recording = copy_recording("bios-lvm", tmp_path)
    if recorded:
        with_backup_disk(recording)
    conf = tmp_path / "b.conf"
    conf.write_text(f"BACKUP=DUPLICITY\nBACKUP_DUPLICITY_URL={url}\n")
    cfg = rescue.load_config([rescue.DEFAULT_CONF, conf], {"PATH": "/bin"}, rescue.Log())
    lay = rescue.capture_layout(rescue.Probe(replay_dir=recording), cfg, "guest").layout
    if not recorded:
        assert lay.backup_filesystem is None
        return
    assert lay.backup_filesystem == rescue.BackupFilesystem("/backup", BACKUP_UUID, "ext4", "drill-backup")
    assert {e.what: e.reason for e in lay.excluded}["/backup"].startswith("holds the backup target")
    assert "/dev/vdb" not in {d.id for d in lay.disks}
    text = rescue.layout_to_json(lay)
    assert rescue.layout_from_json(text) == lay
    # a layout saved before the field existed still reads (and has none)
    old = json.loads(text)
    del old["backup_filesystem"], old["digest"]
    assert rescue.layout_from_json(json.dumps(old)).backup_filesystem is None
