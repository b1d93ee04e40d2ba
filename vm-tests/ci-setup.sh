#!/bin/sh
# Install the Debian packages the vm-tests harness needs on a fresh Debian 12 host (root).
# Idempotent: re-running only refreshes the package lists.
# Usage: sh vm-tests/ci-setup.sh
set -eu
if [ "$(id -u)" != 0 ]; then
    echo "ci-setup.sh: must run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# qemu-system-x86: the emulator (TCG); qemu-utils: qemu-img; ovmf: UEFI firmware;
# debootstrap: the guest image; busybox-static: the helper VM's initramfs;
# e2fsprogs: mke2fs -d and debugfs for tools/job disks; openssh-client: ssh/scp into guests;
# util-linux: unshare (private mount namespaces); tar: payloads;
# gpgv + debian-archive-keyring: debootstrap verifies the mirror (Recommends, not Depends).
apt-get install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils ovmf debootstrap busybox-static e2fsprogs \
    openssh-client util-linux tar ca-certificates gpgv debian-archive-keyring
