/* Threads and forks opening, duplicating and closing thousands of sockets under preload mode.
 *   stress THREADS ITERATIONS PORT_LO PORT_HI HOST_NETNS_INO UNBOUND_TAG
 * Binds to 0.0.0.0:PORT_LO..PORT_HI are grafted (the test's ingress pair); binds to 127.0.0.1:0
 * stay local. Every socket is checked: which netns it lives in (SIOCGSKNS), what getsockname
 * reports. Duplicates (dup, dup2, dup3, F_DUPFD_CLOEXEC, taken before or after bind) must follow
 * the graft; close_range must forget what it closed; no fd may leak (the library's pooled unbound
 * sockets, marked UNBOUND_TAG, are its cache, not the program's). Prints "ok N" or the failure. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int iters, port_lo, port_hi;
static unsigned unbound_tag; /* core/tables.py UNBOUND_TAG, from the test */
static ino_t host_ino, own_ino;
static atomic_int checked, failed;

#define FAIL(...) do { fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); atomic_fetch_add(&failed, 1); return -1; } while (0)

static ino_t netns_of(int fd)
{
	int ns = ioctl(fd, SIOCGSKNS);
	if (ns < 0)
		return 0;
	struct stat sb;
	ino_t ino = fstat(ns, &sb) == 0 ? sb.st_ino : 0;
	close(ns);
	return ino;
}

/* The open fds, less the library's pooled unbound sockets (mark UNBOUND_TAG | n): a bind of a pair
 * seen before fetches a batch and keeps what it did not use, up to POOL_SLOTS. */
static int open_files(void)
{
	int n = 0;
	DIR *d = opendir("/proc/self/fd");
	for (struct dirent *e; d && (e = readdir(d));) {
		unsigned mark = 0;
		socklen_t l = sizeof(mark);
		if (e->d_name[0] == '.' ||
		    (getsockopt(atoi(e->d_name), SOL_SOCKET, SO_MARK, &mark, &l) == 0 && (mark & 0xFFFF0000u) == unbound_tag))
			continue;
		n++;
	}
	if (d)
		closedir(d);
	return n - 1; /* the directory's own fd */
}

static int expect(int fd, ino_t ns, const char *what)
{
	ino_t got = netns_of(fd);
	if (got != ns)
		FAIL("%s: fd %d lives in netns %lu, expected %lu (%s)", what, fd, (unsigned long)got, (unsigned long)ns,
		     ns == host_ino ? "host" : "container");
	atomic_fetch_add(&checked, 1);
	return 0;
}

static int bind_to(int fd, const char *addr, int port)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, addr, &sa.sin_addr);
	return bind(fd, (struct sockaddr *)&sa, sizeof(sa));
}

/* One grafted socket, duplicated one of four ways (before or after its bind). */
static int grafted(unsigned *seed)
{
	int port = port_lo + (int)(rand_r(seed) % (unsigned)(port_hi - port_lo + 1));
	int how = rand_r(seed) % 5, before = rand_r(seed) % 2;
	int fd = socket(AF_INET, rand_r(seed) % 2 ? SOCK_DGRAM : SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		FAIL("socket: %s", strerror(errno));
	int copy = -1, rc = 0;
	if (before && how)
		copy = how == 1 ? dup(fd) : how == 2 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : dup3(fd, dup(fd), O_CLOEXEC);
	if (bind_to(fd, "0.0.0.0", port) != 0) {
		close(fd);
		if (copy >= 0)
			close(copy);
		FAIL("bind 0.0.0.0:%d: %s", port, strerror(errno));
	}
	if (!before && how)
		copy = how == 1 ? dup(fd) : how == 2 ? fcntl(fd, F_DUPFD_CLOEXEC, 0) : dup3(fd, dup(fd), O_CLOEXEC);
	rc |= expect(fd, host_ino, "grafted");
	if (copy >= 0)
		rc |= expect(copy, host_ino, before ? "dup before bind" : "dup after bind");
	struct sockaddr_in me;
	socklen_t len = sizeof(me);
	if (getsockname(copy >= 0 ? copy : fd, (struct sockaddr *)&me, &len) != 0 || me.sin_addr.s_addr != 0 || ntohs(me.sin_port) != port)
		rc = -1, fprintf(stderr, "getsockname: not 0.0.0.0:%d\n", port), atomic_fetch_add(&failed, 1);
	if (copy >= 0)
		close(copy);
	close(fd);
	return rc;
}

static int local(unsigned *seed)
{
	int fd = socket(AF_INET, rand_r(seed) % 2 ? SOCK_DGRAM : SOCK_STREAM, 0);
	if (fd < 0)
		FAIL("socket: %s", strerror(errno));
	int rc = 0;
	if (rand_r(seed) % 2) {
		if (bind_to(fd, "127.0.0.1", 0) != 0)
			rc = -1, fprintf(stderr, "local bind: %s\n", strerror(errno)), atomic_fetch_add(&failed, 1);
		struct sockaddr_in me;
		socklen_t len = sizeof(me);
		if (getsockname(fd, (struct sockaddr *)&me, &len) != 0 || me.sin_addr.s_addr != htonl(INADDR_LOOPBACK) || !me.sin_port)
			rc = -1, fprintf(stderr, "local getsockname: wrong\n"), atomic_fetch_add(&failed, 1);
	}
	if (expect(fd, own_ino, "local"))
		rc = -1;
	close(fd);
	return rc;
}

static int step(unsigned *seed)
{
	return rand_r(seed) % 3 ? grafted(seed) : local(seed);
}

static void *worker(void *arg)
{
	unsigned seed = (unsigned)(uintptr_t)arg * 7919u + 1;
	for (int i = 0; i < iters && !atomic_load(&failed); i++) {
		step(&seed);
		if ((uintptr_t)arg == 0 && i % 100 == 50) { /* fork in the middle of the others' work */
			pid_t pid = fork();
			if (pid == 0) {
				unsigned s2 = seed + 17;
				int bad = 0;
				for (int k = 0; k < 10; k++)
					bad |= step(&s2) != 0;
				_exit(bad || atomic_load(&failed));
			}
			int status;
			if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
				fprintf(stderr, "forked child failed\n"), atomic_fetch_add(&failed, 1);
		}
	}
	return NULL;
}

/* close_range forgets the grafted state of what it closes: the fd numbers, reused by local
 * sockets, must behave as local sockets. */
static int ranges(void)
{
	int fds[8];
	for (int i = 0; i < 8; i++) {
		fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
		if (fds[i] < 0 || bind_to(fds[i], "0.0.0.0", port_lo) != 0)
			FAIL("range socket %d: %s", i, strerror(errno));
	}
	int lo = fds[0], hi = fds[0];
	for (int i = 1; i < 8; i++)
		lo = fds[i] < lo ? fds[i] : lo, hi = fds[i] > hi ? fds[i] : hi;
	if (close_range(lo, hi, 0) != 0)
		FAIL("close_range: %s", strerror(errno));
	for (int i = 0; i < 8; i++) {
		int fd = socket(AF_INET, SOCK_DGRAM, 0);
		bind_to(fd, "127.0.0.1", 0);
		struct sockaddr_in me;
		socklen_t len = sizeof(me);
		getsockname(fd, (struct sockaddr *)&me, &len);
		if (me.sin_addr.s_addr != htonl(INADDR_LOOPBACK))
			FAIL("fd %d after close_range: getsockname reports the old graft", fd);
		if (expect(fd, own_ino, "after close_range"))
			return -1;
		fds[i] = fd;
	}
	for (int i = 0; i < 8; i++)
		close(fds[i]);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 7) {
		fprintf(stderr, "usage: stress THREADS ITERATIONS PORT_LO PORT_HI HOST_NETNS_INO UNBOUND_TAG\n");
		return 64;
	}
	unbound_tag = (unsigned)strtoul(argv[6], NULL, 0);
	int threads = atoi(argv[1]);
	iters = atoi(argv[2]), port_lo = atoi(argv[3]), port_hi = atoi(argv[4]);
	host_ino = strtoul(argv[5], NULL, 10);
	struct stat sb;
	if (stat("/proc/self/ns/net", &sb) != 0 || sb.st_ino == host_ino) {
		fprintf(stderr, "not inside a container netns\n");
		return 2;
	}
	own_ino = sb.st_ino;
	unsigned warm = 1;
	if (grafted(&warm) != 0) /* the library's one connection to the service is open from here on */
		return 1;
	int before = open_files();
	pthread_t t[64];
	if (threads > 64)
		threads = 64;
	for (int i = 0; i < threads; i++)
		pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)i);
	for (int i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	ranges();
	/* close_range above may have closed the library's connection to the service (its fd number lies
	 * between the test's sockets); local binds no longer ask (prefilter), so one grafted socket
	 * makes the library open it again before counting */
	if (grafted(&warm) != 0)
		return 1;
	int after = open_files();
	if (after != before)
		fprintf(stderr, "fd leak: %d open before, %d after\n", before, after), atomic_fetch_add(&failed, 1);
	if (atomic_load(&failed))
		return 1;
	printf("ok %d\n", atomic_load(&checked));
	return 0;
}
