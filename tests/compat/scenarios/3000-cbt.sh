#!/bin/bash -e
# Port of the original's 3000-cbt: change tracking over a full backup and
# incremental ones. As in the original, the readable map does not change
# while a snapshot is held however much the origin is written (the maps
# read right after the take and after the writes are equal). Beyond the
# original, which only prints what it reads: cbtinfo's change number goes
# up by one at each take within one generation; what was written after a
# take shows in the map of the next take above that take's number; and
# the extents of a file given to markdirtyblock --file (preallocated, so
# never written) show in the map of the next take, with the original's
# output lines.
#
# Changed from the original: sizes (128 MiB origin, 4 MiB a round, a
# 64 MiB storage file; the original has 4 GiB, 10 MiB and 1 GiB), and the
# origin is our loop device (tests/compat/shim.sh).
. "$(dirname "$0")/../lib.sh"

blksnap version
WORK=${HOME}/cbt
MP=${WORK}/mnt
STORAGE=${WORK}/diff_storage
mkdir -p "${MP}/one"

image_make "${WORK}/one.img" 128
DEV1=$(loop_device_attach "${WORK}/one.img")
mkfs.ext4 -q "${DEV1}"
mount "${DEV1}" "${MP}/one"
files_direct "${MP}/one" before 5
drop_caches

rm -f "${STORAGE}"
fallocate --length 64MiB "${STORAGE}"

BS=$(field_of block_size cbtinfo --device="${DEV1}")
GENERATION=$(field_of generation_id cbtinfo --device="${DEV1}")
BLOCKS=$(field_of block_count cbtinfo --device="${DEV1}")
[ "$(field_of device_capacity cbtinfo --device="${DEV1}")" -eq $((128 << 20)) ] ||
	fail "device_capacity is not 128 MiB"
[ "${BLOCKS}" -eq $(((128 << 20) / BS)) ] || fail "block_count=${BLOCKS} for block_size=${BS}"
PREVIOUS=$(field_of changes_number cbtinfo --device="${DEV1}")

# One round: take, read the map, write MIB MiB, read it again, destroy.
round()
{
	local name=$1 mib=$2 number
	blksnap_snapshot_create "${DEV1}" "${STORAGE}" 1G
	blksnap_snapshot_take
	number=$(field_of changes_number cbtinfo --device="${DEV1}")
	[ "${number}" -eq $((PREVIOUS + 1)) ] || fail "changes_number=${number} after the take, was ${PREVIOUS}"
	[ "$(field_of generation_id cbtinfo --device="${DEV1}")" = "${GENERATION}" ] ||
		fail "the generation changed at a take"
	blksnap_readcbt "${DEV1}" "${WORK}/${name}.map"
	[ "$(stat -c %s "${WORK}/${name}.map")" -eq "${BLOCKS}" ] || fail "the map is not ${BLOCKS} bytes"
	# What the last round wrote after its take is above its number now.
	if [ -n "${3:-}" ]; then
		changed=$(blocks_above "${WORK}/${name}.map" "${PREVIOUS}")
		[ "${changed}" -ge $(($3 * 1048576 / BS)) ] ||
			fail "${changed} blocks above ${PREVIOUS} in ${name}.map, but $3 MiB were written since"
		echo "${changed} blocks changed since the last take"
	fi
	if [ "${mib}" -gt 0 ]; then
		files_mib "${MP}/one" "${name}" "${mib}"
		files_check "${MP}/one"
	fi
	blksnap_readcbt "${DEV1}" "${WORK}/${name}_.map"
	blksnap_snapshot_destroy
	cmp -l "${WORK}/${name}.map" "${WORK}/${name}_.map" ||
		fail "the readable map changed while the snapshot was held"
	PREVIOUS=${number}
}

echo "full: the first snapshot of the just attached device"
round full 4
echo "first increment"
round inc-first 4 4
echo "second increment"
round inc-second 4 4

echo "markdirtyblock --file"
blksnap_snapshot_create "${DEV1}" "${STORAGE}" 1G
blksnap_snapshot_take
DIRTY_N=$(field_of changes_number cbtinfo --device="${DEV1}")
blksnap_readcbt "${DEV1}" "${WORK}/dirty.map"
fallocate --length 2MiB "${MP}/one/dirty_file"
sync
${BLKSNAP} markdirtyblock --file="${MP}/one/dirty_file" >"${WORK}/markdirty.out"
cat "${WORK}/markdirty.out"
majmin=$(stat -c '%Hd:%Ld' "${MP}/one/dirty_file")
[ "$(head -1 "${WORK}/markdirty.out")" = "device path: '/dev/block/${majmin}'" ] ||
	fail "markdirtyblock's first line is not the file's device path"
sed -n '2,$p' "${WORK}/markdirty.out" | grep -Evq '^allocate range: ofs=[0-9]+ cnt=[0-9]+$' &&
	fail "markdirtyblock printed a line that is not an allocate range"
sectors=$(sed -n 's/^allocate range: ofs=[0-9]* cnt=\([0-9]*\)$/\1/p' "${WORK}/markdirty.out" | awk '{ s += $1 } END { print s + 0 }')
[ "${sectors}" -eq 4096 ] || fail "markdirtyblock marked ${sectors} sectors, not the 4096 of a 2 MiB file"
blksnap_readcbt "${DEV1}" "${WORK}/dirty_.map"
blksnap_snapshot_destroy
echo "dirty blocks in the map of the held snapshot (the original prints them):"
cmp -l "${WORK}/dirty.map" "${WORK}/dirty_.map" || true
# As with the original, they show at once, at the held snapshot's number.
cmp -s "${WORK}/dirty.map" "${WORK}/dirty_.map" &&
	fail "the dirty blocks do not show in the held snapshot's map"
map_values "${WORK}/dirty_.map" | awk -v n="${DIRTY_N}" '$1 > n { bad = 1 } END { exit bad }' ||
	fail "the held snapshot's map has a block above its changes_number ${DIRTY_N}"

# The marked ranges are changes of the next backup.
blksnap_snapshot_create "${DEV1}" "${STORAGE}" 1G
blksnap_snapshot_take
blksnap_readcbt "${DEV1}" "${WORK}/after-dirty.map"
blksnap_snapshot_destroy
while read -r start count; do
	range_above "${WORK}/after-dirty.map" "${DIRTY_N}" "${start}" "${count}" "${BS}"
done < <(sed -n 's/^allocate range: ofs=\([0-9]*\) cnt=\([0-9]*\)$/\1 \2/p' "${WORK}/markdirty.out")

blksnap_detach_mounted "${DEV1}" "${MP}/one"
loop_device_detach "${DEV1}"
echo "cbt: done"
