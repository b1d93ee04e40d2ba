"""Unit tests of the harness's pure parts (no QEMU, no root): they run in every pytest run."""

import re
from pathlib import Path

import pytest

from vmlib import cache, cpio, install, procs
from vmlib.image import apt_mirror, module_load_order
from vmlib.machine import Disk, Machine, disk_args
from vmlib.spec import SpecError, available_specs, load_spec, parse_spec

BIOS_LVM = load_spec("bios-lvm")


def test_shipped_specs_load():
    assert {"bios-lvm", "uefi-gpt", "raid1-luks"} <= set(available_specs())
    for name in available_specs():
        assert load_spec(name).root.mountpoint == "/"


def minimal(**changes):
    data = {"firmware": "bios",
            "disks": [{"name": "d0", "size": "2G", "label": "msdos", "boot": True,
                       "partitions": [{"name": "root"}]}],
            "filesystems": [{"device": "root", "type": "ext4", "mountpoint": "/"}]}
    data.update(changes)
    return data


@pytest.mark.parametrize("changes,message", [
    ({"firmware": "coreboot"}, "firmware"),
    ({"filesystems": [{"device": "nope", "type": "ext4", "mountpoint": "/"}]}, "unknown device"),
    ({"filesystems": [{"device": "root", "type": "ext4", "mountpoint": "/home"}]}, "exactly one"),
    ({"firmware": "uefi"}, "vfat filesystem mounted at /boot/efi"),
    ({"disks": [{"name": "d0", "size": "2G", "label": "gpt", "boot": True,
                 "partitions": [{"name": "root"}]}]}, "bios_grub"),
    ({"disks": [{"name": "d0", "size": "2G", "label": "msdos", "boot": True,
                 "partitions": [{"name": "root"}, {"name": "p2", "size": "1G"}]}]}, "only the last"),
    ({"disks": [{"name": "d0", "size": "2X", "boot": True, "partitions": []}]}, "bad size"),
])
def test_invalid_specs_are_rejected_with_a_reason(changes, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec("t", minimal(**changes))


def test_uuids_are_stable_and_distinct():
    ids = install.stable_uuids(BIOS_LVM)
    assert ids == install.stable_uuids(load_spec("bios-lvm"))
    assert len(set(ids.values())) == len(ids)
    assert set(ids.values()).isdisjoint(install.stable_uuids(load_spec("uefi-gpt")).values())


def test_fstab_and_job_agree_on_uuids():
    ids = install.stable_uuids(BIOS_LVM)
    fstab = install.fstab(BIOS_LVM, ids)
    job = install.job_script(BIOS_LVM, ids)
    assert "UUID=%s / xfs defaults 0 1" % ids["fs:vg0/root"] in fstab
    assert "mkfs.xfs -q -f -m uuid=%s /dev/mapper/vg0-root" % ids["fs:vg0/root"] in job
    assert "mkfs.ext4 -q -F -U %s \"$P_boot\"" % ids["fs:boot"] in job
    assert 'grub-install --target=i386-pc "$DISK_disk0"' in job
    assert "label: dos" in job and "size=512MiB, type=83, bootable" in job


def test_luks_raid_spec_renders_keyfile_crypttab_and_arrays():
    spec = load_spec("raid1-luks")
    ids = install.stable_uuids(spec)
    files = install.etc_files(spec, ids)
    assert re.fullmatch(r"[0-9a-f]{32}\n", files["etc/machine-id"])
    assert files["etc/machine-id"] != install.etc_files(load_spec("bios-lvm"), install.stable_uuids(load_spec("bios-lvm")))[
        "etc/machine-id"]
    assert files["etc/crypttab"] == ("cryptroot UUID=%s /etc/cryptsetup-keys.d/cryptroot.key "
                                     "luks,discard,initramfs\n" % ids["luks:cryptroot"])
    arrays = [line for line in files["etc/mdadm/mdadm.conf"].splitlines() if line.startswith("ARRAY")]
    assert arrays == ["ARRAY /dev/md%d metadata=1.2 UUID=%s name=raid1-luks:%d" % (n, ids["md:md%d" % n], n)
                      for n in (0, 1)]
    job = install.job_script(spec, ids)
    assert job.index("mdadm --create /dev/md1") < job.index("luksFormat") < job.index("pvcreate")
    assert '"$DISK_disk0"' in job.split("grub-install")[1] and '"$DISK_disk1"' in job.split("grub-install")[2]


def test_uefi_job_registers_nvram_entry_and_removable_path():
    spec = load_spec("uefi-gpt")
    job = install.job_script(spec, install.stable_uuids(spec))
    assert "--bootloader-id=debian" in job and "--removable" in job
    assert "mount -t efivarfs" in job


@pytest.mark.parametrize("disk,device", [
    (Disk("a", Path("/x.qcow2")), "virtio-blk-pci,drive=d-a,serial=a"),
    (Disk("b", Path("/x.raw"), fmt="raw", bus="scsi", bootindex=1), "scsi-hd,drive=d-b,bus=scsi0.0,serial=b,bootindex=1"),
    (Disk("c", Path("/x.qcow2"), bus="nvme"), "nvme,drive=d-c,serial=c"),
    (Disk("cd", Path("/x.iso"), fmt="raw", bus="scsi", media="cdrom", readonly=True), "scsi-cd,drive=d-cd,bus=scsi0.0,serial=cd"),
])
def test_disk_args(disk, device):
    argv = disk_args(disk)
    assert argv[3] == device
    assert argv[1].startswith("if=none,id=d-%s,file=%s,format=%s,cache=unsafe" % (disk.name, disk.path, disk.fmt))


def test_unsupported_bus_is_an_error():
    with pytest.raises(procs.HarnessError):
        disk_args(Disk("x", Path("/x"), bus="ide"))


def test_qemu_argv_uefi_with_ssh(tmp_path):
    m = Machine("t", tmp_path, ssh_key=tmp_path / "key", firmware="uefi")
    m.add_disk(tmp_path / "d.qcow2", "d0", bus="scsi")
    m.ssh_port = 2222
    argv = " ".join(m.qemu_argv())
    assert "-accel tcg,thread=multi" in argv
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd" in argv
    assert "unit=1,file=%s" % (tmp_path / "OVMF_VARS.fd") in argv
    assert "-device virtio-scsi-pci,id=scsi0" in argv
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in argv
    m.close()


def test_qemu_argv_uefi_secboot_is_q35_with_smm_and_microsofts_keys(tmp_path):
    m = Machine("t", tmp_path, firmware="uefi-secboot", network=False)
    argv = m.qemu_argv()
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.secboot.fd" in argv
    assert (tmp_path / "OVMF_VARS.fd").read_bytes() == Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").read_bytes()
    m.close()
    with pytest.raises(procs.HarnessError, match="firmware must be one of bios, uefi, uefi-secboot"):
        Machine("t", tmp_path, firmware="coreboot")


def test_module_load_order_puts_dependencies_first(tmp_path):
    moddir = tmp_path / "lib/modules/6.1.0-x"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/virtio_blk.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/virtio_ring.ko: kernel/virtio.ko\nkernel/virtio.ko:\n"
        "kernel/dm-mod.ko:\n")
    order = module_load_order(tmp_path, "6.1.0-x", ["virtio_blk", "dm_mod"])
    assert order == ["kernel/virtio.ko", "kernel/virtio_ring.ko", "kernel/virtio_blk.ko", "kernel/dm-mod.ko"]


def test_apt_mirror_from_deb822_and_one_line_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("RESCUE_VM_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://one.example/debian bookworm main\n")
    assert apt_mirror(tmp_path) == "http://one.example/debian"
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://deb.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n")
    assert apt_mirror(tmp_path) == "http://deb.example/debian"


def read_cpio(path: Path):
    data, pos, names = path.read_bytes(), 0, {}
    while True:
        fields = [int(data[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return names
        names[name] = (fields[1], data[pos: pos + filesize], (fields[9], fields[10]))
        pos += filesize + (-filesize % 4)


def test_cpio_roundtrip(tmp_path):
    cpio.write(tmp_path / "x.cpio", [cpio.directory("dev"), cpio.chardev("dev/console", 5, 1),
                                     cpio.file("init", b"#!/bin/sh\n", 0o755)])
    entries = read_cpio(tmp_path / "x.cpio")
    assert entries["init"] == (0o100755, b"#!/bin/sh\n", (0, 0))
    assert entries["dev/console"][0] == 0o20600 and entries["dev/console"][2] == (5, 1)


def test_build_once_builds_once_and_atomically(tmp_path):
    calls = []

    def builder(out: Path) -> None:
        calls.append(out)
        (out / "artifact").write_text("ok")

    first = cache.build_once(tmp_path, "thing-1", builder)
    second = cache.build_once(tmp_path, "thing-1", builder)
    assert first == second == tmp_path / "thing-1" and len(calls) == 1
    assert calls[0].name.startswith("thing-1.tmp-") and not calls[0].exists()


def test_failed_build_leaves_no_entry_but_keeps_logs(tmp_path):
    stale = tmp_path / "thing-2.tmp-999999"
    stale.mkdir()

    def builder(out: Path) -> None:
        (out / "build.log").write_text("what went wrong\n")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.build_once(tmp_path, "thing-2", builder)
    assert not (tmp_path / "thing-2").exists() and not stale.exists()
    assert not list(tmp_path.glob("thing-2.tmp-*"))
    kept = list((tmp_path / "failed").glob("thing-2-*/build.log"))
    assert [p.read_text() for p in kept] == ["what went wrong\n"]


def test_run_reports_failure_output_and_enforces_timeout():
    with pytest.raises(procs.CommandFailed, match="exit 3") as failure:
        procs.run(["sh", "-c", "echo evidence; exit 3"], timeout=10)
    assert "evidence" in failure.value.output
    with pytest.raises(procs.HarnessError, match="timed out"):
        procs.run(["sleep", "30"], timeout=0.5)


def fake_image(tmp_path):
    """A GuestImage directory with just what the stand-in reads: kernel, modules, recipe."""
    from vmlib import GuestImage
    moddir = tmp_path / "img/rootfs/lib/modules/6.1.0-x/kernel"
    moddir.mkdir(parents=True)
    (moddir.parent / "modules.dep").write_text(
        "kernel/virtio_blk.ko: kernel/virtio_ring.ko kernel/virtio.ko\n"
        "kernel/virtio_ring.ko: kernel/virtio.ko\nkernel/virtio.ko:\n"
        "kernel/virtio_pci.ko: kernel/virtio_ring.ko kernel/virtio.ko\n")
    for name in ("virtio", "virtio_ring", "virtio_blk", "virtio_pci"):
        (moddir / (name + ".ko")).write_bytes(b"ELF " + name.encode())
    for name in ("vmlinuz", "tools.img", "id_ed25519"):
        (tmp_path / "img" / name).write_bytes(b"x")
    (tmp_path / "img/recipe.json").write_text('{"kernel": "6.1.0-x"}')
    return GuestImage(tmp_path / "img", "k")


def test_standin_initramfs_holds_init_stage2_busybox_modules_and_settings(tmp_path):
    from vmlib.standin import rescue_standin
    s = rescue_standin(fake_image(tmp_path), "r", tmp_path / "r", udev=False, hostname="src-host")
    entries = read_cpio(s.initrd)
    assert entries["init"][0] == 0o100755 and entries["init"][1].startswith(b"#!/bin/busybox sh")
    assert b"switch_root /newroot /run/standin/busybox sh /run/standin/stage2.sh" in entries["init"][1]
    assert b"udevadm trigger --type=devices --action=add" in entries["stage2.sh"][1]
    assert b"poweroff -f" in entries["poweroff.sh"][1]
    assert entries["bin/busybox"][1] == Path("/bin/busybox").read_bytes()
    assert entries["etc/standin.conf"][1] == b"UDEV=0\nNET=static\nHOSTNAME=src-host\n"
    # dependencies first, each once
    assert entries["etc/standin-modules"][1].decode().split() == [
        "kernel/virtio.ko", "kernel/virtio_ring.ko", "kernel/virtio_pci.ko", "kernel/virtio_blk.ko"]
    assert entries["lib/modules/kernel/virtio_blk.ko"][1] == b"ELF virtio_blk"
    assert entries["dev/console"][2] == (5, 1)
    s.close()


def test_standin_qemu_argv_boots_kernel_with_tools_disk_as_snapshot(tmp_path):
    from vmlib.standin import rescue_standin
    image = fake_image(tmp_path)
    s = rescue_standin(image, "r", tmp_path / "r", firmware="uefi")
    s.add_disk(tmp_path / "t.qcow2", "disk0", bus="nvme")
    s.ssh_port = 2200
    argv = s.qemu_argv()
    joined = " ".join(argv)
    assert argv[argv.index("-kernel") + 1] == str(image.kernel)
    assert argv[argv.index("-initrd") + 1] == str(s.initrd)
    assert "console=ttyS0" in argv[argv.index("-append") + 1]
    assert ("-drive if=none,id=d-tools,file=%s,format=raw,cache=unsafe,snapshot=on "
            "-device virtio-blk-pci,drive=d-tools,serial=tools" % image.tools_img) in joined
    assert "-device nvme,drive=d-disk0,serial=disk0" in joined
    assert "hostfwd=tcp:127.0.0.1:2200-:22" in joined and "-m 2048" in joined
    assert "if=pflash" in joined
    with pytest.raises(procs.HarnessError, match="stand-in's own root disk"):
        s.add_disk(tmp_path / "x.qcow2", "tools")
    with pytest.raises(procs.HarnessError, match="hostname"):
        rescue_standin(image, "q", tmp_path / "q", hostname="bad name;")
    s.close()


def test_standin_serials_from_sysfs_listing():
    from vmlib.standin import parse_serials
    listing = "vda tools\nvdb disk0\nnvme0n1 target\nsda backup\nsr0 \nloop0\n"
    assert parse_serials(listing) == {"tools": "/dev/vda", "disk0": "/dev/vdb", "target": "/dev/nvme0n1",
                                      "backup": "/dev/sda"}


def guest_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), Path(__file__).parent / "guest" / (name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def drill_tree(tmp_path):
    """The drills' test data, made on this host by the script the guests run."""
    import os
    import shutil
    if os.geteuid() != 0 or not shutil.which("setcap"):
        pytest.skip("needs root and setcap (trusted xattrs, odd owners, a file capability)")
    root = tmp_path / "src"
    guest_script("drill-data").make(str(root))
    return root


def test_drill_manifest_sees_every_kind_of_test_data(drill_tree):
    manifest = guest_script("manifest").manifest([str(drill_tree)], [])
    files = {k[len(str(drill_tree)):]: v for k, v in manifest["files"].items()}
    assert files["/ping-copy"]["xattrs"]["security.capability"].startswith("01000002")   # v2, effective
    assert files["/acl.txt"]["xattrs"]["system.posix_acl_access"].startswith("02000000")
    assert "system.posix_acl_default" in files["/acl-dir"]["xattrs"]
    assert files["/xattrs.txt"]["xattrs"]["user.drill.text"] == b"hello".hex()
    assert files["/sparse.img"]["sparse"] and files["/sparse.img"]["size"] == 64 * 1024 * 1024 + 4096
    assert files["/fifo"]["type"] == "fifo" and files["/dangling-link"]["target"] == "does/not/exist"
    assert (files["/odd-owner"]["uid"], files["/odd-owner"]["mtime"]) == (4242, 1000000000)
    assert files["/setuid"]["mode"] == "4755" and files["/sticky-dir"]["mode"] == "1777"
    assert manifest["hardlinks"] == [sorted(str(drill_tree / p) for p in ("linked-a", "linked-b", "other-dir/linked-c"))]


def test_drill_comparison_finds_what_a_restore_loses(drill_tree, tmp_path):
    import os
    import subprocess
    from vmlib.drill import compare_manifests
    make = guest_script("manifest").manifest
    copy = tmp_path / "copy"
    # what a careful restore does: cp -a keeps xattrs, ACLs, capabilities, links, holes, times
    subprocess.run(["cp", "-a", str(drill_tree), str(copy)], check=True)

    def relative(m, root):
        return {"files": {"/x" + k[len(str(root)):]: v for k, v in m["files"].items()},
                "hardlinks": [["/x" + p[len(str(root)):] for p in g] for g in m["hardlinks"]]}
    source = relative(make([str(drill_tree)], []), drill_tree)
    assert compare_manifests(source, relative(make([str(copy)], []), copy)) == []
    # now lose what duplicity alone loses
    os.removexattr(copy / "ping-copy", "security.capability")
    os.unlink(copy / "linked-b")
    subprocess.run(["cp", str(copy / "linked-a"), str(copy / "linked-b")], check=True)
    os.utime(copy / "linked-b", (os.stat(drill_tree / "linked-b").st_atime, os.stat(drill_tree / "linked-b").st_mtime))
    os.utime(copy, (1200000000, 1200000000))
    (copy / "fifo").unlink()
    (copy / "extra").write_text("x")
    os.utime(copy, (1200000000, 1200000000))
    diff = compare_manifests(source, relative(make([str(copy)], []), copy))
    assert "/x/ping-copy: xattr security.capability 0100000200200000000000000000000000000000 -> None" in diff
    assert "missing: /x/fifo (fifo)" in diff and "extra: /x/extra (file)" in diff
    assert "hard links lost: /x/linked-a = /x/linked-b = /x/other-dir/linked-c" in diff
    assert "hard links new: /x/linked-a = /x/other-dir/linked-c" in diff
    assert len(diff) == 5, diff


def test_drill_comparison_leaves_out_volatile_paths_and_their_directories_mtime():
    from vmlib.drill import compare_manifests
    f = lambda **kw: dict({"type": "file", "mode": "0644", "uid": 0, "gid": 0, "mtime": 1}, **kw)  # noqa: E731
    d = lambda mtime: {"type": "dir", "mode": "0755", "uid": 0, "gid": 0, "mtime": mtime}  # noqa: E731
    src = {"files": {"/var": d(1), "/var/log/syslog": f(), "/etc": d(1), "/etc/x": f(sha256="a"),
                     "/boot": d(1), "/boot/initrd.img-6.1": f(sha256="b"), "/sock": f(type="socket"),
                     "/backup": {"type": "dir", "mountpoint": True, "mode": "0755", "uid": 0, "gid": 0}},
           "hardlinks": []}
    dst = {"files": {"/var": d(2), "/var/log/new": f(), "/etc": d(2), "/etc/x": f(sha256="c"),
                     "/boot": d(2), "/boot/initrd.img-6.1": f(sha256="d"), "/backup": d(5)}, "hardlinks": []}
    assert compare_manifests(src, dst) == ["/etc: mtime 1 -> 2", "/etc/x: sha256 a -> c"]


def test_drill_identity_keys_ignore_names_and_sizes():
    from vmlib.drill import identity_keys
    row = lambda name, typ, size, **kw: dict({"NAME": name, "TYPE": typ, "FSTYPE": None, "UUID": None,  # noqa: E731
                                             "LABEL": None, "PARTUUID": None, "PTUUID": None, "PTTYPE": None,
                                             "SIZE": size}, **kw)
    a = [row("vda", "disk", 4, PTUUID="ab", PTTYPE="dos"), row("vda1", "part", 1, FSTYPE="ext4", UUID="u1",
                                                              PARTUUID="ab-01")]
    b = [row("nvme0n1", "disk", 8, PTUUID="ab", PTTYPE="dos"), row("nvme0n1p1", "part", 1, FSTYPE="ext4",
                                                                  UUID="u1", PARTUUID="ab-01")]
    assert identity_keys(a) == identity_keys(b)
    b[1]["LABEL"] = "boot"
    assert identity_keys(a) != identity_keys(b)


def test_the_drill_reads_recovers_own_account_of_its_time_from_its_output():
    from vmlib.drill import time_line
    out = ("rescue: Restore done: 1.2 GiB written\n"
           "rescue: Time: 700.1 s: duplicity 170.0 s, initramfs 420.0 s, waiting for devices 3.0 s, "
           "orchestration 20.0 s (2.9 %; other tools 15.0 s of it)\nrescue: Unmounted /mnt/local\n")
    assert time_line(out).startswith("Time: 700.1 s: duplicity 170.0 s") and time_line(out).endswith("of it)")
    assert time_line("no such line\n") == ""


def test_a_loader_on_the_esp_may_have_a_new_mtime_but_not_other_bytes():
    from vmlib.drill import compare_manifests
    entry = {"type": "file", "mode": 0o700, "uid": 0, "gid": 0, "mtime": 1, "sha256": "aa"}
    source = {"files": {"/boot/efi/EFI/debian/grubx64.efi": dict(entry), "/etc/x": dict(entry)}, "hardlinks": []}
    same = {"files": {"/boot/efi/EFI/debian/grubx64.efi": dict(entry, mtime=2), "/etc/x": dict(entry)}, "hardlinks": []}
    assert compare_manifests(source, same) == []
    other = {"files": {"/boot/efi/EFI/debian/grubx64.efi": dict(entry, mtime=2, sha256="bb"),
                       "/etc/x": dict(entry, mtime=2)}, "hardlinks": []}
    assert compare_manifests(source, other) == ["/boot/efi/EFI/debian/grubx64.efi: sha256 aa -> bb",
                                                "/etc/x: mtime 1 -> 2"]
