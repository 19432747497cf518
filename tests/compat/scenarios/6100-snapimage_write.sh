#!/bin/bash -e
# Port of the original's 6100-snapimage_write: direct writes of 1 MiB to
# the origin and at three unaligned places of the image (126 KiB, 2 MiB +
# 126 KiB, 4 MiB + 126 KiB); the image reads back what was written to it.
# Beyond the original: the image's first MiB is still what the origin
# held at the take, and the origin never sees the image's writes.
#
# Changed from the original: a 16 MiB origin (256 MiB there). The origin
# gets 512-byte logical sectors (loop_device_attach's second argument,
# which the original gives from the storage directory's device), since
# the original writes in 1 KiB direct I/O; it is our loop device
# (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/snapimage_direct
mkdir -p "${WORK}"

image_make "${WORK}/original.img" 16
DEVICE=$(loop_device_attach "${WORK}/original.img" 512)
STORAGE=${WORK}/diff_storage
fallocate --length 16MiB "${STORAGE}"

blksnap_snapshot_create "${DEVICE}" "${STORAGE}" 256M
blksnap_snapshot_take
DEVICE_IMAGE=$(blksnap_get_image "${DEVICE}")

# 2048 sectors, each "BLKSNAP\n" and random bytes, as the original's
# magic file.
FILE=${WORK}/magic
perl -e 'open(my $r, "<", "/dev/urandom") or die; for (1 .. 2048) { read($r, my $b, 504) == 504 or die; print "BLKSNAP\n", $b }' >"${FILE}"
[ "$(stat -c %s "${FILE}")" -eq $((2048 * 512)) ] || fail "the magic file is not 1 MiB"

dd if="${FILE}" of="${DEVICE}" bs=1KiB count=1024 seek=0 oflag=direct status=none
for at in 126 $((2048 + 126)) $((4096 + 126)); do
	dd if="${FILE}" of="${DEVICE_IMAGE}" bs=1KiB count=1024 seek="${at}" oflag=direct status=none
done
sync "${DEVICE_IMAGE}"

for at in 126 $((2048 + 126)) $((4096 + 126)); do
	dd if="${DEVICE_IMAGE}" of="${FILE}_copy" bs=1KiB count=1024 skip="${at}" iflag=direct status=none
	cmp "${FILE}" "${FILE}_copy" || fail "the image at ${at} KiB is not what was written there"
	echo "Files are equal."
done
# The origin has its own write, and none of the image's (which reach up
# to 4 MiB + 1150 KiB).
cmp -s "${FILE}" <(dd if="${DEVICE}" bs=1KiB count=1024 iflag=direct status=none) ||
	fail "the origin lost its write"
cmp -s <(dd if="${DEVICE}" bs=1KiB skip=1024 count=$((4096 + 126)) iflag=direct status=none) \
	<(head -c $(((4096 + 126) * 1024)) /dev/zero) || fail "the origin sees the image's writes"
# The image's first 126 KiB: the origin's zeros of the take, not the
# origin's write after it.
cmp -s <(dd if="${DEVICE_IMAGE}" bs=1KiB count=126 iflag=direct status=none) <(head -c 126K /dev/zero) ||
	fail "the image shows the origin's write after the take"
[ "$(field_of error_code snapshot_info --device "${DEVICE}")" = 0 ] || fail "the image is not valid"

blksnap_snapshot_destroy
blksnap_detach "${DEVICE}"
loop_device_detach "${DEVICE}"
echo "snapimage_write direct: done"
