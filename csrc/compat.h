/* Platform differences for the relay engine, in one place.
 *
 * Everything else in csrc/ includes this first. It picks the feature macros, the monotonic
 * clock, relaxed atomics, the wake-up primitive (eventfd on Linux, a pipe elsewhere) and the
 * socket options that differ between systems.
 */
#ifndef EDGEGW_COMPAT_H
#define EDGEGW_COMPAT_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1 /* splice(), pipe2(), F_SETPIPE_SZ */
#endif

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#if defined(__linux__)
#include <sys/eventfd.h>
#define RELAY_HAVE_SPLICE 1
#define RELAY_HAVE_EVENTFD 1
#else
#define RELAY_HAVE_SPLICE 0
#define RELAY_HAVE_EVENTFD 0
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0 /* macOS: SO_NOSIGPIPE is set per socket instead, see relay_tune_socket() */
#endif

/* Relaxed atomics: counters written by one thread and read for stats by another. */
typedef uint64_t relay_counter;
#define relay_counter_add(p, v) ((void)__atomic_fetch_add((p), (v), __ATOMIC_RELAXED))
#define relay_counter_sub(p, v) ((void)__atomic_fetch_sub((p), (v), __ATOMIC_RELAXED))
#define relay_counter_get(p) __atomic_load_n((p), __ATOMIC_RELAXED)

static inline uint64_t relay_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline int relay_set_flags(int fd)
{
    /* Callers usually hand over sockets that have both flags: set only what is missing. */
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0))
        return -errno;
    int fdfl = fcntl(fd, F_GETFD);
    if (fdfl < 0 || (!(fdfl & FD_CLOEXEC) && fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) < 0))
        return -errno;
    return 0;
}

/* Small messages must leave at once (SSH keystrokes); a relay never batches. */
static inline void relay_tune_socket(int fd)
{
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* not TCP: ignored */
#ifdef SO_NOSIGPIPE
    (void)setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#endif
}

/* A readable-when-signalled descriptor: eventfd on Linux, a non-blocking pipe elsewhere. */
typedef struct relay_notifier {
    int rfd;
    int wfd;
} relay_notifier;

static inline int relay_notifier_open(relay_notifier *n)
{
#if RELAY_HAVE_EVENTFD
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    n->rfd = n->wfd = fd;
#else
    int p[2];
    if (pipe(p) < 0)
        return -errno;
    if (relay_set_flags(p[0]) < 0 || relay_set_flags(p[1]) < 0) {
        int err = errno;
        close(p[0]);
        close(p[1]);
        return -err;
    }
    n->rfd = p[0];
    n->wfd = p[1];
#endif
    return 0;
}

static inline void relay_notifier_signal(relay_notifier *n)
{
#if RELAY_HAVE_EVENTFD
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(n->wfd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
#else
    char c = 1;
    ssize_t r;
    do
        r = write(n->wfd, &c, 1);
    while (r < 0 && errno == EINTR); /* EAGAIN: already signalled, good enough */
#endif
    (void)r;
}

static inline void relay_notifier_clear(relay_notifier *n)
{
    char buf[64];
    ssize_t r;
    do
        r = read(n->rfd, buf, sizeof buf); /* eventfd: one 8-byte read resets the counter */
    while (r > 0 || (r < 0 && errno == EINTR));
}

static inline void relay_notifier_close(relay_notifier *n)
{
    if (n->rfd >= 0)
        close(n->rfd);
    if (n->wfd >= 0 && n->wfd != n->rfd)
        close(n->wfd);
    n->rfd = n->wfd = -1;
}

#endif /* EDGEGW_COMPAT_H */
