/*
 * fuse-unionfs: the installed command, a small C program for the one path
 * that must be fast (podman's mount program, with a unionfs daemon running).
 *
 * It asks the daemon's mount socket to parse and check its command line
 * ({"op": "prepare"}, unionfs/daemon/prepare.py: fuse-unionfs's own parser
 * and checks, run in this process's namespaces with its ids), opens the
 * layers the answer names, mounts /dev/fuse (mount(2) with fd=N, or
 * fusermount3 with _FUSE_COMMFD where the kernel refuses), and sends the
 * mount request the daemon wrote, with the descriptors, as the Python
 * client does (unionfs/daemon/client.py, fusemount.py, wire.py).
 *
 * Everything else is the Python program's: with UNIONFS_NO_DAEMON=1, when
 * no daemon answers, when the daemon says "fallback" (--help, --version,
 * -f, -d, ...) or gives no plan (an older daemon), it execs FALLBACK (the
 * Python fuse-unionfs, installed as fuse-unionfs-py) with the same
 * arguments, before anything is mounted. Errors are the Python program's
 * lines and exit statuses. Plain C, libc only; scripts/setup.sh builds it.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef FALLBACK
#define FALLBACK "/opt/unionfs/venv/bin/fuse-unionfs-py"
#endif

#define MAX_FDS 16              /* unionfs/daemon/wire.py MAX_FDS */
#define MAX_LINE (1 << 20)      /* wire.py MAX_LINE */
#define CONNECT_TIMEOUT 2       /* seconds, as client.py */
#define ANSWER_TIMEOUT 90

static char **program_argv;

/* ---- leaving --------------------------------------------------------------- */

static void fallback(void)
{
    execv(FALLBACK, program_argv);
    fprintf(stderr, "fuse-unionfs: cannot run %s: %s\n", FALLBACK, strerror(errno));
    exit(1);
}

static void fail(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

/* ---- a growable buffer ----------------------------------------------------- */

struct buf {
    char *data;
    size_t len, cap;
};

static void buf_add(struct buf *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (b->len + n + 1 > cap)
            cap *= 2;
        char *p = realloc(b->data, cap);
        if (!p)
            fail(1, "fuse-unionfs: out of memory");
        b->data = p;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

/* ---- JSON out: strings only need care ---------------------------------------- */

/* Is s valid UTF-8 (no overlongs, no surrogates)? JSON text must be. */
static int valid_utf8(const unsigned char *s)
{
    while (*s) {
        unsigned c = *s, n, min, cp;
        if (c < 0x80) { s++; continue; }
        else if ((c & 0xe0) == 0xc0) { n = 1; min = 0x80; cp = c & 0x1f; }
        else if ((c & 0xf0) == 0xe0) { n = 2; min = 0x800; cp = c & 0x0f; }
        else if ((c & 0xf8) == 0xf0) { n = 3; min = 0x10000; cp = c & 0x07; }
        else return 0;
        for (unsigned i = 1; i <= n; i++) {
            if ((s[i] & 0xc0) != 0x80)
                return 0;
            cp = cp << 6 | (s[i] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        s += n + 1;
    }
    return 1;
}

static void json_string(struct buf *b, const char *s)
{
    buf_add(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            buf_add(b, esc, 2);
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            buf_add(b, esc, 6);
        } else {
            buf_add(b, (const char *)&c, 1);
        }
    }
    buf_add(b, "\"", 1);
}

/* ---- JSON in: a small tree, bounded ----------------------------------------- */

enum { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

struct json {
    int type;
    double num;
    char *str;                  /* J_STR: NUL-terminated, no NUL inside */
    size_t n;                   /* J_ARR/J_OBJ: children */
    char **keys;                /* J_OBJ */
    struct json **items;
};

struct parser {
    const char *p, *end;
    int depth;
};

static void skip_ws(struct parser *ps)
{
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' ||
                               *ps->p == '\r'))
        ps->p++;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

static void put_utf8(struct buf *b, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) { u[0] = (char)cp; n = 1; }
    else if (cp < 0x800) { u[0] = (char)(0xc0 | cp >> 6); u[1] = (char)(0x80 | (cp & 0x3f)); n = 2; }
    else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | cp >> 12); u[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f)); n = 3;
    } else {
        u[0] = (char)(0xf0 | cp >> 18); u[1] = (char)(0x80 | (cp >> 12 & 0x3f));
        u[2] = (char)(0x80 | (cp >> 6 & 0x3f)); u[3] = (char)(0x80 | (cp & 0x3f)); n = 4;
    }
    buf_add(b, u, n);
}

/* A JSON string; Python's surrogateescape (\udc80..\udcff) becomes the raw byte,
 * as os.fsencode would make it. NULL on anything malformed. */
static char *parse_string(struct parser *ps)
{
    struct buf b = {0};
    if (ps->p >= ps->end || *ps->p != '"')
        return NULL;
    ps->p++;
    buf_add(&b, "", 0);
    while (ps->p < ps->end && *ps->p != '"') {
        unsigned char c = (unsigned char)*ps->p;
        if (c < 0x20)
            goto bad;
        if (c != '\\') {
            buf_add(&b, ps->p, 1);
            ps->p++;
            continue;
        }
        if (ps->end - ps->p < 2)
            goto bad;
        char e = ps->p[1];
        ps->p += 2;
        switch (e) {
        case '"': buf_add(&b, "\"", 1); break;
        case '\\': buf_add(&b, "\\", 1); break;
        case '/': buf_add(&b, "/", 1); break;
        case 'b': buf_add(&b, "\b", 1); break;
        case 'f': buf_add(&b, "\f", 1); break;
        case 'n': buf_add(&b, "\n", 1); break;
        case 'r': buf_add(&b, "\r", 1); break;
        case 't': buf_add(&b, "\t", 1); break;
        case 'u': {
            unsigned cp, lo;
            if (ps->end - ps->p < 4 || hex4(ps->p, &cp))
                goto bad;
            ps->p += 4;
            if (cp == 0)
                goto bad;
            if (cp >= 0xdc80 && cp <= 0xdcff) {
                char raw = (char)(cp - 0xdc00);
                buf_add(&b, &raw, 1);
                break;
            }
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (ps->end - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u' ||
                    hex4(ps->p + 2, &lo) || lo < 0xdc00 || lo > 0xdfff)
                    goto bad;
                ps->p += 6;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            } else if (cp >= 0xdc00 && cp <= 0xdfff) {
                goto bad;
            }
            put_utf8(&b, cp);
            break;
        }
        default:
            goto bad;
        }
    }
    if (ps->p >= ps->end)
        goto bad;
    ps->p++;
    return b.data;
bad:
    free(b.data);
    return NULL;
}

static struct json *parse_value(struct parser *ps);

static struct json *new_node(int type)
{
    struct json *j = calloc(1, sizeof *j);
    if (!j)
        fail(1, "fuse-unionfs: out of memory");
    j->type = type;
    return j;
}

static int add_child(struct json *j, char *key, struct json *item)
{
    if (j->n >= 4096)
        return -1;
    char **keys = realloc(j->keys, (j->n + 1) * sizeof *keys);
    if (keys)
        j->keys = keys;
    struct json **items = realloc(j->items, (j->n + 1) * sizeof *items);
    if (items)
        j->items = items;
    if (!keys || !items)
        fail(1, "fuse-unionfs: out of memory");
    j->keys[j->n] = key;
    j->items[j->n] = item;
    j->n++;
    return 0;
}

/* The tree is freed by exit: a parse happens twice per run, on bounded input. */
static struct json *parse_container(struct parser *ps, int obj)
{
    struct json *j = new_node(obj ? J_OBJ : J_ARR);
    char close = obj ? '}' : ']';
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        return j;
    }
    for (;;) {
        char *key = NULL;
        skip_ws(ps);
        if (obj) {
            if (!(key = parse_string(ps)))
                return NULL;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':')
                return NULL;
            ps->p++;
        }
        struct json *item = parse_value(ps);
        if (!item || add_child(j, key, item))
            return NULL;
        skip_ws(ps);
        if (ps->p >= ps->end)
            return NULL;
        if (*ps->p == ',') {
            ps->p++;
            continue;
        }
        if (*ps->p != close)
            return NULL;
        ps->p++;
        return j;
    }
}

static struct json *parse_value(struct parser *ps)
{
    skip_ws(ps);
    if (ps->p >= ps->end)
        return NULL;
    char c = *ps->p;
    if (c == '{' || c == '[') {
        if (++ps->depth > 32)
            return NULL;
        struct json *j = parse_container(ps, c == '{');
        ps->depth--;
        return j;
    }
    if (c == '"') {
        char *s = parse_string(ps);
        if (!s)
            return NULL;
        struct json *j = new_node(J_STR);
        j->str = s;
        return j;
    }
    static const struct { const char *word; int type; } words[] = {
        {"true", J_BOOL}, {"false", J_BOOL}, {"null", J_NULL}};
    for (size_t i = 0; i < sizeof words / sizeof *words; i++) {
        size_t n = strlen(words[i].word);
        if ((size_t)(ps->end - ps->p) >= n && !memcmp(ps->p, words[i].word, n)) {
            ps->p += n;
            struct json *j = new_node(words[i].type);
            j->num = words[i].word[0] == 't';
            return j;
        }
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        char tmp[64];
        size_t n = 0;
        while (ps->p + n < ps->end && n < sizeof tmp - 1 &&
               strchr("+-.eE0123456789", ps->p[n]))
            n++;
        memcpy(tmp, ps->p, n);
        tmp[n] = 0;
        char *endp;
        double v = strtod(tmp, &endp);
        if (endp != tmp + n || n == 0)
            return NULL;
        ps->p += n;
        struct json *j = new_node(J_NUM);
        j->num = v;
        return j;
    }
    return NULL;
}

static struct json *parse_json(const char *text, size_t len)
{
    struct parser ps = {text, text + len, 0};
    struct json *j = parse_value(&ps);
    skip_ws(&ps);
    if (!j || ps.p != ps.end || j->type != J_OBJ)
        return NULL;
    return j;
}

static struct json *get(const struct json *obj, const char *key, int type)
{
    if (!obj || obj->type != J_OBJ)
        return NULL;
    for (size_t i = 0; i < obj->n; i++)
        if (!strcmp(obj->keys[i], key))
            return obj->items[i]->type == type ? obj->items[i] : NULL;
    return NULL;
}

static const char *get_str(const struct json *obj, const char *key)
{
    struct json *j = get(obj, key, J_STR);
    return j ? j->str : NULL;
}

/* ---- the daemon's socket ------------------------------------------------------ */

/* As unionfs/daemon/paths.py: UNIONFS_SOCKET, else real root's /run/unionfs,
 * else $XDG_RUNTIME_DIR/unionfs; "" when there is no place for one. */
static int is_real_root(void)
{
    if (geteuid() != 0)
        return 0;
    FILE *f = fopen("/proc/self/uid_map", "re");
    if (!f)
        return 0;
    unsigned long a, b, c;
    char extra;
    int n = fscanf(f, " %lu %lu %lu %c", &a, &b, &c, &extra);
    fclose(f);
    return n == 3 && a == 0 && b == 0 && c == 4294967295UL;
}

static void mount_socket_path(struct buf *path)
{
    const char *explicit = getenv("UNIONFS_SOCKET");
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    if (explicit && *explicit) {
        buf_str(path, explicit);
    } else if (is_real_root()) {
        buf_str(path, "/run/unionfs/unionfs.sock");
    } else if (runtime && *runtime) {
        buf_str(path, runtime);
        buf_str(path, "/unionfs/unionfs.sock");
    } else {
        return;
    }
    buf_str(path, ".mount");
}

static int connect_daemon(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return -1;
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    struct timeval tv = {.tv_sec = CONNECT_TIMEOUT};
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(sock);
        return -1;
    }
    tv.tv_sec = ANSWER_TIMEOUT;
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return sock;
}

/* One message: the descriptors ride with its first byte (wire.py). */
static int send_message(int sock, const char *data, size_t len, const int *fds, int nfds)
{
    size_t sent = 0;
    if (nfds > 0) {
        union {
            char buf[CMSG_SPACE(MAX_FDS * sizeof(int))];
            struct cmsghdr align;
        } u;
        memset(&u, 0, sizeof u);
        struct iovec iov = {.iov_base = (void *)data, .iov_len = 1};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                             .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
        memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
        ssize_t n;
        do
            n = sendmsg(sock, &msg, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        if (n < 0)
            return -1;
        sent = (size_t)n;
    }
    while (sent < len) {
        ssize_t n = send(sock, data + sent, len - sent, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        sent += (size_t)n;
    }
    return 0;
}

/* One answer line, parsed; NULL at EOF, on a timeout or on garbage. */
static struct json *recv_message(int sock)
{
    struct buf b = {0};
    char chunk[65536];
    buf_add(&b, "", 0);
    while (!(b.len && b.data[b.len - 1] == '\n')) {
        ssize_t n = recv(sock, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || b.len + (size_t)n > MAX_LINE)
            return NULL;
        buf_add(&b, chunk, (size_t)n);
    }
    return parse_json(b.data, b.len);
}

/* ---- mounting /dev/fuse, as fusemount.py ------------------------------------- */

struct plan {
    const char *mountpoint, *source, *fstype, *fuse_options, *fusermount_options, *request;
    unsigned long mount_flags;
};

/* Python's str.strip(): the ASCII whitespace it knows */
static char *strip(char *s)
{
    size_t n = strlen(s);
    while (n && (isspace((unsigned char)s[n - 1]) || (s[n - 1] >= 0x1c && s[n - 1] <= 0x1f)))
        s[--n] = 0;
    while (*s && (isspace((unsigned char)*s) || (*s >= 0x1c && *s <= 0x1f)))
        s++;
    return s;
}

static int run_fusermount(const struct plan *pl)
{
    int pair[2], errpipe[2], execpipe[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0 ||
        pipe2(errpipe, O_CLOEXEC) < 0 || pipe2(execpipe, O_CLOEXEC) < 0)
        fail(1, "unionfs: %s: %s", strerror(errno), pl->mountpoint);
    char commfd[16];
    snprintf(commfd, sizeof commfd, "%d", pair[1]);
    pid_t pid = fork();
    if (pid < 0)
        fail(1, "unionfs: %s: %s", strerror(errno), pl->mountpoint);
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY | O_CLOEXEC);
        if (null >= 0)
            dup2(null, 1);
        dup2(errpipe[1], 2);
        /* subprocess's close_fds: only 0-2 and the commfd pass */
        close_range(3, ~0U, CLOSE_RANGE_CLOEXEC);
        fcntl(pair[1], F_SETFD, 0);
        setenv("_FUSE_COMMFD", commfd, 1);
        char *argv[] = {"fusermount3", "-o", (char *)pl->fusermount_options, "--",
                        (char *)pl->mountpoint, NULL};
        execvp("fusermount3", argv);
        int e = errno;
        if (write(execpipe[1], &e, sizeof e) < 0)
            _exit(127);
        _exit(127);
    }
    close(pair[1]);
    close(errpipe[1]);
    close(execpipe[1]);
    struct buf err = {0};
    char chunk[4096];
    buf_add(&err, "", 0);
    for (;;) {
        ssize_t n = read(errpipe[0], chunk, sizeof chunk);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        if (err.len < 65536)
            buf_add(&err, chunk, (size_t)n);
    }
    close(errpipe[0]);
    int status, exec_errno = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (read(execpipe[0], &exec_errno, sizeof exec_errno) != (ssize_t)sizeof exec_errno)
        exec_errno = 0;
    close(execpipe[0]);
    if (exec_errno == ENOENT)
        fail(1, "fusermount3 is not installed");
    if (exec_errno)
        fail(1, "unionfs: %s: fusermount3", strerror(exec_errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        char *text = strip(err.data);
        fail(1, "fusermount3: %s", *text ? text : "failed");
    }
    char byte;
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = &byte, .iov_len = 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
                         .msg_controllen = sizeof u.buf};
    ssize_t n;
    do
        n = recvmsg(pair[0], &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    close(pair[0]);
    if (n < 0)
        fail(1, "unionfs: %s: %s", strerror(errno), pl->mountpoint);
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS &&
            cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm), sizeof fd);
            return fd;
        }
    }
    fail(1, "fusermount3 sent no FUSE descriptor");
    return -1;
}

/* Python's PermissionError: EPERM or EACCES */
#define DENIED(e) ((e) == EPERM || (e) == EACCES)

static int fuse_mount(const struct plan *pl)
{
    struct stat st;
    if (stat(pl->mountpoint, &st) < 0) {
        if (DENIED(errno))
            return run_fusermount(pl);
        fail(1, "unionfs: %s: %s", strerror(errno), pl->mountpoint);
    }
    int fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        if (DENIED(errno))
            return run_fusermount(pl);
        fail(1, "unionfs: %s: /dev/fuse", strerror(errno));
    }
    struct buf data = {0};
    char head[128];
    snprintf(head, sizeof head, "fd=%d,rootmode=%o,user_id=%u,group_id=%u", fd,
             (unsigned)(st.st_mode & S_IFMT), (unsigned)getuid(), (unsigned)getgid());
    buf_str(&data, head);
    if (*pl->fuse_options) {
        buf_str(&data, ",");
        buf_str(&data, pl->fuse_options);
    }
    if (mount(pl->source, pl->mountpoint, pl->fstype, pl->mount_flags, data.data) < 0) {
        int e = errno;
        close(fd);
        free(data.data);
        if (DENIED(e))
            return run_fusermount(pl);
        fail(1, "unionfs: %s: %s", strerror(e), pl->mountpoint);
    }
    free(data.data);
    return fd;
}

/* serve/process.py unmount(): umount2, else fusermount3 -u; problems ignored */
static void undo(const char *mountpoint)
{
    if (umount2(mountpoint, 0) == 0 || errno != EPERM)
        return;
    pid_t pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
        }
        execlp("fusermount3", "fusermount3", "-u", mountpoint, (char *)NULL);
        _exit(127);
    }
    if (pid > 0)
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
}

/* ---- the run ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    (void)argc;
    program_argv = argv;
    const char *no_daemon = getenv("UNIONFS_NO_DAEMON");
    if (no_daemon && !strcmp(no_daemon, "1"))
        fallback();
    for (char **a = argv + 1; *a; a++)
        if (!valid_utf8((const unsigned char *)*a))
            fallback();
    struct buf path = {0};
    mount_socket_path(&path);
    if (!path.len)
        fallback();

    /* the view the daemon checks in: our namespaces, root and directory */
    int view[4] = {
        open("/proc/self/ns/user", O_RDONLY | O_CLOEXEC),
        open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC),
        open("/", O_PATH | O_DIRECTORY | O_CLOEXEC),
        open(".", O_PATH | O_DIRECTORY | O_CLOEXEC),
    };
    for (int i = 0; i < 4; i++)
        if (view[i] < 0)
            fallback();
    int sock = connect_daemon(path.data);
    if (sock < 0)
        fallback();
    struct buf req = {0};
    buf_str(&req, "{\"op\":\"prepare\",\"fds\":{\"userns\":0,\"mntns\":1,\"root\":2,\"cwd\":3},"
                  "\"argv\":[");
    for (char **a = argv + 1; *a; a++) {
        if (a != argv + 1)
            buf_str(&req, ",");
        json_string(&req, *a);
    }
    buf_str(&req, "]}\n");
    if (send_message(sock, req.data, req.len, view, 4) < 0)
        fallback();
    struct json *answer = recv_message(sock);
    close(sock);
    close(view[2]);
    close(view[3]);
    if (!answer)
        fallback();
    const char *error = get_str(answer, "error");
    struct json *status = get(answer, "status", J_NUM);
    if (error && status) {
        int code = (int)status->num;
        fail(code >= 1 && code <= 255 ? code : 1, "%s", error);
    }
    struct json *plan_obj = get(answer, "plan", J_OBJ);
    struct json *open_list = get(plan_obj, "open", J_ARR);
    struct json *flags = get(plan_obj, "mount_flags", J_NUM);
    struct plan pl = {
        .mountpoint = get_str(plan_obj, "mountpoint"),
        .source = get_str(plan_obj, "source"),
        .fstype = get_str(plan_obj, "fstype"),
        .fuse_options = get_str(plan_obj, "fuse_options"),
        .fusermount_options = get_str(plan_obj, "fusermount_options"),
        .request = get_str(plan_obj, "request"),
    };
    if (!open_list || !flags || !pl.mountpoint || !pl.source || !pl.fstype ||
        !pl.fuse_options || !pl.fusermount_options || !pl.request ||
        open_list->n + 3 > MAX_FDS || flags->num < 0 || flags->num > 0xffffffffUL)
        fallback();         /* an older daemon, or a plan this client cannot carry out */
    for (size_t i = 0; i < open_list->n; i++)
        if (open_list->items[i]->type != J_STR)
            fallback();
    pl.mount_flags = (unsigned long)flags->num;

    /* as the Python client: the layers, the namespaces, then the mount */
    int fds[MAX_FDS];
    int nfds = 0;
    for (size_t i = 0; i < open_list->n; i++) {
        const char *layer = open_list->items[i]->str;
        int fd = open(layer, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
            fail(1, "unionfs: %s: %s", strerror(errno), layer);
        fds[nfds++] = fd;
    }
    fds[nfds++] = view[0];
    fds[nfds++] = view[1];
    int fuse_fd = fuse_mount(&pl);
    fds[nfds++] = fuse_fd;

    struct buf mreq = {0};
    buf_str(&mreq, pl.request);
    buf_str(&mreq, "\n");
    sock = connect_daemon(path.data);
    struct json *reply = NULL;
    if (sock >= 0 && send_message(sock, mreq.data, mreq.len, fds, nfds) == 0)
        reply = recv_message(sock);
    int e = errno;
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    if (sock >= 0)
        close(sock);
    if (!reply) {
        undo(pl.mountpoint);
        if (sock < 0)
            fail(1, "unionfs daemon: cannot reach %s: %s", path.data, strerror(e));
        if (e == EAGAIN || e == EWOULDBLOCK)
            fail(1, "unionfs: timed out: %s", pl.mountpoint);
        fail(1, "unionfs daemon: no answer to the mount request");
    }
    const char *message = get_str(reply, "error");
    if (message) {
        undo(pl.mountpoint);
        if (!strncmp(message, "unionfs", 7))
            fail(1, "%s", message);
        fail(1, "unionfs daemon: %s", message);
    }
    if (!get(reply, "ready", J_BOOL)) {
        undo(pl.mountpoint);
        fail(1, "unionfs daemon: no answer to the mount request");
    }
    return 0;
}
