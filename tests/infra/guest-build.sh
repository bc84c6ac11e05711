#!/usr/bin/env bash
# Build the root filesystem, kernel and initrd of the vmigrate LVM test guest: a minimal
# Debian 12 (bookworm) booted under qemu-system-x86_64 (TCG) without systemd, with LVM,
# OpenSSH and sudo. Run as root; needs debootstrap and e2fsprogs (mkfs.ext4 -d, so no loop
# mount). The Debian mirror is the one apt on this machine uses (or $VMIGRATE_GUEST_MIRROR).
#
#   guest-build.sh OUTDIR INIT_SCRIPT
#
# OUTDIR must not exist; it is created atomically (built beside it, then renamed) and holds
#   rootfs.img   ext4 image of the root filesystem (sparse raw file)
#   vmlinuz      the stock linux-image-cloud-amd64 kernel
#   initrd.img   a minimal initramfs (busybox, the virtio/ext4 modules; see below)
#   manifest     what was built, from where
# tests/infra/guest.py caches OUTDIR under /var/cache/vmigrate-tests/, keyed by a hash of
# this script and INIT_SCRIPT: change either and the next test session rebuilds.
set -euo pipefail
export LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive

die() { echo "guest-build: $*" >&2; exit 1; }
[ $# -eq 2 ] || die "usage: $0 OUTDIR INIT_SCRIPT"
out=${1%/}
init=$2
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
[ -e "$out" ] && die "$out already exists"
[ -r "$init" ] || die "init script $init not readable"
for tool in debootstrap mkfs.ext4 chroot; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || die "$tool not found"
done

suite=bookworm
# The Debian archive apt is configured with: first deb822 stanza (sources.list.d/*.sources)
# or one-line entry (sources.list, sources.list.d/*.list) for the plain suite.
apt_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk -v suite="$suite" '
      function flush() {
        if (types ~ /(^|[ \t])deb([ \t]|$)/ && (" " suites " ") ~ ("[ \t]" suite "[ \t]") && uris != "") {
          split(uris, u, /[ \t]+/); print u[1]; found = 1; exit
        }
        types = ""; suites = ""; uris = ""
      }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]*#/ { next }
      tolower($1) == "types:"  { $1 = ""; types = $0 }
      tolower($1) == "suites:" { $1 = ""; suites = $0 }
      tolower($1) == "uris:"   { $1 = ""; sub(/^[ \t]+/, ""); uris = $0 }
      END { if (!found) flush() }
    ' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    # deb [opts] URI SUITE COMPONENTS...
    sed -E 's/\[[^]]*\]//' "$f" | awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2 }'
  done
}
mirror=${VMIGRATE_GUEST_MIRROR:-$(apt_mirror | head -n1)}
[ -n "$mirror" ] || die "no Debian $suite mirror found in /etc/apt/sources.list*; set VMIGRATE_GUEST_MIRROR"
mirror=${mirror%/}

packages=lvm2,openssh-server,openssh-sftp-server,linux-image-cloud-amd64,iproute2,kmod,udev
packages+=,e2fsprogs,procps,python3-minimal,sudo,zstd,busybox-static

# The root tree is built in RAM (tmpfs: dpkg's fsyncs cost nothing; about 600 MiB, freed
# at exit) when /dev/shm has room; the outputs next to OUTDIR, renamed into place at the end.
tmpbase=${VMIGRATE_BUILD_TMPDIR:-/dev/shm}
avail_kib=$(df -Pk "$tmpbase" 2>/dev/null | awk 'NR == 2 { print $4 }')
[ -w "$tmpbase" ] && [ "${avail_kib:-0}" -gt $((2 * 1024 * 1024)) ] || tmpbase=$(dirname "$out")
work=$(mktemp -d "$out.build.XXXXXX")
tree=$(mktemp -d "$tmpbase/vmigrate-guest-build.XXXXXX")
cleanup() {
  # debootstrap mounts proc/sys inside the target; never leave them behind.
  local m
  for m in proc sys dev/pts dev; do
    mountpoint -q "$tree/root/$m" 2>/dev/null && umount -l "$tree/root/$m"
  done
  rm -rf --one-file-system "$work" "$tree"
}
trap cleanup EXIT
root=$tree/root
start=$(date +%s)

echo "guest-build: debootstrap $suite from $mirror into $tree"
# INITRD=No: the kernel's postinst skips initramfs-tools (we make our own initrd below).
INITRD=No debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
  >"$work/debootstrap.log" 2>&1 \
  || { tail -n 40 "$work/debootstrap.log" "$root/debootstrap/debootstrap.log" 2>/dev/null >&2; die "debootstrap failed"; }
echo "guest-build: debootstrap done in $(( $(date +%s) - start )) s"

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 "$@"; }

# --- system configuration (no systemd: /sbin/vmigrate-init is PID 1) ---
echo vmigrate-guest >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vmigrate-guest\n::1 localhost\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 rw 0 1\n' >"$root/etc/fstab"
printf 'dm_mod\ndm_snapshot\n' >"$root/etc/modules"
install -m 0755 "$init" "$root/sbin/vmigrate-init"

# Per-session secrets (host key, authorized key, password) come from a seed disk at boot:
# the image holds none.
rm -f "$root"/etc/ssh/ssh_host_*
cat >"$root/etc/ssh/sshd_config.d/vmigrate.conf" <<'EOF'
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication yes
KbdInteractiveAuthentication no
UsePAM yes
UseDNS no
MaxStartups 64:30:128
MaxSessions 64
PrintMotd no
PrintLastLog no
EOF
# pam_motd runs update-motd.d scripts on every login: seconds under TCG.
sed -i -E 's/^(session[[:space:]]+optional[[:space:]]+pam_(motd|mail)\.so)/# \1/' "$root/etc/pam.d/sshd"
rm -f "$root"/etc/update-motd.d/*

# Password user with passwordless sudo (the password itself is set per session at boot).
in_root useradd --create-home --shell /bin/bash --comment "vmigrate test user" tester
printf 'tester ALL=(ALL:ALL) NOPASSWD: ALL\n' >"$root/etc/sudoers.d/vmigrate-tester"
chmod 0440 "$root/etc/sudoers.d/vmigrate-tester"

# LVM without lvmetad/systemd: udev (started by init) handles device links; no auto
# activation services, no monitoring daemon.
sed -i -E 's/^([[:space:]]*)# *monitoring = 1/\1monitoring = 0/' "$root/etc/lvm/lvm.conf"

# --- kernel, and a tiny initrd ---
# initramfs-tools' initrd spends several seconds (udev, scripts) under TCG before it mounts
# the root; ours loads the few modules needed (order from modprobe), mounts /dev/vda and
# switches to /sbin/vmigrate-init: about a second.
mkdir -p "$work/out"
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -n1)
[ -f "$kernel" ] || die "no kernel in /boot"
kver=${kernel##*/vmlinuz-}
cp "$kernel" "$work/out/vmlinuz"
ird=$tree/initrd
mkdir -p "$ird"/bin "$ird"/dev "$ird"/proc "$ird"/sys "$ird"/root "$ird"/modules
cp "$root/bin/busybox" "$ird/bin/busybox"
for m in virtio_pci virtio_blk ext4; do
  in_root modprobe --show-depends -S "$kver" "$m"
done | awk '$1 == "insmod" && !seen[$2]++ { print $2 }' >"$work/modules.list"
grep -q '/virtio_blk\.ko' "$work/modules.list" || die "modprobe found no virtio_blk for the initrd"
: >"$ird/modules/order"
while read -r m; do
  cp "$root$m" "$ird/modules/"
  basename "$m" >>"$ird/modules/order"
done <"$work/modules.list"
cat >"$ird/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "VMIGRATE-FAILED: initrd: $*"; sleep 1; reboot -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs -o mode=0755 devtmpfs /dev
for m in $(cat /modules/order); do
  insmod "/modules/$m" 2>/dev/null || grep -q "^${m%.ko*} " /proc/modules || echo "initrd: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/vda"
  sleep 0.1
done
mount -t ext4 -o rw /dev/vda /root || fail "cannot mount /dev/vda"
umount /proc /sys
mount --move /dev /root/dev
exec switch_root /root /sbin/vmigrate-init
EOF
chmod 0755 "$ird/init"
(cd "$ird" && find . | "$root/bin/busybox" cpio -o -H newc 2>/dev/null) >"$work/out/initrd.img"

# --- slim down: package caches, docs, man pages, locales ---
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log \
  "$root"/debootstrap "$root"/boot/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +

# --- pack into ext4 without mounting anything ---
used_mib=$(du -sm --apparent-size "$root" | cut -f1)
size_mib=$(( used_mib * 13 / 10 + 256 ))
truncate -s "${size_mib}M" "$work/out/rootfs.img"
mkfs.ext4 -q -F -L vmigrate-root -d "$root" "$work/out/rootfs.img"

cat >"$work/out/manifest" <<EOF
suite=$suite
mirror=$mirror
kernel=$kver
packages=$packages
rootfs_mib=$size_mib
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$(( $(date +%s) - start ))
EOF
mv "$work/out" "$out"
echo "guest-build: $out ready (kernel $kver, rootfs ${size_mib} MiB) in $(( $(date +%s) - start )) s"
