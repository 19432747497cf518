#!/bin/bash -e
# Port of the original's 1100-loop_diff_storage: the difference storage
# is a whole block device, at a fixed size.
#
# Changed from the original: sizes (64 MiB origin, 32 MiB storage), and
# the storage device is a plain loop device made with losetup, not one
# from loop_device_attach: the original gives its storage device to the
# module's helper too, which here would make it a device the daemon
# serves, and the daemon refuses its own devices as storage (EINVAL;
# its writes into the storage must not come back through itself). The
# origin is our loop device (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/loop_storage
MP=${WORK}/mnt
mkdir -p "${MP}/one" "${MP}/image"

image_make "${WORK}/storage.img" 32
STORAGE_DEV=$(losetup --sector-size 4096 --direct-io=on -f --show "${WORK}/storage.img")
echo "storage device ${STORAGE_DEV}"

image_make "${WORK}/one.img" 64
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"

files_direct "${MP}/one" before 9
drop_caches

blksnap_snapshot_create "${DEV1}" "${STORAGE_DEV}" 32M
blksnap_snapshot_take
total=$(field_of storage_total snapshot_info --device "${DEV1}")
[ "${total}" -eq $((32 << 20)) ] || fail "storage_total=${total}, not the whole 32 MiB device"

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
used=$(field_of storage_used snapshot_info --device "${DEV1}")
[ "${used}" -gt 0 ] || fail "storage_used=${used}: nothing was copied to the storage device"
[ "$(field_of error_code snapshot_info --device "${DEV1}")" = 0 ] || fail "the image is not valid"

blksnap_snapshot_destroy

drop_caches
umount "${DEV1}"
mount "${DEV1}" "${MP}/one"
files_check "${MP}/one"

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"

losetup -d "${STORAGE_DEV}"
echo "loop_diff_storage: done"
