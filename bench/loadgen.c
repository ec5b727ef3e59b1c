/*
 * loadgen: a bounded loopback TCP connection generator for tcpstates'
 * benchmark and soak test.
 *
 *   loadgen -p PORT [-6] [-n CONNECTIONS] [-c CONCURRENT] [-r RATE] [-d SECONDS]
 *
 * Listens on 127.0.0.1:PORT (or [::1]:PORT with -6) and makes up to
 * CONNECTIONS connections to it, keeping up to CONCURRENT of them open at
 * once (the oldest is closed when a new one is made), paced at RATE
 * connections a second (0: as fast as possible), for at most SECONDS.
 * Each connection: connect, send one byte, client closes first; the server
 * side reads to EOF and closes. That is 10 TCP state changes per connection
 * on this kernel (5 per end). At the end it prints one JSON line:
 *   {"connections": N, "seconds": S, "rate": R, "errors": E}
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int family = AF_INET;
static int port;
static volatile int done;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static socklen_t make_addr(struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons(port);
        a->sin6_addr = in6addr_loopback;
        return sizeof(*a);
    }
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    a->sin_family = AF_INET;
    a->sin_port = htons(port);
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sizeof(*a);
}

/* The server: accepts, reads each connection to EOF, closes it. */
static void *serve(void *arg)
{
    int lfd = *(int *)arg;
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event evs[256];
    char buf[256];
    while (!done) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (;;) {
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
                    if (c < 0)
                        break;
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r;
            while ((r = read(fd, buf, sizeof(buf))) > 0)
                ;
            if (r == 0 || (r < 0 && errno != EAGAIN)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                close(fd);
            }
        }
    }
    close(ep);
    return NULL;
}

int main(int argc, char **argv)
{
    long total = 1000, concurrent = 1;
    double rate = 0, seconds = 60;
    int opt;
    while ((opt = getopt(argc, argv, "p:6n:c:r:d:")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case '6': family = AF_INET6; break;
        case 'n': total = atol(optarg); break;
        case 'c': concurrent = atol(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': seconds = atof(optarg); break;
        default:
            fprintf(stderr, "usage: loadgen -p PORT [-6] [-n N] [-c CONCURRENT] [-r RATE] [-d SECONDS]\n");
            return 2;
        }
    }
    if (port <= 0 || port > 65535 || total < 1 || concurrent < 1 || seconds <= 0) {
        fprintf(stderr, "loadgen: bad arguments\n");
        return 2;
    }
    struct rlimit rl = {concurrent * 2 + 256, concurrent * 2 + 256};
    setrlimit(RLIMIT_NOFILE, &rl);

    struct sockaddr_storage ss;
    socklen_t len = make_addr(&ss);
    int lfd = socket(family, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *)&ss, len) || listen(lfd, 4096)) {
        perror("loadgen: listen");
        return 1;
    }
    pthread_t server;
    pthread_create(&server, NULL, serve, &lfd);

    int *ring = calloc(concurrent, sizeof(int));
    for (long i = 0; i < concurrent; i++)
        ring[i] = -1;
    long made = 0, errors = 0;
    double start = now(), deadline = start + seconds;
    for (long i = 0; i < total; i++) {
        double t = now();
        if (t >= deadline)
            break;
        if (rate > 0) {
            double due = start + i / rate;
            if (due > t) {
                struct timespec ts = {(time_t)(due - t), (long)((due - t - (time_t)(due - t)) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
        long slot = i % concurrent;
        if (ring[slot] >= 0) {
            close(ring[slot]);
            ring[slot] = -1;
        }
        int fd = socket(family, SOCK_STREAM, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&ss, len) < 0) {
            errors++;
            if (fd >= 0)
                close(fd);
            continue;
        }
        if (write(fd, "x", 1) != 1)
            errors++;
        ring[slot] = fd;
        made++;
    }
    for (long i = 0; i < concurrent; i++)
        if (ring[i] >= 0)
            close(ring[i]);
    double elapsed = now() - start;
    usleep(200000);              /* let the server see the last FINs */
    done = 1;
    pthread_join(server, NULL);
    close(lfd);
    printf("{\"connections\": %ld, \"seconds\": %.6f, \"rate\": %.1f, \"errors\": %ld}\n",
           made, elapsed, made / (elapsed > 0 ? elapsed : 1), errors);
    return 0;
}
