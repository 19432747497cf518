#!/bin/bash -e
# Port of the original's 2000-stretch: a difference storage file that
# starts small grows in steps (the daemon's diff_storage_minimum, 8 MiB in
# tests/compat/run, where the original loads the module with 128 MiB)
# while the origin is written, up to the snapshot's limit; past the limit
# the snapshot overflows, the watcher reports it and ends with status 0,
# and the origin is unharmed.
#
# Changed from the original: sizes (256 MiB origin, 8 MiB file, 40 MiB
# limit, 16 MiB written, then 48 MiB to overflow; the original has
# 4 GiB, 128 MiB, 512 MiB, 100 MiB and 768 MiB), and the origin is our
# loop device (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/stretch
MP=${WORK}/mnt
STORAGE=${WORK}/diff_storage
LIMIT_MIB=40
mkdir -p "${MP}/one" "${MP}/image"

image_make "${WORK}/one.img" 256
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"

files_direct "${MP}/one" before 5
drop_caches

rm -f "${STORAGE}"
fallocate --length 8MiB "${STORAGE}"
blksnap_snapshot_create "${DEV1}" "${STORAGE}" "${LIMIT_MIB}M"

# Written after the create and before the take: in the image.
files_direct "${MP}/one" tracked 5
drop_caches

blksnap_snapshot_watcher
blksnap_snapshot_take

files_mib "${MP}/one" after 16
files_check "${MP}/one"
total=$(field_of storage_total snapshot_info --device "${DEV1}")
[ "${total}" -gt $((8 << 20)) ] || fail "storage_total=${total}: the storage did not grow past its 8 MiB"
echo "storage grew to ${total} bytes"

echo "check the image before the overflow"
IMAGE1=$(blksnap_get_image "${DEV1}")
mount "${IMAGE1}" "${MP}/image"
files_check "${MP}/image"
files_absent "${MP}/image" after

echo "overflow the snapshot"
files_mib "${MP}/one" overflow 48
[ "$(${BLKSNAP} snapshot_info --device "${DEV1}" --field error_code)" = -28 ] ||
	fail "error_code is not -28 (ENOSPC) after the overflow"
total=$(field_of storage_total snapshot_info --device "${DEV1}")
[ "${total}" -le $((LIMIT_MIB << 20)) ] || fail "storage_total=${total} is past the ${LIMIT_MIB} MiB limit"
files_check "${MP}/one"

umount "${MP}/image"
blksnap_snapshot_destroy
blksnap_watcher_wait
watcher_said '^Start snapshot watcher\.$' || fail "the watcher did not start"
watcher_said ' - The the difference storage already grow up to [0-9]+ MiB\. Limit has been reached\.$' ||
	fail "the watcher did not report the limit"
watcher_said ' - The snapshot was corrupted for device \[[^]]+\] with error "No space left on device"\.$' ||
	fail "the watcher did not report the overflow"
watcher_said '^Snapshot watcher finished$' || fail "the watcher did not finish"

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"
echo "stretch: done"
