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
 * copies), and a pooled fd the application closed or replaced is noticed by its inode.
 *
 * Refill ahead (low watermark): when a connect leaves POOL_LOW or fewer sockets of its key, the next
 * batch is asked for at once, without waiting for the reply, on a second connection of this process
 * (`refill`: one request in flight at most); later connects collect the reply without blocking, so in
 * steady state no connect waits for the service. Only a connect that finds its key empty while the
 * batch for it is in flight waits for that reply. The refill connection is this process's (a forked
 * child closes its copy, never reads its parent's reply) and is recognised by its inode. */
#include "internal.h"
#include "prefilter.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define POOL_BATCH 16    /* sockgraft.core.protocol.MAX_POOL */
#define POOL_SLOTS 32    /* pooled sockets a process holds at most */
#define POOL_OFF_NS 1000000000LL
#define POOL_LOW 8       /* sockets of a key left after a connect at or below which the next batch is asked for */
#define REFILL_WAIT_MS 5000 /* a connect waiting for the batch in flight gives up after this (then asks itself) */

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
static int refill = -1;     /* the refill connection (owner's), or -1 */
static ino_t refill_ino;
static struct {
	int active; /* a `pool` request is in flight on `refill` */
	int family, type, proto, row;
	unsigned gen;
} inflight;

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

static void refill_forget(void) /* under lock */
{
	if (refill >= 0 && fd_ino(refill) == refill_ino)
		real_close(refill); /* ours (after fork: the inherited copy; the parent keeps its own) */
	refill = -1;
	inflight.active = 0;
}

/* Under lock: the reply of the batch in flight, if there is one (waiting up to wait_ms for it). Its
 * sockets join the slots when they are still of the current table and this process. */
static void refill_collect(int wait_ms)
{
	if (!inflight.active)
		return;
	if (fd_ino(refill) != refill_ino) { /* the application closed or replaced the fd: not ours now */
		refill = -1;
		inflight.active = 0;
		return;
	}
	if (wait_ms > 0) {
		struct pollfd p = { .fd = refill, .events = POLLIN };
		int r;
		do
			r = poll(&p, 1, wait_ms);
		while (r < 0 && errno == EINTR);
		if (r <= 0)
			return;
	}
	char buf[MAX_MESSAGE + 1];
	union {
		char b[CMSG_SPACE(sizeof(int) * POOL_BATCH)];
		struct cmsghdr align;
	} cbuf;
	struct iovec iov = { buf, MAX_MESSAGE };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.b, .msg_controllen = sizeof(cbuf.b) };
	ssize_t n = recvmsg(refill, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	inflight.active = 0;
	int fds[POOL_BATCH], nfds = 0;
	if (n > 0)
		reply_fds(&mh, fds, POOL_BATCH, &nfds);
	if (n <= 0) { /* the service closed it: the next refill dials anew */
		for (int i = 0; i < nfds; i++)
			real_close(fds[i]);
		refill_forget();
		return;
	}
	buf[n] = 0;
	if (g_trace)
		say("graft: reply (refill): %.60s", buf);
	int ok = strncmp(buf, "ok ", 3) == 0;
	if (!ok && strncmp(buf, "err ", 4) == 0 && atoi(buf + 4) == EOPNOTSUPP)
		off_until = now_ns() + POOL_OFF_NS;
	for (int i = 0; i < nfds; i++) { /* (of an older table: `take` drops them) */
		if (!ok || nslots == POOL_SLOTS) {
			real_close(fds[i]);
			continue;
		}
		slots[nslots++] = (struct slot){ fds[i], fd_ino(fds[i]), inflight.family, inflight.type, inflight.proto,
						 inflight.row, inflight.gen };
	}
	/* `local` or another `err`: nothing joins; the next connect that finds no socket asks itself */
}

/* Under lock: ask for the next batch of this key without waiting for the reply. */
static void refill_ask(int family, const char *addr, int port, int type, int proto, int row, unsigned gen)
{
	char head[200], req[MAX_MESSAGE + 1];
	if (inflight.active)
		return;
	if (refill < 0 || fd_ino(refill) != refill_ino) {
		int s = service_dial();
		if (s < 0) {
			refill = -1;
			return;
		}
		refill = s;
		refill_ino = fd_ino(s);
	}
	if (wire_pool(head, sizeof(head), family, addr, port, type, proto, POOL_BATCH) < 0)
		return;
	const char *tail = __atomic_load_n(&g_tail_connect, __ATOMIC_ACQUIRE);
	int n = snprintf(req, sizeof(req), "%s%s", head, tail ? tail : "");
	if (n < 0 || n > MAX_MESSAGE)
		return; /* the synchronous path says why */
	if (g_trace)
		say("graft: request: %s", req);
	if (real_sendto(refill, req, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT, NULL, 0) < 0) {
		refill_forget();
		return;
	}
	inflight.active = 1;
	inflight.family = family;
	inflight.type = type;
	inflight.proto = proto;
	inflight.row = row;
	inflight.gen = gen;
}

/* Under lock: a pooled socket of this key (removed from the slots), or -1; *left: how many remain,
 * *ino: its inode (just checked: the installer need not ask again). */
static int take(int family, int type, int proto, int row, unsigned gen, int *left, ino_t *ino)
{
	int got = -1;
	*left = 0;
	for (int i = nslots - 1; i >= 0; i--) {
		struct slot s = slots[i];
		if (s.gen != gen) {
			drop(i);
			continue;
		}
		if (s.row != row || s.family != family || s.type != type || s.proto != proto)
			continue;
		if (got >= 0) {
			(*left)++;
			continue;
		}
		slots[i] = slots[--nslots];
		if (fd_ino(s.fd) != s.ino) /* the application closed or reused that fd number */
			continue;
		got = s.fd;
		*ino = s.ino;
	}
	return got;
}

int pool_get(int family, const char *addr, int port, int type, int proto, ino_t *ino)
{
	unsigned gen;
	int row = egress_row(addr, &gen);
	if (row < 0 || (type != SOCK_STREAM && type != SOCK_DGRAM))
		return POOL_OFF;
	pid_t pid = g_pid;
	*ino = 0; /* unknown: st_install asks */
	pthread_mutex_lock(&lock);
	if (owner != pid) { /* a forked child: its copies of the parent's sockets (and of the parent's
			     * refill connection, with its batch in flight) are not its to use */
		while (nslots)
			drop(nslots - 1);
		refill_forget();
		owner = pid;
		off_until = 0;
	}
	if (now_ns() < off_until) {
		pthread_mutex_unlock(&lock);
		return POOL_OFF;
	}
	refill_collect(0);
	int left, fd = take(family, type, proto, row, gen, &left, ino);
	if (fd < 0 && inflight.active && inflight.row == row && inflight.gen == gen && inflight.family == family &&
	    inflight.type == type && inflight.proto == proto) {
		refill_collect(REFILL_WAIT_MS); /* the batch of this key is on its way: wait for it, not ask again */
		fd = take(family, type, proto, row, gen, &left, ino);
	}
	if (fd >= 0) {
		if (left <= POOL_LOW)
			refill_ask(family, addr, port, type, proto, row, gen);
		pthread_mutex_unlock(&lock);
		return fd;
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
