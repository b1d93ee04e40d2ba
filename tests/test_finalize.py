"""finalize: what the restored tree holds (TreeProbe on real files of real systems, see
tests/data/finalize/SOURCE.md), the plan for each family, BIOS and UEFI, the rewrites of names
on real fstab/BLS/GRUB texts, efibootmgr output, and the actions run on a copy of a tree."""

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import rescue

DATA = Path(__file__).parent / "data" / "finalize"
DEBIAN_KERNEL = "6.1.0-50-cloud-amd64"
RHEL_KERNEL = "4.18.0-305.el8.x86_64"
CANARY = "canary-Sekr1t-passphrase-7f3a"


def probed(name):
    return rescue.probe_restored(rescue.TreeProbe(DATA / name))


def by_id(steps):
    return {s.id: s for s in steps}


def commands(steps):
    return [rescue.step_command(s) for s in steps]


def context(tmp_path, values=None):
    log = rescue.Log()
    log.open_file(tmp_path / "log" / "rescue.log")
    config = rescue.config_from_values(dict(values or {}), [k for k in (values or {}) if "PASSPHRASE" in k],
                                       environ={"HOSTNAME": "host"})
    for secret in config.secret_values():
        log.add_secret(secret)
    return rescue.Context(argparse.Namespace(), config, log, rescue.Runner(log))


# -- the probe ------------------------------------------------------------------------------------

def test_probe_of_a_debian_tree_finds_kernel_initramfs_tools_and_the_files_that_name_devices():
    system = probed("debian12")
    assert system.family == "debian"
    assert system.kernels == [DEBIAN_KERNEL]                       # /lib -> usr/lib resolved in the tree
    assert system.initrds == {DEBIAN_KERNEL: f"/boot/initrd.img-{DEBIAN_KERNEL}"}
    assert {"virtio_blk", "dm_mod", "raid1", "dm_crypt"} <= set(system.modules[DEBIAN_KERNEL])
    assert {"nvme", "ext4"} <= set(system.builtin[DEBIAN_KERNEL])          # the cloud kernel has them built in
    assert {"update-initramfs", "lsinitramfs", "grub-install", "grub-mkconfig"} <= set(system.tools)
    assert "dracut" not in system.tools
    assert {"/etc/fstab", "/etc/crypttab", "/etc/mdadm/mdadm.conf", "/etc/default/grub"} <= set(system.texts)
    assert system.esp_dir == "" and system.selinux == "" and not system.lvm_devices
    assert system.grub_cfg == "/boot/grub/grub.cfg"


def test_probe_of_rhel8_uefi_sees_the_menu_on_the_esp_and_grubenv_once_through_its_symlink():
    system = probed("rhel-uefi")
    assert system.family == "rhel"
    assert system.esp_dir == "/boot/efi"                          # no vfat line in this fstab: found by EFI/
    assert system.efi_dirs == {"redhat": ["grub.cfg", "grubenv", "grubx64.efi", "mmx64.efi", "shimx64.efi"]}
    assert system.grub_cfg == "/boot/efi/EFI/redhat/grub.cfg"     # a whole menu there, not a stub
    grubenvs = [p for p in system.texts if p.endswith("grubenv")]
    assert grubenvs == ["/boot/efi/EFI/redhat/grubenv"]
    assert f"/boot/loader/entries/rhel-20210429130346-{RHEL_KERNEL}.conf" in system.texts
    assert system.lvm_devices and system.selinux == "enforcing"
    assert system.file_contexts == "/etc/selinux/targeted/contexts/files/file_contexts"
    assert not system.labels_present                              # the fixture files carry no security.selinux


def test_probe_of_rhel_bios_and_sles():
    rhel = probed("rhel-bios")
    assert rhel.grub_cfg == "/boot/grub2/grub.cfg" and rhel.selinux == "" and not rhel.lvm_devices
    assert {"/boot/grub2/grub.cfg", "/boot/grub2/grubenv", "/etc/default/grub"} <= set(rhel.texts)
    sles = probed("sles15-uefi")
    assert sles.family == "suse" and sles.esp_dir == "/boot/efi"
    assert rescue.efi_loaders(sles, "sles") == ("shim.efi", "grub.efi")


def test_tree_probe_resolves_absolute_symlinks_inside_the_tree(tmp_path):
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    (tmp_path / "usr" / "lib" / "os-release").write_text("ID=debian\n")
    (tmp_path / "etc").mkdir()
    os.symlink("/usr/lib/os-release", tmp_path / "etc" / "os-release")    # absolute: the tree's, not ours
    os.symlink("/../../..", tmp_path / "up")
    probe = rescue.TreeProbe(tmp_path)
    assert probe.resolve("/etc/os-release") == "/usr/lib/os-release"
    assert probe.read_text("/etc/os-release") == "ID=debian\n"
    assert probe.resolve("/up/etc") == "/etc"


# -- the plan -------------------------------------------------------------------------------------

def debian_raid1_options(**changes):
    return rescue.FinalizeOptions(boot_mode="bios", boot_disks=["/dev/vda", "/dev/vdb"],
                                  drivers=["virtio_blk", "raid1", "dm-crypt", "nvme"], **changes)


def test_debian_bios_raid1_plan_installs_grub_on_each_member_and_rebuilds_every_initramfs():
    steps = rescue.finalize_plan(probed("debian12"), debian_raid1_options())
    ids = [s.id for s in steps]
    assert not [i for i in ids if i.startswith("finalize names")]          # nothing changed: nothing rewritten
    assert ids[:4] == ["finalize bind /proc", "finalize bind /sys", "finalize bind /dev", "finalize bind /run"]
    assert "finalize bind /sys/firmware/efi/efivars" not in ids
    cmd = commands(steps)
    assert f"chroot /mnt/local update-initramfs -u -k {DEBIAN_KERNEL}" in cmd
    assert "chroot /mnt/local grub-install --target=i386-pc /dev/vda" in cmd
    assert "chroot /mnt/local grub-install --target=i386-pc /dev/vdb" in cmd
    assert "chroot /mnt/local grub-mkconfig -o /boot/grub/grub.cfg" in cmd
    assert ids.index("finalize grub config") > ids.index("finalize grub-install /dev/vdb")
    assert ids[-1] == "finalize unbind"
    check = by_id(steps)[f"finalize check initramfs {DEBIAN_KERNEL}"]
    # the built-in nvme is not looked for in the image
    assert check.params["drivers"] == ["virtio_blk", "raid1", "dm-crypt"]
    assert ids.index(check.id) == ids.index(f"finalize initramfs {DEBIAN_KERNEL}") + 1
    assert len(ids) == len(set(ids))


def test_every_program_a_plan_runs_is_in_tools():
    plans = [rescue.finalize_plan(probed("debian12"), debian_raid1_options()),
             rescue.finalize_plan(probed("rhel-uefi"), rescue.FinalizeOptions(
                 boot_mode="uefi", pvs=["/dev/vda2"], esps=[rescue.EspTarget("/dev/vda", 1, "Red Hat")])),
             rescue.finalize_plan(probed("sles15-uefi"), rescue.FinalizeOptions(boot_mode="uefi"))]
    for step in (s for plan in plans for s in plan if s.argv):
        assert step.argv[0] in rescue.TOOLS, step.argv
        if step.argv[0] == "chroot":
            assert step.argv[2] in rescue.TOOLS, step.argv


def test_debian_uefi_runs_grub_install_for_efi_and_makes_an_entry_and_the_removable_path():
    system = probed("debian12-uefi")
    esp = rescue.EspTarget("/dev/nvme0n1", 1, "debian")
    steps = by_id(rescue.finalize_plan(system, rescue.FinalizeOptions(boot_mode="uefi", esps=[esp])))
    assert "finalize bind /sys/firmware/efi/efivars" in steps
    assert steps["finalize grub-install efi"].argv == [
        "chroot", "/mnt/local", "grub-install", "--target=x86_64-efi", "--efi-directory=/boot/efi",
        "--bootloader-id=debian", "--no-nvram"]
    assert steps["finalize efi loader"].params == {"directory": "/mnt/local/boot/efi/EFI/debian",
                                                    "files": ["grubx64.efi"]}
    assert steps["finalize efi removable path"].params["target"] == "/mnt/local/boot/efi/EFI/BOOT/BOOTX64.EFI"
    assert steps["finalize efi boot entries"].params["efivars"] == "/sys/firmware/efi/efivars"
    assert steps["finalize efi boot entries"].params["entries"] == [
        {"disk": "/dev/nvme0n1", "partition": 1, "label": "debian", "loader": "\\EFI\\debian\\grubx64.efi"}]
    assert not [s for s in steps if "i386-pc" in " ".join(steps[s].argv)]


def test_rhel_uefi_keeps_the_shim_chain_and_rewrites_the_devices_file_and_relabels():
    system = probed("rhel-uefi")
    esps = [rescue.EspTarget("/dev/sda", 1, "Red Hat Enterprise Linux", "\\EFI\\redhat\\shimx64.efi"),
            rescue.EspTarget("/dev/sdb", 1, "Red Hat Enterprise Linux", "\\EFI\\redhat\\shimx64.efi")]
    steps = rescue.finalize_plan(system, rescue.FinalizeOptions(boot_mode="uefi", esps=esps,
                                                                pvs=["/dev/md1"], drivers=["nvme"]))
    found = by_id(steps)
    ids = [s.id for s in steps]
    assert not [s for s in steps if s.argv[2:3] == ["grub2-install"]]      # RHEL: no grub2-install for EFI
    assert found["finalize efi loader"].params["files"] == ["shimx64.efi", "grubx64.efi"]
    assert found["finalize grub config"].argv[2:] == ["grub2-mkconfig", "-o", "/boot/efi/EFI/redhat/grub.cfg"]
    assert len(found["finalize efi boot entries"].params["entries"]) == 2   # one per RAID1 member's ESP
    lvm = found["finalize lvm devices file"]
    assert lvm.params == {"root": "/mnt/local", "pvs": ["/dev/md1"]}
    assert ids.index(lvm.id) < ids.index(f"finalize initramfs {RHEL_KERNEL}")   # before dracut reads it
    assert found[f"finalize initramfs {RHEL_KERNEL}"].argv == [
        "chroot", "/mnt/local", "dracut", "-f", "--kver", RHEL_KERNEL, f"/boot/initramfs-{RHEL_KERNEL}.img"]
    relabel = found["finalize selinux relabel"]
    assert relabel.argv == ["setfiles", "-m", "-r", "/mnt/local", "-e", "/mnt/local/boot/efi",
                            "/mnt/local/etc/selinux/targeted/contexts/files/file_contexts", "/mnt/local"]
    assert ids.index(relabel.id) > ids.index("finalize unbind")           # nothing bound below the root
    assert ids[-1] == "finalize selinux autorelabel"


def test_dracut_gets_the_drivers_its_kernel_has_as_modules_and_the_check_looks_for_them():
    debian = probed("debian12")
    system = dataclasses.replace(probed("rhel-uefi"), modules={RHEL_KERNEL: debian.modules[DEBIAN_KERNEL]},
                                 builtin={RHEL_KERNEL: debian.builtin[DEBIAN_KERNEL]})
    steps = by_id(rescue.finalize_plan(system, rescue.FinalizeOptions(
        boot_mode="uefi", drivers=["nvme", "virtio_blk", "dm-crypt", "not_a_module_here"], selinux_relabel="no")))
    assert steps[f"finalize initramfs {RHEL_KERNEL}"].argv[3:7] == ["-f", "--add-drivers", "virtio_blk dm-crypt", "--kver"]
    check = steps[f"finalize check initramfs {RHEL_KERNEL}"]
    assert check.argv == ["chroot", "/mnt/local", "lsinitrd", f"/boot/initramfs-{RHEL_KERNEL}.img"]
    assert check.params["drivers"] == ["virtio_blk", "dm-crypt"]
    assert "finalize selinux relabel" not in steps


def test_rhel_bios_plan():
    steps = rescue.finalize_plan(probed("rhel-bios"), rescue.FinalizeOptions(boot_disks=["/dev/sda"], pvs=["/dev/sda2"]))
    cmd = commands(steps)
    assert "chroot /mnt/local grub2-install --target=i386-pc /dev/sda" in cmd
    assert "chroot /mnt/local grub2-mkconfig -o /boot/grub2/grub.cfg" in cmd
    assert not [s for s in steps if "lvm" in s.id or "selinux" in s.id]   # no devices file, no SELinux


def test_sles_with_shim_keeps_it_and_builds_initrd_with_its_name():
    kernel = "5.14.21-150500.55.19-default"
    steps = by_id(rescue.finalize_plan(probed("sles15-uefi"), rescue.FinalizeOptions(boot_mode="uefi")))
    assert "finalize grub-install efi" not in steps
    assert steps["finalize efi loader"].params["files"] == ["shim.efi", "grub.efi"]
    assert steps[f"finalize initramfs {kernel}"].argv[-1] == f"/boot/initrd-{kernel}"
    assert "finalize efi boot entries" not in steps                       # no ESP given: no NVRAM entry


def test_settings_turn_steps_off_and_bad_cases_are_errors():
    system = probed("rhel-uefi")
    steps = rescue.finalize_plan(system, rescue.FinalizeOptions(boot_mode="uefi", rebuild_initramfs=False,
                                                                selinux_relabel="no"))
    assert not [s for s in steps if "initramfs" in s.id or "selinux" in s.id]
    labeled = dataclasses.replace(system, labels_present=True)
    assert not [s for s in rescue.finalize_plan(labeled, rescue.FinalizeOptions(boot_mode="uefi")) if "selinux" in s.id]
    assert [s.id for s in rescue.finalize_plan(labeled, rescue.FinalizeOptions(boot_mode="uefi", selinux_relabel="yes"))
            if "selinux" in s.id] == ["finalize selinux relabel", "finalize selinux autorelabel"]
    with pytest.raises(rescue.RescueError, match="no disk to install GRUB on"):
        rescue.finalize_plan(probed("debian12"), rescue.FinalizeOptions(boot_mode="bios"))
    with pytest.raises(rescue.RescueError, match="not one rescue can finalize"):
        rescue.finalize_plan(dataclasses.replace(system, family="unknown"), rescue.FinalizeOptions())


def test_settings_are_typed():
    config = rescue.config_from_values({"GRUB2_INSTALL_DEVICES": "/dev/sda /dev/sdb", "REBUILD_INITRAMFS": "no",
                                        "SELINUX_RELABEL": "YES"}, environ={"HOSTNAME": "h"})
    assert config.setting("GRUB2_INSTALL_DEVICES") == ["/dev/sda", "/dev/sdb"]
    assert config.setting("REBUILD_INITRAMFS") is False and config.setting("SELINUX_RELABEL") == "yes"
    with pytest.raises(rescue.ConfigError, match="SELINUX_RELABEL: expected auto or yes or no"):
        rescue.config_from_values({"SELINUX_RELABEL": "maybe"}, environ={"HOSTNAME": "h"})


# -- rewriting names on real texts -----------------------------------------------------------------

def test_device_names_are_whole_words_and_a_swap_is_one_pass():
    fstab = (DATA / "rhel-bios" / "etc" / "fstab").read_text()
    new = rescue.rewrite_names(fstab, {"/dev/sdb1": "/dev/sdc1", "/dev/sdc1": "/dev/sdb1"})
    assert "/dev/sdc1 /hdfs/data1 " in new and "/dev/sdb1 /hdfs/data2 " in new
    assert rescue.rewrite_names("/dev/sda10 /dev/sda1 /dev/sda", {"/dev/sda1": "/dev/vda1"}) == "/dev/sda10 /dev/vda1 /dev/sda"
    assert rescue.rewrite_names(fstab, {}) == fstab


def test_uuids_are_rewritten_bare_with_prefixes_and_in_either_case():
    cfg = (DATA / "rhel-uefi" / "boot" / "efi" / "EFI" / "redhat" / "grub.cfg").read_text()
    new = rescue.rewrite_names(cfg, {"d80fa96c-ffa1-4894-9282-aeda37f0befe": "0aaa0000-1111-2222-3333-444455556666",
                                     "A40B320E-0711-4CD6-8F9E-CE32810E2A79": "b5b5b5b5-0711-4cd6-8f9e-ce32810e2a79"})
    assert "d80fa96c" not in new and new.count("0aaa0000-1111-2222-3333-444455556666") == cfg.count("d80fa96c-ffa1")
    assert "rd.luks.uuid=luks-b5b5b5b5-0711-4cd6-8f9e-ce32810e2a79" in new
    assert new.count("\n") == cfg.count("\n")


def test_by_id_names_carry_their_partition_suffix():
    text = "/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001-part2 / xfs defaults 0 0\n"
    assert rescue.rewrite_names(text, {"/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001": "/dev/disk/by-id/nvme-QEMU_NVMe_deadbeef"}) \
        == "/dev/disk/by-id/nvme-QEMU_NVMe_deadbeef-part2 / xfs defaults 0 0\n"


def test_grubenv_stays_a_1024_byte_block_with_saved_entry_and_kernelopts():
    env = (DATA / "rhel-uefi" / "boot" / "efi" / "EFI" / "redhat" / "grubenv").read_text()
    assert len(env) == 1024
    new = rescue.rewrite_file_text("/boot/grub2/grubenv", env, {"/dev/mapper/root_vg-lv_swap": "UUID=5e5e5e5e-aaaa-bbbb-cccc-ddddeeeeffff"})
    assert len(new.encode()) == 1024 and new.endswith("#")
    assert "resume=UUID=5e5e5e5e-aaaa-bbbb-cccc-ddddeeeeffff" in new
    assert "saved_entry=295e1ba1696e4fad9e062f096f92d147-4.18.0-305.el8.x86_64\n" in new
    with pytest.raises(rescue.RescueError, match="1024-byte environment block"):
        rescue.rewrite_file_text("/boot/grub2/grubenv", env, {"/dev/mapper/root_vg-lv_root": "/dev/" + "x" * 900})


def test_rename_steps_only_for_files_that_name_what_changed():
    system = probed("rhel-bios")
    changes = {"/dev/mapper/rhel_vm37--146-swap": "UUID=11111111-2222-3333-4444-555555555555"}
    steps = [s for s in rescue.finalize_plan(system, rescue.FinalizeOptions(boot_disks=["/dev/sda"], changes=changes))
             if s.action == "rewrite_names"]
    assert [s.params["path"] for s in steps] == [
        "/mnt/local/boot/loader/entries/rhel-20190428101407-4.18.0-80.1.2.el8_0.x86_64.conf"]


# -- the actions, run on a copy of a tree -------------------------------------------------------------

@pytest.fixture
def rhel_tree(tmp_path):
    root = tmp_path / "mnt-local"
    shutil.copytree(DATA / "rhel-uefi", root, symlinks=True)
    return root


def run_steps(ctx, steps):
    for step in steps:
        rescue.STEP_ACTIONS[step.action](ctx, **step.params)


def test_rewrites_are_atomic_keep_mode_owner_and_symlinks_log_a_diff_and_resume(tmp_path, rhel_tree):
    ctx = context(tmp_path)
    entry = rhel_tree / "boot" / "loader" / "entries" / f"rhel-20210429130346-{RHEL_KERNEL}.conf"
    fstab = rhel_tree / "etc" / "fstab"
    os.chmod(fstab, 0o600)
    os.chown(fstab, 1234, 4321)
    changes = {"/dev/sdb1": "/dev/vdb1", "2c839365-37c7-4bd5-ac47-040fba761735": "99999999-37c7-4bd5-ac47-040fba761735",
               "/dev/mapper/root_vg-lv_swap": "/dev/mapper/root_vg-swap2"}
    system = rescue.probe_restored(rescue.TreeProbe(rhel_tree))
    steps = [s for s in rescue.finalize_plan(system, rescue.FinalizeOptions(target_root=str(rhel_tree), boot_mode="uefi",
                                                                            changes=changes)) if s.action == "rewrite_names"]
    assert sorted(s.params["path"] for s in steps) == [str(rhel_tree / "boot/efi/EFI/redhat/grubenv"), str(fstab)]
    entry_before = entry.read_text()
    run_steps(ctx, steps)
    text = fstab.read_text()
    assert "/dev/vdb1 /hdfs/data1" in text and "UUID=99999999-37c7-4bd5-ac47-040fba761735 /boot" in text
    info = os.stat(fstab)
    assert (oct(info.st_mode & 0o7777), info.st_uid, info.st_gid) == ("0o600", 1234, 4321)
    assert os.path.islink(rhel_tree / "boot" / "grub2" / "grubenv")
    env = (rhel_tree / "boot" / "grub2" / "grubenv").read_text()
    assert "resume=/dev/mapper/root_vg-swap2" in env and len(env) == 1024
    assert entry.read_text() == entry_before                             # names only via $kernelopts
    assert not list(rhel_tree.rglob(".*.partial"))
    log = (tmp_path / "log" / "rescue.log").read_text()
    assert "-/dev/sdb1 /hdfs/data1" in log and "+/dev/vdb1 /hdfs/data1" in log
    run_steps(ctx, steps)                                               # a resumed run: done already
    assert fstab.read_text() == text
    fstab.write_text(text + "# edited\n")
    with pytest.raises(rescue.RescueError, match="changed after finalize was planned"):
        run_steps(ctx, [s for s in steps if s.params["path"] == str(fstab)])


def test_a_swap_survives_a_resume_of_its_step(tmp_path, rhel_tree):
    ctx = context(tmp_path)
    swap = {"/dev/sdb1": "/dev/sdc1", "/dev/sdc1": "/dev/sdb1"}
    system = rescue.probe_restored(rescue.TreeProbe(rhel_tree))
    steps = [s for s in rescue.finalize_plan(system, rescue.FinalizeOptions(target_root=str(rhel_tree), boot_mode="uefi",
                                                                            changes=swap)) if s.action == "rewrite_names"]
    run_steps(ctx, steps)
    run_steps(ctx, steps)
    assert "/dev/sdc1 /hdfs/data1" in (rhel_tree / "etc" / "fstab").read_text()


def test_efi_loader_check_and_removable_path_copy(tmp_path, rhel_tree):
    ctx = context(tmp_path)
    system = rescue.probe_restored(rescue.TreeProbe(rhel_tree))
    steps = by_id(rescue.finalize_plan(system, rescue.FinalizeOptions(target_root=str(rhel_tree), boot_mode="uefi")))
    run_steps(ctx, [steps["finalize efi loader"], steps["finalize efi removable path"]])
    boot = rhel_tree / "boot" / "efi" / "EFI" / "BOOT"
    assert sorted(p.name for p in boot.iterdir()) == ["BOOTX64.EFI", "grubx64.efi"]
    (rhel_tree / "boot" / "efi" / "EFI" / "redhat" / "grubx64.efi").unlink()
    with pytest.raises(rescue.RescueError, match="lacks the boot loader"):
        run_steps(ctx, [steps["finalize efi loader"]])


def test_autorelabel_marker(tmp_path, rhel_tree):
    steps = by_id(rescue.finalize_plan(rescue.probe_restored(rescue.TreeProbe(rhel_tree)),
                                       rescue.FinalizeOptions(target_root=str(rhel_tree), boot_mode="uefi")))
    run_steps(context(tmp_path), [steps["finalize selinux autorelabel"]])
    assert (rhel_tree / ".autorelabel").is_file()


# -- efibootmgr and the initramfs listing -------------------------------------------------------------

EFIBOOTMGR = (DATA / "efibootmgr-v-centos8.txt").read_text()


def test_efibootmgr_output_gives_labels_loaders_and_partition_uuids():
    entries = rescue.parse_efibootmgr(EFIBOOTMGR)
    assert [e["label"] for e in entries] == ["UiApp", "UEFI Misc Device", "EFI Internal Shell", "CentOS Linux"]
    centos = entries[-1]
    assert rescue.efi_loader_of(centos["path"]) == "\\EFI\\centos\\shimx64.efi"
    assert rescue.efi_partition_uuid(centos["path"]) == "714e014a-5636-47b0-a8a7-b5109bfe895c"
    assert rescue.efi_loader_of(entries[0]["path"]) == ""
    assert rescue.stale_efi_entries(EFIBOOTMGR, ["CentOS Linux"]) == ["0004"]


def test_efi_entries_action_removes_the_stale_entry_then_makes_one_per_esp(tmp_path, fake_process):
    fake_process.register(["efibootmgr", "-v"], stdout=EFIBOOTMGR)
    fake_process.register(["efibootmgr", "-q", "-b", "0004", "-B"])
    made = []
    for disk in ("/dev/vdb", "/dev/vda"):
        argv = ["efibootmgr", "-q", "-c", "-d", disk, "-p", "1", "-L", "CentOS Linux", "-l", "\\EFI\\centos\\shimx64.efi"]
        fake_process.register(argv)
        made.append(argv)
    entries = [{"disk": d, "partition": 1, "label": "CentOS Linux", "loader": "\\EFI\\centos\\shimx64.efi"}
               for d in ("/dev/vda", "/dev/vdb")]
    efivars = tmp_path / "efivars"                      # where a rescue system booted by UEFI has them
    efivars.mkdir()
    rescue.STEP_ACTIONS["efi_entries"](context(tmp_path), entries=entries, efivars=str(efivars))
    calls = [list(c) for c in fake_process.calls]
    assert calls == [["efibootmgr", "-v"], ["efibootmgr", "-q", "-b", "0004", "-B"]] + made


def test_a_rescue_system_booted_by_bios_makes_no_nvram_entry_and_says_so(tmp_path, capsys):
    entries = [{"disk": "/dev/vda", "partition": 1, "label": "debian", "loader": "\\EFI\\debian\\grubx64.efi"}]
    rescue.STEP_ACTIONS["efi_entries"](context(tmp_path), entries=entries, efivars=str(tmp_path / "none"))
    assert "not booted by UEFI" in capsys.readouterr().err
    assert "no NVRAM boot entry" in (tmp_path / "log" / "rescue.log").read_text()


def test_the_initramfs_check_reads_a_real_listing(tmp_path, fake_process):
    listing = (DATA / "debian12-lsinitramfs.txt").read_text()
    assert rescue.initramfs_lacks(listing, ["virtio_blk", "dm-mod", "raid1", "dm_crypt"]) == []
    assert rescue.initramfs_lacks(listing, ["virtio_blk", "mpt3sas_not_there"]) == ["mpt3sas_not_there"]
    image = f"/boot/initrd.img-{DEBIAN_KERNEL}"
    fake_process.register(["chroot", "/mnt/local", "lsinitramfs", image], stdout=listing, occurrences=2)
    ctx = context(tmp_path)
    rescue.STEP_ACTIONS["check_initramfs"](ctx, root="/mnt/local", image=image, lister="lsinitramfs",
                                           drivers=["virtio_blk", "raid1"])
    with pytest.raises(rescue.RescueError, match="lacks the storage drivers vmw_pvscsi_nope"):
        rescue.STEP_ACTIONS["check_initramfs"](ctx, root="/mnt/local", image=image, lister="lsinitramfs",
                                               drivers=["vmw_pvscsi_nope"])


# -- options from the layout ------------------------------------------------------------------------

def raid1_layout(firmware):
    boot = rescue.Boot(firmware=firmware, family="rhel", distribution={"id": "centos"},
                       efi_entries=rescue.parse_efibootmgr(EFIBOOTMGR))
    layout = rescue.Layout(hostname="h", boot=boot)
    layout.disks = [rescue.Disk("/dev/sda", 10 << 30), rescue.Disk("/dev/sdb", 10 << 30)]
    layout.partitions = [rescue.Partition(f"/dev/sd{x}{n}", f"/dev/sd{x}", n, 2048 * n, 2048, "fd",
                                          uuid="714e014a-5636-47b0-a8a7-b5109bfe895c" if (x, n) == ("a", 1) else None)
                         for x in "ab" for n in (1, 2)]
    layout.md_arrays = [rescue.MdArray("/dev/md0", "raid1", ["/dev/sda1", "/dev/sdb1"]),
                        rescue.MdArray("/dev/md1", "raid1", ["/dev/sda2", "/dev/sdb2"])]
    layout.physical_volumes = [rescue.PhysicalVolume("/dev/md1", "pv-uuid", "vg0", 1 << 30)]
    mountpoint = "/boot/efi" if firmware == "uefi" else "/boot"
    layout.mounts = [rescue.Mount(mountpoint, "/dev/md0", "vfat" if firmware == "uefi" else "ext4", "defaults")]
    layout.boot.esp = "/dev/md0" if firmware == "uefi" else None
    return layout


def test_options_from_the_layout_bios_raid1_onto_other_disks(tmp_path):
    layout = raid1_layout("bios")
    mapping = rescue.Mapping({"/dev/sda": "/dev/vda", "/dev/sdb": "/dev/vdb"}, {}, [])
    config = rescue.config_from_values({}, environ={"HOSTNAME": "h"})
    options = rescue.finalize_options(layout, mapping, config, drivers=["virtio_blk"])
    assert options.boot_disks == ["/dev/vda", "/dev/vdb"]                 # each member of the RAID1 /boot
    assert options.changes["/dev/sda1"] == "/dev/vda1" and options.changes["/dev/sdb"] == "/dev/vdb"
    assert options.pvs == ["/dev/md1"] and options.rebuild_initramfs and options.selinux_relabel == "auto"
    configured = rescue.config_from_values({"GRUB2_INSTALL_DEVICES": "/dev/sda /dev/sdz"}, environ={"HOSTNAME": "h"})
    assert rescue.finalize_options(layout, mapping, configured).boot_disks == ["/dev/vda", "/dev/sdz"]
    same = rescue.finalize_options(layout, rescue.Mapping({"/dev/sda": "/dev/sda", "/dev/sdb": "/dev/sdb"}, {}, []), config)
    assert same.changes == {}


def test_options_from_the_layout_uefi_raid1_esp_members_with_the_original_entry():
    layout = raid1_layout("uefi")
    mapping = rescue.Mapping({"/dev/sda": "/dev/nvme0n1", "/dev/sdb": "/dev/nvme1n1"}, {}, [])
    options = rescue.finalize_options(layout, mapping, rescue.config_from_values({}, environ={"HOSTNAME": "h"}))
    assert options.esps == [rescue.EspTarget("/dev/nvme0n1", 1, "CentOS Linux", "\\EFI\\centos\\shimx64.efi"),
                            rescue.EspTarget("/dev/nvme1n1", 1, "CentOS Linux", "\\EFI\\centos\\shimx64.efi")]
    assert options.changes["/dev/sda1"] == "/dev/nvme0n1p1"



def test_an_esp_without_its_own_entry_takes_the_systems_entry_never_another_systems():
    layout = raid1_layout("uefi")
    layout.partitions[0].uuid = None
    windows = {"num": "0001", "active": "yes", "label": "Windows Boot Manager",
               "path": "HD(1,GPT,d9a4b84f-d02a-419b-94ec-f714451af42f,0x800,0x32000)/\\EFI\\MICROSOFT\\BOOT\\BOOTMGFW.EFI"}
    layout.boot.efi_entries.insert(0, windows)
    mapping = rescue.Mapping({"/dev/sda": "/dev/vda", "/dev/sdb": "/dev/vdb"}, {}, [])
    config = rescue.config_from_values({}, environ={"HOSTNAME": "h"})
    assert [e.label for e in rescue.finalize_options(layout, mapping, config).esps] == ["CentOS Linux"] * 2
    layout.boot.distribution = {"id": "debian"}
    layout.boot.family = "debian"
    assert rescue.finalize_options(layout, mapping, config).esps == [
        rescue.EspTarget("/dev/vda", 1, "debian", ""), rescue.EspTarget("/dev/vdb", 1, "debian", "")]


# -- no secret in a plan or a log -----------------------------------------------------------------------

def test_no_secret_in_the_plan_or_the_log(tmp_path, rhel_tree):
    ctx = context(tmp_path, {"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE": CANARY, "SELINUX_RELABEL": "yes"})
    layout = raid1_layout("uefi")
    mapping = rescue.Mapping({"/dev/sda": "/dev/vda", "/dev/sdb": "/dev/vdb"}, {}, [])
    options = dataclasses.replace(rescue.finalize_options(layout, mapping, ctx.config), target_root=str(rhel_tree),
                                  changes={"/dev/sdb1": "/dev/vdb1"})
    steps = rescue.finalize_plan(rescue.probe_restored(rescue.TreeProbe(rhel_tree)), options)
    assert CANARY not in json.dumps([dataclasses.asdict(s) for s in steps])
    run_steps(ctx, [s for s in steps if s.action == "rewrite_names"])
    assert "/dev/vdb1" in (tmp_path / "log" / "rescue.log").read_text()
    assert CANARY not in (tmp_path / "log" / "rescue.log").read_text()


# -- the disks here: by-id names, drivers, bind mounts ---------------------------------------------

def test_by_id_names_of_the_replaced_disks():
    layout = raid1_layout("bios")
    layout.disks[0].by_id = ["ata-QEMU_HARDDISK_QM00001", "wwn-0x5000c500a1b2c3d4"]
    here = [rescue.DiskHere("/dev/vda", 10 << 30, by_id=["ata-QEMU_HARDDISK_QM00005", "virtio-abc"])]
    mapping = rescue.Mapping({"/dev/sda": "/dev/vda"}, {}, [])
    options = rescue.finalize_options(layout, mapping, rescue.config_from_values({}, environ={"HOSTNAME": "h"}), here=here)
    assert options.changes["/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001"] == "/dev/disk/by-id/ata-QEMU_HARDDISK_QM00005"
    assert not [k for k in options.changes if "wwn-" in k]                # no wwn- name here to take its place


@pytest.mark.skipif(not os.path.exists("/sys/block/vda/device/driver"), reason="this machine has no /dev/vda")
def test_storage_drivers_of_a_disk_here_from_sysfs():
    drivers = rescue.storage_drivers(["/dev/vda"])
    assert drivers[0] == os.path.basename(os.path.realpath("/sys/block/vda/device/driver")).replace("-", "_")
    assert len(drivers) == len(set(drivers))


def mounts_at(path):
    with open("/proc/self/mounts") as mounts:
        return sum(1 for line in mounts if line.split()[1] == str(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_bind_mounts_are_made_once_and_undone(tmp_path):
    ctx = context(tmp_path)
    root = tmp_path / "root"
    bind = rescue.bind_steps(str(root), uefi=False)[0]
    unbind = rescue.Step("finalize unbind", "", action="unbind", params={"paths": [str(root / "proc")]})
    try:
        run_steps(ctx, [bind, bind])                                   # a resumed run binds nothing twice
        assert mounts_at(root / "proc") == 1
        assert (root / "proc" / "self").exists()
        run_steps(ctx, [unbind, unbind])
        assert mounts_at(root / "proc") == 0
    finally:
        while mounts_at(root / "proc"):
            subprocess.run(["umount", "-l", str(root / "proc")], check=True)


# -- for real, in a chroot (opt-in: about a minute of CPU) ---------------------------------------------

GUEST_ROOTFS = sorted(Path("/var/cache/rescue-vm-tests").glob("image-*/rootfs/usr/sbin/update-initramfs"))


@pytest.mark.skipif(os.environ.get("RESCUE_FINALIZE_CHROOT") != "1" or not GUEST_ROOTFS or os.geteuid() != 0,
                    reason="set RESCUE_FINALIZE_CHROOT=1 (as root, with the VM guest image built) to run it")
def test_initramfs_rebuild_and_check_in_a_chroot_of_the_guest_image(tmp_path):
    """The plan's own steps on an overlay of the VM guest image's Debian 12 rootfs: bind
    mounts, update-initramfs through chroot, the lsinitramfs check, the unbind."""
    lower = GUEST_ROOTFS[0].parents[2]
    merged, upper, work = tmp_path / "merged", tmp_path / "upper", tmp_path / "work"
    for d in (merged, upper, work):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(merged)], check=True)
    ctx = context(tmp_path)
    try:
        system = rescue.probe_restored(rescue.TreeProbe(merged))
        options = rescue.FinalizeOptions(target_root=str(merged), boot_disks=["/dev/null"],
                                         drivers=["virtio_blk", "raid1", "dm-crypt"])
        steps = [s for s in rescue.finalize_plan(system, options) if "grub" not in s.id]
        for step in steps:
            rescue.run_step(ctx, step, {})
        kernel = system.kernels[0]
        assert (upper / "boot" / f"initrd.img-{kernel}").stat().st_size > 1 << 20     # written anew
        assert mounts_at(merged / "proc") == 0
    finally:
        for path in ("run", "dev", "sys", "proc"):
            while mounts_at(merged / path):
                subprocess.run(["umount", "-l", str(merged / path)], check=True)
        subprocess.run(["umount", str(merged)], check=True)


def test_efibootmgr_output_whose_tabs_became_spaces():
    pasted = EFIBOOTMGR.replace("\t", "        ")
    assert [(e["label"], e["path"]) for e in rescue.parse_efibootmgr(pasted)] == \
        [(e["label"], e["path"]) for e in rescue.parse_efibootmgr(EFIBOOTMGR)]
    assert rescue.efi_loader_of("HD(3,GPT,d8f40d21-76b4-4388-aeac-d55b5e6c924d,0x35552000,0x12c000)"
                                "/\\EFI\\FEDORA\\SHIMX64.EFI0000424f") == "\\EFI\\FEDORA\\SHIMX64.EFI"


def test_the_devices_file_is_made_anew_with_only_the_recreated_pvs(tmp_path, rhel_tree, fake_process):
    """lvmdevices cannot run here (no device-mapper): the fake writes what lvmdevices wrote on a
    real system (insights-core's SYSTEM_DEVICES1, a devices file made by lvmdevices)."""
    devices = rhel_tree / "etc" / "lvm" / "devices" / "system.devices"
    written = ("# LVM uses devices listed in this file.\n"
               "# Created by LVM command lvmdevices pid 2631 at Fri May 27 07:37:11 2022\n"
               "VERSION=1.1.2\n"
               "IDTYPE=devname IDNAME=/dev/vda2 DEVNAME=/dev/vda2 PVID=phl0clFbAokp9UXqbIgI5YYQxuTIJVkD PART=2\n")
    seen = []

    def lvmdevices(process):
        seen.append(devices.exists())                # the old file is gone before the first PV is added
        devices.write_text(written)

    fake_process.register(["chroot", str(rhel_tree), "lvmdevices", "--adddev", "/dev/vda2"], callback=lvmdevices)
    system = rescue.probe_restored(rescue.TreeProbe(rhel_tree))
    step = by_id(rescue.finalize_plan(system, rescue.FinalizeOptions(target_root=str(rhel_tree), boot_mode="uefi",
                                                                    pvs=["/dev/vda2"])))["finalize lvm devices file"]
    ctx = context(tmp_path)
    run_steps(ctx, [step])
    assert seen == [False] and devices.read_text() == written
    log = (tmp_path / "log" / "rescue.log").read_text()
    assert "-IDTYPE=sys_serial IDNAME=/dev/vda1" in log                 # the old disk's entry, in the diff


# -- the network: NICs of the layout -> NICs here, and the restored files rewritten ----------------
# tests/data/network: files the real tools wrote (cloud-init's renderers, nmcli, netplan), see SOURCE.md.

NET = Path(__file__).parent / "data" / "network"
OLD1, OLD2, WIFI = "52:54:00:12:34:56", "52:54:00:ab:cd:ef", "52:54:00:c0:ff:ee"
NEW1, NEW2 = "52:54:00:aa:00:01", "52:54:00:aa:00:02"
PSK = "psk-CANARY-9d2e"


def nic(name, mac):
    return rescue.Interface(name, mac, [])


def net_tree(tmp_path, name):
    root = tmp_path / ("net-" + name)
    shutil.copytree(NET / name, root, symlinks=True)
    return root


def test_the_probe_finds_every_kind_of_network_file_and_only_network_udev_rules(tmp_path):
    root = net_tree(tmp_path, "rhel9")
    (root / "etc/udev/rules.d/60-disk.rules").write_text('SUBSYSTEM=="block", ATTR{queue/scheduler}="none"\n')
    (root / "etc/sysconfig/network-scripts/readme").write_text("not a NIC's file\n")
    assert sorted(rescue.network_texts(rescue.TreeProbe(root))) == [
        "/etc/NetworkManager/system-connections/Wired connection 1.nmconnection",
        "/etc/NetworkManager/system-connections/office.nmconnection",
        "/etc/sysconfig/network-scripts/ifcfg-enp1s0", "/etc/sysconfig/network-scripts/ifcfg-enp2s0",
        "/etc/udev/rules.d/70-persistent-net.rules"]
    assert sorted(rescue.network_texts(rescue.TreeProbe(NET / "sles15"))) == [
        "/etc/sysconfig/network/ifcfg-enp1s0", "/etc/sysconfig/network/ifcfg-enp2s0",
        "/etc/udev/rules.d/85-persistent-net-cloud-init.rules"]
    assert sorted(rescue.network_texts(rescue.TreeProbe(NET / "ubuntu"))) == [
        "/etc/netplan/50-cloud-init.yaml", "/etc/systemd/network/10-netplan-enp1s0.link"]
    assert sorted(rescue.network_texts(rescue.TreeProbe(NET / "debian"))) == [
        "/etc/network/interfaces.d/50-cloud-init", "/etc/systemd/network/10-cloud-init-enp1s0.network"]


def test_nics_whose_macs_are_here_are_themselves_and_nothing_changes():
    old = [nic("enp1s0", OLD1), nic("enp2s0", OLD2)]
    pairs, notes = rescue.pair_nics(old, [nic("eth1", OLD2.upper()), nic("eth0", OLD1)], {})
    assert (pairs, notes) == ([], [])
    assert rescue.nic_changes(pairs) == {}
    system = rescue.probe_restored(rescue.TreeProbe(NET / "rhel9"))
    assert system.network_texts and not rescue.rename_steps(system.network_texts, {}, "/mnt/local", "network")


def test_a_replaced_nic_is_paired_by_name_then_as_the_only_one_left():
    old = [nic("enp1s0", OLD1), nic("enp2s0", OLD2)]
    pairs, notes = rescue.pair_nics(old, [nic("enp1s0", NEW1), nic("enp2s0", OLD2)], {})
    assert [(p.old_name, p.new_name, p.new_mac, p.how) for p in pairs] == [("enp1s0", "enp1s0", NEW1, "the same name")]
    assert rescue.nic_changes(pairs) == {OLD1: NEW1} and notes == []
    # another slot: another name of the same scheme, the only NIC missing and the only one new
    pairs, notes = rescue.pair_nics(old, [nic("enp7s0", NEW1), nic("enp2s0", OLD2)], {})
    assert rescue.nic_changes(pairs) == {OLD1: NEW1, "enp1s0": "enp7s0"} and notes == []


def test_names_of_another_scheme_in_the_rescue_system_are_not_taken_for_the_restored_system():
    pairs, _ = rescue.pair_nics([nic("enp1s0", OLD1)], [nic("eth0", NEW1)], {})
    assert rescue.nic_changes(pairs) == {OLD1: NEW1}
    pairs, _ = rescue.pair_nics([nic("eth0", OLD1)], [nic("ens3", NEW1)], {})
    assert rescue.nic_changes(pairs) == {OLD1: NEW1}
    pairs, _ = rescue.pair_nics([nic("eth1", OLD1)], [nic("eth0", NEW1)], {})
    assert rescue.nic_changes(pairs) == {OLD1: NEW1, "eth1": "eth0"}


def test_two_nics_replaced_by_two_of_other_names_are_not_guessed_but_the_mapping_file_decides():
    old = [nic("enp1s0", OLD1), nic("enp2s0", OLD2)]
    here = [nic("enp8s0", NEW1), nic("enp9s0", NEW2)]
    pairs, notes = rescue.pair_nics(old, here, {})
    assert pairs == [] and len(notes) == 2
    assert "enp1s0 (52:54:00:12:34:56) is not here" in notes[0] and "enp8s0 52:54:00:aa:00:01" in notes[0]
    assert "mappings/mac" in notes[0]
    mapping = rescue.parse_mac_mapping(f"# old new interface\n{OLD1.upper()} {NEW2} enp1s0\n{OLD2} {NEW1}\n", "mac")
    pairs, notes = rescue.pair_nics(old, here, mapping)
    assert notes == [] and rescue.nic_changes(pairs) == {OLD1: NEW2, "enp1s0": "enp9s0", OLD2: NEW1, "enp2s0": "enp8s0"}
    # a mapping to a MAC no NIC here has: the MAC is rewritten as told, the name kept
    pairs, _ = rescue.pair_nics(old[:1], here, {OLD1: "52:54:00:ff:ff:ff"})
    assert rescue.nic_changes(pairs) == {OLD1: "52:54:00:ff:ff:ff"} and pairs[0].new_name == ""


def test_a_bad_mac_mapping_line_is_one_clear_error():
    for line in ("00:11:85:c2:b8:d5", "00:11:85:c2:b8 00:50:56:b3:75:ad eth0", "a b c d"):
        with pytest.raises(rescue.RescueError, match=r"mac:1: expected 'OLD-MAC NEW-MAC \[INTERFACE\]'"):
            rescue.parse_mac_mapping(line + "\n", "mac")


def test_a_swap_of_two_nics_is_one_pass_over_real_files():
    text = (NET / "rhel9/etc/udev/rules.d/70-persistent-net.rules").read_text()
    swapped = rescue.rewrite_names(text, {OLD1: OLD2, OLD2: OLD1})
    assert f'ATTR{{address}}=="{OLD2}", NAME="enp1s0"' in swapped
    assert f'ATTR{{address}}=="{OLD1}", NAME="enp2s0"' in swapped


def migrate(tmp_path, name, changes):
    root = net_tree(tmp_path, name)
    ctx = context(tmp_path)
    ctx.log.add_secret(PSK)
    system = rescue.probe_restored(rescue.TreeProbe(root))
    steps = [s for s in rescue.finalize_plan(system, rescue.FinalizeOptions(target_root=str(root), boot_disks=["/dev/sda"],
                                                                            nic_changes=changes))
             if s.id.startswith("finalize network ")] if system.family != "unknown" else \
        rescue.rename_steps(system.network_texts, changes, str(root), "network")
    run_steps(ctx, steps)
    return root, steps, (tmp_path / "log" / "rescue.log").read_text()


def test_rhel_ifcfg_keyfiles_and_persistent_net_rules_move_to_the_new_nic(tmp_path):
    changes = {OLD1: NEW1, "enp1s0": "enp7s0", WIFI: NEW2}
    root, steps, log = migrate(tmp_path, "rhel9", changes)
    assert sorted(s.id for s in steps) == [
        "finalize network /etc/NetworkManager/system-connections/Wired connection 1.nmconnection",
        "finalize network /etc/NetworkManager/system-connections/office.nmconnection",
        "finalize network /etc/sysconfig/network-scripts/ifcfg-enp1s0",
        "finalize network /etc/udev/rules.d/70-persistent-net.rules"]
    ifcfg = (root / "etc/sysconfig/network-scripts/ifcfg-enp1s0").read_text()
    assert f"HWADDR={NEW1}\n" in ifcfg and "DEVICE=enp7s0\n" in ifcfg
    assert (root / "etc/sysconfig/network-scripts/ifcfg-enp2s0").read_text() == \
        (NET / "rhel9/etc/sysconfig/network-scripts/ifcfg-enp2s0").read_text()
    rules = (root / "etc/udev/rules.d/70-persistent-net.rules").read_text()
    assert f'ATTR{{address}}=="{NEW1}", NAME="enp7s0"' in rules and f'=="{OLD2}", NAME="enp2s0"' in rules
    wired = (root / "etc/NetworkManager/system-connections/Wired connection 1.nmconnection").read_text()
    assert f"mac-address={NEW1}\n" in wired and "interface-name=enp7s0\n" in wired
    office = root / "etc/NetworkManager/system-connections/office.nmconnection"
    assert f"mac-address={NEW2.upper()}\n" in office.read_text()          # NetworkManager's upper case kept
    assert f"psk={PSK}\n" in office.read_text()
    assert "-HWADDR=52:54:00:12:34:56" in log and f"+HWADDR={NEW1}" in log and "+DEVICE=enp7s0" in log
    assert PSK not in log and "psk=" not in log                          # changed lines only, no secret


def test_the_diff_of_a_secret_line_hides_its_value():
    diff = rescue.file_diff("/x", "psk=old-secret\nid=a\n", "psk=new-secret\nid=b\n", secrets=True)
    assert "old-secret" not in diff and "new-secret" not in diff and "-psk=(hidden)" in diff and "+id=b" in diff


def test_sles_ubuntu_and_debian_files_move_to_the_new_nic(tmp_path):
    changes = {OLD1: NEW1, "enp1s0": "enp7s0"}
    root, _, _ = migrate(tmp_path, "sles15", changes)
    assert f"LLADDR={NEW1}\n" in (root / "etc/sysconfig/network/ifcfg-enp1s0").read_text()
    assert f'=="{NEW1}", NAME="enp7s0"' in (root / "etc/udev/rules.d/85-persistent-net-cloud-init.rules").read_text()
    root, _, _ = migrate(tmp_path, "ubuntu", changes)
    netplan = (root / "etc/netplan/50-cloud-init.yaml").read_text()
    assert f"macaddress: '{NEW1}'" in netplan and "        enp7s0:\n" in netplan and "set-name: enp7s0" in netplan
    assert f"macaddress: {OLD2}" in netplan                              # the other NIC as it was
    link = (root / "etc/systemd/network/10-netplan-enp1s0.link").read_text()
    assert f"PermanentMACAddress={NEW1}\n" in link and "Name=enp7s0\n" in link
    root, _, _ = migrate(tmp_path, "debian", changes)
    eni = (root / "etc/network/interfaces.d/50-cloud-init").read_text()
    assert "auto enp7s0\niface enp7s0 inet static" in eni and "auto enp2s0\n" in eni
    networkd = (root / "etc/systemd/network/10-cloud-init-enp1s0.network").read_text()
    assert f"MACAddress={NEW1}\nName=enp7s0\n" in networkd


def test_finalize_pairs_the_nics_here_and_says_so(tmp_path, monkeypatch, capsys):
    ctx = context(tmp_path)
    ctx.args.config_dir = str(tmp_path / "conf")
    layout = rescue.Layout(hostname="h", boot=rescue.Boot(firmware="bios"))
    layout.network = rescue.Network([nic("ens3", OLD1)])
    monkeypatch.setattr(rescue, "probe_network", lambda probe: rescue.Network([nic("ens3", NEW1)]))
    assert rescue.nics_here(ctx, layout) == {OLD1: NEW1}
    assert f"NIC ens3 {OLD1} -> ens3 {NEW1} (the same name)" in capsys.readouterr().out
    monkeypatch.setattr(rescue, "probe_network", lambda probe: rescue.Network([nic("ens3", OLD1)]))
    assert rescue.nics_here(ctx, layout) == {}
    (tmp_path / "conf" / "mappings").mkdir(parents=True)
    (tmp_path / "conf" / "mappings" / "mac").write_text("nonsense\n")
    with pytest.raises(rescue.RescueError, match="mappings/mac:1"):
        rescue.mac_mapping(ctx)
