# The stand-in's poweroff (there is no init system to ask): stop udev, flush, remount every
# filesystem read-only (the deepest first), then power off at once.
B=/run/standin/busybox
udevadm control --exit 2>/dev/null
sync
$B awk '$2 != "/" && $3 !~ /^(proc|sysfs|devtmpfs|devpts|tmpfs|efivarfs|mqueue|debugfs|tracefs|securityfs|cgroup2?|configfs|pstore|bpf|fusectl|hugetlbfs)$/ {print $2}' /proc/mounts \
    | $B sort -r | while read -r m; do umount "$m" 2>/dev/null || umount -r "$m"; done
mount -o remount,ro / 2>/dev/null
sync
echo "STANDIN-POWEROFF" > /dev/console
$B poweroff -f
