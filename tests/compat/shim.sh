# shellcheck shell=bash
#
# The compatibility shim: what a user-space blksnap cannot take over from
# the original blksnap test suite's helpers, and nothing else.
#
# The original suite loads a kernel module (modinfo, modprobe) and gives
# its scenarios raw loop devices, whose writes the module sees. Here there
# is no module: a device's writes reach blksnapd only through the daemon's
# own loop device over its FUSE file. So:
#
#   - modinfo/modprobe of "blksnap" do nothing (modinfo reports a built-in
#     module, so the suite's load and unload helpers return at once);
#     every other module is passed on to the real commands;
#   - loop_device_attach makes the raw loop device as the original does
#     (4 KiB logical sectors unless told otherwise, direct I/O), attaches
#     it with `blksnap attach --loop`, and prints OUR loop device, which
#     the scenario then formats, mounts and snapshots;
#   - loop_device_detach takes our loop device, lets the daemon go of it if
#     it is still attached, and removes the raw loop device under it.
#
# Every `blksnap` command of a scenario still goes to the CLI unchanged.
# Sourced after the helpers it overrides (tests/compat/lib.sh for our
# scenarios; after the original functions.sh for the original suite, see
# tests/compat/run). Needs BLKSNAP_COMPAT_DIR, a directory for the table
# of loop devices (our loop device -> raw loop device), and `blksnap` on
# PATH with BLKSNAP_CONTROL set.

: "${BLKSNAP_COMPAT_DIR:?BLKSNAP_COMPAT_DIR must name the directory of the shim state}"

modinfo()
{
	# The original asks for the module's file name; "(builtin)" is its
	# answer for a module that needs no loading.
	case " $* " in
	*" blksnap "*) echo "(builtin)" ;;
	*) command modinfo "$@" ;;
	esac
}

modprobe()
{
	case " $* " in
	*" blksnap "*) return 0 ;;
	*) command modprobe "$@" ;;
	esac
}

loop_device_attach()
{
	local image=$1
	local sector=${2:-4096}
	local raw out ours

	raw=$(losetup --sector-size "${sector}" --direct-io=on -f --show "${image}") || return 1
	if ! out=$(blksnap attach --device "${raw}" --loop); then
		echo "loop_device_attach: the loop devices now:" >&2
		losetup -a >&2
		losetup -d "${raw}"
		return 1
	fi
	ours=$(sed -n 's/^loop=//p' <<<"${out}")
	if [ -z "${ours}" ]; then
		echo "loop_device_attach: blksnap attach printed no loop= line: ${out}" >&2
		losetup -d "${raw}"
		return 1
	fi
	echo "${ours} ${raw}" >>"${BLKSNAP_COMPAT_DIR}/loops"
	echo "${ours}"
}

loop_device_detach()
{
	local ours=$1
	local raw

	raw=$(awk -v d="${ours}" '$1 == d { r = $2 } END { print r }' "${BLKSNAP_COMPAT_DIR}/loops" 2>/dev/null)
	if [ -z "${raw}" ]; then
		# Not one the shim made: a plain loop device.
		losetup -d "${ours}"
		return
	fi
	# The original detaches from the module first; a scenario that did
	# not (a storage device, or a failed run) still has its raw device
	# attached here.
	if blksnap list | grep -q "^device=$(basename "${raw}") "; then
		blksnap detach --device "${raw}" || return 1
	fi
	losetup -d "${raw}" || return 1
	awk -v d="${ours}" '$1 != d' "${BLKSNAP_COMPAT_DIR}/loops" >"${BLKSNAP_COMPAT_DIR}/loops.new"
	mv "${BLKSNAP_COMPAT_DIR}/loops.new" "${BLKSNAP_COMPAT_DIR}/loops"
}
