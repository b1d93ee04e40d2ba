"""rescue recover's own parts on this host (the whole recover, recreate to boot, is drilled in
QEMU: vm-tests/test_recover_vm.py): the backup is checked before any disk is touched, a typed
passphrase that does not open it is asked again, an interrupted restore is started again on
emptied filesystems, and the unmount undoes the mount in reverse order."""

import json
import os
import subprocess
from pathlib import Path

import pytest

import rescue
from conftest import run_rescue
from test_backup import Site, assert_clean_error

RECORDINGS = Path(__file__).parent / "data" / "layouts"


@pytest.fixture
def site(tmp_path, conf_dir, gnupg_keys):
    return Site(tmp_path, conf_dir, gnupg_keys)


def replayed_layout(tmp_path, name):
    """layout.json of a recording made in a real guest (tests/data/layouts)."""
    out = tmp_path / f"layout-{name}"
    conf = tmp_path / f"conf-{name}"
    conf.mkdir()
    proc = run_rescue("-c", conf, "savelayout", "--replay", RECORDINGS / name, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out / "layout.json"


def test_a_wrong_passphrase_stops_recover_before_any_disk_is_touched(site):
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one").returncode == 0
    layout = replayed_layout(site.tmp, "bios-lvm")
    proc = site.run("--non-interactive", "recover", "--yes", "--layout", layout,
                    BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="a-wrong-one")
    assert_clean_error(proc, "opening the backup (before any disk is touched) failed", "wrong passphrase")
    assert not (site.var / rescue.RECREATE_STATE).exists() and not (site.var / rescue.RECOVER_STATE).exists()
    assert "a-wrong-one" not in (site.tmp / "log/rescue.log").read_text()


def test_a_typed_passphrase_that_does_not_open_the_backup_is_asked_again(site):
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one").returncode == 0
    layout = replayed_layout(site.tmp, "bios-lvm")
    # The right one on the second try; the mapping then names a disk that is not here, so
    # recover stops before its confirmation (nothing on this host is ever offered to it).
    proc = site.run("recover", "--layout", layout, "--map", "/dev/vda=/dev/no-such-disk",
                    input="not-it\nthe-right-one\nno\n", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="",
                    BACKUP_DUPLICITY_ASK_PASSPHRASE="true")
    assert proc.returncode != 0
    assert proc.stderr.count("Enter the duplicity passphrase for the restore") == 2, proc.stderr
    assert "That passphrase does not open the backup; try again" in proc.stdout + proc.stderr
    assert "The backup is there and the passphrase opens it" in proc.stdout + proc.stderr
    assert "/dev/no-such-disk" in proc.stderr and "Traceback" not in proc.stderr
    assert not (site.var / rescue.RECREATE_STATE).exists()
    log = (site.tmp / "log/rescue.log").read_text()
    assert "not-it" not in log and "the-right-one" not in log


def test_three_wrong_typed_passphrases_are_a_clear_stop(site):
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one").returncode == 0
    layout = replayed_layout(site.tmp, "bios-lvm")
    proc = site.run("recover", "--layout", layout, input="wrong-one\nwrong-two\nwrong-three\nwrong-four\n", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="",
                    BACKUP_DUPLICITY_ASK_PASSPHRASE="true")
    assert_clean_error(proc, "opening the backup (before any disk is touched) failed", "wrong passphrase")
    assert proc.stderr.count("Enter the duplicity passphrase for the restore") == rescue.PASSPHRASE_TRIES


def test_recover_of_an_unreachable_backup_fails_before_planning(site):
    layout = replayed_layout(site.tmp, "bios-lvm")
    proc = site.run("--non-interactive", "recover", "--yes", "--layout", layout,
                    BACKUP_DUPLICITY_URL=f"file://{site.tmp}/nowhere", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="x")
    assert_clean_error(proc, "there is no backup at")
    assert not (site.var / rescue.RECREATE_STATE).exists()


def test_an_interrupted_restore_is_emptied_but_mountpoints_and_lost_found_stay(tmp_path):
    root = tmp_path / "mnt-local"
    for d in ("lost+found", "boot/lost+found", "boot/grub", "etc/ssh", "var/lib/x/lost+found", "var/log"):
        (root / d).mkdir(parents=True)
    for f in ("etc/hostname", "boot/vmlinuz", "var/log/syslog", "var/lib/x/data", ".hidden"):
        (root / f).write_text("partly restored\n")
    os.symlink("etc/hostname", str(root / "link"))
    mounts = [str(root / "boot"), str(root / "var/lib/x")]
    removed = rescue.empty_restored_tree(root, mounts)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == ["boot", "boot/lost+found", "lost+found", "var", "var/lib", "var/lib/x", "var/lib/x/lost+found"]
    assert removed == 7


def test_an_interrupted_restore_keeps_the_parts_it_restored_completely_and_only_those(tmp_path):
    root = tmp_path / "mnt-local"
    home = root / "home"
    done = rescue.part_staging(str(home), "/home/big")
    half = rescue.part_staging(str(home), "/home/other")
    for d in (done / "big", half / "other", root / (rescue.MAIN_STAGING + "x1") / "etc"):
        d.mkdir(parents=True)
    Path(str(done) + rescue.PART_DONE).write_text("{}\n")
    removed = rescue.empty_restored_tree(root, [str(home)])
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == sorted(["home", "home/" + done.name, "home/" + done.name + "/big",
                           "home/" + done.name + rescue.PART_DONE])
    assert removed == 2


def test_the_recover_journal_round_trips_and_a_broken_one_is_a_clear_error(tmp_path):
    state = rescue.RecoverState("digest", "2026-12-01T10:00:00", "started", ["a", "b"], reported=True, timings={"restore": 12.5})
    path = tmp_path / "recover.json"
    path.write_text(state.to_json())
    assert rescue.read_recover_state(path) == state
    path.write_text("{ broken")
    with pytest.raises(rescue.RescueError, match="cannot read the journal of an earlier recover"):
        rescue.read_recover_state(path)
    assert rescue.read_recover_state(tmp_path / "none.json") is None


def test_unmount_undoes_the_mounts_then_lvm_luks_and_raid_in_that_order(tmp_path):
    layout = rescue.layout_from_json(replayed_layout(tmp_path, "raid1-luks").read_text(), "raid1-luks")
    steps = rescue.unmount_plan(layout, "/mnt/local")
    assert steps[0].argv == ["umount", "-R", "/mnt/local"]
    kinds = [s.argv[0] if s.argv[0] != "lvm" else "lvm" for s in steps[1:]]
    assert kinds == sorted(kinds, key=["lvm", "cryptsetup", "mdadm"].index) and set(kinds) == {"lvm", "cryptsetup", "mdadm"}
    assert all(s.optional for s in steps)


def test_restoreonly_without_target_needs_the_recreated_tree_mounted(site, tmp_path):
    proc = site.run("restoreonly", TARGET_FS_ROOT=str(tmp_path / "not-mounted"))
    assert_clean_error(proc, f"nothing is mounted at {tmp_path / 'not-mounted'}", "rescue layoutonly")


def test_the_passphrase_from_a_file_opens_the_backup_and_stays_out_of_the_log(site):
    canary = "CANARY-from-a-file-7f3a"
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=canary).returncode == 0
    secret = site.tmp / "passphrase"
    secret.write_text(canary + "\n")
    proc = site.run("--non-interactive", "restoreonly", "--target", site.tmp / "r", "--passphrase-file", secret,
                    BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="")
    assert proc.returncode == 0, proc.stderr
    assert canary not in (site.tmp / "log/rescue.log").read_text() + proc.stdout + proc.stderr
    proc = site.run("--non-interactive", "restoreonly", "--target", site.tmp / "r2", "--passphrase-file",
                    site.tmp / "missing")
    assert_clean_error(proc, "cannot read the passphrase file")


def test_a_layout_fetched_from_the_backup_is_its_check_the_backup_is_not_opened_twice(site):
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one").returncode == 0
    # No layout in the rescue system: recover fetches it (which proves the passphrase), then
    # stops at the disks of this host (in use) or at the confirmation, answered no.
    proc = site.run("recover", input="no\n", LAYOUT_DIR=str(site.tmp / "no-layout-here"),
                    BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="the-right-one")
    out = proc.stdout + proc.stderr
    assert "No layout here: fetching the one stored beside the backup" in out, out
    assert "The backup is there and the passphrase opens it (the layout came from it)" in out
    log = (site.tmp / "log/rescue.log").read_text()
    assert log.count("--name") and log.count(" restore ") == 1, "the layout chain was restored more than once"
    assert proc.returncode != 0 and "Traceback" not in out
    assert not (site.var / rescue.RECREATE_STATE).exists()


def with_backup_filesystem(layout_file, mountpoint, uuid):
    data = json.loads(layout_file.read_text())
    data.pop("digest")
    data["backup_filesystem"] = {"mountpoint": str(mountpoint), "uuid": uuid, "fstype": "ext4", "label": "rbk"}
    layout_file.write_text(json.dumps(data))
    return layout_file


@pytest.fixture
def backup_disk(tmp_path):
    """A real ext4 filesystem on a loop device (the disk a file:// backup is on), unmounted."""
    image, mountpoint = tmp_path / "backup.img", tmp_path / "backup-disk"
    uuid = "5b0c7e62-8f8e-4a51-b3f4-1c2d3e4f5a6b"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-U", uuid, "-L", "rbk", str(image)], check=True)
    loop = subprocess.run(["losetup", "--show", "-f", str(image)], capture_output=True, text=True,
                          check=True).stdout.strip()
    mountpoint.mkdir()
    try:
        yield loop, mountpoint, uuid
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_recover_mounts_the_disk_of_a_file_backup_read_only_by_the_uuid_the_layout_recorded(site, backup_disk):
    """In a rescue system nothing mounts the USB or second disk a file:// backup is on: recover
    finds its filesystem by UUID and mounts it where it was, read-only, before it checks the
    backup (and so before any disk is touched); that disk is then in use for the mapping."""
    loop, mountpoint, uuid = backup_disk
    subprocess.run(["mount", loop, str(mountpoint)], check=True)
    url = f"file://{mountpoint}/backups"
    assert site.run("mkbackuponly", BACKUP_DUPLICITY_URL=url, BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="pw").returncode == 0
    subprocess.run(["umount", str(mountpoint)], check=True)
    layout = with_backup_filesystem(replayed_layout(site.tmp, "bios-lvm"), mountpoint, uuid)
    proc = site.run("--non-interactive", "recover", "--yes", "--layout", layout, "--map", f"/dev/vda={loop}")
    out = proc.stdout + proc.stderr
    assert f"Mounted the backup's filesystem {loop} (label rbk) read-only at {mountpoint}" in out, out
    assert "The backup is there and the passphrase opens it" in out
    assert_clean_error(proc, f"{loop} cannot take the place of /dev/vda", "it holds the backup")
    options = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", str(mountpoint)], capture_output=True,
                             text=True).stdout
    assert options.split(",")[0] == "ro", options
    # mounted already (by the user, or the run before): left as it is
    proc = site.run("--non-interactive", "recover", "--yes", "--layout", layout, "--map", "/dev/vda=/dev/no-such")
    assert "Mounted the backup's filesystem" not in proc.stdout + proc.stderr
    assert "The backup is there and the passphrase opens it" in proc.stdout + proc.stderr


def test_recover_says_which_disk_to_attach_when_the_backup_filesystem_is_not_here(site, backup_disk):
    _, mountpoint, _ = backup_disk
    layout = with_backup_filesystem(replayed_layout(site.tmp, "bios-lvm"), mountpoint,
                                    "00000000-1111-2222-3333-444444444444")
    proc = site.run("--non-interactive", "recover", "--yes", "--layout", layout,
                    BACKUP_DUPLICITY_URL=f"file://{mountpoint}/backups", BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="pw")
    assert_clean_error(proc, "the backup is on the ext4 filesystem UUID=00000000-1111-2222-3333-444444444444 "
                       f"(label rbk), which was mounted at {mountpoint}", "attach the disk that holds the backup")
    assert not (site.var / rescue.RECREATE_STATE).exists() and not (site.var / rescue.RECOVER_STATE).exists()
