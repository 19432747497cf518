#!/bin/bash -e
# Port of the original's 1000-simple: two ext4 devices in one snapshot,
# difference storage in a small file that grows; the image holds the
# files written before the take and none written after; writes to the
# image stay in the image; the origin is unharmed once the snapshot is
# gone. Detach comes before umount, as in the original.
#
# Changed from the original: sizes (64 and 96 MiB devices, still small
# files), and its devices are our loop devices (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/simple
MP=${WORK}/mnt
mkdir -p "${MP}/one" "${MP}/two" "${MP}/image"

STORAGE=${WORK}/diff_storage
fallocate --length 4KiB "${STORAGE}"

image_make "${WORK}/one.img" 64
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"

image_make "${WORK}/two.img" 96
DEV2=$(loop_device_attach "${WORK}/two.img")
mkfs.ext4 -q "${DEV2}"
mount "${DEV2}" "${MP}/two"
echo "devices ${DEV1} ${DEV2}"

files_direct "${MP}/one" before 9
files_direct "${MP}/two" before 4
drop_caches

blksnap_snapshot_create "${DEV1} ${DEV2}" "${STORAGE}" 2G
blksnap_snapshot_take

echo "write to the origin"
cp "${MP}/one/hash.md5" "${WORK}/one-at-take.md5"
files_direct "${MP}/one" after 3
drop_caches
files_check "${MP}/one"

echo "check the images"
IMAGE1=$(blksnap_get_image "${DEV1}")
IMAGE2=$(blksnap_get_image "${DEV2}")
[ "${IMAGE1}" != "${IMAGE2}" ] || fail "both devices have image ${IMAGE1}"
mount "${IMAGE1}" "${MP}/image"
cmp "${WORK}/one-at-take.md5" "${MP}/image/hash.md5" || fail "the image's checksums are not those at the take"
files_check "${MP}/image"
files_absent "${MP}/image" after

echo "write to the image"
files_direct "${MP}/image" snapshot 3
drop_caches
umount "${IMAGE1}"
mount "${IMAGE1}" "${MP}/image"
files_check "${MP}/image"
umount "${MP}/image"
mount -o ro,noload "${IMAGE2}" "${MP}/image"
files_check "${MP}/image"
umount "${MP}/image"

blksnap_snapshot_destroy
[ -z "$(${BLKSNAP} snapshot_collect | tr -d ' \n')" ] || fail "a snapshot is left after the destroy"

drop_caches
umount "${DEV1}"
mount "${DEV1}" "${MP}/one"
files_check "${MP}/one"
files_absent "${MP}/one" snapshot

echo "detach the second device, then the first"
blksnap_detach_mounted "${DEV2}" "${MP}/two"
loop_device_detach "${DEV2}"

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"
echo "simple: done"
