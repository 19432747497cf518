# shellcheck shell=bash
#
# Helpers of the compatibility scenarios (tests/compat/scenarios/), sourced
# by each of them. They play the part of the original blksnap suite's
# helpers (its functions.sh and blksnap.sh), written anew: the same
# blksnap commands with the original's option spellings (`--id=ID`,
# `--device=DEV`, `--field image`, ...), and its output parsed the way the
# original's helpers parse it (the UUID alone on a line from
# snapshot_create, the image device alone from `snapshot_info --field
# image`, `key=value` lines from cbtinfo). Unlike the original, the file
# checksums are recorded with names relative to their directory, so that
# checking a snapshot image's copy of a directory checks the image's files
# and not the origin's.
#
# The scenarios run with `bash -e` in a directory of their own ($HOME, made
# by tests/compat/run), with `blksnap` on PATH and BLKSNAP_CONTROL set.

# shellcheck source=shim.sh
. "$(dirname "${BASH_SOURCE[0]}")/shim.sh"

BLKSNAP=${BLKSNAP:-blksnap}
# The snapshot the helpers below work on, as in the original.
ID=""
WATCHER_PID=""
WATCHER_LOG=""

fail()
{
	echo "FAILED: $*" >&2
	exit 1
}

# A zero-filled image file of MIB MiB (sparse: it reads as zeros).
image_make()
{
	rm -f "$1"
	truncate --size "$2M" "$1"
	echo "image file $1: $2 MiB"
}

# The physical sector size of the device a directory's filesystem is on:
# the unit of the direct writes below.
sector_of()
{
	lsblk -dn -o PHY-SEC "$(findmnt -n -o SOURCE --target "$1")" | tr -d ' '
}

# Appends "MD5  NAME" of DIR/NAME to DIR/hash.md5.
record_sum()
{
	(cd "$1" && md5sum "$2" >>hash.md5)
}

# COUNT files of random content, 8 to 107 KiB each, written with O_DIRECT
# in the device's physical sectors: DIR/PREFIX-0, DIR/PREFIX-1, ...
files_direct()
{
	local dir=$1 prefix=$2 count=$3 sector kib i
	sector=$(sector_of "${dir}")
	for ((i = 0; i < count; i++)); do
		kib=$((RANDOM % 100 + 8))
		dd if=/dev/urandom of="${dir}/${prefix}-${i}" bs="${sector}" \
			count=$((kib * 1024 / sector)) oflag=direct status=none
		record_sum "${dir}" "${prefix}-${i}"
	done
	echo "${count} files ${prefix}-* written to ${dir} (direct)"
}

# The same with O_SYNC writes of 1 KiB.
files_sync()
{
	local dir=$1 prefix=$2 count=$3 i
	for ((i = 0; i < count; i++)); do
		dd if=/dev/urandom of="${dir}/${prefix}-${i}" bs=1024 count=$((RANDOM % 100 + 8)) \
			oflag=sync status=none
		record_sum "${dir}" "${prefix}-${i}"
	done
	echo "${count} files ${prefix}-* written to ${dir} (sync)"
}

# Files of 1 to 4 MiB of random content, written with O_DIRECT, until
# MIB MiB are written: DIR/PREFIX-0, ...
files_mib()
{
	local dir=$1 prefix=$2 total=$3 done_mib=0 i=0 mib
	while [ "${done_mib}" -lt "${total}" ]; do
		mib=$((RANDOM % 4 + 1))
		[ $((done_mib + mib)) -le "${total}" ] || mib=$((total - done_mib))
		dd if=/dev/urandom of="${dir}/${prefix}-${i}" bs=1M count="${mib}" oflag=direct status=none
		record_sum "${dir}" "${prefix}-${i}"
		done_mib=$((done_mib + mib))
		i=$((i + 1))
	done
	echo "${done_mib} MiB in files ${prefix}-* written to ${dir}"
}

# Every file recorded in DIR/hash.md5 has its recorded content.
files_check()
{
	echo "checking ${1}"
	(cd "$1" && md5sum --quiet -c hash.md5) || fail "files in $1 differ from their checksums"
}

# No file DIR/PREFIX-* exists (written to the origin after the take, so
# it must not be in the image).
files_absent()
{
	local found
	found=$(find "$1" -maxdepth 1 -name "$2-*" | head -1)
	[ -z "${found}" ] || fail "${found} is in $1, but was written after the take"
}

drop_caches()
{
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# blksnap_snapshot_create "DEV [DEV...]" STORAGE LIMIT: sets ID from the
# UUID that snapshot_create prints alone on its line.
blksnap_snapshot_create()
{
	local args=() dev
	for dev in $1; do
		args+=(--device "${dev}")
	done
	[ -z "${2:-}" ] || args+=(--file "$2")
	[ -z "${3:-}" ] || args+=(--limit "$3")
	ID=$(${BLKSNAP} snapshot_create "${args[@]}")
	[[ ${ID} =~ ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$ ]] ||
		fail "snapshot_create printed ${ID@Q}, not a UUID alone"
	echo "snapshot ${ID} created"
}

blksnap_snapshot_take()
{
	${BLKSNAP} snapshot_take --id="${ID}"
	echo "snapshot ${ID} taken"
}

blksnap_snapshot_destroy()
{
	${BLKSNAP} snapshot_destroy --id="${ID}" && echo "snapshot ${ID} destroyed"
}

blksnap_detach()
{
	${BLKSNAP} detach --device="$1"
}

blksnap_readcbt()
{
	${BLKSNAP} readcbtmap --device="$1" --file="$2"
}

# The block device that holds the image of DEV's snapshot, as the
# original's helper reads it: `--field image` alone on its line.
blksnap_get_image()
{
	local image
	image=$(${BLKSNAP} snapshot_info --field image --device "$1")
	[ -b "${image}" ] || fail "snapshot_info --field image printed ${image@Q}, not a block device"
	echo "${image}"
}

# The value of KEY in the key=value lines of `blksnap COMMAND ARGS...`.
field_of()
{
	local key=$1 out
	shift
	out=$(${BLKSNAP} "$@") || return 1
	sed -n "s/^${key}=//p" <<<"${out}" | head -1
}

# The snapshot watcher in the background, its output in WATCHER_LOG.
blksnap_snapshot_watcher()
{
	WATCHER_LOG=${HOME}/watcher.log
	${BLKSNAP} snapshot_watcher --id="${ID}" >"${WATCHER_LOG}" 2>&1 &
	WATCHER_PID=$!
}

# Waits for the watcher; fails unless it exited with status 0. Prints what
# it printed.
blksnap_watcher_wait()
{
	local status=0
	wait "${WATCHER_PID}" || status=$?
	sed 's/^/watcher: /' "${WATCHER_LOG}"
	[ "${status}" -eq 0 ] || fail "snapshot_watcher exited with status ${status}"
}

# Whether the watcher printed a line matching the extended regex.
watcher_said()
{
	grep -Eq "$1" "${WATCHER_LOG}"
}

# The end of a device, as the original ends it: detach from blksnap while
# its filesystem is still mounted (tracking stops, the loop device serves
# the filesystem untracked), then unmount it, then remove its loop device
# (loop_device_detach, after this).
blksnap_detach_mounted()
{
	local dev=$1 mountpoint=$2
	blksnap_detach "${dev}"
	umount "${mountpoint}"
}

# The change map of FILE, one number per line (block 0 first).
map_values()
{
	od -An -v -tu1 -w1 "$1" | tr -d ' '
}

# How many blocks of map FILE hold a change number above N.
blocks_above()
{
	map_values "$1" | awk -v n="$2" '$1 > n { c++ } END { print c + 0 }'
}

# Fails unless every block of map FILE that sectors START..START+COUNT-1
# touch holds a change number above N (block size BS bytes).
range_above()
{
	local map=$1 n=$2 start=$3 count=$4 bs=$5
	map_values "${map}" | awk -v n="${n}" -v first=$((start * 512 / bs)) \
		-v last=$(((start + count) * 512 / bs - ((start + count) * 512 % bs == 0 ? 1 : 0))) '
		NR - 1 >= first && NR - 1 <= last && $1 <= n { bad++ }
		END { exit bad > 0 }' ||
		fail "blocks of sectors ${start}+${count} are not above change number ${n} in ${map}"
}
