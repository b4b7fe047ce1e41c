/* edgegw relay engine: moves bytes between pairs of connected sockets, both ways, without
 * looking at them, in its own threads, and reports each pair once both directions are done.
 *
 * Knows nothing of Python. Every function returns 0 (or a count) on success and -errno on
 * failure; nothing here raises, aborts or prints.
 *
 *   relay_engine *e;
 *   relay_config cfg; relay_config_default(&cfg);
 *   relay_engine_create("splice", &cfg, &e);
 *   watch relay_engine_notify_fd(e) for readability, then relay_engine_drain() the reports;
 *   relay_engine_add(e, id, fd_a, fd_b);     // takes ownership of both fds on success
 *   relay_engine_close(e);                    // remaining sessions reported as SHUTDOWN
 *   relay_engine_drain(...); relay_engine_destroy(e);
 */
#ifndef EDGEGW_RELAY_H
#define EDGEGW_RELAY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct relay_engine relay_engine;

/* Why a session ended; names (relay_reason_name) match edgegw.relay.FinishReason values. */
typedef enum relay_reason {
    RELAY_EOF = 0,      /* both directions reached end of stream and were forwarded */
    RELAY_RESET = 1,    /* a peer reset or a socket call failed (error holds errno) */
    RELAY_IDLE = 2,     /* no byte either way for idle_timeout (or fin_timeout) seconds */
    RELAY_KILLED = 3,   /* relay_engine_kill() */
    RELAY_SHUTDOWN = 4, /* relay_engine_close() with the session still running */
    RELAY_ERROR = 5     /* local failure: out of pipes, descriptors, memory (error holds errno) */
} relay_reason;

typedef struct relay_config {
    int threads;          /* I/O threads; sessions are spread over them (>= 1) */
    size_t pipe_size;     /* splice: pipe capacity asked with F_SETPIPE_SZ; 0 = kernel default */
    size_t pool_max;      /* idle pipes (splice) or buffers (select) kept per thread */
    size_t buffer_size;   /* select: bytes buffered per direction while in flight */
    double idle_timeout;  /* seconds without a byte either way before IDLE; 0 = never */
    double fin_timeout;   /* the same once one side has closed (its end of stream forwarded):
                             a peer that never closes its own side holds nothing longer than
                             this; 0 = only idle_timeout applies */
    unsigned coalesce_us; /* pause after a bulk wakeup (see RELAY_COALESCE_MIN); 0 = never */
    int sched_batch;      /* Linux: I/O threads run SCHED_BATCH, woken without preempting */
} relay_config;

/* A thread that moved at least RELAY_COALESCE_MIN bytes, but less than RELAY_COALESCE_BATCH,
 * in one wakeup pauses coalesce_us before it polls again: it is waking for each segment or two
 * that a bulk sender writes, and the pause lets them gather into fewer, larger splices and
 * wakeups. A wakeup that found RELAY_COALESCE_BATCH or more already had its batch (the thread
 * is behind the sender, not woken by each of its segments), and pausing after it would only
 * hold the next bytes. Interactive traffic (keystrokes, round trips of small messages) never
 * reaches the lower bound and is never delayed unless it shares a thread with a bulk transfer.
 * Off by default: since the threads run SCHED_BATCH (a busy machine wakes them late, with a
 * batch waiting) it no longer saved CPU per GB uploaded, while it slowed a single fast stream
 * and held the small messages of every session sharing the thread (bench/README.md). */
#define RELAY_COALESCE_MIN 32768u
#define RELAY_COALESCE_BATCH 131072u
#define RELAY_COALESCE_DEFAULT_US 0u
#define RELAY_COALESCE_MAX_US 100000u

/* Bounds relay_engine_create() checks: idle pipes or buffers kept per thread, and the idle
 * timeout (about 31 years; "never" is 0), so that neither size arithmetic nor the conversion
 * to nanoseconds can overflow. */
#define RELAY_POOL_MAX 65536u
#define RELAY_IDLE_TIMEOUT_MAX 1e9

typedef struct relay_report {
    uint64_t session_id;
    uint64_t bytes_a_to_b; /* delivered to b */
    uint64_t bytes_b_to_a; /* delivered to a */
    double duration;       /* seconds from relay_engine_add() to the end */
    int reason;            /* relay_reason */
    int error;             /* errno for RESET/ERROR, else 0 */
} relay_report;

typedef struct relay_stats {
    uint64_t active_sessions;
    uint64_t total_sessions;
    uint64_t bytes_total;
    uint64_t pipes_in_use;   /* pipes holding data in flight */
    uint64_t pipes_pooled;   /* empty pipes kept for reuse */
    uint64_t buffers_in_use; /* select backend; splice: copies waiting while no pipe was to be had */
    uint64_t buffers_pooled;
} relay_stats;

void relay_config_default(relay_config *cfg);

/* 1 if `backend` ("splice" or "select") can run on this system, else 0. */
int relay_backend_available(const char *backend);

const char *relay_reason_name(int reason);

/* -EINVAL bad config, -ENOSYS backend not available here, or the errno of a failed setup. */
int relay_engine_create(const char *backend, const relay_config *cfg, relay_engine **out);

/* Readable while reports wait; relay_engine_drain() clears it. -1 after close. */
int relay_engine_notify_fd(const relay_engine *e);

/* Relay fd_a <-> fd_b under `session_id`. On success the engine owns both fds (sets them
 * non-blocking and closes them when done); on failure the caller still owns them.
 * -EEXIST duplicate id, -EINVAL bad fds, -ESHUTDOWN engine closed, -ENOMEM. */
int relay_engine_add(relay_engine *e, uint64_t session_id, int fd_a, int fd_b);

/* End a running session (reported as KILLED). -ENOENT if it is not running. */
int relay_engine_kill(relay_engine *e, uint64_t session_id);

/* Move up to `max` finished-session reports into `out`; returns how many. */
size_t relay_engine_drain(relay_engine *e, relay_report *out, size_t max);

void relay_engine_stats(relay_engine *e, relay_stats *out);

/* Stop the threads; sessions still running are closed and reported as SHUTDOWN. Idempotent.
 * Closes every descriptor the engine holds, the notify fd included; reports stay drainable. */
void relay_engine_close(relay_engine *e);

/* Close (if needed) and free. */
void relay_engine_destroy(relay_engine *e);

#ifdef __cplusplus
}
#endif
#endif /* EDGEGW_RELAY_H */
