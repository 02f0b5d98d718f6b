#!/bin/sh
# hvbench's block hotplug script for blkback (libxl runs it with `add` or `remove` and
# XENBUS_PATH set to the vbd's backend directory): the disk file becomes a loop device
# and the loop device goes when the vbd does. POSIX sh with busybox or util-linux
# losetup, so that it also runs in the lab's busybox dom0 (Xen's own `block` needs bash).
dir=$XENBUS_PATH
fail() { xenstore-write "$dir/hotplug-error" "$*" "$dir/hotplug-status" error; exit 1; }
case "$1" in
add)
    file=$(xenstore-read "$dir/params") || fail "no params for $dir"
    dev=$(losetup -f) || fail "no free loop device"
    losetup "$dev" "$file" || fail "losetup $dev $file failed"
    echo "$dev" > "$file.loop"
    mm=$(stat -L -c '%t:%T' "$dev") || fail "stat $dev failed"
    xenstore-write "$dir/physical-device" "$mm" "$dir/physical-device-path" "$dev" \
        "$dir/node" "$dev" || fail "xenstore-write failed"
    xenstore-write "$dir/hotplug-status" connected
    ;;
remove)
    file=$(xenstore-read "$dir/params" 2>/dev/null)
    dev=$(xenstore-read "$dir/node" 2>/dev/null) || dev=$(cat "$file.loop" 2>/dev/null)
    [ -n "$dev" ] && losetup -d "$dev"
    [ -n "$file" ] && rm -f "$file.loop"
    exit 0
    ;;
esac
