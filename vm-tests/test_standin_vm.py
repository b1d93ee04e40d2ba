"""The rescue stand-in VM (vmlib/standin.py): it comes up quickly with udev, network and ssh,
finds attached disks by serial on every bus, never offers its own root disk, and powers off
cleanly; without udev it still sees the disks."""

import pytest


@pytest.mark.vm
def test_standin_ready_with_udev_network_and_disks_on_every_bus(make_standin, guest_image):
    tools_mtime = guest_image.tools_img.stat().st_mtime_ns
    s = make_standin("standin")
    disks = [s.add_blank_disk("blank-virtio", "1G"), s.add_blank_disk("blank-nvme", "2G", bus="nvme"),
             s.add_blank_disk("blank-scsi", "3G", bus="scsi")]
    s.start()
    ready = s.wait_ready()
    print("stand-in ready after %.1f s" % ready)
    assert ready < 60, "the stand-in took %.1f s to come up" % ready
    sizes = {}
    for d in disks:
        node = s.disk_path(d)
        sizes[d.name] = int(s.run(["blockdev", "--getsize64", node], check=True).stdout)
        # udev made the same by-id names as in a booted Debian guest
        assert s.run(["readlink", "-f", d.guest_path], check=True).stdout.strip() == node
    assert sizes == {"blank-virtio": 1 << 30, "blank-nvme": 2 << 30, "blank-scsi": 3 << 30}
    root = s.run("findmnt -n -o SOURCE /", check=True).stdout.strip()
    assert root == s.disk_serials()["tools"]
    assert s.run("ip -4 -o addr show scope global", check=True).stdout.split()[3] == "10.0.2.15/24"
    assert s.run("hostname", check=True).stdout.strip() == "rescue-standin"
    # writes go to the snapshot, never to the image's tools.img
    s.run("echo scratch > /root/standin-was-here", check=True)
    assert s.shutdown() == 0
    assert "STANDIN-POWEROFF" in s.console_text()
    assert guest_image.tools_img.stat().st_mtime_ns == tools_mtime


@pytest.mark.vm
def test_standin_without_udev_finds_disks_by_sysfs_serial(make_standin):
    s = make_standin("plain", udev=False)
    d = s.add_blank_disk("blank-nvme", "1G", bus="nvme")
    s.start()
    s.wait_ready()
    assert s.run(["blockdev", "--getsize64", s.disk_path(d)], check=True).stdout.strip() == str(1 << 30)
    assert s.run("pgrep -x systemd-udevd", check=False).returncode == 1
    assert s.run("test -e /root/standin-was-here").returncode == 1   # the snapshot was thrown away
    assert s.shutdown() == 0
