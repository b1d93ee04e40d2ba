"""rescue mkrescue inside a real guest, and the rescue media it makes booted in fresh machines.

    flock /tmp/rescue-vm.lock python3 -m pytest vm-tests/test_media_vm.py -m vm -v

The bios-lvm guest runs `rescue.pyz mkrescue` with a configuration that holds a canary GPG
passphrase; the ISO and the initramfs are copied out, the initramfs is scanned for the canary,
and the ISO boots with SeaBIOS and with OVMF: the banner appears on the serial console with the
network up, and `rescue --version` answers at the shell and over ssh; with SeaBIOS, `rescue layoutonly
--plan` plans the recreation onto a blank disk and `rescue recover --plan` the whole recovery.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import rescue  # noqa: E402
from vmlib import cache, create_disk_image, drill, image, procs  # noqa: E402

CANARY = "canary-Vm-Passphrase-51c0ffee-never-in-media"
OUT = "/var/lib/rescue/output"


def build_pyz(tmp_path: Path) -> Path:
    pyz = tmp_path / "rescue.pyz"
    subprocess.run([sys.executable, str(REPO / "build_zipapp.py"), "-o", str(pyz)], check=True,
                   capture_output=True, timeout=600)
    return pyz


def unpacked(initrd: bytes) -> bytes:
    data = subprocess.run(["zstd", "-d", "-c"], input=initrd, capture_output=True, check=True).stdout \
        if initrd[:4] == b"\x28\xb5\x2f\xfd" else initrd
    return b"\0".join(e.name.encode() + b"\0" + e.data for e in rescue.read_cpio(data))


def boot_rescue_iso(make_machine, iso: Path, firmware: str, record_property, plan: bool = False) -> str:
    """Boot the ISO to the rescue prompt and use it; its console text."""
    machine = make_machine(None, name="rescue-" + firmware, firmware=firmware, network=True)
    machine.add_cdrom(iso)
    if plan:
        machine.add_blank_disk("target", "4G")      # bare metal of the same size as bios-lvm's disk
    started = time.monotonic()
    machine.start()
    banner = machine.wait_console(r"RESCUE SYSTEM of (\S+) \(rescue ([0-9.]+)", timeout=300)
    assert banner.group(1) == "bios-lvm" and banner.group(2) == rescue.__version__
    network = machine.wait_console(r"network: ([^;]*);", timeout=30)
    assert "10.0.2.15" in network.group(1)
    machine.wait_console("RESCUE-READY", timeout=60)
    record_property(f"{firmware}_boot_to_prompt_s", round(time.monotonic() - started, 1))
    with open(iso.parent / "timings.txt", "a") as timings:
        timings.write(f"{firmware} boot to prompt: {time.monotonic() - started:.1f} s\n")
    time.sleep(2)
    machine.send_console("echo RV-$(rescue --version)-END\n")
    machine.wait_console(r"RV-rescue [0-9.]+-END", timeout=180)
    machine.send_console("echo LS-$(ls /dev/vda >/dev/null 2>&1; ip -o link | grep -c ether)-END\n")
    machine.wait_console(r"LS-[1-9]-END", timeout=60)
    # sshd of the rescue system, with the guest's root authorized_keys
    machine.wait_ssh(timeout=120)
    r = machine.run(["rescue", "--version"], timeout=120, check=True)
    assert r.stdout.strip() == f"rescue {rescue.__version__}"
    if plan:
        r = machine.run(["rescue", "layoutonly", "--plan"], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "sfdisk" in r.stdout and "vg0" in r.stdout
        # the whole recover, planned from the image's own layout (the backup is not needed to plan)
        r = machine.run(["rescue", "recover", "--plan"], timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "the rescue system's copy" in r.stdout + r.stderr and "vg0" in r.stdout
        assert "restore the backup at file:///var/backup" in r.stdout and "finalize in the restored system" in r.stdout
    machine.kill()
    return machine.console_text()


@pytest.mark.vm
@pytest.mark.slow
def test_mkrescue_in_the_guest_and_its_iso_boots(make_machine, tmp_path, record_property):
    pyz = build_pyz(tmp_path)
    guest = make_machine("bios-lvm")
    guest.start()
    assert guest.wait_booted() == "running"
    guest.put(pyz, "/root/rescue.pyz")
    guest.run("mkdir -p /etc/rescue && printf '%s\\n' "
              f"\"BACKUP_DUPLICITY_URL=file:///var/backup\" \"BACKUP_DUPLICITY_GPG_ENC_PASSPHRASE='{CANARY}'\" "
              "> /etc/rescue/local.conf", check=True)
    started = time.monotonic()
    r = guest.run(["python3", "/root/rescue.pyz", "mkrescue"], timeout=1200)
    seconds = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Self-test passed" in r.stdout
    record_property("mkrescue_s", round(seconds, 1))
    for name in ("rescue-bios-lvm.iso", "rescue-bios-lvm-initrd.cgz", "rescue-bios-lvm-kernel"):
        guest.get(f"{OUT}/{name}", tmp_path / name)
    manifest = guest.run(["python3", "/root/rescue.pyz", "mkrescue", "--manifest"], timeout=600, check=True).stdout
    (tmp_path / "manifest.txt").write_text(manifest)
    guest.shutdown()

    iso, initrd = tmp_path / "rescue-bios-lvm.iso", tmp_path / "rescue-bios-lvm-initrd.cgz"
    record_property("iso_bytes", iso.stat().st_size)
    record_property("initrd_bytes", initrd.stat().st_size)
    (tmp_path / "timings.txt").write_text(f"mkrescue in the guest: {seconds:.1f} s; ISO {iso.stat().st_size} B; "
                                          f"initrd {initrd.stat().st_size} B\n")
    image = unpacked(initrd.read_bytes())
    assert CANARY.encode() not in image and CANARY.encode() not in iso.read_bytes()
    assert b"etc/rescue/local.conf" in image and b"usr/share/rescue/rescue.pyz" in image
    assert "module xfs" in manifest and "module dm_mod" in manifest and "module virtio_blk" in manifest

    boot_rescue_iso(make_machine, iso, "bios", record_property, plan=True)
    boot_rescue_iso(make_machine, iso, "uefi", record_property)


# Debian's Secure Boot chain (shim signed by Microsoft's UEFI CA, GRUB by Debian): what a host
# with shim has. Not in the guest image: installing grub-efi-amd64-signed would replace grub-pc.
SIGNED_BOOT_PACKAGES = ("shim-signed", "shim-helpers-amd64-signed", "grub-efi-amd64-signed")


def signed_boot_debs() -> List[Path]:
    """Debian's signed shim and GRUB packages from the host's mirror (apt-get download), cached."""
    def download(out: Path) -> None:
        procs.run(["apt-get", "download"] + list(SIGNED_BOOT_PACKAGES), timeout=600, cwd=out,
                  log_file=out / "download.log")
    name = cache.entry_name("secureboot", cache.digest(image.SUITE, SIGNED_BOOT_PACKAGES))
    debs = sorted(cache.build_once(cache.cache_dir(), name, download).glob("*.deb"))
    assert len(debs) == len(SIGNED_BOOT_PACKAGES), debs
    return debs


def mtype(fat_image: Path, path: str) -> bytes:
    return subprocess.run(["mtype", "-i", str(fat_image), "::" + path], capture_output=True, check=True,
                          env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout


@pytest.mark.vm
@pytest.mark.slow
def test_on_a_host_with_debians_signed_shim_the_iso_boots_with_secure_boot_on(make_machine, tmp_path,
                                                                             record_property):
    """Debian's shim-signed and grub-efi-amd64-signed unpacked into the guest (dpkg-deb -x): its
    mkrescue puts that chain into the ISO unchanged, and the ISO boots to the rescue prompt under
    OVMF with Microsoft's keys and Secure Boot on: shim checks GRUB, GRUB (through shim) checks
    the guest's signed kernel. The same kernel and initramfs behind GRUB made here (unsigned) are
    refused by that firmware: the check is real."""
    debs = signed_boot_debs()
    pyz = build_pyz(tmp_path)
    guest = make_machine("bios-lvm")
    guest.start()
    assert guest.wait_booted() == "running"
    guest.put(pyz, "/root/rescue.pyz")
    for deb in debs:
        guest.put(deb, "/root/" + deb.name)
        guest.run(["dpkg-deb", "-x", "/root/" + deb.name, "/"], check=True)
    started = time.monotonic()
    r = guest.run(["python3", "/root/rescue.pyz", "mkrescue"], timeout=1200)
    seconds = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is not signed" not in r.stdout + r.stderr
    manifest = guest.run(["python3", "/root/rescue.pyz", "mkrescue", "--manifest"], timeout=600, check=True).stdout
    assert "UEFI with Secure Boot (shim /usr/lib/shim/shimx64.efi.signed, GRUB /usr/lib/grub/x86_64-efi-signed/" \
        in manifest, manifest
    names = ("rescue-bios-lvm.iso", "rescue-bios-lvm-initrd.cgz", "rescue-bios-lvm-kernel")
    for name in names:
        guest.get(f"{OUT}/{name}", tmp_path / name)
    guest.get("/usr/lib/shim/shimx64.efi.signed", tmp_path / "shimx64.efi.signed")
    guest.shutdown()
    iso, initrd, kernel = (tmp_path / name for name in names)
    (tmp_path / "timings.txt").write_text(f"mkrescue in the guest (shim chain): {seconds:.1f} s; "
                                          f"ISO {iso.stat().st_size} B\n")
    subprocess.run(["xorriso", "-osirrox", "on", "-indev", str(iso), "-extract", "/boot/efi.img",
                    str(tmp_path / "efi.img")], check=True, capture_output=True)
    assert mtype(tmp_path / "efi.img", "/EFI/BOOT/BOOTX64.EFI") == (tmp_path / "shimx64.efi.signed").read_bytes()
    assert rescue.pe_signed(mtype(tmp_path / "efi.img", "/EFI/BOOT/grubx64.efi")[:4096]) is True
    assert rescue.pe_signed(kernel.read_bytes()[:4096]) is True

    console = boot_rescue_iso(make_machine, iso, "uefi-secboot", record_property)
    assert re.search(r"Secure Boot is enabled|Secure boot enabled", console), console[-3000:]

    # the same kernel and initramfs, UEFI by GRUB made here (the host's x86_64-efi modules): refused
    boot, _ = rescue.iso_boot(rescue.MediaProbe(None, "/", ""), "no", "debian")
    if not boot.efi_modules:
        pytest.skip("the host has no GRUB x86_64-efi modules for the unsigned ISO (grub-efi-amd64-bin)")
    work = tmp_path / "unsigned"
    work.mkdir()
    m = rescue.Manifest("", "/boot/vmlinuz", "zstd", "console=ttyS0,115200n8", "bios-lvm")
    m.boot = rescue.IsoBoot(efi_modules=boot.efi_modules)
    log = rescue.Log()
    ctx = rescue.Context(argparse.Namespace(), rescue.config_from_values({"HOSTNAME": "bios-lvm"}), log,
                         rescue.Runner(log))
    unsigned = work / "unsigned.iso"
    rescue.make_iso(ctx, m, kernel, initrd, unsigned, work)
    refused = make_machine(None, name="unsigned-secboot", firmware="uefi-secboot", network=False)
    refused.add_cdrom(unsigned)
    refused.start()
    refused.wait_console(r"Access Denied|Security Violation", timeout=300)
    time.sleep(5)
    refused.kill()
    assert "RESCUE SYSTEM" not in refused.console_text() and "GRUB" not in refused.console_text()


def mkrescue_for_the_drill(make_machine, backup, rescue_pyz, tmp_path) -> Path:
    """The rescue ISO of the drills' source machine, made by `rescue mkrescue` in it with the
    drill backup's disk mounted where the backup was (so the layout records that disk), for an
    unattended recover: the passphrase goes in (RESCUE_GPG_PASSPHRASE, by name) and the boot
    menu starts `rescue.auto=recover,reboot`."""
    guest = make_machine("bios-lvm", name="source")
    guest.add_overlay(backup.disk, drill.BACKUP_DISK)
    guest.start()
    assert guest.wait_booted() == "running"
    conf = tmp_path / "iso.conf"
    conf.write_text(backup.conf.read_text() + "RESCUE_GPG_PASSPHRASE=yes\n"
                    "KERNEL_CMDLINE='rescue.auto=recover,reboot'\n")
    drill.mount_backup_disk(guest)
    drill.install_rescue(guest, rescue_pyz, conf)
    r = guest.run([drill.RESCUE, "mkrescue"], timeout=1200)
    (tmp_path / "mkrescue.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESCUE_GPG_PASSPHRASE=yes: the duplicity passphrase goes into the rescue media" in r.stderr
    iso = tmp_path / "rescue-bios-lvm.iso"
    guest.get(f"{OUT}/{iso.name}", iso)
    guest.shutdown()
    return iso


@pytest.mark.vm
@pytest.mark.slow
def test_a_whole_recover_from_the_iso_with_rescue_auto_onto_a_blank_disk_then_the_machine_boots(
        make_machine, golden, drill_backup, rescue_pyz, tmp_path):
    """The drills' backup and an ISO of the same machine: the ISO boots a machine with a blank
    disk and the backup's disk, its boot menu runs `rescue recover` by itself (it mounts the
    backup's disk by the UUID its layout recorded), reboots when done, and the recovered disk
    boots to multi-user with every file of the backup (the drills' comparison)."""
    g, backup = golden("bios-lvm"), drill_backup("bios-lvm")
    iso = mkrescue_for_the_drill(make_machine, backup, rescue_pyz, tmp_path)
    m = make_machine(None, name="rescue-auto", firmware="bios", memory_mb=2048, lifetime=2700)
    m.add_cdrom(iso)
    disks = []
    for d in g.spec.disks:
        path = create_disk_image(tmp_path / (d.name + ".qcow2"), "%dM" % d.size_mib)
        disks.append(m.add_disk(path, d.name, bus=d.bus))
    m.add_overlay(backup.disk, drill.BACKUP_DISK)
    started = time.monotonic()
    m.start()
    done = m.wait_console(r"RESCUE-AUTO-RECOVER-DONE rc=(\d+)", timeout=2400)
    (tmp_path / "rescue-console.log").write_text(m.console_text())
    assert done.group(1) == "0", m.console_tail(80)
    text = m.console_text()
    assert "read-only at %s" % drill.BACKUP_MOUNT in text and drill.PASSPHRASE not in text
    m.wait_exit(180)          # the reboot (QEMU runs with -no-reboot: it ends)
    assert "rescue: rebooting" in m.console_text()

    r = make_machine(None, name="recovered", firmware="bios")
    for index, d in enumerate(disks):
        r.add_disk(d.path, d.name, bus=d.bus, bootindex=index if g.spec.disks[index].boot else None)
    r.start()
    state = r.wait_booted()
    rto = time.monotonic() - started
    with open(tmp_path / "timings.txt", "a") as timings:
        timings.write(f"ISO boot to recovered system booted (RTO): {rto:.1f} s\n")
    print("\n  RTO from the rescue ISO (rescue.auto=recover,reboot) to the recovered system booted: %.1f s" % rto)
    drill.put_drill_scripts(r)
    recovered = drill.take_manifest(r, backup.info["roots"], tmp_path / "recovered-manifest.json")
    identity = drill.storage_identity(r)
    checklayout = r.run(drill.RESCUE + " checklayout", timeout=300)
    r.shutdown()
    assert state == "running", state
    differences = drill.compare_manifests(backup.manifest, recovered)
    assert not differences, "%d differences, first ones:\n%s" % (len(differences), "\n".join(differences[:40]))
    assert drill.identity_keys(identity) == drill.identity_keys(backup.info["identity"])
    assert checklayout.returncode == 0, checklayout.stdout + checklayout.stderr
