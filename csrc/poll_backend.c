/* Portable backend: poll() and a buffer per direction (recv/send), what systems without
 * splice() get; selectable on Linux so the same tests cover it. Buffers come from a per-thread
 * pool only while bytes are in flight, so an idle session holds none. */
#include "relay_internal.h"

#include <poll.h>
#include <stdlib.h>

static int poll_init(struct relay_worker *w)
{
    w->cap_slots = 64;
    w->slots = malloc(w->cap_slots * sizeof *w->slots);
    w->pfds = malloc((1 + 2 * w->cap_slots) * sizeof(struct pollfd));
    w->bufs = malloc((w->pool_max ? w->pool_max : 1) * sizeof *w->bufs);
    if (!w->slots || !w->pfds || !w->bufs) {
        free(w->slots);
        free(w->pfds);
        free(w->bufs);
        w->slots = NULL;
        w->pfds = NULL;
        w->bufs = NULL;
        return -ENOMEM;
    }
    return 0;
}

static void poll_fini(struct relay_worker *w)
{
    for (size_t i = 0; i < w->nbufs; i++)
        free(w->bufs[i]);
    relay_counter_sub(&w->bufs_pooled, w->nbufs);
    w->nbufs = 0;
    free(w->bufs);
    free(w->slots);
    free(w->pfds);
    w->bufs = NULL;
    w->slots = NULL;
    w->pfds = NULL;
}

static char *buf_get(struct relay_worker *w)
{
    char *b;
    if (w->nbufs > 0) {
        b = w->bufs[--w->nbufs];
        relay_counter_sub(&w->bufs_pooled, 1);
    } else if ((b = malloc(w->buffer_size)) == NULL) {
        return NULL;
    }
    relay_counter_add(&w->bufs_in_use, 1);
    return b;
}

static void buf_put(struct relay_worker *w, char **b)
{
    if (*b == NULL)
        return;
    relay_counter_sub(&w->bufs_in_use, 1);
    if (w->nbufs < w->pool_max) {
        w->bufs[w->nbufs++] = *b;
        relay_counter_add(&w->bufs_pooled, 1);
    } else {
        free(*b);
    }
    *b = NULL;
}

/* What fd[side] must be polled for, given the two directions through it. */
static short want_events(const struct relay_session *s, int side)
{
    const struct relay_dir *in = &s->dir[side];
    const struct relay_dir *out = &s->dir[!side];
    short ev = 0;
    if (!in->eof && in->len == 0 && !in->can_read && !((s->hup >> side) & 1))
        ev |= POLLIN;
    if (out->len > 0 && !out->can_write)
        ev |= POLLOUT;
    return ev;
}

static int pump(struct relay_worker *w, struct relay_session *s, int d, int *err)
{
    struct relay_dir *x = &s->dir[d];
    int src = s->fd[d], dst = s->fd[!d];
    uint64_t moved = 0;
    int reason = 0;
    *err = 0;
    for (;;) {
        while (x->len > 0 && x->can_write) {
            ssize_t n = send(dst, x->buf + x->off, x->len, MSG_NOSIGNAL);
            if (n > 0) {
                x->off += (uint32_t)n;
                x->len -= (uint32_t)n;
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
            break;
        if (x->eof) {
            if ((*err = relay_dir_forward_eof(x, dst)) != 0) {
                reason = RELAY_RESET;
                goto out;
            }
            break;
        }
        if (!x->can_read)
            break;
        if (x->buf == NULL && (x->buf = buf_get(w)) == NULL) {
            *err = ENOMEM;
            reason = RELAY_ERROR;
            goto out;
        }
        ssize_t n;
        do
            n = recv(src, x->buf, w->buffer_size, 0);
        while (n < 0 && errno == EINTR);
        if (n > 0) {
            x->off = 0;
            x->len = (uint32_t)n;
        } else if (n == 0) {
            x->eof = 1;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            x->can_read = 0;
            break;
        } else {
            *err = errno;
            reason = RELAY_RESET;
            goto out;
        }
    }
out:
    if (x->len == 0)
        buf_put(w, &x->buf);
    if (moved) {
        x->bytes += moved;
        relay_session_touch(w, s, moved);
    }
    return reason;
}

static void service(struct relay_worker *w, struct relay_session *s)
{
    (void)relay_pump_both(w, s, pump);
}

static int poll_attach(struct relay_worker *w, struct relay_session *s)
{
    if (w->nslots == w->cap_slots) {
        size_t ncap = w->cap_slots * 2;
        struct relay_session **ns = realloc(w->slots, ncap * sizeof *ns);
        if (ns == NULL)
            return -ENOMEM;
        w->slots = ns;
        void *np = realloc(w->pfds, (1 + 2 * ncap) * sizeof(struct pollfd));
        if (np == NULL)
            return -ENOMEM;
        w->pfds = np;
        w->cap_slots = ncap;
    }
    s->slot = (uint32_t)w->nslots;
    w->slots[w->nslots++] = s;
    s->registered = 1;
    service(w, s); /* bytes that arrived before the hand-over go out now */
    return 0;
}

static void poll_detach(struct relay_worker *w, struct relay_session *s)
{
    if (s->registered) {
        struct relay_session *last = w->slots[--w->nslots];
        w->slots[s->slot] = last;
        last->slot = s->slot;
        s->registered = 0;
    }
    for (int d = 0; d < 2; d++) {
        s->dir[d].len = 0;
        buf_put(w, &s->dir[d].buf);
    }
}

static void poll_wait(struct relay_worker *w, int timeout_ms)
{
    struct pollfd *pfds = w->pfds;
    size_t n = w->nslots;
    pfds[0].fd = w->wake.rfd;
    pfds[0].events = POLLIN;
    pfds[0].revents = 0;
    for (size_t i = 0; i < n; i++) {
        struct relay_session *s = w->slots[i];
        for (int side = 0; side < 2; side++) {
            struct pollfd *p = &pfds[1 + 2 * i + (size_t)side];
            /* A hung-up fd would report POLLHUP forever: leave it out (negative fd). */
            p->fd = ((s->hup >> side) & 1) ? -1 : s->fd[side];
            p->events = want_events(s, side);
            p->revents = 0;
        }
    }
    int r = poll(pfds, (nfds_t)(1 + 2 * n), timeout_ms);
    if (r <= 0)
        return;
    w->now_ns = relay_now_ns();
    if (pfds[0].revents)
        relay_notifier_clear(&w->wake);
    /* Backwards: finishing slot i moves the last session (already seen) into it. */
    for (size_t i = n; i-- > 0;) {
        if (i >= w->nslots)
            continue;
        struct relay_session *s = w->slots[i];
        short rev[2] = {pfds[1 + 2 * i].revents, pfds[2 + 2 * i].revents};
        if (!rev[0] && !rev[1])
            continue;
        int dead = 0;
        for (int side = 0; side < 2 && !dead; side++) {
            if (rev[side] & (POLLERR | POLLNVAL)) {
                int err = 0;
                socklen_t len = sizeof err;
                if (getsockopt(s->fd[side], SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                    err = errno;
                if (err || (rev[side] & POLLNVAL)) {
                    relay_session_finish(w, s, RELAY_RESET, err ? err : EBADF);
                    dead = 1;
                }
            }
            if (rev[side] & POLLHUP)
                s->hup |= (uint8_t)(1u << side);
            if (rev[side] & (POLLIN | POLLHUP | POLLERR))
                s->dir[side].can_read = 1;
            if (rev[side] & (POLLOUT | POLLHUP | POLLERR))
                s->dir[!side].can_write = 1;
        }
        if (!dead)
            service(w, s);
    }
}

const struct relay_backend relay_poll_backend = {
    .name = "select",
    .init = poll_init,
    .fini = poll_fini,
    .attach = poll_attach,
    .detach = poll_detach,
    .wait = poll_wait,
};
