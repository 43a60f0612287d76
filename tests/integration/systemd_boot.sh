#!/bin/bash
# Boots systemd on a throwaway copy of this machine, for test_systemd_live.py.
#
#   unshare --mount --net --pid --cgroup --fork --kill-child systemd_boot.sh WORK FERRY HOST_MNT_NS
#
# It must run as PID 1 of new pid, mount, network and cgroup namespaces (it refuses
# otherwise): systemd then sees / as an overlay whose writes all go to a tmpfs mounted on
# WORK, so nothing it starts or cleans up at boot (/tmp, units of the host) touches the
# host's files, and everything ends when the namespace's PID 1 is killed. Services that are
# of no use here (udev, sysctl, timers, getty, databases) are masked in the copy. FERRY is
# the ferry program `ferry init` writes into the units; it creates one UDP pair under
# /srv/ferry (as user ferry), and the boot target starts both agents.
set -euo pipefail
work=$1 ferry=$2 host_ns=$3

if [ "$$" != 1 ]; then
  echo "systemd_boot.sh: refusing to run: not PID 1 of a new pid namespace" >&2
  exit 90
fi
if [ "$(readlink /proc/self/ns/mnt)" = "$host_ns" ]; then
  echo "systemd_boot.sh: refusing to run: still in the host's mount namespace" >&2
  exit 91
fi

mount --make-rprivate /
mkdir -p "$work"
mount -t tmpfs -o size=2g,mode=0700 ferry-systemd-test "$work"
mkdir "$work/upper" "$work/work" "$work/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$work/upper,workdir=$work/work" "$work/root"
root=$work/root

for unit in systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket \
    systemd-udev-trigger.service systemd-udev-settle.service systemd-sysctl.service \
    systemd-modules-load.service systemd-binfmt.service systemd-timesyncd.service \
    systemd-networkd.service systemd-resolved.service networking.service \
    systemd-tmpfiles-clean.timer timers.target getty.target getty@.service \
    console-getty.service serial-getty@.service ssh.service cron.service \
    postgresql.service postgresql@.service mariadb.service mysql.service; do
  ln -sf /dev/null "$root/etc/systemd/system/$unit"
done

# /tmp is emptied at boot (tmpfiles' "D /tmp"): in the copy too, which would take a checkout
# of ferry in /tmp with it; keep its contents
printf 'd /tmp 1777 root root -\n' > "$root/etc/tmpfiles.d/tmp.conf"

# the ferry user may have to pass through directories the host keeps closed (/root):
# the copy's modes change, not the host's
dir=$(dirname "$ferry")
while [ "$dir" != / ]; do
  chmod o+x "$root$dir"
  dir=$(dirname "$dir")
done

chroot "$root" /usr/sbin/useradd --system --home-dir /srv/ferry --shell /usr/sbin/nologin ferry
chroot "$root" "$ferry" init /srv/ferry --json > "$root/root/init.json" 2> "$root/root/init.log"
chroot "$root" chown -R ferry: /srv/ferry/outside /srv/ferry/inside
cp "$root/srv/ferry/outside/ferry-outside.service" "$root/srv/ferry/inside/ferry-inside.service" \
  "$root/etc/systemd/system/"
cat > "$root/etc/systemd/system/ferry-test.target" <<'UNIT'
[Unit]
Description=ferry under systemd (test)
Requires=basic.target ferry-outside.service ferry-inside.service
After=basic.target
UNIT

mkdir -p "$root/oldroot"
cd "$root"
pivot_root . oldroot
# umount reads /proc/self/mountinfo: this pid namespace's /proc first (systemd keeps it)
exec chroot . /bin/sh -c 'mount -t proc proc /proc && umount -l /oldroot && exec /lib/systemd/systemd \
  --unit=ferry-test.target --show-status=false --log-target=journal-or-kmsg --log-level=notice'
