"""Harness paths the smoke tests do not cover: the helper VM (direct kernel+initramfs boot with
a job disk), booting from an ISO image with SeaBIOS and with OVMF, and the guarantees that no
QEMU outlives the test process."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmlib import Disk, GuestError, create_disk_image, run_helper
from vmlib import cpio, procs
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


IDLE_QEMU = ["qemu-system-x86_64", "-accel", "tcg", "-S", "-nodefaults", "-display", "none",
             "-monitor", "none", "-serial", "none"]


@pytest.mark.vm
def test_session_sees_and_kills_its_qemu():
    """The end-of-session check (conftest.no_qemu_survives) can actually see a leftover QEMU."""
    proc = procs.spawn(IDLE_QEMU, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=procs.base_env())
    try:
        deadline = time.monotonic() + 10
        while proc.pid not in procs.session_qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.pid in procs.session_qemu_pids()
    finally:
        procs.kill_group(proc)
    assert proc.pid not in procs.session_qemu_pids()


@pytest.mark.vm
def test_qemu_dies_with_a_killed_test_process(tmp_path):
    """PR_SET_PDEATHSIG: even a SIGKILLed pytest leaves no QEMU behind."""
    script = ("import sys, time, subprocess; sys.path.insert(0, %r)\n"
              "from vmlib import procs\n"
              "p = procs.spawn(%r, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,"
              " stderr=subprocess.DEVNULL, env=procs.base_env())\n"
              "print(p.pid, flush=True)\ntime.sleep(60)\n") % (str(Path(__file__).parent), IDLE_QEMU)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    qemu_pid = int(parent.stdout.readline())
    assert Path("/proc/%d" % qemu_pid).exists()
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while Path("/proc/%d" % qemu_pid).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path("/proc/%d" % qemu_pid).exists()
