#!/bin/bash -e
# The stretch flow of the original tool before its storage grew by itself
# (its stretch_snapshot, and the kernel module's no_space event): a
# snapshot created without storage gets ranges of a block device with
# snapshot_appendstorage, and each no_space event that
# snapshot_waitevent reports while the origin is written is answered
# with one more range. The image stays valid throughout.
#
# Ours, no original script: the original suite has this flow only in its
# C++ tests. The storage device is a plain loop device (see
# 1100-loop_diff_storage.sh); the origin is our loop device.
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/stretch_append
MP=${WORK}/mnt
mkdir -p "${MP}/one" "${MP}/image"
RANGE=16384 # sectors: 8 MiB a range

image_make "${WORK}/storage.img" 64
STORAGE_DEV=$(losetup --sector-size 4096 --direct-io=on -f --show "${WORK}/storage.img")

image_make "${WORK}/one.img" 128
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"
files_direct "${MP}/one" before 5
drop_caches

ID=$(${BLKSNAP} snapshot_create --device "${DEV1}")
${BLKSNAP} snapshot_appendstorage --id="${ID}" --device="${STORAGE_DEV}" --range="0:${RANGE}"
blksnap_snapshot_take

# The answer to no_space: the next range, until the device is used up.
(
	next=${RANGE}
	while :; do
		out=$(${BLKSNAP} snapshot_waitevent --id="${ID}" --timeout=1000) || exit 1
		case "${out}" in
		*"result=not found"*) exit 0 ;;
		*"event=no_space"*)
			[ $((next + RANGE)) -le $((64 * 2048)) ] || { echo "appender: storage device used up"; exit 1; }
			${BLKSNAP} snapshot_appendstorage --id="${ID}" --device="${STORAGE_DEV}" --range="${next}:${RANGE}" || exit 1
			echo "appended ${next}:${RANGE}"
			next=$((next + RANGE))
			;;
		esac
	done
) >"${WORK}/appender.log" 2>&1 &
APPENDER=$!

files_mib "${MP}/one" after 24
drop_caches
files_check "${MP}/one"
[ "$(${BLKSNAP} snapshot_info --device "${DEV1}" --field error_code)" = 0 ] ||
	fail "the image is not valid: $(cat "${WORK}/appender.log")"
total=$(field_of storage_total snapshot_info --device "${DEV1}")
[ "${total}" -gt $((RANGE * 512)) ] || fail "storage_total=${total}: nothing was appended"
grep -q '^appended ' "${WORK}/appender.log" || fail "no no_space event was answered"
echo "storage stretched to ${total} bytes"

IMAGE1=$(blksnap_get_image "${DEV1}")
mount "${IMAGE1}" "${MP}/image"
files_check "${MP}/image"
files_absent "${MP}/image" after
umount "${MP}/image"

blksnap_snapshot_destroy
wait "${APPENDER}" || fail "the appender failed: $(cat "${WORK}/appender.log")"
cat "${WORK}/appender.log"

umount "${MP}/one"
blksnap_detach "${DEV1}"
loop_device_detach "${DEV1}"
losetup -d "${STORAGE_DEV}"
echo "stretch_append: done"
