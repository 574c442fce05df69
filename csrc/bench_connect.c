/* The cost of one connect, as a program sees it (docs/PRELOAD.md "Cost of one grafted connect"):
 *   bench_connect accept PORT            accept and close on 127.0.0.1:PORT, forever (the host side)
 *   bench_connect connect ADDR PORT N    N x (socket, blocking connect, close), the client closing
 *                                        first; prints "p50 p99 mean errors" of connect() in µs
 *   bench_connect local N                the same to a listener this program opens in its own netns
 *   bench_connect bind N                 N x (socket, bind 127.0.0.1:0, close): "p50 p99 mean errors" */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void *acceptor(void *arg)
{
	int l = (int)(long)arg;
	for (;;) {
		int c = accept(l, NULL, NULL);
		if (c >= 0)
			close(c);
	}
	return NULL;
}

static int listener(int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(l, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(l, 4096) != 0) {
		perror("listener");
		exit(1);
	}
	return l;
}

static void report(double *t, int n, int errors)
{
	double sum = 0;
	for (int i = 0; i < n; i++)
		sum += t[i];
	qsort(t, (size_t)n, sizeof(*t), cmp);
	printf("%.1f %.1f %.1f %d\n", t[n / 2], t[(int)(n * 0.99)], sum / n, errors);
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "accept")) {
		acceptor((void *)(long)listener(atoi(argv[2])));
		return 0;
	}
	int n = atoi(argv[argc - 1]), errors = 0;
	double *t = calloc((size_t)n, sizeof(double));
	struct sockaddr_in sa = { .sin_family = AF_INET };
	if (!strcmp(argv[1], "bind")) {
		inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
		for (int i = 0; i < n; i++) {
			int fd = socket(AF_INET, SOCK_STREAM, 0);
			double a = now_us();
			errors += bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0;
			t[i] = now_us() - a;
			close(fd);
		}
		report(t, n, errors);
		return 0;
	}
	if (!strcmp(argv[1], "local")) {
		int l = listener(0);
		socklen_t sl = sizeof(sa);
		getsockname(l, (struct sockaddr *)&sa, &sl);
		pthread_t th;
		pthread_create(&th, NULL, acceptor, (void *)(long)l);
	} else {
		inet_pton(AF_INET, argv[2], &sa.sin_addr);
		sa.sin_port = htons(atoi(argv[3]));
	}
	for (int i = 0; i < n; i++) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		double a = now_us();
		errors += connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0;
		t[i] = now_us() - a;
		close(fd);
	}
	report(t, n, errors);
	return 0;
}
