/* pool.c: host sockets fetched ahead of their connects (issue 11, lever 4).
 *
 * A connect to a destination an egress rule names asks the service `pool ...` once: the service
 * judges it as it judges `connect` and answers with up to POOL_BATCH host sockets of the granted
 * endpoint, bound with IP_BIND_ADDRESS_NO_PORT and marked, NOT connected. The library installs one
 * in place of the application's socket and lets the application's own connect() run on it: the
 * kernel's connect, with its port choice per 4-tuple, blocking and non-blocking semantics, at
 * native cost. The rest wait here for the next connects through the same rule.
 *
 * The service hands such sockets over only where the kernel guards them (host/bindguard.py: no
 * re-bind of a marked socket without a port; host/egress.py: a marked socket reaches only its
 * container's destinations); otherwise it answers EOPNOTSUPP and the library asks `connect` (for
 * POOL_OFF_NS). Pooled sockets are keyed by the prefilter row of the rule (longest prefix) and its
 * generation: a changed table drops them. A forked child never uses its parent's (closes its
 * copies), and a pooled fd the application closed or replaced is noticed by its inode. */
#include "internal.h"
#include "prefilter.h"

#include <errno.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define POOL_BATCH 16    /* sockgraft.core.protocol.MAX_POOL */
#define POOL_SLOTS 32    /* pooled sockets a process holds at most */
#define POOL_OFF_NS 1000000000LL

struct slot {
	int fd;
	ino_t ino;
	int family, type, proto, row;
	unsigned gen;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct slot slots[POOL_SLOTS];
static int nslots;
static pid_t owner;
static long long off_until;

void pool_lock(void) { pthread_mutex_lock(&lock); }
void pool_unlock(void) { pthread_mutex_unlock(&lock); }

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void drop(int i) /* under lock: close slot i if the fd is still ours, and forget it */
{
	if (fd_ino(slots[i].fd) == slots[i].ino)
		real_close(slots[i].fd);
	slots[i] = slots[--nslots];
}

int pool_get(int family, const char *addr, int port, int type, int proto)
{
	unsigned gen;
	int row = egress_row(addr, &gen);
	if (row < 0 || (type != SOCK_STREAM && type != SOCK_DGRAM))
		return POOL_OFF;
	pid_t pid = getpid();
	pthread_mutex_lock(&lock);
	if (owner != pid) { /* a forked child: its copies of the parent's sockets are not its to use */
		while (nslots)
			drop(nslots - 1);
		owner = pid;
		off_until = 0;
	}
	if (now_ns() < off_until) {
		pthread_mutex_unlock(&lock);
		return POOL_OFF;
	}
	for (int i = nslots - 1; i >= 0; i--) {
		struct slot s = slots[i];
		if (s.gen != gen) {
			drop(i);
			continue;
		}
		if (s.row != row || s.family != family || s.type != type || s.proto != proto)
			continue;
		slots[i] = slots[--nslots];
		if (fd_ino(s.fd) != s.ino) /* the application closed or reused that fd number */
			continue;
		pthread_mutex_unlock(&lock);
		return s.fd;
	}
	pthread_mutex_unlock(&lock);

	char head[200];
	int fds[POOL_BATCH], n = 0;
	if (wire_pool(head, sizeof(head), family, addr, port, type, proto, POOL_BATCH) < 0)
		return POOL_OFF;
	switch (decide_fds(head, &g_tail_connect, "GRAFT_EGRESS/GRAFT_BBCONN", fds, POOL_BATCH, &n)) {
	case D_LOCAL:
		return POOL_LOCAL;
	case D_GRANT:
		break;
	default:
		if (errno != EOPNOTSUPP)
			return POOL_ERR;
		pthread_mutex_lock(&lock);
		off_until = now_ns() + POOL_OFF_NS;
		pthread_mutex_unlock(&lock);
		return POOL_OFF;
	}
	pthread_mutex_lock(&lock);
	for (int i = 1; i < n; i++) {
		if (nslots == POOL_SLOTS || owner != pid) {
			real_close(fds[i]);
			continue;
		}
		slots[nslots++] = (struct slot){ fds[i], fd_ino(fds[i]), family, type, proto, row, gen };
	}
	pthread_mutex_unlock(&lock);
	return fds[0];
}
