/* Pipes for splice(), reused: created on demand, sized once, kept (up to a cap) only when
 * empty. A pipe that still holds bytes is closed, never handed to another session. */
#include "relay_internal.h"

#include <stdlib.h>

#define RELAY_MIN_PIPE_SIZE (64u * 1024u)

void relay_pipe_pool_init(struct relay_pipe_pool *pool, size_t want, size_t max_idle)
{
    pool->idle = NULL;
    pool->nidle = 0;
    pool->max_idle = max_idle;
    pool->want = want;
    pool->granted = want;
    pool->in_use = pool->pooled = 0;
}

#if RELAY_HAVE_SPLICE
/* Ask for the configured size; when refused (pipe-max-size, per-user pipe pages), halve down
 * to the kernel default and remember what worked so later pipes don't retry refusals. */
static uint32_t size_pipe(struct relay_pipe_pool *pool, int fd)
{
    size_t size = pool->granted;
    while (size >= RELAY_MIN_PIPE_SIZE && size <= INT_MAX) {
        int got = fcntl(fd, F_SETPIPE_SZ, (int)size);
        if (got > 0) {
            pool->granted = size;
            return (uint32_t)got;
        }
        size /= 2;
    }
    int cur = fcntl(fd, F_GETPIPE_SZ);
    return cur > 0 ? (uint32_t)cur : 65536u;
}
#endif

int relay_pipe_get(struct relay_pipe_pool *pool, struct relay_pipe *out)
{
    if (pool->nidle > 0) {
        *out = pool->idle[--pool->nidle];
        relay_counter_sub(&pool->pooled, 1);
        relay_counter_add(&pool->in_use, 1);
        return 0;
    }
#if RELAY_HAVE_SPLICE
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return -errno;
    out->rfd = p[0];
    out->wfd = p[1];
    out->cap = pool->want ? size_pipe(pool, p[1]) : (uint32_t)fcntl(p[1], F_GETPIPE_SZ);
    if ((int32_t)out->cap <= 0)
        out->cap = 65536u;
    relay_counter_add(&pool->in_use, 1);
    return 0;
#else
    (void)out;
    return -ENOSYS;
#endif
}

static void close_pipe(struct relay_pipe *p)
{
    close(p->rfd);
    close(p->wfd);
}

void relay_pipe_put(struct relay_pipe_pool *pool, struct relay_pipe *p, size_t pending)
{
    if (p->rfd < 0)
        return;
    relay_counter_sub(&pool->in_use, 1);
    if (pending == 0 && pool->nidle < pool->max_idle) {
        if (pool->idle == NULL) {
            pool->idle = malloc(pool->max_idle * sizeof *pool->idle);
        }
        if (pool->idle != NULL) {
            pool->idle[pool->nidle++] = *p;
            relay_counter_add(&pool->pooled, 1);
            p->rfd = p->wfd = -1;
            return;
        }
    }
    close_pipe(p);
    p->rfd = p->wfd = -1;
}

void relay_pipe_pool_destroy(struct relay_pipe_pool *pool)
{
    for (size_t i = 0; i < pool->nidle; i++)
        close_pipe(&pool->idle[i]);
    relay_counter_sub(&pool->pooled, pool->nidle);
    pool->nidle = 0;
    free(pool->idle);
    pool->idle = NULL;
}
