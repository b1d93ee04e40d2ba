"""Harness paths the smoke tests do not cover: the helper VM (direct kernel+initramfs boot with
a job disk) and booting from an ISO image with SeaBIOS and with OVMF."""

from pathlib import Path

import pytest

from vmlib import Disk, GuestError, create_disk_image, run_helper
from vmlib import cpio
from vmlib.image import HOST_BUSYBOX, chroot_run


@pytest.mark.vm
def test_helper_job_sees_its_disks_and_returns_files(guest_image, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "run.sh").write_text(
        "set -eu\n"
        "uname -r > /job/out/kernel\n"
        # no udev in the helper, so no lsblk SERIAL: read the virtio serial from sysfs
        "for d in /sys/block/vd*; do echo $(cat $d/serial) $(cat $d/size); done > /job/out/disks\n")
    scratch = Disk("scratch", create_disk_image(tmp_path / "scratch.qcow2", "3G"))
    out = run_helper(guest_image, tmp_path / "helper", job, [scratch])
    assert (out / "out" / "kernel").read_text().strip() == guest_image.recipe["kernel"]
    disks = dict(line.split() for line in (out / "out" / "disks").read_text().splitlines())
    assert disks["scratch"] == str(3 * 1024 ** 3 // 512)  # sectors


@pytest.mark.vm
def test_helper_job_failure_is_reported(guest_image, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "run.sh").write_text("echo about to fail\nexit 3\n")
    with pytest.raises(GuestError, match="HELPER-RC=3"):
        run_helper(guest_image, tmp_path / "helper", job, [])


def make_test_iso(image, workdir: Path) -> Path:
    """A hybrid BIOS/UEFI ISO (grub-mkrescue from the guest image) whose system prints a marker."""
    tree = workdir / "tree"
    (tree / "boot/grub").mkdir(parents=True)
    (tree / "boot/vmlinuz").write_bytes(image.kernel.read_bytes())
    init = (b"#!/bin/busybox sh\n/bin/busybox mount -t sysfs sys /sys\n"
            b"if [ -d /sys/firmware/efi ]; then fw=uefi; else fw=bios; fi\n"
            b"/bin/busybox echo ISO-BOOT-OK firmware=$fw\n/bin/busybox poweroff -f\n")
    cpio.write(tree / "boot/initrd.cpio", [
        cpio.directory("bin"), cpio.directory("dev"), cpio.directory("sys"),
        cpio.chardev("dev/console", 5, 1),
        cpio.file("bin/busybox", HOST_BUSYBOX.read_bytes(), 0o755), cpio.file("init", init, 0o755)])
    (tree / "boot/grub/grub.cfg").write_text(
        "serial --unit=0 --speed=115200\nterminal_input serial\nterminal_output serial\n"
        "set timeout=0\nmenuentry iso-test {\n"
        "  linux /boot/vmlinuz console=ttyS0,115200 quiet panic=-1\n  initrd /boot/initrd.cpio\n}\n")
    chroot_run(image.rootfs, ["grub-mkrescue", "-o", "/mnt/test.iso", "/mnt/tree"],
               log_file=workdir / "grub-mkrescue.log", binds={workdir: "/mnt"})
    return workdir / "test.iso"


@pytest.fixture(scope="module")
def test_iso(guest_image, tmp_path_factory) -> Path:
    return make_test_iso(guest_image, tmp_path_factory.mktemp("iso"))


@pytest.mark.vm
@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_boot_from_iso(firmware, test_iso, make_machine):
    machine = make_machine(None, name="iso-" + firmware, firmware=firmware, network=False)
    machine.add_cdrom(test_iso)
    machine.start()
    machine.wait_console(r"ISO-BOOT-OK firmware=%s" % firmware, timeout=180)
    assert machine.wait_exit(60) == 0
