#!/bin/bash -e
# Port of the original's 2100-overflow: the difference storage is a file
# on a tmpfs with a limit far below what is written; the snapshot
# overflows, its image is marked corrupted (error_code -28), the watcher
# reports it and ends with status 0, and the origin is unharmed.
#
# Changed from the original: the origin is our loop device with ext4,
# not the filesystem holding /root (a user-space daemon cannot snapshot
# the running root filesystem); the tmpfs is the scenario's own, not
# /dev/shm; sizes (12 MiB limit, 4 MiB then 24 MiB written; the
# original has 512 MiB, 100 MiB and 768 MiB).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/overflow
MP=${WORK}/mnt
TMPFS=${WORK}/shm
mkdir -p "${MP}/one" "${MP}/image" "${TMPFS}"
mount -t tmpfs -o size=64M overflow_shm "${TMPFS}"
STORAGE=${TMPFS}/diff_storage

image_make "${WORK}/one.img" 128
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"

files_direct "${MP}/one" before 5
drop_caches

rm -f "${STORAGE}"
fallocate --length 4MiB "${STORAGE}"
blksnap_snapshot_create "${DEV1}" "${STORAGE}" 12M

files_direct "${MP}/one" tracked 5
drop_caches

blksnap_snapshot_watcher
blksnap_snapshot_take

files_mib "${MP}/one" after 4
files_check "${MP}/one"

echo "check the image before the overflow"
IMAGE=$(blksnap_get_image "${DEV1}")
mount "${IMAGE}" "${MP}/image"
files_check "${MP}/image"

echo "overflow the snapshot"
files_mib "${MP}/one" overflow 24
drop_caches
files_check "${MP}/one"
[ "$(${BLKSNAP} snapshot_info --device "${DEV1}" --field error_code)" = -28 ] ||
	fail "error_code is not -28 (ENOSPC) after the overflow"

umount "${MP}/image"
blksnap_snapshot_destroy
blksnap_watcher_wait
watcher_said ' - The snapshot was corrupted for device \[[^]]+\] with error "No space left on device"\.$' ||
	fail "the watcher did not report the overflow"

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"
umount "${TMPFS}"
echo "overflow: done"
