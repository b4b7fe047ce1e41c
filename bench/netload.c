/* Small load programs for the latency and session benchmarks, compiled on the fly by
 * bench/netload.py so the client is never the bottleneck.
 *
 *   netload echo PORT                      epoll echo server on 127.0.0.1:PORT
 *   netload pingpong PORT COUNT SIZE       one connection, COUNT round trips of SIZE bytes
 *   netload cycle PORT COUNT SIZE          COUNT x (connect, send SIZE, read SIZE, close)
 *   netload banner PORT COUNT              COUNT x (connect, read one line, close)
 *
 * Client modes print one JSON object: per-iteration microseconds (p50, p90, p99, min, max,
 * mean) and how many iterations failed.
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

static int echo_server(int port) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0 || listen(ls, 4096) < 0) {
        perror("echo: bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    static char buf[65536];
    struct epoll_event evs[256];
    fprintf(stderr, "echo listening on %d\n", port);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0) break;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct epoll_event ce = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r > 0) {
                if (write_full(fd, buf, r) < 0) close(fd);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close(fd);
            }
        }
    }
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    if (argc >= 3 && !strcmp(argv[1], "echo")) return echo_server(atoi(argv[2]));
    if (argc < 4) {
        fprintf(stderr, "usage: netload echo|pingpong|cycle|banner PORT COUNT [SIZE]\n");
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
        for (int i = 0; i < count; i++) {
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
