#!/bin/busybox sh
# PID 1 of the rescue stand-in's initramfs (image kernel + busybox + virtio modules).
# Stage 1: find the "tools" disk (an ext4 copy of the guest rootfs, attached snapshot=on so
# every write is thrown away) by its virtio serial, mount it read-write as the new root, put
# busybox and stage 2 on a tmpfs /run in it and switch_root there. Stage 2
# (/run/standin/stage2.sh) starts udev, the NIC and sshd from the Debian tools.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
while read -r mod; do
    insmod "/lib/modules/$mod" || echo "standin: insmod $mod failed"
done < /etc/standin-modules

fail() {
    echo "standin: $*"
    echo "STANDIN-FAILED"
    poweroff -f
    exit 1
}

disk_by_serial() {
    for d in /sys/block/*; do
        if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${d##*/}"; return 0; fi
    done
    return 1
}

i=0
until tools=$(disk_by_serial tools); do
    i=$((i + 1))
    [ $i -lt 100 ] || fail "tools disk not found"
    sleep 0.1
done
mkdir -p /newroot
mount -t ext4 -o rw "$tools" /newroot || fail "cannot mount tools disk $tools"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /newroot/run || fail "cannot mount /run"
mkdir -p /newroot/run/standin
cp /bin/busybox /etc/standin.conf /stage2.sh /poweroff.sh /newroot/run/standin/ || fail "cannot copy stage 2"
echo "STANDIN-STAGE1 uptime=$(cut -d' ' -f1 /proc/uptime) tools=$tools"
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /run/standin/busybox sh /run/standin/stage2.sh
