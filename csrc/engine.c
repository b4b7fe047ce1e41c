/* The engine core: session id table, I/O threads and their command queues, idle expiry and
 * the report queue. The backends (splice_backend.c, poll_backend.c) only move bytes. */
#include "relay_internal.h"

#include <stdlib.h>
#include <string.h>

struct relay_engine {
    const struct relay_backend *be;
    relay_config cfg;
    uint64_t idle_ns, closing_ns; /* timeouts of lru[0] and lru[1]; 0 = none */
    struct relay_worker *workers;
    int nworkers;

    pthread_mutex_t lock; /* id table, closing */
    struct relay_session **table;
    size_t table_mask, count;
    int closing, closed;
    pthread_mutex_t close_lock;

    pthread_mutex_t report_lock;
    relay_report *reports;
    size_t nreports, cap_reports;
    relay_notifier notify;

    relay_counter total_sessions;
};

static const char *const reason_names[] = {"eof", "reset", "idle", "killed", "shutdown", "error"};

const char *relay_reason_name(int reason)
{
    if (reason < 0 || reason > RELAY_ERROR)
        return "error";
    return reason_names[reason];
}

void relay_config_default(relay_config *cfg)
{
    cfg->threads = 1;
    cfg->pipe_size = 1u << 20;
    cfg->pool_max = 64;
    cfg->buffer_size = 64u * 1024u;
    cfg->idle_timeout = 0.0;
    cfg->fin_timeout = 0.0;
    cfg->coalesce_us = RELAY_COALESCE_DEFAULT_US;
    cfg->sched_batch = 1;
}

static const struct relay_backend *find_backend(const char *name)
{
    if (name == NULL)
        return NULL;
#if RELAY_HAVE_SPLICE
    if (strcmp(name, "splice") == 0)
        return &relay_splice_backend;
#endif
    if (strcmp(name, "select") == 0 || strcmp(name, "poll") == 0)
        return &relay_poll_backend;
    return NULL;
}

int relay_backend_available(const char *name) { return find_backend(name) != NULL; }

/* ---- id table (engine lock held) -------------------------------------------------- */

static size_t slot_of(const relay_engine *e, uint64_t id)
{
    return (size_t)((id * 0x9E3779B97F4A7C15ull) >> 17) & e->table_mask;
}

static struct relay_session *table_find(relay_engine *e, uint64_t id)
{
    for (struct relay_session *s = e->table[slot_of(e, id)]; s; s = s->hnext)
        if (s->id == id)
            return s;
    return NULL;
}

static void table_grow(relay_engine *e)
{
    size_t ncap = (e->table_mask + 1) * 2;
    struct relay_session **nt = calloc(ncap, sizeof *nt);
    if (nt == NULL)
        return; /* keep the longer chains; still correct */
    struct relay_session **old = e->table;
    size_t oldcap = e->table_mask + 1;
    e->table = nt;
    e->table_mask = ncap - 1;
    for (size_t i = 0; i < oldcap; i++) {
        struct relay_session *s = old[i], *next;
        for (; s; s = next) {
            next = s->hnext;
            size_t k = slot_of(e, s->id);
            s->hnext = nt[k];
            nt[k] = s;
        }
    }
    free(old);
}

static void table_insert(relay_engine *e, struct relay_session *s)
{
    if (e->count >= e->table_mask + 1)
        table_grow(e);
    size_t k = slot_of(e, s->id);
    s->hnext = e->table[k];
    e->table[k] = s;
    e->count++;
}

static void table_remove(relay_engine *e, struct relay_session *s)
{
    struct relay_session **pp = &e->table[slot_of(e, s->id)];
    for (; *pp; pp = &(*pp)->hnext) {
        if (*pp == s) {
            *pp = s->hnext;
            e->count--;
            return;
        }
    }
}

/* ---- reports ---------------------------------------------------------------------- */

static void push_report(relay_engine *e, const relay_report *r)
{
    pthread_mutex_lock(&e->report_lock);
    if (e->nreports == e->cap_reports) {
        size_t ncap = e->cap_reports ? e->cap_reports * 2 : 64;
        relay_report *nr = realloc(e->reports, ncap * sizeof *nr);
        if (nr == NULL) { /* cannot happen in practice; drop rather than crash */
            pthread_mutex_unlock(&e->report_lock);
            return;
        }
        e->reports = nr;
        e->cap_reports = ncap;
    }
    e->reports[e->nreports++] = *r;
    if (e->nreports == 1 && e->notify.wfd >= 0)
        relay_notifier_signal(&e->notify);
    pthread_mutex_unlock(&e->report_lock);
}

size_t relay_engine_drain(relay_engine *e, relay_report *out, size_t max)
{
    pthread_mutex_lock(&e->report_lock);
    size_t n = e->nreports < max ? e->nreports : max;
    if (n > 0) {
        memcpy(out, e->reports, n * sizeof *out);
        memmove(e->reports, e->reports + n, (e->nreports - n) * sizeof *out);
        e->nreports -= n;
    }
    if (e->nreports == 0 && e->notify.rfd >= 0)
        relay_notifier_clear(&e->notify);
    pthread_mutex_unlock(&e->report_lock);
    return n;
}

int relay_engine_notify_fd(const relay_engine *e) { return e->notify.rfd; }

/* ---- services for backends --------------------------------------------------------- */

static void lru_unlink(struct relay_worker *w, struct relay_session *s)
{
    struct relay_lru *l = &w->lru[s->closing];
    if (s->lru_prev)
        s->lru_prev->lru_next = s->lru_next;
    else
        l->head = s->lru_next;
    if (s->lru_next)
        s->lru_next->lru_prev = s->lru_prev;
    else
        l->tail = s->lru_prev;
    s->lru_prev = s->lru_next = NULL;
}

static void lru_append(struct relay_worker *w, struct relay_session *s)
{
    struct relay_lru *l = &w->lru[s->closing];
    s->lru_next = NULL;
    s->lru_prev = l->tail;
    if (l->tail)
        l->tail->lru_next = s;
    else
        l->head = s;
    l->tail = s;
}

void relay_session_touch(struct relay_worker *w, struct relay_session *s, uint64_t moved)
{
    relay_counter_add(&w->bytes, moved);
    s->last_ns = w->now_ns;
    if (w->lru[s->closing].tail != s) {
        lru_unlink(w, s);
        lru_append(w, s);
    }
}

void relay_session_closing(struct relay_worker *w, struct relay_session *s)
{
    if (s->closing || !s->attached || w->engine->closing_ns == w->engine->idle_ns)
        return; /* nothing would change: both lists would expire alike */
    lru_unlink(w, s);
    s->closing = 1;
    s->last_ns = w->now_ns; /* the other side has fin_timeout from now to close its own */
    lru_append(w, s);
}

void relay_session_finish(struct relay_worker *w, struct relay_session *s, int reason, int err)
{
    relay_engine *e = w->engine;
    if (s->done)
        return;
    s->done = 1;
    if (s->attached) {
        w->be->detach(w, s);
        lru_unlink(w, s);
        s->attached = 0;
    }
    close(s->fd[0]);
    close(s->fd[1]);
    relay_report r = {
        .session_id = s->id,
        .bytes_a_to_b = s->dir[0].bytes,
        .bytes_b_to_a = s->dir[1].bytes,
        .duration = (double)(relay_now_ns() - s->start_ns) / 1e9,
        .reason = reason,
        .error = (reason == RELAY_RESET || reason == RELAY_ERROR) ? err : 0,
    };
    /* Free the id before the report is visible, so the caller may reuse it at once. */
    pthread_mutex_lock(&e->lock);
    table_remove(e, s);
    pthread_mutex_unlock(&e->lock);
    relay_counter_sub(&w->load, 1);
    push_report(e, &r);
    s->dead_next = w->dead;
    w->dead = s;
}

/* ---- I/O threads ------------------------------------------------------------------- */

static void enqueue(struct relay_worker *w, struct relay_cmd *c)
{
    c->next = NULL;
    pthread_mutex_lock(&w->cmd_lock);
    int was_empty = w->cmd_head == NULL;
    if (w->cmd_tail)
        w->cmd_tail->next = c;
    else
        w->cmd_head = c;
    w->cmd_tail = c;
    pthread_mutex_unlock(&w->cmd_lock);
    if (was_empty)
        relay_notifier_signal(&w->wake);
}

static void attach(struct relay_worker *w, struct relay_session *s)
{
    if (w->stop) { /* added while the engine was closing */
        relay_session_finish(w, s, RELAY_SHUTDOWN, 0);
        return;
    }
    s->last_ns = w->now_ns;
    lru_append(w, s);
    s->attached = 1;
    int rc = w->be->attach(w, s);
    if (rc < 0) {
        /* The backend registered nothing it would need to undo beyond detach(). */
        relay_session_finish(w, s, RELAY_ERROR, -rc);
    }
}

static void run_commands(struct relay_worker *w)
{
    pthread_mutex_lock(&w->cmd_lock);
    struct relay_cmd *c = w->cmd_head;
    w->cmd_head = w->cmd_tail = NULL;
    pthread_mutex_unlock(&w->cmd_lock);
    while (c) {
        struct relay_cmd *next = c->next;
        if (c->op == RELAY_CMD_ADD) {
            attach(w, c->session);
        } else if (c->op == RELAY_CMD_KILL) {
            relay_engine *e = w->engine;
            pthread_mutex_lock(&e->lock);
            struct relay_session *s = table_find(e, c->id);
            int mine = s && s->worker == w && s->attached && !s->done;
            pthread_mutex_unlock(&e->lock);
            if (mine) /* only this thread frees its sessions, so s stays valid */
                relay_session_finish(w, s, RELAY_KILLED, 0);
        } else {
            w->stop = 1;
        }
        free(c);
        c = next;
    }
}

static void free_dead(struct relay_worker *w)
{
    while (w->dead) {
        struct relay_session *s = w->dead;
        w->dead = s->dead_next;
        free(s);
    }
}

static int next_timeout_ms(const struct relay_worker *w)
{
    const uint64_t timeout[2] = {w->engine->idle_ns, w->engine->closing_ns};
    uint64_t deadline = UINT64_MAX;
    for (int i = 0; i < 2; i++) {
        if (timeout[i] != 0 && w->lru[i].head != NULL &&
            w->lru[i].head->last_ns + timeout[i] < deadline)
            deadline = w->lru[i].head->last_ns + timeout[i];
    }
    if (deadline == UINT64_MAX)
        return -1;
    if (deadline <= w->now_ns)
        return 0;
    uint64_t ms = (deadline - w->now_ns + 999999u) / 1000000u;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

static void expire_idle(struct relay_worker *w)
{
    const uint64_t timeout[2] = {w->engine->idle_ns, w->engine->closing_ns};
    for (int i = 0; i < 2; i++) {
        if (timeout[i] == 0)
            continue;
        while (w->lru[i].head && w->now_ns - w->lru[i].head->last_ns >= timeout[i])
            relay_session_finish(w, w->lru[i].head, RELAY_IDLE, 0);
    }
}

/* Every session still held, at shutdown. */
static void finish_all(struct relay_worker *w)
{
    for (int i = 0; i < 2; i++)
        while (w->lru[i].head)
            relay_session_finish(w, w->lru[i].head, RELAY_SHUTDOWN, 0);
}

/* Interrupt moderation, as a NIC does it: after a wakeup that moved a segment or two of bulk,
 * let the sockets fill for coalesce_us instead of waking for each segment the sender writes. An
 * SFTP upload's client writes one 32 KiB SSH packet at a time; woken for each, the thread spent
 * more CPU per GB on wakeups than on moving bytes. The bytes wait in the kernel's socket buffers
 * meanwhile. A wakeup that found a batch already (RELAY_COALESCE_BATCH) does not pause: on a
 * machine busy enough that the thread wakes late, pausing as well made each wakeup's burst
 * larger and cost both the relay and the receiver more CPU per GB, not less. */
static void coalesce(const struct relay_worker *w, uint64_t moved)
{
    unsigned us = w->engine->cfg.coalesce_us;
    if (us == 0 || moved < RELAY_COALESCE_MIN || moved >= RELAY_COALESCE_BATCH || w->stop)
        return;
    struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)us * 1000L};
    (void)nanosleep(&ts, NULL);
}

/* SCHED_BATCH (same nice level, no real-time): a woken I/O thread takes an idle CPU at once, as
 * before, but no longer preempts a task running on a busy one. The relay wakes thousands of
 * times a second during bulk transfers, and on a machine whose CPUs are all busy (the SSH
 * server and its client beside the gateway, or many sessions) each of those preemptions cost
 * the preempted process its cache: an SFTP server behind the gateway was preempted about 6,000
 * times per 512 MiB uploaded, about 300 times with this. Set before relay_engine_create()
 * returns (pthread attributes cannot carry it); where it is refused (a seccomp filter), threads
 * run as usual. */
static void *worker_main(void *arg);

static int start_worker(struct relay_worker *w)
{
    int rc = pthread_create(&w->thread, NULL, worker_main, w);
#ifdef SCHED_BATCH
    if (rc == 0 && w->engine->cfg.sched_batch) {
        struct sched_param sp = {.sched_priority = 0};
        (void)pthread_setschedparam(w->thread, SCHED_BATCH, &sp);
    }
#endif
    return -rc;
}

static void *worker_main(void *arg)
{
    struct relay_worker *w = arg;
    w->now_ns = relay_now_ns();
    while (!w->stop) {
        uint64_t before = relay_counter_get(&w->bytes);
        w->be->wait(w, next_timeout_ms(w));
        w->now_ns = relay_now_ns();
        free_dead(w);
        run_commands(w);
        expire_idle(w);
        free_dead(w);
        coalesce(w, relay_counter_get(&w->bytes) - before);
    }
    finish_all(w);
    free_dead(w);
    return NULL;
}

/* ---- public API -------------------------------------------------------------------- */

static void destroy_workers(relay_engine *e)
{
    for (int i = 0; i < e->nworkers; i++) {
        struct relay_worker *w = &e->workers[i];
        if (w->be)
            w->be->fini(w);
        relay_notifier_close(&w->wake);
        pthread_mutex_destroy(&w->cmd_lock);
    }
    free(e->workers);
    e->workers = NULL;
    e->nworkers = 0;
}

int relay_engine_create(const char *backend, const relay_config *cfg_in, relay_engine **out)
{
    relay_config cfg;
    if (cfg_in)
        cfg = *cfg_in;
    else
        relay_config_default(&cfg);
    *out = NULL;
    const struct relay_backend *be = find_backend(backend);
    if (be == NULL)
        return backend && strcmp(backend, "splice") == 0 ? -ENOSYS : -EINVAL;
    if (cfg.threads < 1 || cfg.threads > 1024 || !(cfg.idle_timeout >= 0) ||
        cfg.idle_timeout > RELAY_IDLE_TIMEOUT_MAX || !(cfg.fin_timeout >= 0) ||
        cfg.fin_timeout > RELAY_IDLE_TIMEOUT_MAX || cfg.buffer_size == 0 ||
        cfg.buffer_size > (1u << 30) || cfg.pipe_size > (1u << 30) ||
        cfg.pool_max > RELAY_POOL_MAX || cfg.coalesce_us > RELAY_COALESCE_MAX_US)
        return -EINVAL;

    relay_engine *e = calloc(1, sizeof *e);
    if (e == NULL)
        return -ENOMEM;
    e->be = be;
    e->cfg = cfg;
    e->idle_ns = (uint64_t)(cfg.idle_timeout * 1e9);
    uint64_t fin_ns = (uint64_t)(cfg.fin_timeout * 1e9);
    e->closing_ns = fin_ns != 0 && (e->idle_ns == 0 || fin_ns < e->idle_ns) ? fin_ns : e->idle_ns;
    e->notify.rfd = e->notify.wfd = -1;
    pthread_mutex_init(&e->lock, NULL);
    pthread_mutex_init(&e->close_lock, NULL);
    pthread_mutex_init(&e->report_lock, NULL);
    e->table_mask = 1023;
    e->table = calloc(e->table_mask + 1, sizeof *e->table);
    e->workers = calloc((size_t)cfg.threads, sizeof *e->workers);
    int rc = (e->table && e->workers) ? relay_notifier_open(&e->notify) : -ENOMEM;
    if (rc < 0)
        goto fail;

    for (int i = 0; i < cfg.threads; i++) {
        struct relay_worker *w = &e->workers[i];
        w->engine = e;
        w->epfd = -1;
        w->wake.rfd = w->wake.wfd = -1;
        w->pool_max = cfg.pool_max;
        w->buffer_size = cfg.buffer_size;
        relay_pipe_pool_init(&w->pipes, cfg.pipe_size, cfg.pool_max);
        pthread_mutex_init(&w->cmd_lock, NULL);
        e->nworkers = i + 1;
        if ((rc = relay_notifier_open(&w->wake)) < 0)
            goto fail;
        if ((rc = be->init(w)) < 0)
            goto fail;
        w->be = be;
    }

    /* The I/O threads take no signals (SIGPIPE from splice() included); they stay with the
     * threads the embedding program expects them on. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < e->nworkers; i++) {
        rc = start_worker(&e->workers[i]);
        if (rc < 0)
            break;
        e->workers[i].started = 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc < 0) {
        relay_engine_destroy(e);
        return rc;
    }
    *out = e;
    return 0;

fail:
    destroy_workers(e);
    relay_notifier_close(&e->notify);
    free(e->table);
    pthread_mutex_destroy(&e->lock);
    pthread_mutex_destroy(&e->close_lock);
    pthread_mutex_destroy(&e->report_lock);
    free(e);
    return rc;
}

static struct relay_worker *least_loaded(relay_engine *e)
{
    struct relay_worker *best = &e->workers[0];
    uint64_t best_load = relay_counter_get(&best->load);
    for (int i = 1; i < e->nworkers; i++) {
        uint64_t l = relay_counter_get(&e->workers[i].load);
        if (l < best_load) {
            best = &e->workers[i];
            best_load = l;
        }
    }
    return best;
}

int relay_engine_add(relay_engine *e, uint64_t id, int fd_a, int fd_b)
{
    if (fd_a < 0 || fd_b < 0 || fd_a == fd_b)
        return -EINVAL;
    struct relay_session *s = calloc(1, sizeof *s);
    struct relay_cmd *c = malloc(sizeof *c);
    if (s == NULL || c == NULL) {
        free(s);
        free(c);
        return -ENOMEM;
    }
    s->id = id;
    s->fd[0] = fd_a;
    s->fd[1] = fd_b;
    for (int i = 0; i < 2; i++) {
        s->dir[i].pipe.rfd = s->dir[i].pipe.wfd = -1;
        s->dir[i].can_read = s->dir[i].can_write = 1;
    }
    s->start_ns = relay_now_ns();

    pthread_mutex_lock(&e->lock);
    int rc = e->closing ? -ESHUTDOWN : table_find(e, id) ? -EEXIST : 0;
    if (rc == 0) {
        /* Before the session is visible: on failure the caller keeps its fds. */
        if ((rc = relay_set_flags(fd_a)) == 0)
            rc = relay_set_flags(fd_b);
    }
    if (rc < 0) {
        pthread_mutex_unlock(&e->lock);
        free(s);
        free(c);
        return rc;
    }
    relay_tune_socket(fd_a);
    relay_tune_socket(fd_b);
    struct relay_worker *w = least_loaded(e);
    s->worker = w;
    table_insert(e, s);
    relay_counter_add(&w->load, 1);
    relay_counter_add(&e->total_sessions, 1);
    c->op = RELAY_CMD_ADD;
    c->id = id;
    c->session = s;
    /* Queued under the lock that close() takes to set closing: every ADD is then ahead of
     * the STOP, so the thread or close()'s last pass attaches or finishes it. */
    enqueue(w, c);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

int relay_engine_kill(relay_engine *e, uint64_t id)
{
    struct relay_cmd *c = malloc(sizeof *c);
    if (c == NULL)
        return -ENOMEM;
    pthread_mutex_lock(&e->lock);
    int rc = e->closing ? -ESHUTDOWN : 0;
    struct relay_session *s = rc ? NULL : table_find(e, id);
    if (s) {
        c->op = RELAY_CMD_KILL;
        c->id = id;
        c->session = NULL;
        enqueue(s->worker, c); /* under the lock, as in relay_engine_add */
    }
    pthread_mutex_unlock(&e->lock);
    if (s == NULL) {
        free(c);
        return rc ? rc : -ENOENT;
    }
    return 0;
}

void relay_engine_stats(relay_engine *e, relay_stats *out)
{
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&e->lock);
    out->active_sessions = e->count;
    pthread_mutex_unlock(&e->lock);
    out->total_sessions = relay_counter_get(&e->total_sessions);
    for (int i = 0; i < e->nworkers; i++) {
        struct relay_worker *w = &e->workers[i];
        out->bytes_total += relay_counter_get(&w->bytes);
        out->pipes_in_use += relay_counter_get(&w->pipes.in_use);
        out->pipes_pooled += relay_counter_get(&w->pipes.pooled);
        out->buffers_in_use += relay_counter_get(&w->bufs_in_use);
        out->buffers_pooled += relay_counter_get(&w->bufs_pooled);
    }
}

void relay_engine_close(relay_engine *e)
{
    pthread_mutex_lock(&e->close_lock);
    if (e->closed) {
        pthread_mutex_unlock(&e->close_lock);
        return;
    }
    pthread_mutex_lock(&e->lock);
    e->closing = 1;
    pthread_mutex_unlock(&e->lock);
    for (int i = 0; i < e->nworkers; i++) {
        struct relay_worker *w = &e->workers[i];
        if (!w->started)
            continue;
        struct relay_cmd *c = malloc(sizeof *c);
        if (c) {
            c->op = RELAY_CMD_STOP;
            enqueue(w, c);
        } else {
            w->stop = 1; /* racy but only reachable when out of memory */
            relay_notifier_signal(&w->wake);
        }
    }
    for (int i = 0; i < e->nworkers; i++) {
        struct relay_worker *w = &e->workers[i];
        if (!w->started)
            continue;
        pthread_join(w->thread, NULL);
        w->started = 0;
        /* ADD commands that raced with the stop: their sessions were never attached. */
        run_commands(w);
        finish_all(w);
        free_dead(w);
    }
    for (int i = 0; i < e->nworkers; i++) {
        struct relay_worker *w = &e->workers[i];
        if (w->be)
            w->be->fini(w);
        w->be = NULL;
        relay_notifier_close(&w->wake);
    }
    pthread_mutex_lock(&e->report_lock);
    relay_notifier_close(&e->notify);
    pthread_mutex_unlock(&e->report_lock);
    e->closed = 1;
    pthread_mutex_unlock(&e->close_lock);
}

void relay_engine_destroy(relay_engine *e)
{
    if (e == NULL)
        return;
    relay_engine_close(e);
    destroy_workers(e);
    free(e->table);
    free(e->reports);
    pthread_mutex_destroy(&e->lock);
    pthread_mutex_destroy(&e->close_lock);
    pthread_mutex_destroy(&e->report_lock);
    free(e);
}
