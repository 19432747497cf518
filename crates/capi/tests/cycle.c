/*
 * A C program driving libblksnap through a full cycle against a running
 * blksnapd: version, attach, list, cbtinfo, snapshots (directory storage,
 * then appended sector ranges, then options), take, info, markdirtyblock,
 * readcbtmap, collect, waitevent, destroy, the error paths, detach.
 *
 * Usage: cycle SOCKET IMAGE_A IMAGE_B STORAGE_DIR APPEND_FILE MISSING_PATH
 *   IMAGE_A, IMAGE_B: 8 MiB image files (absolute paths); STORAGE_DIR: an
 *   empty directory; APPEND_FILE: a file of at least 4 MiB; MISSING_PATH: a
 *   path that does not exist.
 *
 * Prints one "ok" line per check and "cycle: N checks passed" at the end;
 * exits 1 at the first failed check (printed on stderr).
 * Built by tests/c_program.rs with -std=c11 -pedantic -Wall -Wextra -Werror.
 */
#define _XOPEN_SOURCE 700

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <blksnap.h>

#define MIB (UINT64_C(1) << 20)

static struct blksnapu_client *c;
static int checks;

static void fail(const char *file, int line, const char *what, const char *detail)
{
    fprintf(stderr, "FAIL %s:%d: %s%s%s\n", file, line, what, detail[0] ? ": " : "", detail);
    fprintf(stderr, "  last error: %s\n", blksnap_last_error(c));
    exit(1);
}

/* A condition, with a detail line printed when it is false. */
#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            char detail_[3 * PATH_MAX];                                        \
            snprintf(detail_, sizeof detail_, __VA_ARGS__);           \
            fail(__FILE__, __LINE__, #cond, detail_);                 \
        }                                                             \
        checks++;                                                     \
        printf("ok   %s\n", #cond);                                   \
    } while (0)

/* A call that must return `want` (0 or a negative errno value). */
#define EXPECT(call, want)                                            \
    do {                                                              \
        int rc_ = (call);                                             \
        if (rc_ != (want)) {                                          \
            char detail_[3 * PATH_MAX];                                        \
            snprintf(detail_, sizeof detail_, "returned %d (%s), expected %d", rc_, \
                     strerror(-rc_), (want));                         \
            fail(__FILE__, __LINE__, #call, detail_);                 \
        }                                                             \
        checks++;                                                     \
        printf("ok   %s = %d\n", #call, rc_);                         \
    } while (0)

static int all_zero(const uint8_t *bytes, size_t n, size_t except)
{
    for (size_t i = 0; i < n; i++)
        if (i != except && bytes[i] != 0)
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s SOCKET IMAGE_A IMAGE_B STORAGE_DIR APPEND_FILE MISSING_PATH\n",
                argv[0]);
        return 2;
    }
    const char *socket_path = argv[1], *a_path = argv[2], *b_path = argv[3];
    const char *storage_dir = argv[4], *append_file = argv[5], *missing = argv[6];
    int err = 1;

    CHECK(strcmp(blksnap_library_version(), BLKSNAP_VERSION) == 0, "library %s, header %s",
          blksnap_library_version(), BLKSNAP_VERSION);

    /* ---- connect ---- */
    char no_socket[PATH_MAX];
    snprintf(no_socket, sizeof no_socket, "%s.none", socket_path);
    CHECK(blksnap_connect(no_socket, &err) == NULL && err == -ENOENT, "err %d", err);
    CHECK(strstr(blksnap_last_error(NULL), ".none") != NULL, "%s", blksnap_last_error(NULL));
    printf("     connect error: %s\n", blksnap_last_error(NULL));
    c = blksnap_connect(socket_path, &err);
    CHECK(c != NULL && err == 0, "err %d: %s", err, blksnap_last_error(NULL));
    CHECK(strcmp(blksnap_last_error(c), "") == 0, "%s", blksnap_last_error(c));

    /* ---- version ---- */
    char version[64];
    uint32_t protocol = 0;
    EXPECT(blksnap_version(c, version, sizeof version, &protocol), 0);
    CHECK(version[0] != '\0' && protocol == BLKSNAP_PROTOCOL_VERSION, "version '%s' protocol %u",
          version, (unsigned)protocol);
    printf("     daemon version %s, protocol %u\n", version, (unsigned)protocol);
    EXPECT(blksnap_version(c, version, 1, NULL), -ERANGE);

    /* ---- attach: A by absolute path and a name, B by a relative path ---- */
    char name_a[BLKSNAP_NAME_MAX], name_b[BLKSNAP_NAME_MAX], b_dir[PATH_MAX], b_rel[PATH_MAX];
    EXPECT(blksnap_attach(c, a_path, "disk-a", name_a, sizeof name_a), 0);
    CHECK(strcmp(name_a, "disk-a") == 0, "name %s", name_a);
    snprintf(b_dir, sizeof b_dir, "%s", b_path);
    char *slash = strrchr(b_dir, '/');
    CHECK(slash != NULL, "%s is not a path", b_path);
    *slash = '\0';
    const char *b_file = slash + 1;
    CHECK(chdir(b_dir) == 0, "chdir %s: %s", b_dir, strerror(errno));
    snprintf(b_rel, sizeof b_rel, "./%s", b_file);
    EXPECT(blksnap_attach(c, b_rel, NULL, name_b, sizeof name_b), 0);
    CHECK(strcmp(name_b, b_file) == 0, "name %s", name_b);
    char short_name[8];
    EXPECT(blksnap_attach(c, a_path, NULL, short_name, sizeof short_name), -EINVAL);
    EXPECT(blksnap_attach(c, a_path, "again", NULL, 0), -EEXIST);

    /* ---- list ---- */
    struct blksnapu_device_info devices_info[4];
    size_t n = 0;
    EXPECT(blksnap_list(c, devices_info, 4, &n), 0);
    CHECK(n == 2, "%zu devices", n);
    char b_real[PATH_MAX];
    CHECK(realpath(b_path, b_real) != NULL, "realpath %s: %s", b_path, strerror(errno));
    int found_b = 0;
    for (size_t i = 0; i < n; i++) {
        printf("     device %s path %s size %llu\n", devices_info[i].name, devices_info[i].path,
               (unsigned long long)devices_info[i].size);
        if (strcmp(devices_info[i].name, name_b) == 0)
            found_b = strcmp(devices_info[i].path, b_real) == 0 &&
                      devices_info[i].size == 8 * MIB && !devices_info[i].in_snapshot;
    }
    CHECK(found_b, "B is listed with its absolute path %s", b_real);
    EXPECT(blksnap_list(c, NULL, 0, &n), -EOVERFLOW);
    CHECK(n == 2, "%zu devices", n);

    /* ---- cbtinfo ---- */
    const char *keys[2] = {"disk-a", b_path};
    struct blksnapu_cbtinfo cbt;
    for (int i = 0; i < 2; i++) {
        EXPECT(blksnapu_cbtinfo(c, keys[i], &cbt), 0);
        CHECK(cbt.block_size == 65536 && cbt.block_count == 128 && cbt.device_capacity == 8 * MIB,
              "block_size %u block_count %llu capacity %llu", (unsigned)cbt.block_size,
              (unsigned long long)cbt.block_count, (unsigned long long)cbt.device_capacity);
        CHECK(cbt.changes_number == 0 && cbt.current_number == 1, "changes %u current %u",
              cbt.changes_number, cbt.current_number);
        CHECK(strcmp(cbt.generation_reason, "attached") == 0, "generation_reason %s",
              cbt.generation_reason);
    }
    char generation[BLKSNAP_ID_STRING_SIZE];
    EXPECT(blksnap_id_to_string(cbt.generation_id, generation, sizeof generation), 0);
    printf("     generation of B: %s\n", generation);

    /* ---- snapshot 1: both devices, directory storage ---- */
    uint8_t id1[BLKSNAP_ID_SIZE], seen[BLKSNAP_ID_SIZE];
    char id1_text[BLKSNAP_ID_STRING_SIZE];
    struct blksnapu_image_info image;
    EXPECT(blksnap_snapshot_create(c, keys, 2, storage_dir, 0, id1), 0);
    EXPECT(blksnap_id_to_string(id1, id1_text, sizeof id1_text), 0);
    printf("     snapshot %s\n", id1_text);
    EXPECT(blksnap_snapshot_info(c, "disk-a", seen, &image), 0);
    CHECK(!image.taken && image.device_count == 2 && memcmp(seen, id1, sizeof id1) == 0,
          "taken %d devices %u", image.taken, (unsigned)image.device_count);
    EXPECT(blksnap_snapshot_take(c, id1), 0);
    EXPECT(blksnap_snapshot_take(c, id1), -EPERM);
    EXPECT(blksnap_snapshot_info(c, "disk-a", seen, &image), 0);
    CHECK(image.taken && image.error_code == 0 && image.size == 8 * MIB && image.chunk_size > 0 &&
              memcmp(seen, id1, sizeof id1) == 0,
          "taken %d error_code %d size %llu chunk_size %llu", image.taken, (int)image.error_code,
          (unsigned long long)image.size, (unsigned long long)image.chunk_size);
    printf("     image of disk-a: size %llu chunk_size %llu storage %llu/%llu location '%s'\n",
           (unsigned long long)image.size, (unsigned long long)image.chunk_size,
           (unsigned long long)image.storage_used, (unsigned long long)image.storage_total,
           image.image);
    EXPECT(blksnapu_cbtinfo(c, "disk-a", &cbt), 0);
    CHECK(cbt.changes_number == 1 && cbt.current_number == 2, "changes %u current %u",
          cbt.changes_number, cbt.current_number);

    /* ---- markdirtyblock: 4 KiB at 1 MiB = tracking block 16 of A ---- */
    const struct blksnapu_range dirty = {.start = 2048, .count = 8};
    EXPECT(blksnap_markdirtyblock(c, "disk-a", &dirty, 1), 0);
    const struct blksnapu_range outside = {.start = 16384, .count = 8};
    EXPECT(blksnap_markdirtyblock(c, "disk-a", &outside, 1), -EINVAL);
    EXPECT(blksnap_markdirtyblock(c, "disk-a", NULL, 1), -EINVAL);
    /* Over the daemon's request size: refused here, the connection goes on. */
    size_t many = 60000;
    struct blksnapu_range *ranges = calloc(many, sizeof *ranges);
    CHECK(ranges != NULL, "calloc");
    for (size_t i = 0; i < many; i++)
        ranges[i] = dirty;
    EXPECT(blksnap_markdirtyblock(c, "disk-a", ranges, many), -E2BIG);
    EXPECT(blksnap_markdirtyblock(c, "disk-a", ranges, 1000), 0);
    free(ranges);

    /* ---- readcbtmap: the readable map is frozen while the snapshot is held,
     * but for image writes and markdirtyblock, raised to changes_number ---- */
    uint8_t map[256];
    size_t count = 0;
    EXPECT(blksnap_readcbtmap(c, "disk-a", map, sizeof map, &count), 0);
    CHECK(count == 128 && map[16] == 1 && all_zero(map, count, 16), "count %zu map[16] %u",
          count, map[16]);
    EXPECT(blksnap_readcbtmap(c, "disk-a", map, 16, &count), -EOVERFLOW);
    CHECK(count == 128, "count %zu", count);
    count = 0;
    EXPECT(blksnap_readcbtmap(c, "disk-a", NULL, 0, &count), -EOVERFLOW);
    CHECK(count == 128, "count %zu", count);

    /* ---- collect, waitevent ---- */
    uint8_t ids[4][BLKSNAP_ID_SIZE];
    EXPECT(blksnap_snapshot_collect(c, ids, 4, &count), 0);
    CHECK(count == 1 && memcmp(ids[0], id1, sizeof id1) == 0, "%zu snapshots", count);
    struct blksnapu_event event;
    memset(&event, 0xff, sizeof event);
    EXPECT(blksnap_snapshot_waitevent(c, id1, 10, &event), 0);
    CHECK(event.type == BLKSNAP_EVENT_NONE && event.time_ns == 0, "event type %d", (int)event.type);

    /* ---- a device in a snapshot cannot be detached ---- */
    EXPECT(blksnap_detach(c, "disk-a"), -EBUSY);
    CHECK(strlen(blksnap_last_error(c)) > 0, "empty message");
    printf("     busy: %s\n", blksnap_last_error(c));

    /* ---- destroy ---- */
    EXPECT(blksnap_snapshot_destroy(c, id1), 0);
    EXPECT(blksnap_snapshot_collect(c, NULL, 0, &count), 0);
    CHECK(count == 0, "%zu snapshots", count);
    EXPECT(blksnap_snapshot_waitevent(c, id1, 10, &event), -ENOENT);
    EXPECT(blksnap_snapshot_destroy(c, id1), -ENOENT);

    /* ---- snapshot 2: no storage at create, add, appendstorage, take ---- */
    uint8_t id2[BLKSNAP_ID_SIZE];
    EXPECT(blksnap_snapshot_create(c, NULL, 0, NULL, 0, id2), 0);
    EXPECT(blksnap_snapshot_add(c, id2, "disk-a"), 0);
    EXPECT(blksnap_snapshot_add(c, id2, b_rel), 0); /* relative, resolved in B's directory */
    const struct blksnapu_range storage = {.start = 0, .count = 8192}; /* 4 MiB */
    EXPECT(blksnap_snapshot_appendstorage(c, id2, append_file, &storage, 1), 0);
    EXPECT(blksnap_snapshot_take(c, id2), 0);
    EXPECT(blksnap_snapshot_add(c, id2, "disk-a"), -EEXIST); /* already in it */
    EXPECT(blksnap_snapshot_info(c, name_b, NULL, &image), 0);
    CHECK(image.taken && image.error_code == 0 && image.device_count == 2 &&
              image.storage_total == 4 * MIB,
          "taken %d error_code %d devices %u storage_total %llu", image.taken,
          (int)image.error_code, (unsigned)image.device_count,
          (unsigned long long)image.storage_total);

    /* ---- the readable map now shows the mark-dirty block raised ---- */
    EXPECT(blksnap_readcbtmap(c, "disk-a", map, sizeof map, &count), 0);
    CHECK(count == 128 && map[16] == 2 && all_zero(map, count, 16), "count %zu map[16] %u", count,
          map[16]);
    EXPECT(blksnapu_cbtinfo(c, "disk-a", &cbt), 0);
    CHECK(cbt.changes_number == 2 && map[16] > 1, "changes %u: block 16 changed since backup 1",
          cbt.changes_number);
    EXPECT(blksnap_readcbtmap(c, name_b, map, sizeof map, &count), 0);
    CHECK(count == 128 && all_zero(map, count, SIZE_MAX), "B has no changes");
    EXPECT(blksnap_snapshot_destroy(c, id2), 0);

    /* ---- snapshot 3: options ---- */
    uint8_t id3[BLKSNAP_ID_SIZE];
    struct blksnapu_snapshot_options options = {
        .limit = 64 * MIB,
        .on_copy_error = BLKSNAP_ON_COPY_ERROR_BREAK_ORIGIN_WRITE,
        .copy_timeout_ms = 1000,
    };
    EXPECT(blksnap_snapshot_create_ex(c, keys, 1, storage_dir, &options, id3), 0);
    EXPECT(blksnap_snapshot_info(c, "disk-a", NULL, &image), 0);
    CHECK(image.storage_limit == 64 * MIB && !image.taken, "limit %llu",
          (unsigned long long)image.storage_limit);
    EXPECT(blksnap_snapshot_destroy(c, id3), 0);
    options.on_copy_error = 7;
    EXPECT(blksnap_snapshot_create_ex(c, keys, 1, storage_dir, &options, id3), -EINVAL);
    options.on_copy_error = BLKSNAP_ON_COPY_ERROR_DEFAULT;
    /* A file with content (the appended one, now free, given a written
       byte: reserved space or holes are no content) is storage only with
       BLKSNAP_SNAPSHOT_OVERWRITE. */
    int content_fd = open(append_file, O_WRONLY);
    CHECK(content_fd >= 0, "open %s", append_file);
    CHECK(pwrite(content_fd, "x", 1, 4096) == 1, "pwrite %s", append_file);
    close(content_fd);
    EXPECT(blksnap_snapshot_create_ex(c, keys, 1, append_file, &options, id3), -EEXIST);
    CHECK(strstr(blksnap_last_error(c), "overwrite") != NULL, "%s", blksnap_last_error(c));
    EXPECT(blksnap_snapshot_create_flags(c, keys, 1, append_file, &options, 2, id3), -EINVAL);
    EXPECT(blksnap_snapshot_create_flags(c, keys, 1, append_file, &options,
                                         BLKSNAP_SNAPSHOT_OVERWRITE, id3),
           0);
    EXPECT(blksnap_snapshot_destroy(c, id3), 0);

    /* ---- error paths ---- */
    EXPECT(blksnap_attach(c, missing, NULL, NULL, 0), -ENOENT);
    printf("     missing: %s\n", blksnap_last_error(c));
    EXPECT(blksnap_detach(c, "no-such-device"), -ENOENT);
    uint8_t random_id[BLKSNAP_ID_SIZE];
    EXPECT(blksnap_id_from_string("6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5", random_id), 0);
    EXPECT(blksnap_snapshot_take(c, random_id), -ENOENT);
    printf("     random id: %s\n", blksnap_last_error(c));
    const char *unknown[2] = {"disk-a", "no-such-device"};
    EXPECT(blksnap_snapshot_create(c, unknown, 2, storage_dir, 0, id3), -ENOENT);
    EXPECT(blksnap_snapshot_collect(c, NULL, 0, &count), 0);
    CHECK(count == 0, "a failed create left %zu snapshots", count);
    EXPECT(blksnap_snapshot_info(c, "disk-a", NULL, &image), -ENOENT);
    EXPECT(blksnap_detach(c, NULL), -EINVAL);
    EXPECT(blksnapu_cbtinfo(c, "disk-a", NULL), -EINVAL);
    CHECK(strstr(blksnap_last_error(c), "out") != NULL, "%s", blksnap_last_error(c));
    EXPECT(blksnap_detach(NULL, "disk-a"), -EINVAL);
    EXPECT(blksnap_snapshot_take(c, NULL), -EINVAL);
    EXPECT(blksnap_id_from_string("not an id", random_id), -EINVAL);
    uint8_t parsed[BLKSNAP_ID_SIZE];
    EXPECT(blksnap_id_from_string(id1_text, parsed), 0);
    CHECK(memcmp(parsed, id1, sizeof id1) == 0, "id text round trip");

    /* ---- detach: A by path, B by name ---- */
    EXPECT(blksnap_detach(c, a_path), 0);
    EXPECT(blksnap_detach(c, name_b), 0);
    EXPECT(blksnap_list(c, NULL, 0, &n), 0);
    CHECK(n == 0, "%zu devices left", n);

    blksnap_disconnect(c);
    c = NULL;
    printf("cycle: %d checks passed\n", checks);
    return 0;
}
