#!/usr/bin/env python3
"""Make the savelayout recordings in this directory, inside real QEMU guests.

Each recording is what `rescue savelayout --record DIR` keeps: every tool output (one file per
command, named after it) plus manifest.json. The tests replay them (tests/test_capture.py).
Usage, as root on the development machine (boots guests with vm-tests/vmlib, ~1-2 min each):

    python3 build_zipapp.py && python3 tests/data/layouts/record.py [NAME ...]
"""

import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
sys.path.insert(0, str(REPO / "vm-tests"))

from vmlib import get_golden  # noqa: E402

NVME = "/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_nvme0"
# A second disk, NVMe-named, with btrfs subvolumes (one nested, a non-default default subvolume),
# an ext4 partition, and mounts that savelayout must leave out (tmpfs, a bind mount).
NVME_BTRFS_SETUP = f"""set -e
printf 'label: gpt\\nsize=1GiB, name=data\\nname=scratch\\n' | sfdisk -q {NVME}
udevadm settle
mkfs.btrfs -q -f -L data {NVME}-part1
mount {NVME}-part1 /mnt
btrfs -q subvolume create /mnt/@data
btrfs -q subvolume create /mnt/@home2
btrfs -q subvolume create /mnt/@data/nested
btrfs subvolume set-default "$(btrfs subvolume show /mnt/@data | awk '/Subvolume ID/ {{print $3}}')" /mnt
umount /mnt
mkdir -p /srv/data /srv/home2 /srv/scratch /srv/tmp /srv/bind
mount -o subvol=@data {NVME}-part1 /srv/data
mount -o subvol=@home2 {NVME}-part1 /srv/home2
mkfs.ext4 -q -L scratch {NVME}-part2
mount {NVME}-part2 /srv/scratch
mount -t tmpfs tmpfs /srv/tmp
mount --bind /srv/scratch /srv/bind
"""

RECORDINGS = {
    "bios-lvm": dict(spec="bios-lvm"),
    "uefi-gpt": dict(spec="uefi-gpt"),
    "raid1-luks": dict(spec="raid1-luks"),
    "nvme-btrfs": dict(spec="uefi-gpt", nvme="2G", setup=NVME_BTRFS_SETUP),
}
GUEST_CONF = "LAYOUT_DIR=/root/layout\nLOGFILE=/root/rescue.log\nLOCKFILE=/root/rescue.lock\n"


def record(name: str, spec: str, nvme: str = "", setup: str = "") -> None:
    out = HERE / name
    golden = get_golden(spec)
    with tempfile.TemporaryDirectory(prefix=f"record-{name}-") as tmp:
        with golden.machine(name, Path(tmp)) as m:
            if nvme:
                m.add_blank_disk("nvme0", nvme, bus="nvme")
            m.start()
            m.wait_booted()
            if setup:
                m.run(setup).check()
            m.put(REPO / "dist" / "rescue.pyz", "/root/rescue.pyz")
            m.run(f"printf '{GUEST_CONF}' > /root/test.conf").check()
            tree = m.run("python3 /root/rescue.pyz -C /root/test.conf savelayout --record /root/rec").check()
            m.run("tar -C /root/rec -cf /root/rec.tar .").check()
            m.get("/root/rec.tar", Path(tmp) / "rec.tar")
            m.shutdown()
        if out.exists():
            for old in out.iterdir():
                old.unlink()
        out.mkdir(exist_ok=True)
        with tarfile.open(Path(tmp) / "rec.tar") as tar:
            tar.extractall(out)
    (out / "TREE.txt").write_text(tree.stdout)
    print(f"{name}: {len(list(out.iterdir()))} files\n{tree.stdout}")


def main() -> None:
    names = sys.argv[1:] or list(RECORDINGS)
    for name in names:
        record(name, **RECORDINGS[name])


if __name__ == "__main__":
    main()
