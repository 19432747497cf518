#!/bin/bash -e
# Port of the original's 1200-tmpfs_diff_storage: the difference storage
# is a file on a tmpfs, grown there as needed.
#
# Changed from the original: sizes (64 MiB origin, 32 MiB tmpfs, an
# 8 MiB file to start with), the tmpfs is mounted under the scenario's
# own directory, and the origin is our loop device (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/tmpfs_storage
MP=${WORK}/mnt
TMPFS=${WORK}/tmp
mkdir -p "${MP}/one" "${MP}/image" "${TMPFS}"
mount -t tmpfs -o size=32M diff_st "${TMPFS}"

STORAGE=${TMPFS}/diff_storage
fallocate --length 8MiB "${STORAGE}"

image_make "${WORK}/one.img" 64
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"

files_direct "${MP}/one" before 9
drop_caches

blksnap_snapshot_create "${DEV1}" "${STORAGE}" 2G
blksnap_snapshot_take

echo "write to the origin"
files_direct "${MP}/one" after 3
drop_caches
files_check "${MP}/one"

echo "check the image"
IMAGE1=$(blksnap_get_image "${DEV1}")
mount "${IMAGE1}" "${MP}/image"
files_check "${MP}/image"
files_absent "${MP}/image" after

echo "write to the image"
files_direct "${MP}/image" snapshot 3
drop_caches
umount "${IMAGE1}"
mount "${IMAGE1}" "${MP}/image"
files_check "${MP}/image"
umount "${MP}/image"
[ "$(field_of error_code snapshot_info --device "${DEV1}")" = 0 ] || fail "the image is not valid"

blksnap_snapshot_destroy
# The file is the storage's, used from its start and given back at its
# length: still there after the destroy.
[ "$(stat -c %s "${STORAGE}")" -eq $((8 << 20)) ] || fail "the storage file is not back at 8 MiB"

drop_caches
umount "${DEV1}"
mount "${DEV1}" "${MP}/one"
files_check "${MP}/one"

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"

umount "${TMPFS}"
echo "tmpfs_diff_storage: done"
