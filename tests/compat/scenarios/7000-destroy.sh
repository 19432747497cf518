#!/bin/bash -e
# Port of the original's 7000-destroy: the snapshot is destroyed while its
# image is mounted and written, the image device read, and the origin
# written; then the image is unmounted lazily. The writers and readers
# end (their errors are expected and ignored, as in the original), the
# snapshot is gone, and the origin's files are intact. The device is
# then detached before its umount, as in the original.
#
# Changed from the original: sizes (128 MiB origin, a 64 MiB storage
# file), the check that the snapshot is gone and the origin intact, and
# the origin is our loop device (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/destroy
MP=${WORK}/mnt
mkdir -p "${MP}/one" "${MP}/image"

image_make "${WORK}/one.img" 128
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"

echo "write to the origin before the take"
files_sync "${MP}/one" before 9
drop_caches

STORAGE=${WORK}/diff_storage
fallocate --length 64MiB "${STORAGE}"
blksnap_snapshot_create "${DEV1}" "${STORAGE}" 128M
blksnap_snapshot_take

IMAGE1=$(blksnap_get_image "${DEV1}")
mount "${IMAGE1}" "${MP}/image"

set +e
files_sync "${MP}/one" after 4 &
PID_GEN1=$!
dd if="${IMAGE1}" of=/dev/null status=none &
PID_DD1=$!
files_sync "${MP}/image" snapshot 4 &
PID_GEN2=$!
dd if="${IMAGE1}" of=/dev/null status=none &
PID_DD2=$!

echo "destroy the snapshot under load"
blksnap_snapshot_destroy
umount --lazy --force "${MP}/image"

echo "wait for the writers and readers"
wait "${PID_GEN1}"
wait "${PID_DD1}"
wait "${PID_GEN2}"
wait "${PID_DD2}"
set -e

[ -z "$(${BLKSNAP} snapshot_collect | tr -d ' \n')" ] || fail "the snapshot is still there after its destroy"
drop_caches
files_check "${MP}/one"

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"
echo "destroy: done"
