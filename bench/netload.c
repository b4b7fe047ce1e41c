/* Small load programs for the latency and session benchmarks, compiled on the fly by
 * bench/netload.py so the client is never the bottleneck.
 *
 *   netload echo PORT [FDSOCK]             epoll echo server on 127.0.0.1:PORT
 *   netload sink PORT [FDSOCK]             epoll server that reads and discards (128 KiB reads)
 *   netload pingpong PORT COUNT SIZE       one connection, COUNT round trips of SIZE bytes
 *   netload cycle PORT COUNT SIZE          COUNT x (connect, send SIZE, read SIZE, close)
 *   netload banner PORT COUNT [PAUSE_US]   COUNT x (connect, read one line, close), pausing
 *                                          PAUSE_US between connections
 *   netload stream PORT SECONDS STREAMS    STREAMS connections writing 128 KiB blocks
 *
 * With FDSOCK the servers also take connections made elsewhere: each message on a Unix
 * SOCK_SEQPACKET socket bound there carries one descriptor (SCM_RIGHTS), served like an
 * accepted one. bench/handoff_node.py hands it the node's end of edgegw Data connections, so
 * the gateway can be measured as a single relay hop.
 *
 * Latency modes print one JSON object: per-iteration microseconds (p50, p90, p99, min, max,
 * mean) and how many iterations failed; stream prints bytes, seconds and Gbit/s, counting
 * only bytes the far end acknowledged by closing after it read them all.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void report(const char *mode, double *s, int n, int failed) {
    if (n == 0) {
        printf("{\"mode\":\"%s\",\"n\":0,\"failed\":%d}\n", mode, failed);
        return;
    }
    qsort(s, n, sizeof(double), cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += s[i];
#define PCT(p) s[(int)((double)(n - 1) * (p))]
    printf("{\"mode\":\"%s\",\"n\":%d,\"failed\":%d,\"p50\":%.2f,\"p90\":%.2f,\"p99\":%.2f,"
           "\"min\":%.2f,\"max\":%.2f,\"mean\":%.2f}\n",
           mode, n, failed, PCT(0.5), PCT(0.9), PCT(0.99), s[0], s[n - 1], sum / n);
}

static int dial(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    return fd;
}

static int read_full(int fd, char *buf, int n) {
    int got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) {
            if (r < 0 && errno == EINTR) continue;
            return -1;
        }
        got += r;
    }
    return got;
}

static int write_full(int fd, const char *buf, int n) {
    int put = 0;
    while (put < n) {
        ssize_t w = write(fd, buf + put, n - put);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd p = {.fd = fd, .events = POLLOUT};
                poll(&p, 1, 1000);
                continue;
            }
            return -1;
        }
        put += w;
    }
    return put;
}

enum { K_DATA, K_TCP_LISTEN, K_FD_LISTEN, K_FD_CONN };
#define MAX_FD 65536
static unsigned char kind[MAX_FD];

static void watch(int ep, int fd, int k) {
    if (fd >= MAX_FD) {
        close(fd);
        return;
    }
    kind[fd] = (unsigned char)k;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static int listen_fdsock(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) return -1;
    strcpy(a.sun_path, path);
    unlink(path);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) < 0 || listen(s, 64) < 0) return -1;
    return s;
}

/* One descriptor per message; a message without one ends nothing, a closed peer is dropped. */
static void take_fds(int ep, int c) {
    for (;;) {
        char byte;
        char ctl[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {.iov_base = &byte, .iov_len = 1};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl,
                           .msg_controllen = sizeof ctl};
        ssize_t r = recvmsg(c, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        if (r <= 0) {
            close(c);
            return;
        }
        struct cmsghdr *h = CMSG_FIRSTHDR(&m);
        if (h && h->cmsg_level == SOL_SOCKET && h->cmsg_type == SCM_RIGHTS) {
            int fd;
            memcpy(&fd, CMSG_DATA(h), sizeof fd);
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            watch(ep, fd, K_DATA);
        }
    }
}

static int server(int port, const char *fdsock, int echo) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 4096) < 0) {
        perror("netload: bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    watch(ep, ls, K_TCP_LISTEN);
    if (fdsock) {
        int us = listen_fdsock(fdsock);
        if (us < 0) {
            perror("netload: fd socket");
            return 1;
        }
        watch(ep, us, K_FD_LISTEN);
    }
    static char buf[131072];
    struct epoll_event evs[256];
    fprintf(stderr, "%s listening on %d%s%s\n", echo ? "echo" : "sink", port,
            fdsock ? " and " : "", fdsock ? fdsock : "");
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (kind[fd] == K_TCP_LISTEN || kind[fd] == K_FD_LISTEN) {
                for (;;) {
                    int c = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) break;
                    if (kind[fd] == K_FD_LISTEN) {
                        watch(ep, c, K_FD_CONN);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    watch(ep, c, K_DATA);
                }
                continue;
            }
            if (kind[fd] == K_FD_CONN) {
                take_fds(ep, fd);
                continue;
            }
            ssize_t r = read(fd, buf, echo ? 65536 : sizeof buf);
            if (r > 0) {
                if (echo && write_full(fd, buf, r) < 0) close(fd);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(fd);
            }
        }
    }
}

/* STREAMS connections write 128 KiB blocks for SECONDS, then half-close and wait for the far
 * end's close, which comes only after it read everything: bytes counted were delivered. */
static int stream(int port, double seconds, int streams) {
    static char block[131072];
    memset(block, 'x', sizeof block);
    int *fds = calloc(streams, sizeof(int));
    int ep = epoll_create1(0);
    for (int i = 0; i < streams; i++) {
        fds[i] = dial(port);
        if (fds[i] < 0) {
            printf("{\"mode\":\"stream\",\"error\":\"connect failed\"}\n");
            return 1;
        }
        fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLOUT, .data.fd = fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
    }
    unsigned long long sent = 0;
    int failed = 0;
    struct epoll_event evs[64];
    double t0 = now_us(), stop = t0 + seconds * 1e6;
    while (now_us() < stop) {
        int n = epoll_wait(ep, evs, 64, 100);
        for (int i = 0; i < n; i++) {
            ssize_t w = write(evs[i].data.fd, block, sizeof block);
            if (w > 0) sent += (unsigned long long)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR) {
                failed++;
                epoll_ctl(ep, EPOLL_CTL_DEL, evs[i].data.fd, NULL);
            }
        }
    }
    for (int i = 0; i < streams; i++) {
        shutdown(fds[i], SHUT_WR);
        struct pollfd p = {.fd = fds[i], .events = POLLIN};
        char c;
        if (poll(&p, 1, 30000) != 1 || read(fds[i], &c, 1) != 0) failed++;
        close(fds[i]);
    }
    double secs = (now_us() - t0) / 1e6;
    printf("{\"mode\":\"stream\",\"streams\":%d,\"failed\":%d,\"bytes\":%llu,\"seconds\":%.4f,"
           "\"gbps\":%.4f}\n", streams, failed, sent, secs, sent * 8.0 / secs / 1e9);
    return failed ? 1 : 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && (!strcmp(argv[1], "echo") || !strcmp(argv[1], "sink")))
        return server(atoi(argv[2]), argc > 3 ? argv[3] : NULL, !strcmp(argv[1], "echo"));
    if (argc >= 5 && !strcmp(argv[1], "stream"))
        return stream(atoi(argv[2]), atof(argv[3]), atoi(argv[4]));
    if (argc < 4) {
        fprintf(stderr, "usage: netload echo|sink PORT [FDSOCK] | stream PORT SECONDS STREAMS"
                        " | pingpong|cycle|banner PORT COUNT [SIZE]\n");
        return 2;
    }
    const char *mode = argv[1];
    int port = atoi(argv[2]), count = atoi(argv[3]);
    int size = argc > 4 ? atoi(argv[4]) : 64;
    if (size < 1 || size > 65536) size = 64;
    char *out = malloc(size), *in = malloc(size > 512 ? size : 512);
    memset(out, 'x', size);
    double *s = calloc(count, sizeof(double));
    int n = 0, failed = 0;
    if (!strcmp(mode, "pingpong")) {
        int fd = dial(port);
        if (fd < 0) {
            report(mode, s, 0, count);
            return 1;
        }
        int warm = count / 10 + 10;
        for (int i = 0; i < warm + count; i++) {
            double t0 = now_us();
            if (write_full(fd, out, size) < 0 || read_full(fd, in, size) < 0) {
                failed++;
                break;
            }
            if (i >= warm) s[n++] = now_us() - t0;
        }
        close(fd);
    } else if (!strcmp(mode, "cycle")) {
        for (int i = 0; i < count; i++) {
            double t0 = now_us();
            int fd = dial(port);
            if (fd < 0 || write_full(fd, out, size) < 0 || read_full(fd, in, size) < 0) {
                failed++;
                if (fd >= 0) close(fd);
                continue;
            }
            close(fd);
            s[n++] = now_us() - t0;
        }
    } else if (!strcmp(mode, "banner")) {
        /* For banner the fourth argument is a pause between connections (µs), so the last
         * session's teardown is not charged to the next one's setup. */
        int pause_us = argc > 4 ? atoi(argv[4]) : 0;
        for (int i = 0; i < count; i++) {
            if (pause_us > 0 && i > 0) usleep(pause_us);
            double t0 = now_us();
            int fd = dial(port), ok = 0, got = 0;
            while (fd >= 0 && got < 511) {
                ssize_t r = read(fd, in + got, 511 - got);
                if (r <= 0) break;
                got += r;
                if (memchr(in, '\n', got)) {
                    ok = got >= 4 && !memcmp(in, "SSH-", 4);
                    break;
                }
            }
            double t = now_us() - t0;
            if (fd >= 0) close(fd);
            if (ok) s[n++] = t;
            else failed++;
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    report(mode, s, n, failed);
    return 0;
}
