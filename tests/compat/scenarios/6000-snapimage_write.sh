#!/bin/bash -e
# Port of the original's 6000-snapimage_write: xfs on the origin; in each
# iteration a snapshot is taken, its image mounted (nouuid, as xfs wants
# beside its origin) and written while the origin is written at the same
# time; both keep their own files, before and after a remount of the
# image. Here the origin is unmounted before detach, as in the original.
#
# Changed from the original: sizes (320 MiB origin, xfs's smallest, and
# 4 MiB written to each side per iteration, 2 iterations; the original has
# 1 GiB, 10 MiB and 3), the storage is a directory on a tmpfs of the
# scenario's own instead of /dev/shm, and the origin is our loop device
# (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/snapimage_write
ORIGINAL=${WORK}/mnt/original
IMAGE=${WORK}/mnt/image
SHM=${WORK}/shm
mkdir -p "${ORIGINAL}" "${IMAGE}" "${SHM}"
mount -t tmpfs -o size=128M image_write_shm "${SHM}"

image_make "${WORK}/original.img" 320
DEVICE=$(loop_device_attach "${WORK}/original.img")
mkfs.xfs -q -f "${DEVICE}"
mount "${DEVICE}" "${ORIGINAL}"
[ "$(findmnt -n -o FSTYPE "${DEVICE}")" = xfs ] || fail "no xfs on ${DEVICE}"
MOUNTOPT="-o nouuid"

files_direct "${ORIGINAL}" "original-it#0" 5
drop_caches

for ITERATION in 1 2; do
	echo "iteration ${ITERATION}"
	blksnap_snapshot_create "${DEVICE}" "${SHM}" 256M
	blksnap_snapshot_take

	DEVICE_IMAGE=$(blksnap_get_image "${DEVICE}")
	# shellcheck disable=SC2086
	mount ${MOUNTOPT} "${DEVICE_IMAGE}" "${IMAGE}"
	# The image has the origin's files of the take.
	cp "${ORIGINAL}/hash.md5" "${WORK}/original-at-take.md5"
	cmp "${WORK}/original-at-take.md5" "${IMAGE}/hash.md5" || fail "the image's checksums are not those at the take"

	files_mib "${IMAGE}" "image-it#${ITERATION}" 4 &
	IMAGE_PID=$!
	files_mib "${ORIGINAL}" "original-it#${ITERATION}" 4
	wait "${IMAGE_PID}" || fail "writing to the image failed"
	drop_caches

	files_check "${IMAGE}" &
	IMAGE_PID=$!
	files_check "${ORIGINAL}"
	wait "${IMAGE_PID}" || fail "the image's files differ"
	files_absent "${IMAGE}" "original-it#${ITERATION}"
	files_absent "${ORIGINAL}" "image-it#${ITERATION}"
	drop_caches

	echo "remount the image ${DEVICE_IMAGE}"
	umount "${DEVICE_IMAGE}"
	# shellcheck disable=SC2086
	mount ${MOUNTOPT} "${DEVICE_IMAGE}" "${IMAGE}"
	files_check "${IMAGE}" &
	IMAGE_PID=$!
	files_check "${ORIGINAL}"
	wait "${IMAGE_PID}" || fail "the image's files differ after a remount"

	umount "${IMAGE}"
	[ "$(field_of error_code snapshot_info --device "${DEVICE}")" = 0 ] || fail "the image is not valid"
	blksnap_snapshot_destroy
done

umount "${ORIGINAL}"
blksnap_detach "${DEVICE}"
loop_device_detach "${DEVICE}"
umount "${SHM}"
echo "snapimage_write: done"
