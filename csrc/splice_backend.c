/* Linux backend: epoll + splice() through a pipe per direction, taken from the thread's pool
 * only while bytes are in flight, so an idle session holds no pipe.
 *
 * Level-triggered epoll; the interest mask of each fd is derived from the session state in
 * want_events() and only changed (EPOLL_CTL_MOD) when it differs from what is registered. */
#include "relay_internal.h"

#if RELAY_HAVE_SPLICE

#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>

#define MAX_EVENTS 256
#define WAKE_TAG ((void *)1) /* sessions are aligned, so bit 0 carries the side */

static inline void *tag(struct relay_session *s, int side)
{
    return (void *)((uintptr_t)s | (uintptr_t)side);
}

static int splice_init(struct relay_worker *w)
{
    w->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (w->epfd < 0)
        return -errno;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wake.rfd, &ev) < 0) {
        int err = errno;
        close(w->epfd);
        w->epfd = -1;
        return -err;
    }
    return 0;
}

static void splice_fini(struct relay_worker *w)
{
    relay_pipe_pool_destroy(&w->pipes);
    if (w->epfd >= 0)
        close(w->epfd);
    w->epfd = -1;
}

/* What fd[side] must be watched for, given the state of the two directions through it. */
static uint32_t want_events(const struct relay_session *s, int side)
{
    const struct relay_dir *in = &s->dir[side];   /* read from fd[side] */
    const struct relay_dir *out = &s->dir[!side]; /* written to fd[side] */
    uint32_t ev = 0;
    if (!in->eof && !in->paused && !in->can_read)
        ev |= EPOLLIN;
    if (out->len > 0 && !out->can_write)
        ev |= EPOLLOUT;
    return ev; /* EPOLLERR and EPOLLHUP are always reported */
}

static int sync_events(struct relay_worker *w, struct relay_session *s, int side)
{
    int registered = (s->registered >> side) & 1;
    if ((s->hup >> side) & 1) {
        /* A hung-up socket stays readable and writable (EOF, EPIPE) and would report EPOLLHUP
         * forever: stop watching it; the other fd's events drive what is left. */
        if (registered)
            (void)epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->fd[side], NULL);
        s->registered &= (uint8_t)~(1u << side);
        return 0;
    }
    uint32_t ev = want_events(s, side);
    if (registered && ev == s->events[side])
        return 0;
    struct epoll_event e = {.events = ev, .data.ptr = tag(s, side)};
    if (epoll_ctl(w->epfd, registered ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s->fd[side], &e) < 0)
        return -errno;
    s->registered |= (uint8_t)(1u << side);
    s->events[side] = ev;
    return 0;
}

/* Small messages (interactive SSH, SFTP requests) cost less copied than spliced: splice turns
 * a few bytes into a page for the pipe and page references in the destination's skb. So a
 * direction reads with recv() into a stack buffer while what it reads is small, and switches to
 * splice() once a read fills the buffer (bulk), back again when a splice read comes up short.
 * With the pipe empty, copy_small() reads once and sends what it read; what the destination
 * will not take now goes into the pipe, where the splice path drains it. Returns 0 when all was
 * sent or at EOF (go on), 1 when the source is empty or the destination full, -1 on a peer's
 * error and -2 on a local one, no memory for the rest (*err set). */
#define COPY_MAX 8192u

/* After pipe2() failed (no descriptor left: EMFILE, ENFILE), the thread does not ask again
 * for this long unless its pool holds an idle pipe: meanwhile directions copy (below). */
#define PIPE_RETRY_NS (100u * 1000u * 1000u)

/* The direction's pipe, from the thread's pool if it holds none: 0 or an errno. */
static int hold_pipe(struct relay_worker *w, struct relay_dir *x)
{
    if (x->pipe.rfd >= 0)
        return 0;
    if (w->pipes.nidle == 0 && w->pipe_err != 0 && w->now_ns < w->pipe_retry_ns)
        return w->pipe_err;
    w->pipe_err = -relay_pipe_get(&w->pipes, &x->pipe);
    if (w->pipe_err != 0)
        w->pipe_retry_ns = w->now_ns + PIPE_RETRY_NS;
    return w->pipe_err;
}

/* Without a pipe, what the destination did not take waits in a buffer of the direction's own
 * (at most COPY_MAX bytes, freed once sent), and the direction copies until a pipe can be had
 * again: a gateway out of descriptors goes slower, it does not drop sessions. 0 or ENOMEM. */
static int spill(struct relay_worker *w, struct relay_dir *x, const char *data, size_t n)
{
    if (x->buf == NULL) {
        x->buf = malloc(COPY_MAX);
        if (x->buf == NULL)
            return ENOMEM;
        relay_counter_add(&w->bufs_in_use, 1);
    }
    memcpy(x->buf, data, n);
    x->off = 0;
    x->len = (uint32_t)n;
    return 0;
}

static void drop_spill(struct relay_worker *w, struct relay_dir *x)
{
    if (x->buf != NULL) {
        free(x->buf);
        x->buf = NULL;
        relay_counter_sub(&w->bufs_in_use, 1);
    }
}

static int copy_small(struct relay_worker *w, struct relay_dir *x, int src, int dst,
                      int hung_up, uint64_t *moved, int *err)
{
    char buf[COPY_MAX];
    ssize_t n;
    do
        n = recv(src, buf, sizeof buf, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n == 0) {
        x->eof = 1;
        return 0; /* the caller's loop forwards it */
    }
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            x->can_read = 0;
            return 1;
        }
        *err = errno;
        return -1;
    }
    size_t sent = 0;
    while (sent < (size_t)n && x->can_write) {
        ssize_t m = send(dst, buf + sent, (size_t)n - sent, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (m > 0)
            sent += (size_t)m;
        else if (m < 0 && errno == EINTR)
            continue;
        else if (m < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            x->can_write = 0;
        else {
            *err = m < 0 ? errno : EPIPE;
            return -1;
        }
    }
    *moved += sent;
    if ((size_t)n == COPY_MAX)
        x->bulk = 1;
    else if (!hung_up)
        x->can_read = 0; /* a short read emptied the socket: level-triggered epoll reports more,
                            so the recv() that would only say EAGAIN is skipped */
    if (sent == (size_t)n)
        return 0; /* else read on until EAGAIN: a hung-up source is no longer watched by epoll */
    /* The rest waits in the (empty) pipe: at most COPY_MAX bytes, far below its capacity. */
    size_t rest = (size_t)n - sent;
    if (hold_pipe(w, x) != 0) {
        if ((*err = spill(w, x, buf + sent, rest)) != 0)
            return -2;
        return 1;
    }
    ssize_t m;
    do
        m = write(x->pipe.wfd, buf + sent, rest);
    while (m < 0 && errno == EINTR);
    if (m != (ssize_t)rest) {
        *err = m < 0 ? errno : EIO;
        return -2;
    }
    x->len += (uint32_t)rest;
    return 1;
}

/* splice() from TCP stops at an urgent (MSG_OOB) mark and never reads past it: it reports
 * EAGAIN, or 0 once the peer has closed, however much follows. recv() steps over the mark
 * (dropping the urgent byte, as every recv()-based relay and the select backend do), so a
 * source at its mark is read by copy_small. SSH has no use for urgent data; without this a
 * client could stall its own stream and keep this thread spinning on a readable socket. */
static int at_urgent_mark(int fd)
{
    int mark = 0;
    return ioctl(fd, SIOCATMARK, &mark) == 0 && mark;
}

/* Move what can be moved in direction d without blocking. Returns 0, or a reason with *err
 * set. Pipe first (drain to the destination), then source into the pipe, until neither end
 * makes progress. */
static int pump(struct relay_worker *w, struct relay_session *s, int d, int *err)
{
    struct relay_dir *x = &s->dir[d];
    int src = s->fd[d], dst = s->fd[!d];
    int hung_up = (s->hup >> d) & 1;
    uint64_t moved = 0;
    int reason = 0;
    *err = 0;
    for (;;) {
        while (x->len > 0 && x->can_write) {
            ssize_t n = x->buf != NULL
                ? send(dst, x->buf + x->off, x->len, MSG_DONTWAIT | MSG_NOSIGNAL)
                : splice(x->pipe.rfd, NULL, dst, NULL, x->len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                x->len -= (uint32_t)n;
                if (x->buf != NULL) {
                    x->off += (uint32_t)n;
                    if (x->len == 0)
                        drop_spill(w, x); /* at once: with a buffer held, what comes next
                                             (into a pipe, maybe) would be sent from it */
                }
                moved += (uint64_t)n;
            } else if (n < 0 && errno == EINTR) {
                continue;
            } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                x->can_write = 0;
            } else {
                *err = n < 0 ? errno : EPIPE;
                reason = RELAY_RESET;
                goto out;
            }
        }
        if (x->len > 0)
            break; /* destination full; EPOLLOUT will bring us back */
        x->paused = 0;
        if (x->eof) {
            if ((*err = relay_dir_forward_eof(x, dst)) != 0) {
                reason = RELAY_RESET;
                goto out;
            }
            break;
        }
        if (!x->can_read)
            break;
        if (!x->bulk) {
            int rc = copy_small(w, x, src, dst, hung_up, &moved, err);
            if (rc < 0) {
                reason = rc == -2 ? RELAY_ERROR : RELAY_RESET;
                goto out;
            }
            if (rc > 0)
                break; /* source empty, or destination full with the rest in the pipe */
            continue;
        }
        if (hold_pipe(w, x) != 0) {
            x->bulk = 0; /* no pipe to be had: copy, a buffer at a time */
            continue;
        }
        ssize_t n;
        do
            n = splice(src, NULL, x->pipe.wfd, NULL, x->pipe.cap, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        while (n < 0 && errno == EINTR);
        if (n > 0) {
            x->len += (uint32_t)n;
            if ((size_t)n < COPY_MAX)
                x->bulk = 0; /* a trickle again: copy it, as small reads are cheaper so */
            if ((size_t)n < x->pipe.cap && !hung_up)
                x->can_read = 0; /* short: the socket is empty (as in copy_small) */
        } else if (n == 0) {
            if (at_urgent_mark(src))
                x->bulk = 0;
            else
                x->eof = 1;
        } else if (errno == EAGAIN) {
            if (x->len > 0) {
                x->paused = 1; /* maybe the pipe is full: read again once it drained */
            } else if (at_urgent_mark(src)) {
                x->bulk = 0;
                continue;
            } else {
                x->can_read = 0;
            }
            if (x->len == 0 || !x->can_write)
                break;
        } else {
            *err = errno;
            reason = RELAY_RESET;
            goto out;
        }
    }
out:
    if (x->len == 0) {
        if (x->pipe.rfd >= 0)
            relay_pipe_put(&w->pipes, &x->pipe, 0);
        drop_spill(w, x);
    }
    if (moved) {
        x->bytes += moved;
        relay_session_touch(w, s, moved);
    }
    return reason;
}

static int sock_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

/* Pump both directions, then finish the session or refresh its interest masks. */
static void service(struct relay_worker *w, struct relay_session *s)
{
    if (relay_pump_both(w, s, pump))
        return;
    for (int side = 0; side < 2; side++) {
        int rc = sync_events(w, s, side);
        if (rc < 0) {
            relay_session_finish(w, s, RELAY_ERROR, -rc);
            return;
        }
    }
}

static int splice_attach(struct relay_worker *w, struct relay_session *s)
{
    service(w, s); /* bytes that arrived before the hand-over go out now */
    return 0;
}

static void splice_detach(struct relay_worker *w, struct relay_session *s)
{
    for (int side = 0; side < 2; side++) {
        if ((s->registered >> side) & 1)
            (void)epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->fd[side], NULL);
        struct relay_dir *x = &s->dir[side];
        relay_pipe_put(&w->pipes, &x->pipe, x->len);
        drop_spill(w, x);
        x->len = 0;
    }
    s->registered = 0;
}

static void splice_wait(struct relay_worker *w, int timeout_ms)
{
    struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(w->epfd, evs, MAX_EVENTS, timeout_ms);
    if (n <= 0)
        return;
    w->now_ns = relay_now_ns();
    for (int i = 0; i < n; i++) {
        void *p = evs[i].data.ptr;
        uint32_t ev = evs[i].events;
        if (p == NULL) {
            relay_notifier_clear(&w->wake);
            continue;
        }
        int side = (int)((uintptr_t)p & 1u);
        struct relay_session *s = (struct relay_session *)((uintptr_t)p & ~(uintptr_t)1);
        if (s->done)
            continue; /* finished earlier in this batch; freed after it */
        if (ev & EPOLLERR) {
            int err = sock_error(s->fd[side]);
            if (err) {
                relay_session_finish(w, s, RELAY_RESET, err);
                continue;
            }
        }
        if (ev & EPOLLHUP)
            s->hup |= (uint8_t)(1u << side);
        if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
            s->dir[side].can_read = 1;
        if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR))
            s->dir[!side].can_write = 1;
        service(w, s);
    }
}

const struct relay_backend relay_splice_backend = {
    .name = "splice",
    .init = splice_init,
    .fini = splice_fini,
    .attach = splice_attach,
    .detach = splice_detach,
    .wait = splice_wait,
};

#endif /* RELAY_HAVE_SPLICE */
