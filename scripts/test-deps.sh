#!/usr/bin/env bash
# System packages for the real SSH test hosts (tests/infra: the QEMU/TCG LVM guest and the
# namespace sshd hosts). Idempotent: installs only what is missing. Debian/Ubuntu.
#   qemu-system-x86  the LVM guest (TCG; no KVM needed)
#   debootstrap      builds the guest's root filesystem (once; cached in /var/cache/vmigrate-tests)
#   e2fsprogs        mkfs.ext4 -d packs it without a loop mount
#   openssh-server   sshd for the namespace/loopback hosts; openssh-client: ssh, ssh-keygen
#   iproute2         ip netns / veth; mount (util-linux): losetup; openssl: password hashes
set -euo pipefail

pkgs=(qemu-system-x86 debootstrap e2fsprogs openssh-server openssh-client iproute2 mount openssl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing test host packages: ${missing[*]}"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
