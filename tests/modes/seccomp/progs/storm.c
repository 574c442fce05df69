/* Signal storm during socket/bind/connect under the seccomp supervisor.
 * usage: storm HOST_PORT THREADS ITERATIONS RESTART(0|1)
 * Each worker: socket, bind 0.0.0.0:7000 (grafted on an ingress pair) or nothing, then a socket
 * connected to 127.0.0.1:HOST_PORT (grafted by an egress rule) and a local bind; the main thread
 * sends SIGUSR1 to the workers as fast as it can. Waits for a line on stdin before and after.
 * prints: "ops N eintr E fail F fds_before A fds_after B" (+ the first failure's errno) */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int host_port, iters;
static volatile int running;
static long ops, eintr, fail, first_errno;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static volatile long handled;

static void on_usr1(int sig) { (void)sig; handled++; }

static int count_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1;
}

static void account(int rc, const char *what) {
    pthread_mutex_lock(&mu);
    ops++;
    if (rc < 0) {
        if (errno == EINTR) eintr++;
        else { fail++; if (!first_errno) { first_errno = errno; fprintf(stderr, "%s: %s\n", what, strerror(errno)); } }
    }
    pthread_mutex_unlock(&mu);
}

static void *worker(void *arg) {
    (void)arg;
    struct sockaddr_in srv = {.sin_family = AF_INET, .sin_port = htons(host_port)};
    inet_pton(AF_INET, "127.0.0.1", &srv.sin_addr);
    struct sockaddr_in pair = {.sin_family = AF_INET, .sin_port = htons(7000)};
    struct sockaddr_in loc = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &loc.sin_addr);
    int one = 1;
    for (int i = 0; i < iters; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        account(s, "socket");
        if (s < 0) continue;
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        account(bind(s, (struct sockaddr *)&pair, sizeof pair), "bind grafted");
        close(s);
        s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { account(s, "socket"); continue; }
        account(connect(s, (struct sockaddr *)&srv, sizeof srv), "connect grafted");
        close(s);
        s = socket(AF_INET, SOCK_DGRAM, 0);
        if (s < 0) { account(s, "socket"); continue; }
        account(bind(s, (struct sockaddr *)&loc, sizeof loc), "bind local");
        close(s);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 5) return 2;
    host_port = atoi(argv[1]);
    int nthreads = atoi(argv[2]);
    iters = atoi(argv[3]);
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = atoi(argv[4]) ? SA_RESTART : 0};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 1;
    int before = count_fds();
    pthread_t t[64];
    for (int i = 0; i < nthreads; i++) pthread_create(&t[i], NULL, worker, NULL);
    long sent = 0;
    for (int k = 0; k < 200000; k++) {
        for (int i = 0; i < nthreads; i++) if (pthread_kill(t[i], SIGUSR1) == 0) sent++;
        usleep(20);
        pthread_mutex_lock(&mu);
        long done_ops = ops;
        pthread_mutex_unlock(&mu);
        if (done_ops >= (long)nthreads * iters * 4) break;
    }
    for (int i = 0; i < nthreads; i++) pthread_join(t[i], NULL);
    int after = count_fds();
    printf("ops %ld eintr %ld fail %ld fds_before %d fds_after %d signals %ld handled %ld errno %ld\n",
           ops, eintr, fail, before, after, sent, handled, first_errno);
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 0;
    return 0;
}
