#!/bin/bash -e
# Port of the original's 1300-tmpfile_diff_storage: the difference storage
# is given as a directory; an unnamed file is made there and vanishes with
# the snapshot.
#
# Changed from the original: sizes (64 MiB origin), the directory is the
# scenario's own, and the origin is our loop device (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/tmpfile_storage
MP=${WORK}/mnt
STORAGE_DIR=${WORK}/storage
mkdir -p "${MP}/one" "${MP}/image" "${STORAGE_DIR}"

image_make "${WORK}/one.img" 64
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"

files_direct "${MP}/one" before 9
drop_caches

blksnap_snapshot_create "${DEV1}" "${STORAGE_DIR}" 2G
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
[ -z "$(ls -A "${STORAGE_DIR}")" ] || fail "the storage left a named file in ${STORAGE_DIR}"
[ "$(field_of storage_total snapshot_info --device "${DEV1}")" -gt 0 ] || fail "the storage did not grow"

blksnap_snapshot_destroy

drop_caches
umount "${DEV1}"
mount "${DEV1}" "${MP}/one"
files_check "${MP}/one"

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"
echo "tmpfile_diff_storage: done"
