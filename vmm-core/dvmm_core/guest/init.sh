#!/bin/sh
# /init of the dvmm test guest (busybox ash).
#
# Mounts the pseudo file systems, loads the virtio/ext4 modules listed in
# /etc/dvmm/modules, brings up lo, then serves a command channel on the
# serial console /dev/ttyS0.  Framing (host side: tests/dvmm_testing/serial.py):
#
#   host -> guest  "<id> <base64 of the command>\n"          (one line each)
#   guest -> host  "@@DVMM-BEGIN <id>@@\n"
#                  <stdout+stderr of: sh -c COMMAND </dev/null>
#                  "\n@@DVMM-END <id> <exit status>@@\n"
#   once, when the channel is up: "@@DVMM-READY@@\n"
#
# The tty is raw and does not echo: input bytes arrive unchanged, output "\n"
# is not turned into "\r\n", so the host sees the output byte for byte (it
# strips the one "\n" that precedes the END marker).  Commands get /dev/null
# as stdin so they cannot swallow the next command line.  Markers are built
# with printf '%s' so the literal marker text never appears in this file
# (`cat /init` cannot fake one).

export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root TERM=dumb

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
# Only emergencies on the console from now on: the channel shares the port.
dmesg -n 1
hostname dvmm-guest

while read -r mod; do
    modprobe "$mod" 2>/run/modprobe.err ||
        echo "dvmm-init: modprobe $mod failed: $(cat /run/modprobe.err)"
done </etc/dvmm/modules
ip link set lo up

# busybox udhcpc only reports a lease; this hook applies it (udhcpc exports
# interface, ip, mask = prefix length, router, dns).  Debian's busybox looks
# for it in /etc/udhcpc, upstream's in /usr/share/udhcpc.
mkdir -p /etc/udhcpc /usr/share/udhcpc
cat >/etc/udhcpc/default.script <<'EOF'
#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then ip route add default via "${router%% *}" dev "$interface"; fi
    for s in $dns; do echo "nameserver $s"; done >/etc/resolv.conf
    ;;
esac
exit 0
EOF
chmod 755 /etc/udhcpc/default.script
ln -s /etc/udhcpc/default.script /usr/share/udhcpc/default.script

exec </dev/ttyS0 >/dev/ttyS0 2>&1
stty raw -echo

printf '@@DVMM-%s@@\n' READY
while read -r id b64; do
    printf '@@DVMM-%s %s@@\n' BEGIN "$id"
    if cmd=$(printf '%s' "$b64" | base64 -d 2>/dev/null); then
        sh -c "$cmd" </dev/null
        rc=$?
    else
        printf 'dvmm-init: command %s is not valid base64' "$id"
        rc=254
    fi
    printf '\n@@DVMM-%s %s %s@@\n' END "$id" "$rc"
done
poweroff -f
