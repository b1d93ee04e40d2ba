#!/bin/sh
# Turn a fresh debootstrap tree into the test guest image. Runs on the host, as root.
# Usage: customize.sh ROOTFS AUTHORIZED_KEY_FILE
# Everything here is spec-independent; provisioning writes fstab, crypttab, mdadm.conf, hostname.
set -eu
R=$1
KEY=$2

# Serial console everywhere: the harness reads the console log, there is no display.
cat > "$R/etc/default/grub" <<'GRUB'
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_TIMEOUT_STYLE=hidden
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=ttyS0,115200n8"
GRUB_TERMINAL=serial
GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB

# DHCP on whatever NIC QEMU gives (virtio-net, named enp0sN or ens3).
cat > "$R/etc/systemd/network/80-dhcp.network" <<'NET'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
NET
chroot "$R" systemctl enable systemd-networkd.service
# wait-online stalls boot ~2 min when a guest has no NIC; tests wait for ssh instead.
chroot "$R" systemctl mask systemd-networkd-wait-online.service
# Timers would start apt/e2scrub/fstrim work in the middle of a timed test.
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer fstrim.timer
# Units that cost seconds under TCG and mean nothing in a test guest: EFI pstore (reading
# EFI variables through emulated flash takes ~13 s), gettys for the absent VGA console,
# binfmt, e2scrub.
chroot "$R" systemctl mask modprobe@efi_pstore.service systemd-pstore.service \
    getty-static.service getty@tty1.service e2scrub_reap.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount proc-sys-fs-binfmt_misc.mount
# udev would load kvm for the emulated CPU's VMX/SVM flag: ~13 s under TCG, and useless.
printf 'blacklist kvm\nblacklist kvm_intel\nblacklist kvm_amd\n' > "$R/etc/modprobe.d/rescue-tests.conf"
printf 'nameserver 10.0.2.3\n' > "$R/etc/resolv.conf"

# Root login: the per-cache ssh key for the harness, a password for the serial console.
install -d -m 700 "$R/root/.ssh"
install -m 600 "$KEY" "$R/root/.ssh/authorized_keys"
echo 'root:rescue' | chroot "$R" chpasswd
cat > "$R/etc/ssh/sshd_config.d/rescue-tests.conf" <<'SSH'
PermitRootLogin prohibit-password
UseDNS no
SSH

# initramfs: no resume probing (swap UUIDs differ per spec), keyfiles for LUKS roots are
# copied in (KEYFILE_PATTERN) and must not be world-readable inside the initrd (UMASK).
echo 'RESUME=none' > "$R/etc/initramfs-tools/conf.d/resume"
echo 'UMASK=0077' > "$R/etc/initramfs-tools/conf.d/umask"
echo 'KEYFILE_PATTERN="/etc/cryptsetup-keys.d/*.key"' >> "$R/etc/cryptsetup-initramfs/conf-hook"
install -d -m 700 "$R/etc/cryptsetup-keys.d"

echo rescue-guest > "$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\trescue-guest\n' > "$R/etc/hosts"
# An empty machine-id makes every clone of the image generate its own at boot.
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
chroot "$R" apt-get clean
rm -rf "$R/var/lib/apt/lists/"* "$R/var/log/"*.log "$R/var/cache/debconf/"*-old
