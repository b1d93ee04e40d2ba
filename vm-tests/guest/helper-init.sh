#!/bin/busybox sh
# PID 1 of the helper VM (kernel of the guest image + a tiny busybox initramfs).
# The helper has no udev and no systemd: it mounts the "tools" disk (an ext4 copy of the guest
# rootfs, attached snapshot=on so writes are thrown away), mounts the "job" disk inside it,
# runs /job/run.sh in a chroot so every Debian tool is available, reports the exit code on
# the serial console and powers off. Disks are found by their virtio serial, never by order.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
while read -r mod; do
    insmod "/lib/modules/$mod" || echo "helper: insmod $mod failed"
done < /etc/helper-modules

disk_by_serial() {
    for d in /sys/block/*; do
        if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${d##*/}"; return 0; fi
    done
    return 1
}

fail() {
    echo "helper: $*"
    echo "HELPER-RC=99"
    poweroff -f
    exit 1  # if poweroff itself failed: PID 1 exiting panics the kernel, panic=-1 ends QEMU
}

# virtio probing is asynchronous: give the block devices a few seconds to appear.
i=0
until tools=$(disk_by_serial tools) && job=$(disk_by_serial job); do
    i=$((i + 1))
    [ $i -lt 100 ] || fail "tools or job disk not found"
    sleep 0.1
done
mount -t ext4 "$tools" /tools || fail "cannot mount tools disk $tools"
mkdir -p /tools/job
mount -t ext4 "$job" /tools/job || fail "cannot mount job disk $job"
mount --rbind /dev /tools/dev
mount -t proc proc /tools/proc
mount -t sysfs sys /tools/sys
mount -t tmpfs tmpfs /tools/run
mount -t tmpfs tmpfs /tools/tmp
echo "HELPER-START uptime=$(cut -d' ' -f1 /proc/uptime)"
chroot /tools /bin/bash /job/run.sh
rc=$?
sync
umount /tools/job || rc=98
echo "HELPER-RC=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
poweroff -f
