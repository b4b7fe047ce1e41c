/* Shared between the engine core and its backends; not part of the public API. */
#ifndef EDGEGW_RELAY_INTERNAL_H
#define EDGEGW_RELAY_INTERNAL_H

#include "compat.h"
#include "relay.h"

/* ---- pipe pool (pipe_pool.c): one per I/O thread, so no locking ---------------------- */

struct relay_pipe {
    int rfd, wfd; /* rfd < 0: no pipe held */
    uint32_t cap; /* capacity the kernel granted */
};

struct relay_pipe_pool {
    struct relay_pipe *idle;
    size_t nidle, max_idle;
    size_t want;        /* size asked for with F_SETPIPE_SZ, 0 = kernel default */
    size_t granted;     /* largest size the kernel accepted so far (stops retrying refusals) */
    relay_counter in_use, pooled;
};

void relay_pipe_pool_init(struct relay_pipe_pool *pool, size_t want, size_t max_idle);
int relay_pipe_get(struct relay_pipe_pool *pool, struct relay_pipe *out);
/* `pending`: bytes still in the pipe. Such a pipe is closed, never pooled. */
void relay_pipe_put(struct relay_pipe_pool *pool, struct relay_pipe *p, size_t pending);
void relay_pipe_pool_destroy(struct relay_pipe_pool *pool);

/* ---- sessions ---------------------------------------------------------------------- */

/* One direction: bytes read from fd[i] and written to fd[!i]. */
struct relay_dir {
    uint64_t bytes;          /* delivered to the destination */
    struct relay_pipe pipe;  /* splice: held only while bytes are in flight */
    char *buf;               /* held only while bytes are in flight: select's buffer, or the
                                splice backend's when no pipe could be had (see spill()) */
    uint32_t off, len;       /* bytes in flight: in the pipe, or buf[off, off + len) */
    uint8_t eof;             /* source said end of stream */
    uint8_t shut;            /* end of stream forwarded: shutdown(dst, SHUT_WR) done */
    uint8_t paused;          /* splice: EAGAIN with data in the pipe, wait for it to drain */
    uint8_t can_read;        /* source not known to be empty */
    uint8_t can_write;       /* destination not known to be full */
    uint8_t bulk;            /* splice: the last read filled the copy buffer, so splice */
};

struct relay_worker;

struct relay_session {
    uint64_t id;
    int fd[2];                      /* a, b */
    struct relay_dir dir[2];        /* dir[0]: a -> b, dir[1]: b -> a */
    uint64_t start_ns, last_ns;
    struct relay_session *lru_prev, *lru_next; /* worker's list, least recently active first */
    struct relay_session *hnext;    /* engine id table chain */
    struct relay_session *dead_next;
    struct relay_worker *worker;
    uint32_t events[2];             /* splice: interest registered with epoll */
    uint32_t slot;                  /* select: index in the worker's session array */
    uint8_t registered;             /* splice: bit i set when fd[i] is in the epoll set */
    uint8_t hup;                    /* bit i set once fd[i] hung up: final state, not watched */
    uint8_t attached, done;
    uint8_t closing;                /* one side closed: in the worker's lru[1], fin_timeout */
};

/* ---- backends ---------------------------------------------------------------------- */

struct relay_backend {
    const char *name;
    int (*init)(struct relay_worker *w);
    void (*fini)(struct relay_worker *w);
    /* Start relaying a session; may finish it at once. -errno: not attached, caller reports. */
    int (*attach)(struct relay_worker *w, struct relay_session *s);
    /* Forget a session and give back its pipes/buffers; the engine closes the fds. */
    void (*detach)(struct relay_worker *w, struct relay_session *s);
    /* Wait up to timeout_ms (-1: forever) for I/O or the wake fd, and do the I/O. */
    void (*wait)(struct relay_worker *w, int timeout_ms);
};

extern const struct relay_backend relay_splice_backend;
extern const struct relay_backend relay_poll_backend;

struct relay_cmd {
    struct relay_cmd *next;
    int op; /* RELAY_CMD_* */
    uint64_t id;
    struct relay_session *session;
};

enum { RELAY_CMD_ADD, RELAY_CMD_KILL, RELAY_CMD_STOP };

struct relay_worker {
    struct relay_engine *engine;
    const struct relay_backend *be;
    pthread_t thread;
    int started;
    relay_notifier wake;
    pthread_mutex_t cmd_lock;
    struct relay_cmd *cmd_head, *cmd_tail;
    struct relay_lru {
        struct relay_session *head, *tail;
    } lru[2];                /* [0] open sessions, [1] closing ones; least recently active first */
    struct relay_session *dead;
    relay_counter load;      /* sessions assigned (for spreading new ones) */
    relay_counter bytes;     /* bytes delivered by this thread */
    uint64_t now_ns;
    int stop;
    size_t pool_max;
    /* splice */
    int epfd;
    struct relay_pipe_pool pipes;
    int pipe_err;            /* errno of the last pipe2() that failed, 0 after one succeeds */
    uint64_t pipe_retry_ns;  /* no pipe2() before then, after a failure */
    /* select */
    struct relay_session **slots;
    size_t nslots, cap_slots;
    void *pfds;              /* struct pollfd[1 + 2 * cap_slots] */
    char **bufs;             /* idle buffers */
    size_t nbufs;
    size_t buffer_size;
    relay_counter bufs_in_use, bufs_pooled;
};

/* Forward a drained direction's end of stream to its destination, once: 0, or the errno of
 * a failed shutdown(). Both backends call it only when nothing is left in flight. */
static inline int relay_dir_forward_eof(struct relay_dir *x, int dst)
{
    if (!x->shut) {
        if (shutdown(dst, SHUT_WR) < 0 && errno != ENOTCONN)
            return errno;
        x->shut = 1;
    }
    return 0;
}

/* Engine services for backends (engine.c). */
void relay_session_touch(struct relay_worker *w, struct relay_session *s, uint64_t moved);
/* One side's end of stream was forwarded: from now on fin_timeout applies. */
void relay_session_closing(struct relay_worker *w, struct relay_session *s);
/* Close the pair and queue its report. Memory is freed after the current batch of events. */
void relay_session_finish(struct relay_worker *w, struct relay_session *s, int reason, int err);

/* A backend's "move what can be moved in direction d": 0, or a finish reason with *err set. */
typedef int (*relay_pump_fn)(struct relay_worker *w, struct relay_session *s, int d, int *err);

/* Pump both directions, then finish the session on an error or once both ends are shut.
 * Returns 1 if the session finished (its memory is freed after the current batch). */
static inline int relay_pump_both(struct relay_worker *w, struct relay_session *s,
                                  relay_pump_fn pump)
{
    int err;
    for (int d = 0; d < 2; d++) {
        int reason = pump(w, s, d, &err);
        if (reason) {
            relay_session_finish(w, s, reason, err);
            return 1;
        }
    }
    if (s->dir[0].shut && s->dir[1].shut) {
        relay_session_finish(w, s, RELAY_EOF, 0);
        return 1;
    }
    if ((s->dir[0].shut || s->dir[1].shut) && !s->closing)
        relay_session_closing(w, s);
    return 0;
}

#endif
