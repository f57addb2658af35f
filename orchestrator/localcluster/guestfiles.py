"""The guest's own files: ``/init`` and the scripts and configuration it and busybox ``init`` read."""

from __future__ import annotations

#: the line the guest prints on its serial console once it is up
BOOT_MARKER = "vmorch-guest: ready"
#: the virtio-serial port name qemu-ga listens on
AGENT_CHANNEL = "org.qemu.guest_agent.0"

_INIT = r"""#!/bin/sh
# vmorch test guest: everything runs from this initramfs.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
# until busybox init takes over as PID 1, honour poweroff/reboot/halt ourselves
trap 'poweroff -f' USR2
trap 'reboot -f' TERM
trap 'halt -f' USR1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/virtio-ports /run /tmp /var/log /var/lib/qemu-ga /mnt/cidata
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
ln -sfn /run /var/run
ln -sfn /proc/self/fd /dev/fd
KMOD=/lib/modules/$(uname -r)
load() { for m in "$@"; do insmod "$KMOD/$m.ko" 2>/dev/null; done; }
# the ACPI power button first: acpid runs /etc/acpi/PWRF/00000080 (poweroff)
load $(cat /etc/modules.early)
acpid -l /dev/null -p /run/acpid.pid
i=0
while [ "$i" -lt 50 ]; do
    pid=$(cat /run/acpid.pid 2>/dev/null)
    [ -n "$pid" ] && ls -l "/proc/$pid/fd" 2>/dev/null | grep -q /dev/input/event && break
    i=$((i + 1))
    sleep 0.02
done
# a press between loading the driver and acpid listening is only counted: act on it
read -r presses _ </sys/firmware/acpi/interrupts/ff_pwr_btn 2>/dev/null
[ "${presses:-0}" -gt 0 ] && poweroff
load $(cat /etc/modules.load)
hostname vmorch-guest
/sbin/vmorch-ports
# a CD-ROM labelled cidata (cloud-init NoCloud), read-only
i=0
while :; do
    dev=$(findfs LABEL=cidata 2>/dev/null) && break
    ls /sys/class/block/ 2>/dev/null | grep -q '^sr' || break
    i=$((i + 1)); [ "$i" -ge 20 ] && break
    sleep 0.1
done
if [ -n "$dev" ] && mount -t iso9660 -o ro "$dev" /mnt/cidata; then
    h=$(sed -n 's/^local-hostname:[[:space:]]*//p' /mnt/cidata/meta-data 2>/dev/null | tr -d "\"' \r")
    [ -n "$h" ] && hostname "$h"
fi
ip link set lo up
for d in /sys/class/net/eth*; do
    [ -e "$d" ] || continue
    n=${d##*/}
    ip link set "$n" up
    # 5 discovers 2 s apart, then a 10 s pause, round after round, in the background
    udhcpc -f -i "$n" -t 5 -T 2 -A 10 -s /etc/udhcpc.script -p "/run/udhcpc.$n.pid" \
        -x "hostname:$(hostname)" >"/run/udhcpc.$n.log" 2>&1 &
done
echo "@MARKER@ (kernel $(uname -r))" >/dev/console
exec /sbin/init
"""

_INITTAB = """\
::respawn:/sbin/vmorch-qga
ttyS0::respawn:-/bin/sh
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sh -c 'sync; umount -a -r 2>/dev/null; true'
"""

_PORTS = r"""#!/bin/sh
# /dev/virtio-ports/<name> links (no udev here); names arrive from the host shortly after probe
mkdir -p /dev/virtio-ports
i=0
while [ "$i" -lt 30 ]; do
    missing=0
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p" ] || continue
        name=$(cat "$p/name" 2>/dev/null)
        if [ -z "$name" ]; then missing=1; continue; fi
        ln -sfn "/dev/${p##*/}" "/dev/virtio-ports/$name"
    done
    [ "$missing" = 0 ] && exit 0
    i=$((i + 1))
    sleep 0.1
done
"""

_QGA = r"""#!/bin/sh
# respawned by init: wait for the agent's port, then run qemu-ga in the foreground
PORT=/dev/virtio-ports/@CHANNEL@
while [ ! -e "$PORT" ]; do
    sleep 5
    /sbin/vmorch-ports
done
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
exec /usr/sbin/qemu-ga -m virtio-serial -p "$PORT" -t /var/lib/qemu-ga -l /var/log/qemu-ga.log
"""

_UDHCPC = r"""#!/bin/sh
# udhcpc event script: address, default route, DNS
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    cur=$(ip -4 -o addr show dev "$interface" | sed -n 's/.* inet \([0-9.]*\/[0-9]*\).*/\1/p')
    if [ "$cur" != "$ip/${mask:-24}" ]; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" ${broadcast:+broadcast "$broadcast"} dev "$interface"
    fi
    if [ -n "$router" ]; then
        for r in $router; do
            ip route replace default via "$r" dev "$interface" && break
        done
    fi
    if [ -n "$dns" ]; then
        : >/etc/resolv.conf
        for s in $dns; do echo "nameserver $s" >>/etc/resolv.conf; done
    fi
    ;;
esac
exit 0
"""

_PROFILE = """\
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PS1='\\h# '
"""

_OS_RELEASE = """\
NAME="vmorch test guest"
ID=vmorch-guest
ID_LIKE=debian
VERSION_ID="12"
PRETTY_NAME="vmorch test guest (Debian 12 kernel, busybox)"
"""
