#!/bin/bash
# PID 1 of the vmigrate LVM test guest (installed as /sbin/vmigrate-init; no systemd).
# Mounts the API filesystems, loads device-mapper and virtio modules, starts udevd,
# installs the per-session seed (host key, authorized key, test password) from the disk
# whose serial is "vmigrate-seed", brings up QEMU user networking (10.0.2.15/24) and starts
# sshd. Prints VMIGRATE-READY (or VMIGRATE-FAILED and powers off) on the console.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/root

log() { echo "vmigrate-init: $*"; }
fail() {
  echo "VMIGRATE-FAILED: $*"
  sync
  echo o >/proc/sysrq-trigger 2>/dev/null
  exit 1
}

mnt() {  # mnt TYPE DIR [OPTIONS]
  mkdir -p "$2"
  mountpoint -q "$2" || mount -t "$1" ${3:+-o "$3"} "$1" "$2" || log "mount $2 failed"
}
mnt proc /proc
mnt sysfs /sys
mnt devtmpfs /dev mode=0755
mnt devpts /dev/pts gid=5,mode=620,ptmxmode=666
mnt tmpfs /dev/shm mode=1777
mnt tmpfs /run mode=0755
mount -o remount,rw / || fail "cannot remount / read-write"
mkdir -p /run/lock /run/lvm /run/sshd
# What udev/systemd would provide: /dev/fd (process substitution), /dev/std*.
ln -sfn /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
hostname vmigrate-guest
echo 1 >/proc/sys/kernel/sysrq

for m in dm_mod dm_snapshot virtio_pci virtio_blk virtio_net virtio_rng; do
  modprobe -q "$m" || log "modprobe $m failed"
done

/lib/systemd/systemd-udevd --daemon || fail "udevd did not start"
# Only block devices: LVM asks udev for its device list. A full trigger loads dozens of
# useless modules (kvm, cpufreq, input...) and costs seconds under TCG.
udevadm trigger --action=add --subsystem-match=block
udevadm settle --timeout=30 || log "udevadm settle timed out"

# --- seed: a tar archive written raw onto a small virtio disk ---
seed=
for d in /sys/block/vd*; do
  [ "$(cat "$d/serial" 2>/dev/null)" = vmigrate-seed ] && seed=/dev/${d##*/}
done
[ -n "$seed" ] || fail "no seed disk (serial vmigrate-seed)"
mkdir -p /run/vmigrate-seed
tar -xf "$seed" -C /run/vmigrate-seed || fail "cannot unpack seed from $seed"
s=/run/vmigrate-seed
install -m 0600 "$s/ssh_host_ed25519_key" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$s/ssh_host_ed25519_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
install -d -m 0700 /root/.ssh
install -m 0600 "$s/authorized_keys" /root/.ssh/authorized_keys
install -d -m 0700 -o tester -g tester /home/tester/.ssh
install -m 0600 -o tester -g tester "$s/authorized_keys" /home/tester/.ssh/authorized_keys
# sha512crypt with few rounds: Debian's default yescrypt costs seconds per login under TCG.
printf 'tester:%s\n' "$(cat "$s/password")" | chpasswd -c SHA512 -s 1000 || fail "chpasswd failed"

# --- network: QEMU user networking (slirp) ---
ip link set lo up
ifc=
for n in /sys/class/net/*; do
  n=${n##*/}
  [ "$n" = lo ] || { ifc=$n; break; }
done
[ -n "$ifc" ] || fail "no network interface"
ip link set "$ifc" up
ip addr add 10.0.2.15/24 dev "$ifc"
ip route add default via 10.0.2.2 dev "$ifc"

/usr/sbin/sshd -E /run/sshd.log || fail "sshd did not start: $(tail -n 5 /run/sshd.log 2>/dev/null)"
echo "VMIGRATE-READY kernel=$(uname -r) net=$ifc uptime=$(cut -d" " -f1 /proc/uptime)"

# PID 1 must never exit; bash reaps orphans reparented to it while it waits.
while :; do
  sleep 3600 &
  wait $!
done
