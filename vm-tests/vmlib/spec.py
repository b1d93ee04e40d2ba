"""Layout specs: declarative descriptions of a guest's disks, loaded from vm-tests/specs/*.json.

This module is pure: it parses and validates a spec, assigns stable UUIDs, and renders the
files an installer writes (fstab, crypttab, mdadm.conf) and the shell job that the helper VM
runs to build the disks. Nothing here touches the host.

Spec format (every "device" reference names a partition, a raid, a luks or "vg/lv"):
    {"description": "...", "firmware": "bios" | "uefi", "hostname": "optional",
     "disks": [{"name": "disk0", "size": "4G", "label": "msdos" | "gpt", "boot": true,
                "bus": "virtio", "partitions": [{"name": "boot", "size": "512M",
                "type": "linux|swap|lvm|raid|esp|bios_grub", "flags": ["boot"]}, ...]}],
     "raids": [{"name": "md0", "level": 1, "devices": ["p1", "p2"]}],
     "luks": [{"name": "cryptroot", "device": "md1", "passphrase": "..."}],
     "vgs": [{"name": "vg0", "pvs": ["cryptroot"], "lvs": [{"name": "root", "size": "2G"}]}],
     "filesystems": [{"device": "vg0/root", "type": "ext4|xfs|vfat|btrfs|swap",
                      "mountpoint": "/", "label": "optional"}]}
A missing "size" means "the rest" (last partition of a disk, last LV of a VG).
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Serial numbers of virtio-blk and nvme devices are limited to 20 bytes.
_MAX_SERIAL = 20
PARTITION_TYPES = {
    "msdos": {"linux": "83", "swap": "82", "lvm": "8e", "raid": "fd", "esp": "ef"},
    "gpt": {"linux": "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
            "swap": "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
            "lvm": "E6D6D379-F507-44C2-A23C-238F2A3DF928",
            "raid": "A19D880F-05FC-4D3B-A006-743F0F84911E",
            "esp": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            "bios_grub": "21686148-6449-6E6F-744E-656564454649"},
}
FS_TYPES = ("ext4", "xfs", "vfat", "btrfs", "swap")
BUSES = ("virtio", "scsi", "nvme")


class SpecError(ValueError):
    pass


@dataclass
class Partition:
    name: str
    number: int
    type: str
    size_mib: Optional[int]
    flags: List[str]


@dataclass
class Disk:
    name: str
    size_mib: int
    label: str
    boot: bool
    bus: str
    partitions: List[Partition]


@dataclass
class Raid:
    name: str
    level: int
    devices: List[str]


@dataclass
class Luks:
    name: str
    device: str
    passphrase: str


@dataclass
class LogicalVolume:
    name: str
    size_mib: Optional[int]


@dataclass
class VolumeGroup:
    name: str
    pvs: List[str]
    lvs: List[LogicalVolume]


@dataclass
class Filesystem:
    device: str
    type: str
    mountpoint: Optional[str]
    label: Optional[str]


@dataclass
class Spec:
    name: str
    description: str
    firmware: str
    hostname: str
    disks: List[Disk]
    raids: List[Raid] = field(default_factory=list)
    luks: List[Luks] = field(default_factory=list)
    vgs: List[VolumeGroup] = field(default_factory=list)
    filesystems: List[Filesystem] = field(default_factory=list)

    @property
    def root(self) -> Filesystem:
        return next(f for f in self.filesystems if f.mountpoint == "/")

    def canonical(self) -> Dict:
        """The spec as plain data (what the golden cache key is computed from)."""
        return json.loads(json.dumps(self, default=lambda o: o.__dict__))


def available_specs() -> List[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def load_spec(name: str, spec_dir: Path = SPEC_DIR) -> Spec:
    path = spec_dir / (name + ".json")
    if not path.is_file():
        raise SpecError("no spec %r (known: %s)" % (name, ", ".join(available_specs())))
    return parse_spec(name, json.loads(path.read_text()))


def parse_size_mib(text: str) -> int:
    """'512M' / '4G' / '1T' (binary units) -> MiB."""
    m = re.fullmatch(r"(\d+)([MGT])", str(text).strip().upper())
    if not m:
        raise SpecError("bad size %r: use e.g. 512M or 4G" % text)
    return int(m.group(1)) * {"M": 1, "G": 1024, "T": 1024 * 1024}[m.group(2)]


def _size(item: Dict) -> Optional[int]:
    return parse_size_mib(item["size"]) if "size" in item else None


def parse_spec(name: str, data: Dict) -> Spec:
    try:
        spec = Spec(
            name=name,
            description=data.get("description", ""),
            firmware=data["firmware"],
            hostname=data.get("hostname", name),
            disks=[_parse_disk(d) for d in data["disks"]],
            raids=[Raid(r["name"], int(r["level"]), list(r["devices"])) for r in data.get("raids", [])],
            luks=[Luks(x["name"], x["device"], x.get("passphrase", "rescue-test"))
                  for x in data.get("luks", [])],
            vgs=[VolumeGroup(v["name"], list(v["pvs"]),
                             [LogicalVolume(lv["name"], _size(lv)) for lv in v["lvs"]])
                 for v in data.get("vgs", [])],
            filesystems=[Filesystem(f["device"], f["type"], f.get("mountpoint"), f.get("label"))
                         for f in data["filesystems"]],
        )
    except KeyError as e:
        raise SpecError("spec %s: missing key %s" % (name, e))
    validate(spec)
    return spec


def _parse_disk(d: Dict) -> Disk:
    parts = [Partition(p["name"], i, p.get("type", "linux"), _size(p), list(p.get("flags", [])))
             for i, p in enumerate(d.get("partitions", []), start=1)]
    return Disk(d["name"], parse_size_mib(d["size"]), d.get("label", "gpt"), bool(d.get("boot")),
                d.get("bus", "virtio"), parts)


def validate(spec: Spec) -> None:
    """Reject specs the provisioner cannot build, with a message naming the offending item."""
    def fail(msg: str) -> None:
        raise SpecError("spec %s: %s" % (spec.name, msg))

    if spec.firmware not in ("bios", "uefi"):
        fail("firmware must be bios or uefi")
    names = [d.name for d in spec.disks]
    for d in spec.disks:
        if d.label not in PARTITION_TYPES or d.bus not in BUSES or len(d.name) > _MAX_SERIAL:
            fail("disk %s: label must be msdos|gpt, bus virtio|scsi|nvme, name <= 20 chars" % d.name)
        for p in d.partitions:
            if p.type not in PARTITION_TYPES[d.label]:
                fail("partition %s: type %s not possible on %s" % (p.name, p.type, d.label))
            if p.size_mib is None and p is not d.partitions[-1]:
                fail("partition %s: only the last partition may omit its size" % p.name)
        names += [p.name for p in d.partitions]
    names += [r.name for r in spec.raids] + [x.name for x in spec.luks] + [v.name for v in spec.vgs]
    for n in names:
        if not _NAME.match(n):
            fail("name %r: use lower-case letters, digits and _" % n)
    if len(set(names)) != len(names):
        fail("names must be unique across disks, partitions, raids, luks and vgs")
    _validate_references(spec, fail)
    _validate_boot(spec, fail)


def _validate_references(spec: Spec, fail) -> None:
    devices = set(device_names(spec))
    uses = [m for r in spec.raids for m in r.devices] + [x.device for x in spec.luks]
    uses += [pv for v in spec.vgs for pv in v.pvs] + [f.device for f in spec.filesystems]
    for u in uses:
        if u not in devices:
            fail("unknown device %r" % u)
    if len(set(uses)) != len(uses):
        fail("a device is used twice")
    for r in spec.raids:
        if not re.fullmatch(r"md\d+", r.name) or r.level not in (0, 1, 5, 6, 10):
            fail("raid %s: name must be mdN, level one of 0 1 5 6 10" % r.name)
    for v in spec.vgs:
        if any(lv.size_mib is None for lv in v.lvs[:-1]):
            fail("vg %s: only the last LV may omit its size" % v.name)
    for f in spec.filesystems:
        if f.type not in FS_TYPES or (f.type == "swap") != (f.mountpoint is None):
            fail("filesystem on %s: type in %s; swap has no mountpoint, others need one"
                 % (f.device, FS_TYPES))
    if [f.mountpoint for f in spec.filesystems].count("/") != 1:
        fail("exactly one filesystem must be mounted at /")


def _validate_boot(spec: Spec, fail) -> None:
    boot_disks = [d for d in spec.disks if d.boot]
    if not boot_disks:
        fail('mark the disk(s) that get the bootloader with "boot": true')
    if spec.firmware == "uefi":
        esp = [f for f in spec.filesystems if f.mountpoint == "/boot/efi"]
        if not esp or esp[0].type != "vfat":
            fail("uefi needs a vfat filesystem mounted at /boot/efi")
    else:
        for d in boot_disks:
            if d.label == "gpt" and not any(p.type == "bios_grub" for p in d.partitions):
                fail("disk %s: BIOS boot from gpt needs a bios_grub partition" % d.name)


def device_names(spec: Spec) -> List[str]:
    """Every block device the spec creates, by the name other items refer to it with."""
    names = [p.name for d in spec.disks for p in d.partitions]
    names += [r.name for r in spec.raids] + [x.name for x in spec.luks]
    names += ["%s/%s" % (v.name, lv.name) for v in spec.vgs for lv in v.lvs]
    return names
