/* pool.c: host sockets fetched ahead of their connects (issue 11, lever 4), and of binds.
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
 * child closes its copy, never reads its parent's reply) and is recognised by its inode.
 *
 * Binds (pool_bind): from the second bind of the same operation on, `bindpool ...` (judged as
 * `bind`) answers a batch of host sockets NOT bound, marked so that the kernel lets them bind only to
 * the container's endpoints (host/bindguard.py) and refuses what they would send or serve before
 * (host/egress.py), with the address to bind them to; the hook binds one there itself. Batches are
 * asked for ahead on the refill connection, as for connects (one round trip per POOL_BATCH binds).
 *
 * Speculation: once a process's last SPEC_STREAK connects (or binds) of a kind all took pooled
 * sockets of one row (an egress row, or a bind key's BIND_ROW), socket() hands out the next socket
 * of that row (pool_speculate); hooks.c settles it (a socket of the container's swapped in) before
 * any other use. */
#include "internal.h"
#include "prefilter.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define POOL_BATCH 32    /* sockgraft.core.protocol.MAX_POOL: a batch asked for ahead */
#define POOL_FIRST (POOL_BATCH / 2) /* protocol.FIRST_POOL: the batch a connect or bind that finds no socket
				     * waits for (a program that connects once pays for no more sockets than that) */
#define POOL_SLOTS 64    /* pooled sockets a process holds at most */
#define POOL_OFF_NS 1000000000LL
#define POOL_LOW (POOL_FIRST / 2) /* sockets of a key left after a connect at or below which the next batch is asked for */
#define REFILL_WAIT_MS 5000 /* a connect waiting for the batch in flight gives up after this (then asks itself) */
#define BIND_KEYS 8      /* bind operations (address, port, type, protocol, flags) a process pools at once */
#define SPEC_STREAK 4    /* pooled connects of one kind and row in a row after which socket() speculates */

struct slot {
	int fd;
	ino_t ino;
	int family, type, proto, row; /* row: the egress prefilter row (connects), BIND_ROW(i) (binds) */
	unsigned gen;
};

/* A bind pooled by this process: the operation, and where its host sockets are bound. Its first
 * bind is asked of the service as `bind` (`seen`: a server binds once, a pool would cost it a batch
 * of sockets); from the second on the sockets come from a `bindpool` batch. */
struct bkey {
	int used, seen, family, port, type, proto;
	unsigned flags, gen;
	char addr[INET6_ADDRSTRLEN];
	struct sockaddr_storage host;
	socklen_t hostlen;
	int host_family;
};
#define BIND_ROW(i) (-2 - (i))

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct slot slots[POOL_SLOTS];
static int nslots;
static pid_t owner;
static long long off_until, bind_off_until;
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

static int bind_batch_host(const char *reply, int row, unsigned gen, int *family);

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
		*(inflight.row < 0 ? &bind_off_until : &off_until) = now_ns() + POOL_OFF_NS;
	if (ok && inflight.row < 0) /* a bind batch: where its sockets are bound, for its key if still there */
		ok = bind_batch_host(buf, inflight.row, inflight.gen, &inflight.family);
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

/* Under lock: ask for the next batch of this key (`head`: its `pool` or `bindpool` request, with the
 * environment's rules *tailp) without waiting for the reply. */
static void refill_ask(const char *head, char **tailp, int family, int type, int proto, int row, unsigned gen)
{
	char req[MAX_MESSAGE + 1];
	if (inflight.active || !head)
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
	const char *tail = __atomic_load_n(tailp, __ATOMIC_ACQUIRE);
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

static struct bkey bkeys[BIND_KEYS];
static int bkey_next;

/* Speculation: the kind (family, type, protocol) of this process's last pooled connects or binds,
 * the row they all went through (an egress row; BIND_ROW(i): bind key i) and how many in a row; a
 * destination of an egress row for its next batch (a bind key holds its own). */
static struct {
	int family, type, proto, row, port, streak;
	unsigned gen;
	char addr[INET6_ADDRSTRLEN];
} spec;

/* Under lock, in process pid: a forked child's copies of its parent's sockets (and of the parent's
 * refill connection, with its batch in flight) are not its to use: closed, forgotten. */
static void own(pid_t pid)
{
	if (owner == pid)
		return;
	while (nslots)
		drop(nslots - 1);
	refill_forget();
	memset(bkeys, 0, sizeof(bkeys));
	memset(&spec, 0, sizeof(spec));
	owner = pid;
	off_until = bind_off_until = 0;
}

/* A pool request the service refused: EOPNOTSUPP (pools off there) keeps this kind of pool off for
 * POOL_OFF_NS (*until), anything else is the operation's error (errno). */
static int refused(long long *until)
{
	if (errno != EOPNOTSUPP)
		return POOL_ERR;
	pthread_mutex_lock(&lock);
	*until = now_ns() + POOL_OFF_NS;
	pthread_mutex_unlock(&lock);
	return POOL_OFF;
}

/* Under lock: with `left` sockets of this connect key, the next batch asked for ahead if due. */
static void ahead(int left, int family, const char *addr, int port, int type, int proto, int row, unsigned gen)
{
	char head[200];
	if (left <= POOL_LOW && wire_pool(head, sizeof(head), family, addr, port, type, proto, POOL_BATCH) >= 0)
		refill_ask(head, &g_tail_connect, family, type, proto, row, gen);
}

/* Under lock: with `left` sockets of bind key BIND_ROW(i) = row, its next batch asked for ahead if due. */
static void bind_ahead(int left, int row, int type, int proto)
{
	char head[200];
	const struct bkey *k = &bkeys[-2 - row];
	if (k->used && left <= POOL_LOW &&
	    wire_bindpool(head, sizeof(head), k->family, k->addr, k->port, type, proto, k->flags, POOL_BATCH) >= 0)
		refill_ask(head, &g_tail_bind, k->host_family, type, proto, row, k->gen);
}

/* Under lock: a connect of this kind took a pooled socket of row/gen; addr, port: its destination
 * (NULL: the row's stays). */
static void spec_used(int family, int type, int proto, int row, unsigned gen, const char *addr, int port)
{
	if (spec.family != family || spec.type != type || spec.proto != proto || spec.row != row || spec.gen != gen) {
		spec.family = family, spec.type = type, spec.proto = proto, spec.row = row, spec.gen = gen;
		spec.streak = 0;
	}
	if (spec.streak < SPEC_STREAK)
		spec.streak++;
	if (addr) {
		snprintf(spec.addr, sizeof(spec.addr), "%s", addr);
		spec.port = port;
	}
}

void pool_spec_used(int family, int type, int proto, int row, unsigned gen)
{
	pthread_mutex_lock(&lock);
	own(g_pid);
	spec_used(family, type, proto, row, gen, NULL, 0);
	pthread_mutex_unlock(&lock);
}

void pool_spec_reset(int family, int type, int proto)
{
	pthread_mutex_lock(&lock);
	if (spec.family == family && spec.type == type && spec.proto == proto)
		spec.streak = 0;
	pthread_mutex_unlock(&lock);
}

int pool_speculate(int family, int type, int proto, int *row, unsigned *gen, ino_t *ino)
{
	if (!g_speculate)
		return -1;
	pthread_mutex_lock(&lock);
	own(g_pid);
	int fd = -1;
	int streak = spec.streak >= SPEC_STREAK && spec.family == family && spec.type == type && spec.proto == proto;
	if (streak && spec.row < 0) {
		int i = -2 - spec.row, left;
		unsigned r = spec.gen, g;
		pthread_mutex_unlock(&lock); /* the prefilter has its own lock: not under ours */
		int known = table_gen(&g) == 0;
		pthread_mutex_lock(&lock);
		const struct bkey *k = &bkeys[i];
		if (!known || g != r || spec.row != BIND_ROW(i) || spec.gen != r) {
			spec.streak = 0; /* the table changed (or another thread's bind moved the streak) */
		} else if (now_ns() >= bind_off_until && k->used && k->gen == g && k->hostlen && k->host_family == family) {
			fd = take(family, type, proto, BIND_ROW(i), g, &left, ino);
			*row = BIND_ROW(i), *gen = g;
		}
	} else if (streak && now_ns() >= off_until) {
		char addr[INET6_ADDRSTRLEN]; /* read under our lock: another thread's connect may write it */
		memcpy(addr, spec.addr, sizeof(addr));
		pthread_mutex_unlock(&lock); /* the prefilter has its own lock: not under ours */
		unsigned g;
		int r = egress_row(addr, &g);
		pthread_mutex_lock(&lock);
		if (r != spec.row || g != spec.gen) {
			spec.streak = 0; /* the table changed */
		} else {
			int left;
			fd = take(family, type, proto, r, g, &left, ino); /* no fd made here: see pool_spec_refill */
			*row = r, *gen = g;
		}
	}
	pthread_mutex_unlock(&lock);
	return fd;
}

void pool_spec_refill(int family, int type, int proto, int row, unsigned gen)
{
	pthread_mutex_lock(&lock);
	if (owner == g_pid) {
		refill_collect(0);
		int left = 0;
		for (int i = 0; i < nslots; i++)
			left += slots[i].row == row && slots[i].gen == gen && slots[i].family == family && slots[i].type == type &&
				slots[i].proto == proto;
		if (spec.row == row && spec.gen == gen && row >= 0)
			ahead(left, family, spec.addr, spec.port, type, proto, row, gen);
		else if (spec.row == row && spec.gen == gen)
			bind_ahead(left, row, type, proto);
	}
	pthread_mutex_unlock(&lock);
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
	own(pid);
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
	char head[200];
	int fds[POOL_BATCH], n = 0;
	if (fd >= 0) {
		spec_used(family, type, proto, row, gen, addr, port);
		ahead(left, family, addr, port, type, proto, row, gen);
		pthread_mutex_unlock(&lock);
		return fd;
	}
	pthread_mutex_unlock(&lock);
	if (wire_pool(head, sizeof(head), family, addr, port, type, proto, POOL_FIRST) < 0)
		return POOL_OFF;

	switch (decide_fds(head, &g_tail_connect, "GRAFT_EGRESS/GRAFT_BBCONN", fds, POOL_FIRST, &n, NULL, 0)) {
	case D_LOCAL:
		return POOL_LOCAL;
	case D_GRANT:
		break;
	default:
		return refused(&off_until);
	}
	pthread_mutex_lock(&lock);
	if (owner == pid)
		spec_used(family, type, proto, row, gen, addr, port);
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

/* -- binds ------------------------------------------------------------------------------------ */
/* Whether key k is this bind's, of table generation gen. */
static int bkey_is(const struct bkey *k, int family, const char *addr, int port, int type, int proto, unsigned flags,
		   unsigned gen)
{
	return k->used && k->gen == gen && k->family == family && k->port == port && k->type == type &&
	       k->proto == proto && k->flags == flags && strcmp(k->addr, addr) == 0;
}

/* Under lock: the key of this bind (made, replacing the oldest, if new: its sockets dropped). */
static struct bkey *bkey_of(int family, const char *addr, int port, int type, int proto, unsigned flags, unsigned gen,
			    int *index)
{
	for (int i = 0; i < BIND_KEYS; i++) {
		struct bkey *k = &bkeys[i];
		if (bkey_is(k, family, addr, port, type, proto, flags, gen)) {
			*index = i;
			return k;
		}
	}
	int i = bkey_next;
	bkey_next = (bkey_next + 1) % BIND_KEYS;
	for (int j = nslots - 1; j >= 0; j--)
		if (slots[j].row == BIND_ROW(i))
			drop(j);
	bkeys[i] = (struct bkey){ .used = 1, .family = family, .port = port, .type = type, .proto = proto,
				  .flags = flags, .gen = gen };
	snprintf(bkeys[i].addr, sizeof(bkeys[i].addr), "%s", addr);
	*index = i;
	return &bkeys[i];
}

/* The host address of an `ok FAMILY ADDR PORT` reply; -1 if it is not one. */
static int reply_host(const char *reply, struct sockaddr_storage *ss, socklen_t *len, int *family)
{
	char addr[INET6_ADDRSTRLEN + 1];
	int fam, port;
	if (sscanf(reply, "ok %d %46s %d", &fam, addr, &port) != 3 || port < 0 || port > 65535)
		return -1;
	memset(ss, 0, sizeof(*ss));
	if (fam == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;
		in->sin_family = AF_INET;
		in->sin_port = htons((uint16_t)port);
		*len = sizeof(*in);
		if (inet_pton(AF_INET, addr, &in->sin_addr) != 1)
			return -1;
	} else if (fam == AF_INET6) {
		struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
		in6->sin6_family = AF_INET6;
		in6->sin6_port = htons((uint16_t)port);
		*len = sizeof(*in6);
		if (inet_pton(AF_INET6, addr, &in6->sin6_addr) != 1)
			return -1;
	} else {
		return -1;
	}
	*family = fam;
	return 0;
}

/* Under lock: the host address of a bind batch's reply noted for its key (row, gen), if that key
 * is still there; *family: the sockets' family. 1, or 0 (the batch is not kept). */
static int bind_batch_host(const char *reply, int row, unsigned gen, int *family)
{
	struct bkey *k = &bkeys[-2 - row];
	struct sockaddr_storage host;
	socklen_t len;
	if (!k->used || k->gen != gen || reply_host(reply, &host, &len, family) != 0)
		return 0;
	k->host = host;
	k->hostlen = len;
	k->host_family = *family;
	return 1;
}

int pool_bind(int family, const char *addr, int port, int type, int proto, unsigned flags,
	      struct sockaddr_storage *host, socklen_t *hostlen, ino_t *ino, int *row, unsigned *rgen)
{
	unsigned gen;
	*row = -1;
	if (table_gen(&gen) < 0 || (type != SOCK_STREAM && type != SOCK_DGRAM))
		return POOL_OFF;
	pid_t pid = g_pid;
	*ino = 0;
	*rgen = gen;
	pthread_mutex_lock(&lock);
	own(pid);
	if (now_ns() < bind_off_until) {
		pthread_mutex_unlock(&lock);
		return POOL_OFF;
	}
	int i, left;
	struct bkey *k = bkey_of(family, addr, port, type, proto, flags, gen, &i);
	if (!k->seen) {
		k->seen = 1;
		pthread_mutex_unlock(&lock);
		return POOL_OFF;
	}
	char head[200], reply[MAX_MESSAGE + 1];
	int fds[POOL_BATCH], n = 0, hfam;
	refill_collect(0);
	int fd = k->hostlen ? take(k->host_family, type, proto, BIND_ROW(i), gen, &left, ino) : -1;
	if (fd < 0 && inflight.active && inflight.row == BIND_ROW(i) && inflight.gen == gen) {
		refill_collect(REFILL_WAIT_MS); /* this key's batch is on its way: wait for it */
		fd = k->hostlen ? take(k->host_family, type, proto, BIND_ROW(i), gen, &left, ino) : -1;
	}
	if (fd >= 0) {
		*host = k->host;
		*hostlen = k->hostlen;
		*row = BIND_ROW(i);
		bind_ahead(left, BIND_ROW(i), type, proto);
		pthread_mutex_unlock(&lock);
		return fd;
	}
	pthread_mutex_unlock(&lock);
	if (wire_bindpool(head, sizeof(head), family, addr, port, type, proto, flags, POOL_FIRST) < 0)
		return POOL_OFF;

	switch (decide_fds(head, &g_tail_bind, "GRAFT_CONV_PAIRS", fds, POOL_FIRST, &n, reply, sizeof(reply))) {
	case D_LOCAL:
		return POOL_LOCAL;
	case D_GRANT:
		if (n > 0 && reply_host(reply, host, hostlen, &hfam) == 0)
			break;
		for (int j = 0; j < n; j++)
			real_close(fds[j]);
		return POOL_OFF;
	default:
		return refused(&bind_off_until);
	}
	pthread_mutex_lock(&lock);
	k = &bkeys[i];
	int same = owner == pid && bkey_is(k, family, addr, port, type, proto, flags, gen);
	if (same) {
		k->host = *host;
		k->hostlen = *hostlen;
		k->host_family = hfam;
		*row = BIND_ROW(i);
	}
	for (int j = 1; j < n; j++) {
		if (!same || nslots == POOL_SLOTS) {
			real_close(fds[j]);
			continue;
		}
		slots[nslots++] = (struct slot){ fds[j], fd_ino(fds[j]), hfam, type, proto, BIND_ROW(i), gen };
	}
	pthread_mutex_unlock(&lock);
	return fds[0];
}

int pool_bind_spec(int family, const char *addr, int port, int type, int proto, unsigned flags, int row, unsigned gen,
		   struct sockaddr_storage *host, socklen_t *hostlen)
{
	unsigned g;
	if (row > BIND_ROW(0) || row < BIND_ROW(BIND_KEYS - 1) || table_gen(&g) < 0 || g != gen)
		return -1;
	pthread_mutex_lock(&lock);
	const struct bkey *k = &bkeys[-2 - row];
	int ok = owner == g_pid && k->hostlen && bkey_is(k, family, addr, port, type, proto, flags, gen);
	if (ok) {
		*host = k->host;
		*hostlen = k->hostlen;
	}
	pthread_mutex_unlock(&lock);
	return ok ? 0 : -1;
}
