/*
 * blksnap.h next to the kernel's <linux/blksnap.h> of the original blksnap
 * (include/uapi/linux/blksnap.h of veeam/blksnap and its kernel patches).
 * That header is not installed here, so this file declares stand-ins for
 * every name it has defined in any version: the struct and enum tags, the
 * enumerators and the macros, each with a layout of its own (a stand-in,
 * not a copy). It compiles only if blksnap.h defines none of those names.
 *
 * Built by tests/c_program.rs with -std=c11 -pedantic -Wall -Wextra -Werror,
 * with UAPI_FIRST defined and not (both orders of inclusion), and as C++.
 */
#ifndef UAPI_FIRST
#include <blksnap.h>
#endif

/* ---- stand-ins for the uapi names ---- */
#define BLKSNAP_CTL "stand-in"
#define BLKSNAP_IMAGE_NAME "stand-in"
#define BLKSNAP 'V'
#define IMAGE_DISK_NAME_LEN 32
#define IOCTL_BLKSNAP_VERSION 1
#define IOCTL_BLKSNAP_SNAPSHOT_CREATE 2
#define IOCTL_BLKSNAP_SNAPSHOT_DESTROY 3
#define IOCTL_BLKSNAP_SNAPSHOT_TAKE 4
#define IOCTL_BLKSNAP_SNAPSHOT_COLLECT 5
#define IOCTL_BLKSNAP_SNAPSHOT_WAIT_EVENT 6
#define IOCTL_BLKSNAP_SNAPSHOT_APPEND_STORAGE 7

struct blksnap_uuid { unsigned char stand_in[3]; };
struct blksnap_cbtinfo { char stand_in; };
struct blksnap_cbtmap { char stand_in; };
struct blksnap_sectors { char stand_in; };
struct blksnap_cbtdirty { char stand_in; };
struct blksnap_snapshotadd { char stand_in; };
struct blksnap_snapshotinfo { char stand_in; };
struct blksnap_version { char stand_in; };
struct blksnap_snapshot_create { char stand_in; };
struct blksnap_snapshot_collect { char stand_in; };
struct blksnap_snapshot_append_storage { char stand_in; };
struct blksnap_snapshot_event { char stand_in; };
struct blksnap_event_corrupted { char stand_in; };
struct blksnap_event_no_space { char stand_in; };
struct blksnap_event_low_free_space { char stand_in; };

enum blkfilter_ctl_blksnap {
    BLKFILTER_CTL_BLKSNAP_CBTINFO,
    BLKFILTER_CTL_BLKSNAP_CBTMAP,
    BLKFILTER_CTL_BLKSNAP_CBTDIRTY,
    BLKFILTER_CTL_BLKSNAP_SNAPSHOTADD,
    BLKFILTER_CTL_BLKSNAP_SNAPSHOTINFO
};
enum blksnap_ioctl {
    BLKSNAP_IOCTL_VERSION,
    BLKSNAP_IOCTL_SNAPSHOT_CREATE,
    BLKSNAP_IOCTL_SNAPSHOT_DESTROY,
    BLKSNAP_IOCTL_SNAPSHOT_TAKE,
    BLKSNAP_IOCTL_SNAPSHOT_COLLECT,
    BLKSNAP_IOCTL_SNAPSHOT_WAIT_EVENT,
    BLKSNAP_IOCTL_SNAPSHOT_APPEND_STORAGE
};
/* The lower-case spellings of earlier versions. */
enum blksnap_ioctl_v1 {
    blksnap_ioctl_version,
    blksnap_ioctl_snapshot_create,
    blksnap_ioctl_snapshot_destroy,
    blksnap_ioctl_snapshot_append_storage,
    blksnap_ioctl_snapshot_take,
    blksnap_ioctl_snapshot_collect,
    blksnap_ioctl_snapshot_wait_event
};
enum blksnap_event_codes {
    blksnap_event_code_corrupted,
    blksnap_event_code_no_space,
    blksnap_event_code_low_free_space
};

#ifdef UAPI_FIRST
#include <blksnap.h>
#endif

/* Both sets in use at once. */
int uapi_names_check(void);
int uapi_names_check(void)
{
    static struct blksnap_cbtinfo theirs;
    static struct blksnapu_cbtinfo ours;
    static struct blksnapu_event event;
    static struct blksnap_version their_version;
    (void)blksnap_version; /* our function beside their struct tag */
    return theirs.stand_in + (int)ours.block_size + event.type + their_version.stand_in +
           BLKSNAP_IOCTL_VERSION + (int)sizeof(struct blksnapu_session_error) + BLKSNAP_NAME_MAX;
}
