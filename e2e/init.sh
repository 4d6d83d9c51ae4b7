#!/bin/busybox sh
# /init of the tvdnet end-to-end guests: a busybox initramfs that runs the host's Python
# (packed into the initramfs by e2e/bundle.py) on a real virtio-serial port. Parameters come from the
# kernel command line: tvdnet.vm=, tvdnet.ip=, tvdnet.run= (the harness's run directory,
# seen through the 9p share: the key file comes from there), tvdnet.nohost=1 (unmount the
# share before starting Python: a guest that will be live-migrated).
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "E2E-INIT: $(cut -d" " -f1 /proc/uptime) $*"; }

for module in $(cat /modules.order); do
    insmod "/modules/$module.ko" 2>/dev/null || say "insmod $module failed"
done

for word in $(cat /proc/cmdline); do
    case "$word" in
        tvdnet.*=*) key="${word%%=*}"; key="${key#tvdnet.}"; eval "TVD_$key=\"${word#*=}\"" ;;
    esac
done

mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host || { say "no 9p share"; poweroff -f; }

ip link set lo up
ip addr add "$TVD_ip/16" dev eth0
ip link set eth0 up
say "up vm=$TVD_vm ip=$TVD_ip"

# The computer-key file moves into the VM (SPEC §6): a private copy on the guest's tmpfs.
mkdir -p /run/tvdnet
mount -t tmpfs -o mode=0700 tmpfs /run/tvdnet
cp "/host$TVD_run/out/export/$TVD_vm.keys" /run/tvdnet/ || say "no key file"
chmod 600 "/run/tvdnet/$TVD_vm.keys"

# The guest's Python is in this initramfs (e2e/bundle.py); the host's share is only the
# fallback for a module the bundle lacks, and where the key file comes from.
. /python.env
if [ "$TVD_nohost" = 1 ]; then
    # A guest to be live-migrated: QEMU refuses to migrate while the 9p share is mounted,
    # so it lets go of the share (the key file is copied already) and runs from the bundle.
    export PYTHONPATH=/py/src:/py/site
    umount /host && say "9p share unmounted" || say "umount /host failed"
fi
/py/bin/python3 /guest.py --vm "$TVD_vm" --key-file "/run/tvdnet/$TVD_vm.keys" --ip "$TVD_ip" 2>&1
say "guest program exited with $?"
poweroff -f
