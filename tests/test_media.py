"""Rescue media (sections "rescue media: manifest" and "rescue media: packers"): the manifest
worked out from a host (a fake root here, with recorded ldd output and a real modules.dep), the
cpio writer read back by rescue and by a real cpio, and the canary: no secret in the image."""

import gzip
import hashlib
import re
import os
import shutil
import stat
import struct
import subprocess
import sys
import argparse
import ast
import json
import sysconfig
import warnings
from pathlib import Path

import pytest

import rescue
from conftest import run_rescue

DATA = Path(__file__).resolve().parent / "data" / "media"
LAYOUTS = Path(__file__).resolve().parent / "data" / "layouts"
KVER = "6.1.0-50-cloud-amd64"
CANARY = "canary-Passphrase-7f3a9c1e-do-not-ship"


def recorded_layout(name):
    config = rescue.config_from_values({})
    return rescue.capture_layout(rescue.Probe(replay_dir=LAYOUTS / name), config, "host").layout


# --- ldd ---------------------------------------------------------------------------------------

def test_ldd_output_gives_the_libraries_with_the_interpreter_first():
    found, missing = rescue.parse_ldd((DATA / "ldd-gpg.txt").read_text())
    assert found[0] == "/lib64/ld-linux-x86-64.so.2"
    assert "/lib/x86_64-linux-gnu/libgcrypt.so.20" in found and "/lib/x86_64-linux-gnu/libc.so.6" in found
    assert not any("vdso" in f for f in found) and missing == []
    assert len(found) == 11


def test_ldd_output_names_what_is_not_found():
    found, missing = rescue.parse_ldd((DATA / "ldd-librsync-alone.txt").read_text())
    assert missing == ["librsync-7a6f72b4.so.2.3.4"]
    assert found == ["/lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/libpthread.so.0",
                     "/lib/x86_64-linux-gnu/libc.so.6"]


def test_the_output_of_ldd_for_several_files_is_split_by_file():
    paths = ["/usr/bin/gpg", "/usr/bin/busybox", "/tmp/media-logs/_librsync.cpython-311-x86_64-linux-gnu.so"]
    parts = rescue.split_ldd((DATA / "ldd-three-files.txt").read_text(), paths)
    assert rescue.parse_ldd(parts[paths[0]]) == rescue.parse_ldd((DATA / "ldd-gpg.txt").read_text())
    assert rescue.parse_ldd(parts[paths[1]]) == ([], [])
    assert rescue.parse_ldd(parts[paths[2]])[1] == ["librsync-7a6f72b4.so.2.3.4"]
    assert rescue.split_ldd("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n", ["/bin/x"]) == {"/bin/x": "\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"}


def test_a_static_program_has_no_libraries():
    assert rescue.parse_ldd((DATA / "ldd-busybox.txt").read_text()) == ([], [])


# --- modules -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cloud_index():
    read = lambda name: (DATA / f"{KVER}.{name}").read_text()   # noqa: E731
    return rescue.parse_module_index(read("modules.dep"), read("modules.softdep"), read("modules.alias"),
                                     read("modules.builtin"))


def test_module_closure_follows_modules_dep_and_softdeps(cloud_index):
    closure = cloud_index.closure(["xfs", "dm-crypt", "virtio_blk"])
    # xfs -> libcrc32c (modules.dep) -> crc32c (softdep pre:, an alias of crc32c_generic/intel)
    assert {"xfs", "libcrc32c", "dm_crypt", "dm_mod", "virtio_blk", "virtio_ring", "virtio"} <= set(closure)
    assert any(m.startswith("crc32c") for m in closure)
    assert closure == sorted(set(closure))


def test_module_names_resolve_by_alias_and_built_ins_are_not_modules(cloud_index):
    assert cloud_index.resolve("crypto-xts") == ["xts"]
    assert cloud_index.resolve("fs-xfs") == ["xfs"]
    assert cloud_index.resolve("md-mod") == ["md_mod"]
    assert "ext4" not in cloud_index.paths or "ext4" not in cloud_index.builtin
    assert cloud_index.resolve("no_such_module") == []


def test_the_layout_names_the_modules_its_storage_needs():
    wanted = rescue.layout_modules(recorded_layout("raid1-luks"))
    assert {"md_mod", "raid1", "dm_crypt", "dm_mod", "ext4"} <= set(wanted)
    assert "xfs" in rescue.layout_modules(recorded_layout("bios-lvm"))


def test_the_compression_is_what_the_kernel_config_unpacks():
    config = "CONFIG_RD_GZIP=y\nCONFIG_RD_XZ=y\nCONFIG_RD_ZSTD=y\n"
    assert rescue.initramfs_compression(config, True) == "zstd"
    assert rescue.initramfs_compression(config, False) == "xz"
    assert rescue.initramfs_compression("CONFIG_RD_GZIP=y\n# CONFIG_RD_XZ is not set\n", True) == "gzip"


# --- the manifest of a fake host ---------------------------------------------------------------

LDD_GPG = (DATA / "ldd-gpg.txt").read_text()


class RecordedProbe(rescue.MediaProbe):
    """A fake root; ldd answers with gpg's real ldd output for every program."""

    def __init__(self, root, firmware=()):
        super().__init__(None, str(root), KVER)
        self.firmware_names = list(firmware)

    def ldd(self, paths):
        return {path: LDD_GPG if "/bin/" in path else "" for path in paths}

    def module_firmware(self, paths):
        return self.firmware_names if paths else []

    def python_paths(self, python):
        return {"stdlib": "/usr/lib/python3.11", "dynload": "/usr/lib/python3.11/lib-dynload",
                "ext_suffix": ".cpython-311-x86_64-linux-gnu.so", "version": "3.11"}


REQUIRED = ("python3", "sfdisk", "wipefs", "blkid", "lsblk", "mount", "umount", "findmnt", "gpg", "sh",
            "mke2fs", "mkfs.xfs", "mkswap", "lvm", "grub-install")


def write(path, data=b"", mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    path.chmod(mode)


def fake_root(tmp_path, tools=REQUIRED, gnupg_home=None, udev=False):
    root = tmp_path / "host"
    (root / "usr" / "lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    os.symlink("usr/lib64", root / "lib64")
    os.symlink("usr/bin", root / "bin")
    write(root / "boot" / f"vmlinuz-{KVER}", b"\x7fkernel image")
    write(root / "boot" / f"config-{KVER}", "CONFIG_RD_GZIP=y\n")
    write(root / "proc" / "modules", "virtio_blk 20480 3 - Live 0x0\nvirtio_net 61440 0 - Live 0x0\n")
    write(root / "proc" / "cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/mapper/vg0-root ro console=ttyS0,115200n8 quiet\n")
    moddir = root / "usr" / "lib" / "modules" / KVER
    for name in ("modules.dep", "modules.softdep", "modules.alias", "modules.builtin"):
        write(moddir / name, (DATA / f"{KVER}.{name}").read_bytes())
    for line in (DATA / f"{KVER}.modules.dep").read_text().splitlines():
        write(moddir / line.partition(":")[0], b"\x7fELF module")
    for tool in tools:
        write(root / "usr" / ("sbin" if tool not in ("python3", "gpg", "sh") else "bin") / tool, b"\x7fELF", 0o755)
    os.symlink("python3.11", root / "usr" / "bin" / "python3.11-link")
    for library in rescue.parse_ldd(LDD_GPG)[0]:
        write(root / library.lstrip("/").replace("lib64/", "usr/lib64/").replace("lib/", "usr/lib/", 1), b"\x7fELF lib")
    stdlib = root / "usr" / "lib" / "python3.11"
    for name in ("os.py", "site.py", "json/__init__.py", "json/decoder.py", "encodings/__init__.py",
                 "encodings/utf_8.py", "tkinter/__init__.py"):
        write(stdlib / name, "import json.decoder\n" if name == "os.py" else "")
    write(stdlib / "lib-dynload" / "_ssl.cpython-311-x86_64-linux-gnu.so", b"\x7fELF")
    write(root / "usr" / "lib" / "firmware" / "virtio-fw.bin", b"firmware")
    if udev:
        write(root / "usr" / "lib" / "systemd" / "systemd-udevd", b"\x7fELF", 0o755)
        write(root / "usr" / "lib" / "udev" / "rules.d" / "60-block.rules", "# rules\n")
        write(root / "usr" / "lib" / "udev" / "ata_id", b"\x7fELF", 0o755)
        write(root / "usr" / "lib" / "udev" / "hwdb.bin", b"hardware names")
        write(root / "usr" / "lib" / "udev" / "hwdb.d" / "20-pci.hwdb", b"hardware names")
    write(root / "usr" / "bin" / "xorriso", b"\x7fELF", 0o755)
    for platform in ("i386-pc", "x86_64-efi"):
        write(root / "usr" / "lib" / "grub" / platform / "moddep.lst", "normal: terminal\n")
    write(root / "root" / ".ssh" / "authorized_keys", "ssh-ed25519 AAAAC3 admin@laptop\n")
    write(root / "root" / ".ssh" / "id_ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n", 0o600)
    if gnupg_home is not None:
        shutil.copytree(gnupg_home, root / "root" / ".gnupg", ignore=shutil.ignore_patterns("S.*"))
    else:
        write(root / "root" / ".gnupg" / "pubring.kbx", b"public keyring")
        write(root / "root" / ".gnupg" / "private-keys-v1.d" / "ABCD.key", b"(private-key secret)", 0o600)
    return root


def fake_pyz(tmp_path):
    import zipfile
    pyz = tmp_path / "rescue.pyz"
    with zipfile.ZipFile(pyz, "w") as archive:
        for name, text in (("rescue.py", "import os\nimport ssl_missing\ndef f():\n    import _ssl\n"),
                           ("__main__.py", "import os\n")):
            archive.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), text)
    return pyz


def manifest_for(tmp_path, values=None, tools=REQUIRED, firmware=(), gnupg_home=None, layout="bios-lvm",
                 udev=False):
    root = fake_root(tmp_path, tools, gnupg_home, udev)
    config = rescue.config_from_values(dict({"HOSTNAME": "host"}, **(values or {})))
    probe = RecordedProbe(root, firmware)
    return rescue.build_manifest(probe, config, recorded_layout(layout), fake_pyz(tmp_path)), root


def test_the_manifest_of_a_host(tmp_path):
    m, root = manifest_for(tmp_path, firmware=["virtio-fw.bin", "absent.bin"], udev=True)
    files = m.files
    assert m.kernel == str(root / "boot" / f"vmlinuz-{KVER}") and m.compression == "gzip"
    assert m.cmdline == "console=ttyS0,115200n8"
    # tools at their host paths, the libraries of ldd through the /lib -> usr/lib symlink
    assert files["/usr/sbin/sfdisk"].kind == "file" and m.tools["sfdisk"] == "/usr/sbin/sfdisk"
    assert (files["/lib"].kind, files["/lib"].source) == ("symlink", "usr/lib")
    assert files["/usr/lib/x86_64-linux-gnu/libgcrypt.so.20"].kind == "file"
    assert files["/usr/lib64/ld-linux-x86-64.so.2"].kind == "file"
    # modules: loaded + the layout's (xfs, dm_mod) + their closure; firmware only what they name
    assert {"virtio_blk", "virtio_net", "virtio_ring", "xfs", "libcrc32c", "dm_mod"} <= set(m.modules)
    assert "raid1" not in m.modules and "btrfs" not in m.modules
    assert f"/usr/lib/modules/{KVER}/kernel/fs/xfs/xfs.ko" in files
    assert m.firmware == ["virtio-fw.bin"]
    # what no driver asks for, /init loads: the layout's device-mapper and filesystems (the ISO
    # drill stopped at "/dev/mapper/control: open failed" with dm_mod in the image, not loaded)
    assert m.load == ["xfs", "dm_mod"] and files["/etc/rescue/modules-load"].data == b"xfs\ndm_mod\n"   # ext4: built in
    assert "/etc/rescue/modules-load" in (rescue.MEDIA_DATA / "init").read_text()
    # the standard library rescue imports, not the rest of it
    assert {"/usr/lib/python3.11/os.py", "/usr/lib/python3.11/json/decoder.py",
            "/usr/lib/python3.11/encodings/utf_8.py", "/usr/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so"} <= set(files)
    assert "/usr/lib/python3.11/tkinter/__init__.py" not in files
    # rescue's own files; public keys in, private keys out
    assert files["/init"].data == (rescue.MEDIA_DATA / "init").read_bytes()
    assert files[rescue.IMAGE_PYZ].source == str(tmp_path / "rescue.pyz")
    assert "/var/lib/rescue/layout/layout.json" in files
    assert "/root/.gnupg/pubring.kbx" in files and "/root/.ssh/authorized_keys" in files
    assert not any("private-keys" in p or "id_ed25519" in p for p in files)
    # programs only mkrescue runs stay out; udevd with its rules and helpers, without its hwdb
    assert "xorriso" not in m.tools and "/usr/bin/xorriso" not in files
    assert m.tools["systemd-udevd"] == "/lib/systemd/systemd-udevd" and not any("udevd" in w for w in m.warnings)
    assert "/usr/lib/udev/rules.d/60-block.rules" in files and "/usr/lib/udev/ata_id" in files
    assert not any("hwdb" in p for p in files)
    text = rescue.manifest_text(m)
    assert "symlink /lib -> usr/lib" in text and "file    /usr/sbin/sfdisk <- " in text


def test_private_keys_go_in_only_when_a_setting_names_them(tmp_path):
    m, _ = manifest_for(tmp_path, {"RESCUE_GPG_PRIVATE_KEYS": "yes", "SSH_UNPROTECTED_PRIVATE_KEYS": "yes"})
    assert "/root/.gnupg/private-keys-v1.d/ABCD.key" in m.files
    assert "/root/.ssh/id_ed25519" in m.files
    assert m.files["/root/.ssh/id_ed25519"].mode == 0o600


def test_a_tool_the_layout_needs_is_an_error_an_optional_one_a_warning(tmp_path):
    with pytest.raises(rescue.RescueError) as error:
        manifest_for(tmp_path, tools=[t for t in REQUIRED if t != "lvm"])
    assert "recover needs lvm" in error.value.message and "lvm2" in error.value.hint
    m, _ = manifest_for(tmp_path / "b")
    assert any("no udevd" in w for w in m.warnings) and any("no DHCP client" in w for w in m.warnings)


def test_modules_load_are_loaded_at_boot_when_the_image_has_them(tmp_path):
    m, _ = manifest_for(tmp_path, {"MODULES": ["raid10"], "MODULES_LOAD": ["raid10", "no_such_module"]})
    assert m.load[-1] == "raid10" and "no_such_module" not in m.load
    assert m.files["/etc/rescue/modules-load"].data.decode().split() == m.load


def test_all_modules_and_explicit_modules(tmp_path):
    m, _ = manifest_for(tmp_path, {"MODULES": ["all_modules"]})
    assert len(m.modules) == len((DATA / f"{KVER}.modules.dep").read_text().splitlines())
    m, _ = manifest_for(tmp_path / "b", {"MODULES": ["loaded_modules", "raid10", "nonexistent_mod"]})
    assert "raid10" in m.modules and "xfs" not in m.modules
    assert any("nonexistent_mod" in w for w in m.warnings)


def test_the_image_config_has_no_secret_values(tmp_path):
    config = rescue.config_from_values({
        "HOSTNAME": "host", "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE": CANARY,
        "BACKUP_DUPLICITY_URL": f"rsync://user@server//srv/{CANARY}"})
    text = rescue.image_config(config)
    assert CANARY not in text
    assert "HOSTNAME=host" in text and "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE=''" in text


def test_the_passphrase_goes_into_the_image_config_only_when_the_user_says_so_by_name(tmp_path):
    """RESCUE_GPG_PASSPHRASE=yes keeps the duplicity passphrase (for an unattended
    rescue.auto=recover), and only it: another secret stays out."""
    values = {"HOSTNAME": "host", "BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE": CANARY,
              "BACKUP_DUPLICITY_GPG_SIGN_PASSPHRASE": CANARY + "-sign", "RESCUE_GPG_PASSPHRASE": "yes"}
    text = rescue.image_config(rescue.config_from_values(values))
    assert f"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE={CANARY}" in text and CANARY + "-sign" not in text
    conf = tmp_path / "image.conf"
    conf.write_text(text)
    loaded = rescue.load_config([rescue.DEFAULT_CONF, conf], {"PATH": "/bin"}, rescue.Log())
    assert loaded.get("BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE") == CANARY
    assert CANARY not in rescue.image_config(rescue.config_from_values(dict(values, RESCUE_GPG_PASSPHRASE="no")))


# --- cpio --------------------------------------------------------------------------------------

def sample_entries():
    return [rescue.CpioEntry("bin", stat.S_IFDIR | 0o755),
            rescue.CpioEntry("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\necho hi\n"),
            rescue.CpioEntry("bin/a", stat.S_IFREG | 0o644, b"same inode", ino=900, nlink=2),
            rescue.CpioEntry("bin/b", stat.S_IFREG | 0o644, b"same inode", ino=900, nlink=2),
            rescue.CpioEntry("lib", stat.S_IFLNK | 0o777, b"usr/lib"),
            rescue.CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
            rescue.CpioEntry("odd", stat.S_IFREG | 0o600, bytes(range(256)) * 3 + b"x")]


def test_cpio_round_trip(tmp_path):
    import io
    buffer = io.BytesIO()
    rescue.write_cpio(buffer, sample_entries())
    data = buffer.getvalue()
    assert len(data) % 4 == 0
    back = {e.name: e for e in rescue.read_cpio(data)}
    assert list(back) == [e.name for e in sample_entries()]
    assert back["bin/tool"].data == b"#!/bin/sh\necho hi\n" and back["odd"].data == bytes(range(256)) * 3 + b"x"
    assert back["bin/a"].data == b"" and back["bin/b"].data == b"same inode"    # data on the last link
    assert back["bin/a"].ino == back["bin/b"].ino and back["bin/b"].nlink == 2
    assert back["lib"].data == b"usr/lib" and back["dev/console"].rdev == (5, 1)


def real_cpio():
    if shutil.which("cpio"):
        return ["cpio"]
    if shutil.which("busybox"):
        return ["busybox", "cpio"]
    pytest.skip("no cpio and no busybox on this machine")


def test_a_real_cpio_unpacks_what_rescue_writes(tmp_path):
    import io
    buffer = io.BytesIO()
    rescue.write_cpio(buffer, [e for e in sample_entries() if not e.name.startswith("dev")])
    listing = subprocess.run(real_cpio() + ["-t"], input=buffer.getvalue(), capture_output=True, check=True)
    # (busybox cpio -t leaves out the earlier names of a hard link; it extracts them)
    assert {"bin", "bin/tool", "bin/b", "lib", "odd"} <= set(listing.stdout.decode().split())
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(real_cpio() + ["-i", "-d"], input=buffer.getvalue(), cwd=out, capture_output=True, check=True)
    assert (out / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (out / "bin" / "a").read_bytes() == (out / "bin" / "b").read_bytes() == b"same inode"
    assert os.readlink(out / "lib") == "usr/lib"
    assert (out / "odd").read_bytes() == bytes(range(256)) * 3 + b"x"


def test_the_staged_tree_becomes_sorted_entries_with_hard_links(tmp_path):
    stage = tmp_path / "stage"
    write(stage / "usr" / "sbin" / "mke2fs", b"mke2fs", 0o755)
    os.link(stage / "usr" / "sbin" / "mke2fs", stage / "usr" / "sbin" / "mkfs.ext4")
    os.symlink("usr/sbin", stage / "sbin")
    entries = rescue.tree_entries(stage)
    names = [e.name for e in entries]
    assert names == ["dev", "dev/console", "sbin", "usr", "usr/sbin", "usr/sbin/mke2fs", "usr/sbin/mkfs.ext4"]
    linked = [e for e in entries if e.nlink == 2]
    assert len(linked) == 2 and linked[0].ino == linked[1].ino


# --- the canary: no secret anywhere in the image -----------------------------------------------

def gpg_home_with_secret_key(tmp_path):
    if not shutil.which("gpg"):
        pytest.skip("no gpg")
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    run = lambda *a, **k: subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",   # noqa: E731
                                          "--passphrase", CANARY] + list(a), capture_output=True, check=True, **k)
    run("--quick-gen-key", "Canary <canary@example.invalid>", "ed25519", "cert,sign", "never")
    secret = run("--export-secret-keys", "--armor").stdout
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True)
    return home, secret


def test_canary_no_passphrase_and_no_secret_key_in_the_image(tmp_path):
    home, armored_secret = gpg_home_with_secret_key(tmp_path)
    key_files = [p.read_bytes() for p in (home / "private-keys-v1.d").glob("*.key")]
    assert key_files
    values = {"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE": CANARY, "BACKUP_DUPLICITY_URL": "file:///srv/backup",
              "SSH_ROOT_PASSWORD": CANARY + "-ssh", "OUTPUT_URL": f"file://{tmp_path}/url",
              "OUTPUT": "RAMDISK", "ISO_DIR": str(tmp_path / "out"), "MODULES": ["loaded_modules"],
              "FIRMWARE_FILES": ["no"]}
    m, root = manifest_for(tmp_path, values, gnupg_home=home)
    m.modules = []          # this machine has no depmod; the modules' bytes are fake anyway
    config = rescue.config_from_values(dict({"HOSTNAME": "host"}, **values))
    log = rescue.Log()
    ctx = rescue.Context(argparse.Namespace(), config, log, rescue.Runner(log))
    result = rescue.make_rescue_media(ctx, m, selftest=False)
    initrd = next(p for p in result.files if p.name.endswith("initrd.cgz"))
    assert sorted(p.name for p in (tmp_path / "url").iterdir()) == sorted(p.name for p in result.files)
    entries = rescue.read_cpio(gzip.decompress(initrd.read_bytes()))
    names = [e.name for e in entries]
    assert "root/.gnupg/pubring.kbx" in names and "etc/rescue/local.conf" in names and "init" in names
    blob = b"\0".join(e.name.encode() + b"\0" + e.data for e in entries)
    assert CANARY.encode() not in blob
    for key in key_files:
        assert key not in blob and key[len(key) // 2:len(key) // 2 + 48] not in blob
    assert armored_secret not in blob and b"private-keys-v1.d" not in blob
    assert not any(n.endswith("id_ed25519") for n in names)
    assert CANARY.encode() not in initrd.read_bytes()
    shadow = next(e.data.decode() for e in entries if e.name == "etc/shadow")
    hashed = shadow.split(":")[1]
    assert rescue.sha512_crypt(CANARY + "-ssh", hashed.split("$")[2]) == hashed


def test_sha512_crypt_is_glibcs():
    # glibc crypt(3) of these, from python3.11 -c "import crypt; crypt.crypt(PW, '$6$' + SALT)"
    assert rescue.sha512_crypt("pw", "saltsalt") == (
        "$6$saltsalt$pauPrmdmG4BTE9h2HPmywiw152IFch6BJCEsaY6D.PLTfpV8sqvXwWdyfsgVgozkYH9B80bAip/08R2BPH2xk/")
    openssl = shutil.which("openssl")
    if openssl:
        for pw, salt in (("a" * 70, "x" * 16), ("pässwörd 1", "QWERTYuiop123456")):
            want = subprocess.run([openssl, "passwd", "-6", "-salt", salt, "-stdin"], input=pw.encode(),
                                  capture_output=True, check=True).stdout.decode().strip()
            assert rescue.sha512_crypt(pw, salt) == want


def test_two_builds_of_the_same_host_are_the_same_bytes(tmp_path):
    values = {"OUTPUT": "RAMDISK", "MODULES": ["loaded_modules"], "FIRMWARE_FILES": ["no"]}
    images = []
    for n in range(2):
        m, _ = manifest_for(tmp_path / str(n), values)
        m.modules = []
        config = rescue.config_from_values(dict({"HOSTNAME": "host", "ISO_DIR": str(tmp_path / f"out{n}")}, **values))
        log = rescue.Log()
        ctx = rescue.Context(argparse.Namespace(), config, log, rescue.Runner(log))
        result = rescue.make_rescue_media(ctx, m, selftest=False)
        images.append(gzip.decompress(result.files[1].read_bytes()))
    assert images[0] == images[1]


def bzimage(release):
    """The start of an x86 bzImage as the boot protocol lays it out: the setup header's magic
    and its pointer (less 0x200) to the version string."""
    image = bytearray(0x4000)
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x20E, 0x3000 - 0x200)
    text = f"{release} (debian-kernel@lists.debian.org) #1 SMP PREEMPT_DYNAMIC Debian 6.1.176-1\0".encode()
    image[0x3000:0x3000 + len(text)] = text
    return bytes(image)


def test_bzimage_release_reads_the_setup_header():
    assert rescue.bzimage_release(bzimage("6.1.0-50-cloud-amd64")) == "6.1.0-50-cloud-amd64"
    assert rescue.bzimage_release(b"\x7fkernel image") == ""
    assert rescue.bzimage_release(bytes(0x4000)) == ""
    assert rescue.bzimage_release(bzimage("6.1.0-50-cloud-amd64")[:0x3010]) == ""     # cut before its end


def test_kernel_file_of_another_release_brings_that_releases_modules(tmp_path):
    """KERNEL_FILE names an installed kernel that is not the running one: its modules and its
    config go with it (the running kernel's would not load in it); KERNEL_VERSION that
    contradicts the file is an error before anything is built."""
    other = "6.1.0-99-cloud-amd64"
    root = fake_root(tmp_path)
    write(root / "boot" / f"vmlinuz-{other}", bzimage(other))
    write(root / "boot" / f"config-{other}", "CONFIG_RD_XZ=y\n")
    shutil.copytree(root / "usr" / "lib" / "modules" / KVER, root / "usr" / "lib" / "modules" / other)
    shutil.rmtree(root / "usr" / "lib" / "modules" / KVER)

    def manifest(values):
        config = rescue.config_from_values(dict({"HOSTNAME": "host"}, **values))
        return rescue.build_manifest(RecordedProbe(root), config, recorded_layout("bios-lvm"), fake_pyz(tmp_path))

    m = manifest({"KERNEL_FILE": f"/boot/vmlinuz-{other}"})
    assert m.kernel_release == other and m.compression == "xz" and m.kernel == str(root / "boot" / f"vmlinuz-{other}")
    assert f"/usr/lib/modules/{other}/kernel/fs/xfs/xfs.ko" in m.files and "xfs" in m.modules
    assert not any("modules.dep" in w for w in m.warnings)
    assert manifest({"KERNEL_VERSION": other}).kernel == str(root / "boot" / f"vmlinuz-{other}")
    with pytest.raises(rescue.RescueError, match=f"is the kernel {other}, not KERNEL_VERSION={KVER}"):
        manifest({"KERNEL_FILE": f"/boot/vmlinuz-{other}", "KERNEL_VERSION": KVER})


def test_grub_installs_data_goes_in_without_the_prebuilt_images_it_never_uses(tmp_path):
    root = fake_root(tmp_path)
    signed = root / "usr" / "lib" / "grub" / "x86_64-efi-signed"
    for name in ("grubx64.efi.signed", "gcdx64.efi.signed", "grubnetx64.efi.signed", "grubnetx64-installer.efi.signed"):
        write(signed / name, b"MZ signed GRUB")
    write(root / "usr" / "lib" / "grub" / "x86_64-efi" / "monolithic" / "grubx64.efi", b"MZ GRUB")
    config = rescue.config_from_values({"HOSTNAME": "host"})
    m = rescue.build_manifest(RecordedProbe(root), config, recorded_layout("bios-lvm"), fake_pyz(tmp_path))
    grub = sorted(p for p in m.files if p.startswith("/usr/lib/grub/"))
    assert "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" in grub and "/usr/lib/grub/i386-pc/moddep.lst" in grub
    assert not any("gcd" in p or "grubnet" in p or "monolithic" in p for p in grub), grub


IMPORT_FORMS = """\
\"\"\"A module. Import rules: from the start, import nothing.\"\"\"
import os, sys as system
from json import (decoder,
                  encoder)
from email.mime \\
    import text
from . import sibling
from ..up import thing
if True: import tomllib
value = 1; import zlib
def later():
    try:
        import lzma
    except ImportError:
        from gzip import open as gzopen
"""


def test_imported_names_finds_every_form_of_import_statement():
    assert rescue.imported_names(IMPORT_FORMS, "pkg.sub") == {
        "os", "sys", "json", "json.decoder", "json.encoder", "email.mime", "email.mime.text",
        "pkg.sub", "pkg.sub.sibling", "pkg.up", "pkg.up.thing", "tomllib", "zlib", "lzma", "gzip", "gzip.open"}


def whole_module_imports(source, package):
    """The reference: every Import/ImportFrom node of the whole parsed module (ast.walk)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # old modules' invalid escapes
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    return set().union(*(rescue.import_node_names(node, package) for node in ast.walk(tree)))


def test_imported_names_misses_nothing_a_whole_parse_finds_in_the_standard_library_and_rescue():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(stdlib.rglob("*.py")) if "site-packages" not in p.parts] + [Path(rescue.__file__)]
    assert len(files) > 500
    for path in files:
        source = path.read_text(encoding="utf-8", errors="surrogateescape")
        missing = whole_module_imports(source, "pkg.sub") - rescue.imported_names(source, "pkg.sub")
        assert not missing, f"{path}: {sorted(missing)}"


def test_init_is_a_valid_shell_script_and_the_boot_menu_gets_the_command_line():
    subprocess.run(["sh", "-n", str(rescue.MEDIA_DATA / "init")], check=True)
    m = rescue.Manifest(KVER, "/boot/vmlinuz", "zstd", "console=ttyS0,115200n8", "host")
    menu = rescue.grub_config(m)
    assert "linux /boot/kernel console=ttyS0,115200n8 rescue.auto=recover,reboot" in menu
    assert "@" not in menu.replace("@VERSION@", "")


def test_mkrescue_manifest_of_this_machine_as_json(tmp_path, conf_dir):
    if not (rescue.HERE / "dist" / "rescue.pyz").is_file():
        pytest.skip("dist/rescue.pyz is not built (python3 build_zipapp.py)")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    with open(conf_dir / "local.conf", "a") as conf:
        conf.write(f'KERNEL_FILE="{kernel}"\nBACKUP_DUPLICITY_GPG_ENC_PASSPHRASE="{CANARY}"\n')
    r = run_rescue("-c", conf_dir, "mkrescue", "--manifest", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    paths = {f["path"]: f for f in manifest["files"]}
    assert manifest["kernel"] == str(kernel) and "python3" in manifest["tools"] and "sfdisk" in manifest["tools"]
    assert paths["/init"]["kind"] == "data" and paths[rescue.IMAGE_PYZ]["source"].endswith("rescue.pyz")
    assert CANARY not in r.stdout


def test_mkrescue_from_the_zipapp_installed_under_another_name_carries_that_zipapp(tmp_path, conf_dir):
    """The one file is often installed as /usr/local/sbin/rescue: mkrescue refused to find itself
    there ("no rescue.pyz to put into the rescue system"), found by the ISO drill."""
    built = rescue.HERE / "dist" / "rescue.pyz"
    if not built.is_file():
        pytest.skip("dist/rescue.pyz is not built (python3 build_zipapp.py)")
    installed = tmp_path / "sbin" / "rescue"
    installed.parent.mkdir()
    shutil.copyfile(built, installed)
    installed.chmod(0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    with open(conf_dir / "local.conf", "a") as conf:
        conf.write(f'KERNEL_FILE="{kernel}"\n')
    r = subprocess.run([sys.executable, str(installed), "-c", str(conf_dir), "mkrescue", "--manifest", "--json"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, HOME=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    files = {f["path"]: f for f in json.loads(r.stdout)["files"]}
    assert files[rescue.IMAGE_PYZ]["source"] == str(installed)


def test_output_url_over_ssh_gets_the_media(tmp_path, sshd_server):
    remote = tmp_path / "remote" / "media"
    values = {"OUTPUT": "RAMDISK", "MODULES": ["loaded_modules"], "FIRMWARE_FILES": ["no"],
              "ISO_DIR": str(tmp_path / "out"), "OUTPUT_URL": sshd_server.url(str(remote)),
              "BACKUP_DUPLICITY_SSH_OPTIONS": sshd_server.ssh_options}
    m, _ = manifest_for(tmp_path, values)
    m.modules = []
    config = rescue.config_from_values(dict({"HOSTNAME": "host"}, **values))
    log = rescue.Log()
    ctx = rescue.Context(argparse.Namespace(), config, log, rescue.Runner(log))
    result = rescue.make_rescue_media(ctx, m, selftest=False)
    for path in result.files:
        assert (remote / path.name).read_bytes() == path.read_bytes()


def test_the_layout_names_the_tools_recover_needs():
    config = rescue.config_from_values({"BACKUP_DUPLICITY_URL": "rsync://backup@server//srv/backup"})
    need = rescue.layout_tools(recorded_layout("raid1-luks"), config)
    assert {"mdadm", "cryptsetup", "lvm", "mke2fs", "mkswap", "ssh", "rsync", "python3", "gpg"} <= {a[0] for a in need}
    assert ["grub-install", "grub2-install"] in need
    assert "mkfs.xfs" not in {a[0] for a in need}
    assert "mkfs.xfs" in {a[0] for a in rescue.layout_tools(recorded_layout("bios-lvm"), rescue.config_from_values({}))}


def test_the_network_as_the_host_had_it_for_init():
    layout = recorded_layout("bios-lvm")
    layout.network = rescue.Network([rescue.Interface("ens3", "52:54:00:12:34:56", ["10.0.2.15/24"])],
                                    "10.0.2.2", ["10.0.2.3"])
    text = rescue.network_config(layout, rescue.config_from_values({"USE_STATIC_NETWORKING": "yes"}))
    assert text == ("STATIC=yes\nNIC0='52:54:00:12:34:56 ens3 10.0.2.15/24'\nGATEWAY=10.0.2.2\n"
                    "NAMESERVERS=10.0.2.3\n")
    script = f"{text}\nn=0\nwhile eval \"line=\\${{NIC$n-}}\"; [ -n \"$line\" ]; do set -- $line; echo \"$1|$2|$3\"; n=$((n + 1)); done"
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout == "52:54:00:12:34:56|ens3|10.0.2.15/24\n"


def test_a_rear_output_rescue_does_not_make_loads_and_only_mkrescue_refuses_it(conf_dir):
    (conf_dir / "local.conf").write_text("OUTPUT=USB\nBACKUP=DUPLICITY\n")
    proc = run_rescue("-c", conf_dir, "dump", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["OUTPUT"] == "USB", proc.stderr
    proc = run_rescue("-c", conf_dir, "mkrescue")
    assert proc.returncode != 0 and "rescue: error: OUTPUT=USB: rescue makes OUTPUT=ISO" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- how the ISO boots: the host's GRUB, or its signed shim chain ------------------------------------

def pe_image(certificate_size, pe32_plus=True):
    """The headers of a PE/COFF image (what an EFI binary starts with), its certificate table
    (data directory 4) of the given size."""
    data = bytearray(1024)
    data[:2] = b"MZ"
    data[0x3C:0x40] = (0x80).to_bytes(4, "little")
    data[0x80:0x84] = b"PE\0\0"
    optional = 0x80 + 24
    data[optional:optional + 2] = (0x20B if pe32_plus else 0x10B).to_bytes(2, "little")
    directory = optional + (112 if pe32_plus else 96) + 4 * 8
    data[directory + 4:directory + 8] = certificate_size.to_bytes(4, "little")
    return bytes(data)


def test_a_pe_image_is_signed_when_its_certificate_table_is_not_empty():
    assert rescue.pe_signed(pe_image(0x5A8)) is True
    assert rescue.pe_signed(pe_image(0)) is False
    assert rescue.pe_signed(pe_image(0x5A8, pe32_plus=False)) is True
    assert rescue.pe_signed(b"\x7fELF" + bytes(100)) is None        # not a PE image at all
    assert rescue.pe_signed(b"MZ" + bytes(10)) is None              # cut short


def efi_probe(tmp_path, files):
    root = tmp_path / "host"
    for path, data in files.items():
        write(root / path.lstrip("/"), data)
    return rescue.MediaProbe(None, str(root), KVER), root


GRUB_MODULES = {"/usr/lib/grub/i386-pc/moddep.lst": "normal: terminal\n",
                "/usr/lib/grub/x86_64-efi/moddep.lst": "normal: terminal\n"}
DEBIAN_SHIM = {"/usr/lib/shim/shimx64.efi.signed": pe_image(8),
               "/usr/lib/shim/mmx64.efi.signed": pe_image(8),
               "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed": pe_image(8) + b"\0/EFI/debian\0",
               "/usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed": pe_image(8) + b"\0/EFI/debian\0/EFI/BOOT\0"}


def test_a_debian_host_with_shim_signed_boots_the_iso_through_its_signed_chain(tmp_path):
    probe, root = efi_probe(tmp_path, dict(GRUB_MODULES, **DEBIAN_SHIM))
    boot, warnings = rescue.iso_boot(probe, "", "debian")
    assert warnings == [] and boot.bootable
    assert boot.bios_modules == str(root / "usr/lib/grub/i386-pc")
    assert boot.shim == str(root / "usr/lib/shim/shimx64.efi.signed") and boot.efi_modules == ""
    # the CD GRUB, as Debian's own ISOs; its built-in prefix says where it reads grub.cfg
    assert boot.grub == str(root / "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed")
    assert (boot.grub_name, boot.vendor_dirs) == ("grubx64.efi", ("debian",))
    assert boot.mok_manager.endswith("mmx64.efi.signed")
    assert "Secure Boot" in boot.summary() and boot.summary().startswith("BIOS (GRUB)")


def test_a_rhel_host_takes_the_shim_from_its_esp_and_suse_from_usr_share_efi(tmp_path):
    rhel = {"/boot/efi/EFI/redhat/shimx64.efi": pe_image(8), "/boot/efi/EFI/redhat/grubx64.efi": pe_image(8),
            "/boot/efi/EFI/redhat/mmx64.efi": pe_image(8), "/usr/lib/grub/i386-pc/moddep.lst": "normal:\n"}
    probe, root = efi_probe(tmp_path / "rhel", rhel)
    boot, warnings = rescue.iso_boot(probe, "", "rhel")
    assert warnings == [] and boot.shim == str(root / "boot/efi/EFI/redhat/shimx64.efi")
    assert boot.grub.endswith("EFI/redhat/grubx64.efi") and boot.mok_manager.endswith("mmx64.efi")
    assert boot.vendor_dirs == ("redhat",)       # no prefix in the image: its own directory on the ESP
    suse = {"/usr/share/efi/x86_64/shim.efi": pe_image(8), "/usr/share/efi/x86_64/grub.efi": pe_image(8),
            "/usr/share/efi/x86_64/MokManager.efi": pe_image(8)}
    probe, root = efi_probe(tmp_path / "suse", suse)
    boot, warnings = rescue.iso_boot(probe, "", "suse")
    assert boot.grub_name == "grub.efi" and boot.mok_manager.endswith("MokManager.efi")
    assert boot.bios_modules == "" and boot.bootable          # UEFI only: said so
    assert boot.vendor_dirs == ("opensuse", "sle_hpc", "sles")
    assert [w for w in warnings if "BIOS" in w] and "no BIOS" in boot.summary()


def test_secure_boot_bootloader_names_a_shim_or_turns_the_chain_off(tmp_path):
    own = {"/opt/sb/shimx64.efi": pe_image(8), "/opt/sb/grubx64.efi": pe_image(8), "/opt/lonely/shimx64.efi": pe_image(8)}
    probe, root = efi_probe(tmp_path, dict(GRUB_MODULES, **DEBIAN_SHIM, **own))
    boot, _ = rescue.iso_boot(probe, "/opt/sb/shimx64.efi", "debian")
    assert boot.shim == str(root / "opt/sb/shimx64.efi") and boot.grub == str(root / "opt/sb/grubx64.efi")
    boot, warnings = rescue.iso_boot(probe, "no", "debian")            # GRUB made here, unsigned
    assert boot.shim == "" and boot.efi_modules == str(root / "usr/lib/grub/x86_64-efi") and warnings == []
    assert "unsigned" in boot.summary()
    with pytest.raises(rescue.RescueError, match="no such file"):
        rescue.iso_boot(probe, "/opt/sb/missing.efi", "debian")
    with pytest.raises(rescue.RescueError, match="no signed GRUB"):
        rescue.iso_boot(probe, "/opt/lonely/shimx64.efi", "debian")


def test_a_host_without_grub_cannot_make_a_bootable_iso(tmp_path):
    probe, _ = efi_probe(tmp_path, {"/etc/os-release": "ID=debian\n"})
    boot, warnings = rescue.iso_boot(probe, "", "debian")
    assert not boot.bootable and len(warnings) == 2
    assert "grub-pc-bin" in warnings[0] and "grub-efi-amd64-bin" in warnings[1]


def test_the_manifest_warns_when_the_kernel_is_unsigned_but_the_iso_boots_through_shim(tmp_path):
    m, root = manifest_for(tmp_path, {"OUTPUT": "ISO"})
    (tmp_path / "rescue.pyz").unlink()
    assert m.boot and m.boot.shim == "" and "ISO boot: BIOS (GRUB), UEFI (GRUB, unsigned" in rescue.manifest_text(m)
    for path, data in DEBIAN_SHIM.items():
        write(root / path.lstrip("/"), data)
    (root / "boot" / f"vmlinuz-{KVER}").write_bytes(pe_image(0))
    config = rescue.config_from_values({"HOSTNAME": "host", "OUTPUT": "ISO"})
    m = rescue.build_manifest(RecordedProbe(root), config, recorded_layout("bios-lvm"), fake_pyz(tmp_path))
    assert m.boot.shim and any("is not signed" in w for w in m.warnings)


HOST_ISO_TOOLS = ("grub-mkimage", "xorriso", "mformat", "mcopy", "mdir")


def host_grub(platform):
    return Path("/usr/lib/grub") / rescue.GRUB_PLATFORMS[platform] / "moddep.lst"


@pytest.fixture
def host_iso_tools():
    missing = [t for t in HOST_ISO_TOOLS if not shutil.which(t)]
    missing += [str(host_grub(p)) for p in ("bios", "efi") if not host_grub(p).is_file()]
    if missing:
        pytest.skip(f"not on this host: {', '.join(missing)} (.ci/run installs grub-pc-bin, grub-efi-amd64-bin, "
                    "xorriso, mtools)")


def iso_of(tmp_path, boot):
    m = rescue.Manifest(KVER, "/boot/vmlinuz", "gzip", "console=ttyS0,115200n8", "host")
    m.boot = boot
    tmp_path.mkdir(parents=True, exist_ok=True)
    kernel, initrd = tmp_path / "kernel", tmp_path / "initrd"
    kernel.write_bytes(b"kernel " * 1000)
    initrd.write_bytes(b"initrd " * 1000)
    log = rescue.Log()
    ctx = rescue.Context(argparse.Namespace(), rescue.config_from_values({"HOSTNAME": "host"}), log, rescue.Runner(log))
    work, iso = tmp_path / "work", tmp_path / "rescue.iso"
    work.mkdir()
    rescue.make_iso(ctx, m, kernel, initrd, iso, work)
    return iso


def el_torito(iso):
    return subprocess.run(["xorriso", "-indev", str(iso), "-report_el_torito", "plain"],
                          capture_output=True, text=True, check=True).stdout


def test_the_iso_made_with_the_hosts_grub_boots_by_bios_and_uefi_and_is_the_same_every_build(tmp_path, host_iso_tools):
    probe = rescue.MediaProbe(None, "/", KVER)
    boot, warnings = rescue.iso_boot(probe, "no", "debian")
    assert warnings == [] and boot.bios_modules and boot.efi_modules
    first, second = iso_of(tmp_path / "1", boot), iso_of(tmp_path / "2", boot)
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    report = el_torito(first)
    assert re.search(r"El Torito boot img :\s+1\s+BIOS\s+y\s+none", report), report
    assert re.search(r"El Torito boot img :\s+2\s+UEFI\s+y\s+none", report), report
    assert "/boot/grub/bios.img" in report and "/boot/efi.img" in report
    # the UEFI image: GRUB made here with the search for the ISO's marker built in
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(first), "-extract", "/", str(out)],
                   check=True, capture_output=True)
    listing = subprocess.run(["mdir", "-i", str(out / "boot" / "efi.img"), "-b", "::/EFI/BOOT"],
                             capture_output=True, text=True, check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
    assert listing.split() == ["::/EFI/BOOT/BOOTX64.EFI"]
    loader = subprocess.run(["mtype", "-i", str(out / "boot" / "efi.img"), "::/EFI/BOOT/BOOTX64.EFI"],
                            capture_output=True, check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
    assert rescue.pe_signed(loader) is False
    marker = [p.name for p in (out / ".disk").iterdir() if p.name.startswith("rescue-")]
    assert len(marker) == 1 and f"/.disk/{marker[0]}".encode() in loader
    assert "linux /boot/kernel console=ttyS0,115200n8" in (out / "boot" / "grub" / "grub.cfg").read_text()
    # hybrid: an MBR that boots GRUB when the ISO is written to a USB stick
    assert first.read_bytes()[510:512] == b"\x55\xaa"


def test_the_shim_iso_carries_the_signed_chain_under_the_names_shim_loads(tmp_path, host_iso_tools):
    """A shim and GRUB signed here with sbsign (a real Authenticode signature) stand for the
    distribution's."""
    for tool in ("sbsign", "openssl"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not on this host (.ci/run installs sbsigntool)")
    key, cert = tmp_path / "db.key", tmp_path / "db.crt"
    subprocess.run(["openssl", "req", "-new", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=rescue test/",
                    "-days", "1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    root = tmp_path / "host"
    signed_dir = root / "usr" / "lib" / "grub" / "x86_64-efi-signed"
    shim_dir = root / "usr" / "lib" / "shim"
    signed_dir.mkdir(parents=True)
    shim_dir.mkdir(parents=True)
    for name, target in (("gcdx64.efi", signed_dir / "gcdx64.efi.signed"), ("shimx64.efi", shim_dir / "shimx64.efi.signed"),
                         ("mmx64.efi", shim_dir / "mmx64.efi.signed")):
        unsigned = tmp_path / name
        subprocess.run(["grub-mkimage", "-O", "x86_64-efi", "-p", "/EFI/debian", "-o", str(unsigned), "normal"],
                       check=True, capture_output=True)
        assert rescue.pe_signed(unsigned.read_bytes()[:4096]) is False
        subprocess.run(["sbsign", "--key", str(key), "--cert", str(cert), "--output", str(target), str(unsigned)],
                       check=True, capture_output=True)
        assert rescue.pe_signed(target.read_bytes()[:4096]) is True
    shutil.copytree("/usr/lib/grub/i386-pc", root / "usr" / "lib" / "grub" / "i386-pc")
    boot, warnings = rescue.iso_boot(rescue.MediaProbe(None, str(root), KVER), "", "debian")
    assert warnings == [] and boot.vendor_dirs == ("debian",)
    iso = iso_of(tmp_path / "iso", boot)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/boot/efi.img", str(out / "efi.img")],
                   check=True, capture_output=True)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    listing = subprocess.run(["mdir", "-i", str(out / "efi.img"), "-/", "-b", "::/"], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
    assert {"::/EFI/BOOT/BOOTX64.EFI", "::/EFI/BOOT/grubx64.efi", "::/EFI/BOOT/mmx64.efi", "::/EFI/BOOT/grub.cfg",
            "::/EFI/debian/grub.cfg"} <= set(listing), listing
    shim = subprocess.run(["mtype", "-i", str(out / "efi.img"), "::/EFI/BOOT/BOOTX64.EFI"], capture_output=True,
                          check=True, env=env).stdout
    assert shim == (shim_dir / "shimx64.efi.signed").read_bytes()
    stub = subprocess.run(["mtype", "-i", str(out / "efi.img"), "::/EFI/debian/grub.cfg"], capture_output=True,
                          text=True, check=True, env=env).stdout
    assert stub.startswith("search --no-floppy --file --set=root /.disk/rescue-") and "configfile $prefix/grub.cfg" in stub
