/*
 * A C program driving a libblksnap session end to end against a running
 * blksnapd (the original library's ISession): the idempotent attach, a
 * session over a real image file with directory storage, a write to the
 * origin through the daemon's NBD export after the take, the image read
 * back through its NBD export (the location the session gives), no error,
 * a window of the change map, free (the snapshot is gone), a session that
 * cannot be made.
 *
 * Usage: session SOCKET DISK STORAGE_DIR
 *   DISK: an 8 MiB image file (absolute path), attached by no one;
 *   STORAGE_DIR: a directory. The daemon serves NBD on a Unix socket.
 *
 * Prints one "ok" line per check and "session: N checks passed" at the end;
 * exits 1 at the first failed check. Built by tests/c_program.rs with
 * -std=c11 -pedantic -Wall -Wextra -Werror.
 */
#define _XOPEN_SOURCE 700

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <blksnap.h>

#define MIB (UINT64_C(1) << 20)

static int checks;

#define CHECK(cond, ...)                                                      \
    do {                                                                      \
        if (!(cond)) {                                                        \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
            fprintf(stderr, __VA_ARGS__);                                     \
            fprintf(stderr, "\n  last error: %s\n", blksnap_last_error(NULL)); \
            exit(1);                                                          \
        }                                                                     \
        checks++;                                                             \
        printf("ok   %s\n", #cond);                                           \
    } while (0)

/* ---- a minimal NBD client: fixed newstyle, NBD_OPT_EXPORT_NAME, simple replies ---- */

static int full(int fd, void *buf, size_t len, int writing)
{
    unsigned char *p = buf;
    while (len > 0) {
        ssize_t n = writing ? write(fd, p, len) : read(fd, p, len);
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static void put64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

static int hex(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                          : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Percent-decodes `in` (up to `end`) into `out` of `len` bytes. */
static int decode(const char *in, const char *end, char *out, size_t len)
{
    size_t n = 0;
    for (; in < end; in++) {
        char c = *in;
        if (c == '%' && end - in >= 3 && hex(in[1]) >= 0 && hex(in[2]) >= 0) {
            c = (char)(hex(in[1]) * 16 + hex(in[2]));
            in += 2;
        }
        if (n + 1 >= len)
            return -1;
        out[n++] = c;
    }
    out[n] = '\0';
    return 0;
}

/* Connects to `export` on the NBD socket `path`; -1 on failure. */
static int nbd_open(const char *path, const char *export, uint64_t *size)
{
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (fd < 0 || strlen(path) >= sizeof addr.sun_path)
        return -1;
    strcpy(addr.sun_path, path);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0)
        return -1;
    unsigned char hello[18];
    if (full(fd, hello, sizeof hello, 0) || memcmp(hello, "NBDMAGICIHAVEOPT", 16) != 0 ||
        !(hello[17] & 2)) /* NO_ZEROES */
        return -1;
    uint32_t flags = htonl(1 | 2); /* FIXED_NEWSTYLE | NO_ZEROES */
    unsigned char option[16];
    memcpy(option, "IHAVEOPT", 8);
    uint32_t opt = htonl(1), len = htonl((uint32_t)strlen(export)); /* NBD_OPT_EXPORT_NAME */
    memcpy(option + 8, &opt, 4);
    memcpy(option + 12, &len, 4);
    unsigned char reply[10];
    if (full(fd, &flags, 4, 1) || full(fd, option, sizeof option, 1) ||
        full(fd, (void *)export, strlen(export), 1) || full(fd, reply, sizeof reply, 0))
        return -1;
    *size = 0;
    for (int i = 0; i < 8; i++)
        *size = *size << 8 | reply[i];
    return fd;
}

/* One command (0 read, 1 write, 3 flush); 0, or the NBD error (or -1). */
static int nbd_io(int fd, uint16_t type, uint64_t offset, void *buf, uint32_t len)
{
    static uint64_t handle;
    unsigned char req[28];
    uint32_t magic = htonl(0x25609513), length = htonl(len);
    uint16_t cmd_flags = 0, cmd = htons(type);
    memcpy(req, &magic, 4);
    memcpy(req + 4, &cmd_flags, 2);
    memcpy(req + 6, &cmd, 2);
    put64(req + 8, ++handle);
    put64(req + 16, offset);
    memcpy(req + 24, &length, 4);
    if (full(fd, req, sizeof req, 1) || (type == 1 && full(fd, buf, len, 1)))
        return -1;
    unsigned char reply[16];
    if (full(fd, reply, sizeof reply, 0))
        return -1;
    uint32_t error;
    memcpy(&magic, reply, 4);
    memcpy(&error, reply + 4, 4);
    if (ntohl(magic) != 0x67446698)
        return -1;
    if (error != 0)
        return (int)ntohl(error);
    if (type == 0 && full(fd, buf, len, 0))
        return -1;
    return 0;
}

static int all(const unsigned char *p, size_t n, unsigned char v)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != v)
            return 0;
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET DISK STORAGE_DIR\n", argv[0]);
        return 2;
    }
    const char *socket_path = argv[1], *disk = argv[2], *storage = argv[3];
    int err = 1;
    struct blksnapu_client *c = blksnap_connect(socket_path, &err);
    CHECK(c != NULL && err == 0, "connect: %d", err);

    /* ---- the idempotent attach: the original tool's "Already was attached" ---- */
    char name[BLKSNAP_NAME_MAX];
    bool already = true;
    int rc = blksnap_attach_idempotent(c, disk, NULL, name, sizeof name, &already);
    CHECK(rc == 0 && !already, "rc %d already %d: %s", rc, already, blksnap_last_error(c));
    rc = blksnap_attach_idempotent(c, disk, name, name, sizeof name, &already);
    CHECK(rc == 0 && already, "rc %d already %d: %s", rc, already, blksnap_last_error(c));
    rc = blksnap_attach_idempotent(c, disk, "another-name", NULL, 0, &already);
    CHECK(rc == -EEXIST, "rc %d", rc);
    CHECK(blksnap_attach(c, disk, NULL, NULL, 0) == -EEXIST, "the plain attach");

    /* ---- data before the take, through the daemon's NBD export of the origin ---- */
    struct blksnapu_device_info devices[2];
    size_t n = 0;
    CHECK(blksnap_list(c, devices, 2, &n) == 0 && n == 1, "%zu devices", n);
    char nbd_socket[BLKSNAP_PATH_MAX];
    snprintf(nbd_socket, sizeof nbd_socket, "%s", socket_path);
    char *slash = strrchr(nbd_socket, '/');
    CHECK(slash != NULL, "%s", socket_path);
    snprintf(slash + 1, sizeof nbd_socket - (size_t)(slash + 1 - nbd_socket), "nbd.sock");
    uint64_t size = 0;
    int origin = nbd_open(nbd_socket, name, &size);
    CHECK(origin >= 0 && size == 8 * MIB, "NBD %s on %s: size %llu", name, nbd_socket,
          (unsigned long long)size);
    static unsigned char block[4096];
    memset(block, 0x11, sizeof block);
    CHECK(nbd_io(origin, 1, MIB, block, sizeof block) == 0 && nbd_io(origin, 3, 0, NULL, 0) == 0,
          "write before the take");

    /* ---- the session: attach (again), create, storage, take ---- */
    const char *list[1] = {disk};
    struct blksnapu_session *s =
        blksnap_session_create(socket_path, list, 1, storage, NULL, 0, 0, &err);
    CHECK(s != NULL && err == 0, "err %d", err);
    uint8_t id[BLKSNAP_ID_SIZE], ids[2][BLKSNAP_ID_SIZE];
    CHECK(blksnap_session_id(s, id) == 0, "id");
    CHECK(blksnap_snapshot_collect(c, ids, 2, &n) == 0 && n == 1 && memcmp(ids[0], id, 16) == 0,
          "%zu snapshots", n);
    struct blksnapu_image_info info;
    CHECK(blksnap_snapshot_info(c, name, NULL, &info) == 0 && info.taken && info.error_code == 0,
          "taken %d error %d", info.taken, (int)info.error_code);

    /* ---- the image, where the session says it is ---- */
    char location[BLKSNAP_PATH_MAX];
    CHECK(blksnap_session_image(s, disk, location, sizeof location) == 0, "image of %s", disk);
    printf("     image: %s\n", location);
    CHECK(blksnap_session_image(s, name, location, 8) == -ERANGE, "short buffer");
    CHECK(blksnap_session_image(s, "not-in-it", location, sizeof location) == -ENOENT, "unknown");
    CHECK(blksnap_session_image(s, name, location, sizeof location) == 0, "by name");
    const char *prefix = "nbd+unix:///", *sock = strstr(location, "?socket=");
    CHECK(strncmp(location, prefix, strlen(prefix)) == 0 && sock != NULL, "%s", location);
    char export[BLKSNAP_NAME_MAX + 16], image_socket[BLKSNAP_PATH_MAX];
    CHECK(decode(location + strlen(prefix), sock, export, sizeof export) == 0 &&
              decode(sock + 8, sock + strlen(sock), image_socket, sizeof image_socket) == 0,
          "%s", location);
    int image = nbd_open(image_socket, export, &size);
    CHECK(image >= 0 && size == 8 * MIB, "NBD %s: size %llu", export, (unsigned long long)size);

    /* ---- a write to the origin after the take; the image keeps the old data ---- */
    memset(block, 0x22, sizeof block);
    CHECK(nbd_io(origin, 1, MIB, block, sizeof block) == 0 && nbd_io(origin, 3, 0, NULL, 0) == 0,
          "write after the take");
    memset(block, 0, sizeof block);
    CHECK(nbd_io(image, 0, MIB, block, sizeof block) == 0 && all(block, sizeof block, 0x11),
          "the image at 1 MiB reads %#x", block[0]);
    CHECK(nbd_io(origin, 0, MIB, block, sizeof block) == 0 && all(block, sizeof block, 0x22),
          "the origin at 1 MiB reads %#x", block[0]);
    close(image);

    struct blksnapu_session_error e;
    memset(&e, 0xff, sizeof e);
    CHECK(blksnap_session_error(s, &e) == 0 && e.errno_value == 0 && e.message[0] == '\0',
          "error %d: %s", (int)e.errno_value, e.message);

    /* ---- a window of the change map is the slice of the whole map ---- */
    uint8_t whole[128], window[16];
    size_t count = 0, got = 0;
    uint64_t blocks = 0;
    CHECK(blksnap_readcbtmap(c, name, whole, sizeof whole, &count) == 0 && count == 128,
          "count %zu", count);
    memset(window, 0xff, sizeof window);
    CHECK(blksnap_readcbtmap_at(c, name, 100, window, sizeof window, &got, &blocks) == 0 &&
              got == 16 && blocks == 128 && memcmp(window, whole + 100, 16) == 0,
          "got %zu blocks %llu", got, (unsigned long long)blocks);
    CHECK(blksnap_readcbtmap_at(c, name, 120, window, sizeof window, &got, NULL) == 0 &&
              got == 8 && memcmp(window, whole + 120, 8) == 0,
          "cut at the end: got %zu", got);
    CHECK(blksnap_readcbtmap_at(c, name, 129, window, sizeof window, &got, NULL) == -EINVAL,
          "beyond the end");

    /* ---- free destroys the snapshot; tracking goes on ---- */
    blksnap_session_free(s);
    CHECK(blksnap_snapshot_collect(c, NULL, 0, &n) == 0 && n == 0, "%zu snapshots left", n);
    CHECK(blksnap_list(c, devices, 2, &n) == 0 && n == 1, "the device stays attached");
    close(origin);

    /* ---- a session that cannot be made leaves nothing ---- */
    const char *bad[2] = {disk, "no-such-device"};
    s = blksnap_session_create(socket_path, bad, 2, storage, NULL, 0, 0, &err);
    CHECK(s == NULL && err == -ENOENT, "err %d", err);
    CHECK(strstr(blksnap_last_error(NULL), "no-such-device") != NULL, "%s",
          blksnap_last_error(NULL));
    printf("     failed session: %s\n", blksnap_last_error(NULL));
    CHECK(blksnap_snapshot_collect(c, NULL, 0, &n) == 0 && n == 0, "%zu snapshots left", n);
    s = blksnap_session_create(socket_path, list, 1, NULL, NULL, 0, 0, &err);
    CHECK(s == NULL && err == -EINVAL, "no storage: err %d", err);

    CHECK(blksnap_detach(c, name) == 0, "detach");
    blksnap_disconnect(c);
    printf("session: %d checks passed\n", checks);
    return 0;
}
