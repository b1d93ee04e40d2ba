#!/bin/bash
# Prelude of every provisioning job (install.job_script appends the spec-specific steps).
# Runs inside the helper VM, chrooted into the tools disk: Debian userland, no udev, no systemd.
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# Without udev, libdevmapper (LVM, cryptsetup) must create /dev/mapper nodes itself ...
export DM_DISABLE_UDEV=1
# ... and LVM must neither ask udev for devices nor wait for it (else lvcreate fails with
# "device not cleared"); metadata backups would land on the throw-away tools disk.
LVM_CONFIG='devices { obtain_device_list_from_udev=0 } activation { udev_sync=0 udev_rules=0 } backup { backup=0 archive=0 }'
mkdir -p /target

# Helpers switch tracing off inside ({ set +x; } 2>/dev/null hides even that) so the console
# log shows the job's commands, not the helpers' internals.
quiet() { { set +x; } 2>/dev/null; }

step() { quiet; echo "STEP $* uptime=$(cut -d' ' -f1 /proc/uptime)"; set -x; }

lvm_() { local cmd=$1; shift; lvm "$cmd" --config "$LVM_CONFIG" "$@"; }

disk_by_serial() {
    quiet
    local d
    for d in /sys/block/*; do
        if [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ]; then echo "/dev/${d##*/}"; return 0; fi
    done
    echo "no disk with serial $1" >&2
    return 1
}

# Partition N of a disk: vda -> vda1, nvme0n1 -> nvme0n1p1.
part() { quiet; case $1 in *[0-9]) echo "${1}p$2" ;; *) echo "$1$2" ;; esac; }

wait_dev() {
    quiet
    local i
    for i in $(seq 50); do [ -b "$1" ] && { set -x; return 0; }; sleep 0.1; done
    echo "device $1 did not appear" >&2
    return 1
}

target_api_mounts() {
    mount --rbind /dev /target/dev
    mount -t proc proc /target/proc
    mount --rbind /sys /target/sys
    mount -t tmpfs tmpfs /target/run
}

in_target() { chroot /target "$@"; }

PS4='+ '
set -x
