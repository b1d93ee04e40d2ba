"""rescue mkrescue inside a real guest, and the rescue media it makes booted in fresh machines.

    flock /tmp/rescue-vm.lock python3 -m pytest vm-tests/test_media_vm.py -m vm -v

The bios-lvm guest runs `rescue.pyz mkrescue` with a configuration that holds a canary GPG
passphrase; the ISO and the initramfs are copied out, the initramfs is scanned for the canary,
and the ISO boots with SeaBIOS and with OVMF: the banner appears on the serial console with the
network up, and `rescue --version` answers at the shell and over ssh; with SeaBIOS, `rescue layoutonly
--plan` plans the recreation onto a blank disk and `rescue recover --plan` the whole recovery.
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import rescue  # noqa: E402

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


def boot_rescue_iso(make_machine, iso: Path, firmware: str, record_property, plan: bool = False) -> None:
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
