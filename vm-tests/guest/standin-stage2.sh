# Stage 2 of the rescue stand-in: PID 1 (busybox sh) in the Debian root of the tools disk.
# /run/standin/standin.conf sets UDEV (1/0), NET (static/none), HOSTNAME.
# Brings up what a rescue system has (mounts, udev coldplug, the NIC, sshd), prints
# STANDIN-READY and then only reaps children. /run/standin/poweroff.sh ends it.
B=/run/standin/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /run/standin/standin.conf
up() { $B cut -d' ' -f1 /proc/uptime; }

mkdir -p /dev/pts /dev/shm /run/lock /run/sshd /run/udev
mount -t devpts -o gid=5,mode=620,ptmxmode=000 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
[ -d /sys/firmware/efi ] && mount -t efivarfs efivarfs /sys/firmware/efi/efivars
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname "$HOSTNAME"
echo "$HOSTNAME" > /etc/hostname
ip link set lo up

if [ "$UDEV" = 1 ]; then
    /lib/systemd/systemd-udevd --daemon
    udevadm trigger --type=subsystems --action=add
    udevadm trigger --type=devices --action=add
    udevadm settle --timeout=60 || echo "standin: udevadm settle timed out"
else
    # No udev: load what a QEMU machine of the harness may carry; devtmpfs makes the nodes.
    for mod in virtio_net virtio_scsi sd_mod sr_mod nvme; do modprobe -q "$mod"; done
fi
echo "STANDIN-UDEV-DONE uptime=$(up)"

if [ "$NET" = static ]; then
    nic=
    i=0
    while [ -z "$nic" ] && [ $i -lt 100 ]; do
        for n in /sys/class/net/*; do
            n=${n##*/}
            [ "$n" = lo ] || { nic=$n; break; }
        done
        [ -n "$nic" ] || { i=$((i + 1)); $B sleep 0.1; }
    done
    if [ -n "$nic" ]; then
        # QEMU user networking: what its DHCP server would hand out.
        ip addr add 10.0.2.15/24 dev "$nic"
        ip link set "$nic" up
        ip route add default via 10.0.2.2
        echo "nameserver 10.0.2.3" > /etc/resolv.conf
        echo "STANDIN-NET $nic 10.0.2.15/24 uptime=$(up)"
    else
        echo "standin: no network interface"
    fi
    /usr/sbin/sshd -E /run/standin/sshd.log || echo "standin: sshd failed"
else
    # No network, no ssh: a root shell on the serial console drives the stand-in.
    $B setsid sh -c "exec /bin/bash -i </dev/ttyS0 >/dev/ttyS0 2>&1" &
fi
echo "STANDIN-READY uptime=$(up)"
trap '' TERM HUP INT
while :; do
    $B sleep 3600 &
    wait
done
