"""Smoke tests of the harness: real guests boot, run commands, exchange files.

The quick ones (not marked slow) are what CI runs on every change:
    python3 -m pytest vm-tests -m "vm and not slow"
"""

import json
from typing import Dict, List

import pytest

from vmlib import install

GiB = 1024 ** 3


def flatten(devices: List[Dict], parents: tuple = ()) -> List[Dict]:
    """lsblk -J tree -> flat list; each entry gets 'chain': the types of its ancestors.

    A device on top of several others (an md array) appears under each of them: keep one.
    """
    flat: Dict[str, Dict] = {}
    for dev in devices:
        flat.setdefault(dev["name"], dict(dev, chain=parents))
        for child in flatten(dev.get("children", []), parents + (dev["type"],)):
            flat.setdefault(child["name"], child)
    return list(flat.values())


def lsblk(machine) -> List[Dict]:
    r = machine.run("lsblk -J -b -o NAME,SIZE,TYPE,FSTYPE,UUID,MOUNTPOINTS,SERIAL", check=True)
    return flatten(json.loads(r.stdout)["blockdevices"])


def mounted_at(devices: List[Dict], mountpoint: str) -> Dict:
    found = [d for d in devices if mountpoint in (d.get("mountpoints") or [])]
    assert len(found) == 1, "expected one device mounted at %s, got %s" % (mountpoint, found)
    return found[0]


def assert_matches_spec(devices: List[Dict], spec, uuids: Dict[str, str]) -> None:
    """Every filesystem of the spec is there, with its type and UUID, mounted where it should."""
    for fs in spec.filesystems:
        if fs.mountpoint:
            dev = mounted_at(devices, fs.mountpoint)
        else:
            dev = next(d for d in devices if (d.get("mountpoints") or [None])[0] == "[SWAP]")
        assert dev["fstype"] == fs.type
        assert dev["uuid"].lower() == uuids["fs:" + fs.device].lower()


SMOKE = [
    # spec, an extra blank disk to attach (one per bus type across the two guests)
    ("bios-lvm", dict(name="spare-scsi", size="1G", bus="scsi", fmt="raw")),
    ("uefi-gpt", dict(name="spare-nvme", size="2G", bus="nvme", fmt="qcow2")),
]


@pytest.mark.vm
@pytest.mark.parametrize("spec_name,extra", SMOKE, ids=[s for s, _ in SMOKE])
def test_boot_run_rescue_and_lsblk(spec_name, extra, make_machine, golden, rescue_py, tmp_path,
                                   record_property):
    machine = make_machine(spec_name)
    spare = machine.add_blank_disk(**extra)
    machine.start()
    assert machine.wait_booted() == "running", machine.run("systemctl --failed").stdout

    machine.put(rescue_py, "/root/rescue.py")
    version = machine.run(["python3", "/root/rescue.py", "--version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("rescue "), version.stdout

    devices = lsblk(machine)
    info = golden(spec_name).info
    assert_matches_spec(devices, golden(spec_name).spec, info["uuids"])
    disk = next(d for d in devices if d["serial"] == spare.name)
    assert int(disk["size"]) == int(extra["size"][:-1]) * GiB
    assert machine.run(["readlink", "-f", spare.guest_path]).stdout.strip() == "/dev/" + disk["name"]

    firmware = machine.run("test -d /sys/firmware/efi && efibootmgr || echo bios").stdout
    if golden(spec_name).spec.firmware == "uefi":
        assert "debian" in firmware
    else:
        assert firmware.strip() == "bios"

    machine.get("/etc/fstab", tmp_path / "fstab")
    spec = golden(spec_name).spec
    assert (tmp_path / "fstab").read_text() == install.fstab(spec, install.stable_uuids(spec))

    failing = machine.run("echo to-stdout; echo to-stderr >&2; exit 7")
    assert (failing.returncode, failing.stdout, failing.stderr) == (7, "to-stdout\n", "to-stderr\n")

    for key, value in dict(machine.timings, round_trip_s=version.seconds).items():
        record_property(key, value)
    print("%s timings: %s, rescue --version round trip %.2f s" % (spec_name, machine.timings, version.seconds))


@pytest.mark.vm
@pytest.mark.slow
def test_raid1_luks_boots_unattended(make_machine, golden):
    """Two disks, md RAID1 -> LUKS2 (keyfile in the initramfs) -> LVM, BIOS boot from disk0."""
    machine = make_machine("raid1-luks")
    machine.start()
    assert machine.wait_booted(timeout=480) == "running", machine.run("systemctl --failed").stdout

    devices = lsblk(machine)
    g = golden("raid1-luks")
    assert_matches_spec(devices, g.spec, g.info["uuids"])
    root = mounted_at(devices, "/")
    assert root["type"] == "lvm" and root["chain"][-2:] == ("raid1", "crypt")
    assert mounted_at(devices, "/boot")["type"] == "raid1"
    mdstat = machine.run("cat /proc/mdstat", check=True).stdout
    assert mdstat.count("[UU]") == 2, mdstat
    # keyslot 1 holds the spec's passphrase, for drills that must unlock by hand
    probe = machine.run("cryptsetup open --test-passphrase --key-file=- /dev/md1",
                        input=g.spec.luks[0].passphrase.encode())
    assert probe.returncode == 0, probe.stderr
    print("raid1-luks timings: %s" % machine.timings)
