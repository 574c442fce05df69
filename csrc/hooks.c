/* The wrapped socket calls. This file holds NO policy: it notices the calls whose outcome depends
 * on an address (bind, connect, sendto/sendmsg/sendmmsg with a destination, AF_GRAFT sockets),
 * forwards the container-side address to the fd service (service.c) and carries out the answer:
 *   ok + fd   the host socket it received replaces the application's fd (dup3), keeping the fd's
 *             O_NONBLOCK/FD_CLOEXEC and the socket options the application set before;
 *   local     the real libc call runs, inside the container's own netns;
 *   err N     the call fails with errno N.
 * dup, dup2, dup3, fcntl(F_DUPFD*), close, close_range and closefrom keep the fd table in step. */
#include "internal.h"
#include "prefilter.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SIN6_LEN_RFC2133
#define SIN6_LEN_RFC2133 24 /* sockaddr_in6 without sin6_scope_id: the kernel accepts it */
#endif

/* The text form of an inet sockaddr: family, address and port, or -1 if it is not one. The lengths
 * are the kernel's: 16 bytes and more for AF_INET, 24 (SIN6_LEN_RFC2133) and more for AF_INET6
 * (sockgraft.modes.seccomp.kernel.decode_sockaddr accepts the same; test_sockaddr.py). */
static int inet_words(const struct sockaddr *sa, socklen_t len, int *fam, char *addr, int *port)
{
	if (!sa || len < (socklen_t)sizeof(sa_family_t))
		return -1;
	if (sa->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
		struct sockaddr_in in;
		memcpy(&in, sa, sizeof(in));
		inet_ntop(AF_INET, &in.sin_addr, addr, INET6_ADDRSTRLEN);
		*fam = AF_INET;
		*port = ntohs(in.sin_port);
		return 0;
	}
	if (sa->sa_family == AF_INET6 && len >= (socklen_t)SIN6_LEN_RFC2133) {
		struct sockaddr_in6 in6 = { 0 }; /* the scope id is optional: 24 bytes are enough */
		memcpy(&in6, sa, len < (socklen_t)sizeof(in6) ? len : sizeof(in6));
		inet_ntop(AF_INET6, &in6.sin6_addr, addr, INET6_ADDRSTRLEN);
		*fam = AF_INET6;
		*port = ntohs(in6.sin6_port);
		return 0;
	}
	return -1;
}

/* The endpoint name in a sockaddr_gr, or -1 with errno EINVAL. */
static int gr_name(const struct sockaddr *sa, socklen_t len, char name[AF_GRAFT_EPNAME_MAX])
{
	size_t off = offsetof(struct sockaddr_gr, sgr_epname);
	if (len <= (socklen_t)off) {
		errno = EINVAL;
		return -1;
	}
	size_t avail = (size_t)len - off;
	if (avail > AF_GRAFT_EPNAME_MAX)
		avail = AF_GRAFT_EPNAME_MAX;
	const char *p = (const char *)sa + off;
	size_t n = strnlen(p, avail);
	if (n == 0 || n >= AF_GRAFT_EPNAME_MAX) {
		errno = EINVAL;
		return -1;
	}
	for (size_t i = 0; i < n; i++)
		if (p[i] <= ' ' || p[i] > '~') {
			errno = EINVAL;
			return -1;
		}
	memcpy(name, p, n);
	name[n] = 0;
	return 0;
}

/* An unbound socket is about to reach `sa`: the egress decision. `verb` is PF_CONNECT (a pooled
 * host socket, not connected: the caller connects it itself (pool.c); or, without pools, the service
 * hands over a socket connected or connecting to `sa`: the caller only waits for it) or PF_SENDTO
 * (a socket bound to the source endpoint with a port of its own: the caller then sends).
 * Returns 0 to go on with the real call, 1 when the grafted socket is in place and connecting,
 * 2 when a pooled one is in place (the real connect follows), -1 with errno. */
static int egress(int fd, struct gs *st, const struct sockaddr *sa, socklen_t len, int verb)
{
	char addr[INET6_ADDRSTRLEN], head[160];
	int fam, port, newfd;
	if (inet_words(sa, len, &fam, addr, &port) != 0 || (st->family != AF_GRAFT && st->family != fam))
		return 0; /* not an address we can decide on: the kernel answers */
	if (!might_graft(verb, fam, addr, port, 0)) {
		st_mark_decided(fd); /* no rule can apply: no round trip */
		pool_spec_reset(st->family, st->type, st->proto);
		return 0;
	}
	if (verb == PF_CONNECT) {
		ino_t pino;
		int pooled = pool_get(fam, addr, port, st->type, st->proto, &pino);
		if (pooled >= 0)
			return st_install_ino(fd, pooled, pino, st) == 0 ? 2 : -1;
		if (pooled == POOL_LOCAL) {
			st_mark_decided(fd);
			pool_spec_reset(st->family, st->type, st->proto);
			return 0;
		}
		if (pooled == POOL_ERR)
			return -1;
	}
	int n = verb == PF_CONNECT ? wire_connect(head, sizeof(head), fam, addr, port, st->type, st->proto)
				   : wire_sendto(head, sizeof(head), fam, addr, port, st->type, st->proto);
	if (n < 0) {
		errno = EINVAL;
		return -1;
	}
	switch (decide(head, &g_tail_connect, "GRAFT_EGRESS/GRAFT_BBCONN", &newfd)) {
	case D_LOCAL:
		st_mark_decided(fd);
		return 0;
	case D_GRANT:
		return st_install(fd, newfd, st) == 0 ? 1 : -1;
	default:
		return -1;
	}
}

/* -- the wrapped calls ------------------------------------------------------------------------ */
static int speculate(struct gs *st, int type);

EXPORT int socket(int family, int type, int proto)
{
	ENSURE();
	if (!g_enabled || (family != AF_INET && family != AF_INET6 && family != AF_GRAFT))
		return real_socket(family, type, proto);
	struct gs st = { .family = family, .type = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC), .proto = proto };
	if (family != AF_GRAFT) {
		int fd = speculate(&st, type);
		if (fd != -2)
			return fd;
	}
	int fd = real_socket(family == AF_GRAFT ? AF_INET : family, type, proto);
	if (fd < 0)
		return fd;
	st.ino = fd_ino(fd);
	st_put(fd, &st);
	return fd;
}

/* socket() of a process whose last connects of this kind all took pooled host sockets of one
 * egress row: one of those, at the lowest free fd number with the flags asked for (pool.c
 * pool_speculate): the next connect through that row runs on it at once (no socket of the
 * container's to make and swap out). -2: no pooled socket ready (make the container's). */
static int speculate(struct gs *st, int type)
{
	ino_t ino;
	int h = pool_speculate(st->family, st->type, st->proto, &st->spec_row, &st->spec_gen, &ino);
	if (h < 0)
		return -2;
	int fd = real_fcntl(h, (type & SOCK_CLOEXEC) ? F_DUPFD_CLOEXEC : F_DUPFD, 0);
	int e = errno;
	real_close(h);
	if (fd < 0) {
		errno = e; /* EMFILE, as socket() would say */
		return -1;
	}
	if ((type & SOCK_NONBLOCK) && real_fcntl(fd, F_SETFL, O_NONBLOCK) < 0) {
		real_close(fd);
		return -2;
	}
	st->ino = ino;
	st->grafted = 1;
	st->spec = 1;
	st_put(fd, st);
	pool_spec_refill(st->family, st->type, st->proto, st->spec_row, st->spec_gen);
	return fd;
}

/* A speculative socket about to be used otherwise than for a connect (or bind) through its row:
 * swapped for a socket of the container's first. 0, or -1 (errno). */
static int settle(int fd, struct gs *st)
{
	if (!st->spec)
		return 0;
	pool_spec_reset(st->family, st->type, st->proto);
	return st_unspeculate(fd, st);
}

/* connect() on a speculative socket: 1 when it goes through the socket's own row (connect it as it
 * is), 0 when it was swapped for a socket of the container's (decide as for any), -1 (errno). */
static int spec_connect(int fd, struct gs *st, const struct sockaddr *sa, socklen_t len)
{
	char addr[INET6_ADDRSTRLEN];
	int fam, port;
	unsigned gen;
	if (st->spec_row >= 0 && inet_words(sa, len, &fam, addr, &port) == 0 && fam == st->family &&
	    might_graft(PF_CONNECT, fam, addr, port, 0) && egress_row(addr, &gen) == st->spec_row && gen == st->spec_gen) {
		st->decided = 1;
		st_put_same(fd, st); /* (its duplicates too: they are this socket) */
		pool_spec_used(st->family, st->type, st->proto, st->spec_row, st->spec_gen);
		return 1;
	}
	return settle(fd, st) < 0 ? -1 : 0;
}

static int v6only(int fd)
{
	int v = 0;
	socklen_t l = sizeof(v);
	return getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, &l) == 0 && v;
}

/* Host socket h bound to *host, an endpoint's address, with the bind flags as the service sets them
 * on a socket it binds (hostsock.open_bound). 0, or -1 (errno). */
static int bind_host(int h, unsigned flags, const struct sockaddr_storage *host, socklen_t hostlen)
{
	if (host->ss_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&((const struct sockaddr_in6 *)host)->sin6_addr))
		flags &= ~FL_V6ONLY; /* a v4-mapped address: dual-stack */
	if (set_socket_flags(h, host->ss_family, flags) != 0)
		return -1;
	return real_bind(h, (const struct sockaddr *)host, hostlen);
}

static void note_bound(struct gs *st, const struct sockaddr *sa, socklen_t len)
{
	st->bound_len = len < (socklen_t)sizeof(st->bound) ? len : (socklen_t)sizeof(st->bound);
	memcpy(&st->bound, sa, st->bound_len);
}

/* bind() on a speculative socket (socket() gave a pooled unbound host socket of bind row
 * st->spec_row): 0 or -1 (errno) as bind() when the bind is that row's (the socket bound where its
 * pooled sockets are, as pooled_bind binds one: no socket of the container's made and swapped out);
 * 1 otherwise, or where the kernel refused as pooled_bind says (settle it, then decide as for any). */
static int spec_bind(int fd, struct gs *st, const struct sockaddr *sa, socklen_t len)
{
	char addr[INET6_ADDRSTRLEN];
	int fam, port;
	struct sockaddr_storage host;
	socklen_t hostlen;
	if (st->spec_row >= 0 || inet_words(sa, len, &fam, addr, &port) != 0 || fam != st->family)
		return 1;
	unsigned flags = socket_flags(fd, fam);
	if (!might_graft(PF_BIND, fam, addr, port, fam == AF_INET6 && strcmp(addr, "::") == 0 && (flags & FL_V6ONLY)) ||
	    pool_bind_spec(fam, addr, port, st->type, st->proto, flags, st->spec_row, st->spec_gen, &host, &hostlen) != 0)
		return 1;
	if (bind_host(fd, flags, &host, hostlen) != 0)
		return errno == EPERM || errno == EADDRINUSE ? 1 : -1;
	st->spec = 0;
	st->decided = 1;
	note_bound(st, sa, len);
	st_put_same(fd, st); /* (its duplicates too: they are this socket) */
	pool_spec_used(st->family, st->type, st->proto, st->spec_row, st->spec_gen);
	return 0;
}

/* A bind the container's own socket makes (no pair takes it): the streak of pooled operations of
 * this kind ends (pool.c: socket() speculates only for a process whose last ones were all pooled). */
static int local_bind(int fd, const struct gs *st, const struct sockaddr *sa, socklen_t len)
{
	pool_spec_reset(st->family, st->type, st->proto);
	int r = real_bind(fd, sa, len);
	if (r == 0)
		st_mark_decided(fd);
	return r;
}

/* A bind grafted on a pooled unbound host socket (pool_bind): the program's options set on it,
 * bound to the endpoint's address, installed. 0 or -1 (errno) as bind(); 1 to ask the service
 * (no pool; or the kernel refused with EPERM, the table changed since the batch came, or with
 * EADDRINUSE, the port maybe still held by the service's copy of a socket bound and closed a
 * moment ago: the service's answer, given once it has closed its copies, is the one to give). */
static int pooled_bind(int fd, struct gs *st, const struct sockaddr *sa, socklen_t len, int fam, const char *addr,
		       int port, unsigned flags)
{
	struct sockaddr_storage host;
	socklen_t hostlen;
	ino_t pino;
	int row;
	unsigned gen;
	int pooled = pool_bind(fam, addr, port, st->type, st->proto, flags, &host, &hostlen, &pino, &row, &gen);
	if (pooled == POOL_LOCAL)
		return local_bind(fd, st, sa, len);
	if (pooled == POOL_ERR)
		return -1;
	if (pooled < 0)
		return 1;
	copy_options(fd, pooled, st);
	if (bind_host(pooled, flags, &host, hostlen) != 0) {
		int e = errno;
		real_close(pooled);
		if (e == EPERM || e == EADDRINUSE)
			return 1;
		errno = e;
		return -1;
	}
	note_bound(st, sa, len);
	if (st_install_ino(fd, pooled, pino, st) != 0)
		return -1;
	if (row != -1)
		pool_spec_used(st->family, st->type, st->proto, row, gen);
	return 0;
}

EXPORT int bind(int fd, const struct sockaddr *sa, socklen_t len)
{
	ENSURE();
	struct gs st;
	if (!sa || len < (socklen_t)sizeof(sa_family_t) || !st_fresh(fd, &st))
		return real_bind(fd, sa, len);
	if (st.spec) {
		int r = spec_bind(fd, &st, sa, len);
		if (r != 1 || settle(fd, &st) < 0)
			return r == 1 ? -1 : r;
	}
	char head[200], addr[INET6_ADDRSTRLEN];
	int fam, port, newfd, r;
	if (sa->sa_family == AF_GRAFT && st.family == AF_GRAFT) {
		char name[AF_GRAFT_EPNAME_MAX];
		if (gr_name(sa, len, name) != 0)
			return -1;
		if (wire_named(head, sizeof(head), name, 0, st.type, st.proto, socket_flags(fd, AF_INET)) < 0)
			r = D_ERR, errno = EINVAL;
		else
			r = ask(head, &newfd, NULL, 0);
		if (r != D_GRANT) {
			if (r == D_LOCAL)
				errno = EADDRNOTAVAIL; /* the service never answers `local` to a name */
			return -1;
		}
		memcpy(st.epname, name, sizeof(name));
		st.bound_len = 0;
		return st_install(fd, newfd, &st);
	}
	if (inet_words(sa, len, &fam, addr, &port) != 0 || (st.family != AF_GRAFT && st.family != fam))
		return real_bind(fd, sa, len);
	if (!might_graft(PF_BIND, fam, addr, port, fam == AF_INET6 && strcmp(addr, "::") == 0 && v6only(fd)))
		return local_bind(fd, &st, sa, len); /* no pair can match: no round trip */
	/* flags include v6only: a dual-stack [::] bind is matched by IPv4 pairs, a V6ONLY one is not */
	unsigned flags = socket_flags(fd, fam);
	r = pooled_bind(fd, &st, sa, len, fam, addr, port, flags);
	if (r != 1)
		return r;
	pool_spec_reset(st.family, st.type, st.proto); /* asked of the service: not pooled */
	if (wire_bind(head, sizeof(head), fam, addr, port, st.type, st.proto, flags) < 0) {
		errno = EINVAL;
		return -1;
	}
	switch (decide(head, &g_tail_bind, "GRAFT_CONV_PAIRS", &newfd)) {
	case D_LOCAL:
		return local_bind(fd, &st, sa, len);
	case D_GRANT:
		note_bound(&st, sa, len);
		return st_install(fd, newfd, &st);
	default:
		return -1;
	}
}

/* The grafted socket on fd is connected or connecting: the caller's connect() semantics.
 * Non-blocking: -1/EINPROGRESS for a stream socket (its outcome left in SO_ERROR for the caller:
 * refused, unreachable...), 0 for a datagram socket. Blocking: wait within SO_SNDTIMEO (expired:
 * EINPROGRESS, as the kernel says), then SO_ERROR (ECONNREFUSED, ETIMEDOUT...). A signal
 * interrupting the wait: -1/EINTR (SA_RESTART or not); a connect() again is then the kernel's own
 * on the connecting host socket. */
static int connected(int fd)
{
	/* The kernel marks a socket connected (SS_CONNECTED) only in a connect() call: a connect
	 * completed in the background leaves it "connecting", and a later connect() to any address
	 * would then answer 0. One connect() to its own peer settles it (0 or EISCONN), so that a
	 * re-aim fails with EISCONN as after a native blocking connect. */
	struct sockaddr_storage peer;
	socklen_t pl = sizeof(peer);
	if (real_getpeername(fd, (struct sockaddr *)&peer, &pl) != 0)
		return 0;
	int saved = errno;
	real_connect(fd, (struct sockaddr *)&peer, pl);
	errno = saved;
	return 1;
}

static int finish_connect(int fd, int type)
{
	int fl = real_fcntl(fd, F_GETFL);
	if (fl >= 0 && (fl & O_NONBLOCK)) {
		/* a stream connect says EINPROGRESS, as the kernel's does even on loopback (a caller's
		 * "connect again: 0 when done" and SO_ERROR work as natively); a datagram one is done */
		if (type != SOCK_STREAM && connected(fd))
			return 0;
		errno = EINPROGRESS;
		return -1;
	}
	struct pollfd p = { .fd = fd, .events = POLLOUT };
	struct timeval tv = { 0 };
	socklen_t tl = sizeof(tv);
	int ms = -1;
	if (getsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, &tl) == 0 && (tv.tv_sec || tv.tv_usec))
		ms = tv.tv_sec > 2000000 ? 2000000000 : (int)(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000);
	int n = poll(&p, 1, ms);
	if (n == 0) {
		errno = EINPROGRESS;
		return -1;
	}
	if (n < 0)
		return -1;
	int err = 0;
	socklen_t l = sizeof(err);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) == 0 && err) {
		errno = err;
		return -1;
	}
	connected(fd);
	return 0;
}

EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	ENSURE();
	struct gs st;
	if (!sa || len < (socklen_t)sizeof(sa_family_t) || !st_fresh(fd, &st))
		return real_connect(fd, sa, len);
	if (sa->sa_family == AF_GRAFT && st.family == AF_GRAFT) {
		char name[AF_GRAFT_EPNAME_MAX], head[160];
		int newfd;
		if (gr_name(sa, len, name) != 0)
			return -1;
		int r = D_ERR;
		if (wire_dial(head, sizeof(head), name, st.type, st.proto) < 0)
			errno = EINVAL;
		else
			r = ask(head, &newfd, NULL, 0);
		if (r != D_GRANT) {
			if (r == D_LOCAL)
				errno = EADDRNOTAVAIL;
			return -1;
		}
		memcpy(st.epname, name, sizeof(name));
		st.dialed = 1;
		if (st_install(fd, newfd, &st) != 0)
			return -1;
		return finish_connect(fd, st.type);
	}
	if (st.spec) {
		int s = spec_connect(fd, &st, sa, len);
		if (s < 0)
			return -1;
		if (s > 0)
			return real_connect(fd, sa, len);
	}
	int g = egress(fd, &st, sa, len, PF_CONNECT);
	if (g < 0)
		return -1;
	if (g == 2)
		return real_connect(fd, sa, len);
	if (g > 0)
		return finish_connect(fd, st.type);
	int r = real_connect(fd, sa, len);
	if (r == 0 || errno == EINPROGRESS)
		st_mark_decided(fd);
	return r;
}

/* A speculative socket listens in the container (no bind before: a port of the container's). */
EXPORT int listen(int fd, int backlog)
{
	ENSURE();
	struct gs st;
	if (st_fresh(fd, &st) && settle(fd, &st) < 0)
		return -1;
	return real_listen(fd, backlog);
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa, socklen_t len)
{
	ENSURE();
	struct gs st;
	if (sa && len >= (socklen_t)sizeof(sa_family_t) && st_fresh(fd, &st) &&
	    (settle(fd, &st) < 0 || egress(fd, &st, sa, len, PF_SENDTO) < 0))
		return -1;
	return real_sendto(fd, buf, n, flags, sa, len);
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	ENSURE();
	struct gs st;
	if (msg && msg->msg_name && msg->msg_namelen >= sizeof(sa_family_t) && st_fresh(fd, &st) &&
	    (settle(fd, &st) < 0 || egress(fd, &st, msg->msg_name, msg->msg_namelen, PF_SENDTO) < 0))
		return -1;
	return real_sendmsg(fd, msg, flags);
}

EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags)
{
	ENSURE();
	struct gs st;
	if (vec && vlen && vec[0].msg_hdr.msg_name && vec[0].msg_hdr.msg_namelen >= sizeof(sa_family_t) &&
	    st_fresh(fd, &st) &&
	    (settle(fd, &st) < 0 || egress(fd, &st, vec[0].msg_hdr.msg_name, vec[0].msg_hdr.msg_namelen, PF_SENDTO) < 0))
		return -1;
	return real_sendmmsg(fd, vec, vlen, flags);
}

/* Copy a name into the caller's buffer the way the kernel does: truncate, report the full size. */
static int give_name(const void *name, socklen_t n, struct sockaddr *sa, socklen_t *len)
{
	socklen_t k = *len < n ? *len : n;
	memcpy(sa, name, k);
	*len = n;
	return 0;
}

static int graft_name(const char *epname, struct sockaddr *sa, socklen_t *len)
{
	struct sockaddr_gr gr;
	memset(&gr, 0, sizeof(gr));
	gr.sgr_family = AF_GRAFT;
	memcpy(gr.sgr_epname, epname, AF_GRAFT_EPNAME_MAX);
	return give_name(&gr, sizeof(gr), sa, len);
}

/* Only noted: the options a grant copies are those the application set (options.c). */
EXPORT int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	ENSURE();
	struct gs st;
	/* a device is the container's: named on a socket of the container's */
	if (level == SOL_SOCKET && (name == SO_BINDTODEVICE || name == SO_BINDTOIFINDEX) &&
	    __atomic_load_n(&g_have_table, __ATOMIC_ACQUIRE) && st_fresh(fd, &st) && settle(fd, &st) < 0)
		return -1;
	int r = real_setsockopt(fd, level, name, val, len);
	if (r == 0 && __atomic_load_n(&g_have_table, __ATOMIC_ACQUIRE))
		st_note_option(fd, level, name);
	return r;
}

EXPORT int getsockname(int fd, struct sockaddr *sa, socklen_t *len)
{
	ENSURE();
	struct gs st;
	if (g_transparent || !g_enabled || !sa || !len || !st_get(fd, &st) || !st.grafted || fd_ino(fd) != st.ino)
		return real_getsockname(fd, sa, len);
	if (st.spec && !st.decided) { /* not connected yet: the unspecified address, port 0 */
		struct sockaddr_storage any;
		memset(&any, 0, sizeof(any));
		any.ss_family = (sa_family_t)st.family;
		return give_name(&any, st.family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in), sa, len);
	}
	if (st.family == AF_GRAFT && st.epname[0])
		return graft_name(st.epname, sa, len);
	if (!st.bound_len) /* grafted by an egress rule: the application bound nothing */
		return real_getsockname(fd, sa, len);
	/* the application's address; a port 0 it asked for is the port the host allocated */
	struct sockaddr_storage host, app = st.bound;
	socklen_t hl = sizeof(host);
	if (real_getsockname(fd, (struct sockaddr *)&host, &hl) == 0) {
		if (app.ss_family == AF_INET && ((struct sockaddr_in *)&app)->sin_port == 0)
			((struct sockaddr_in *)&app)->sin_port = host.ss_family == AF_INET ? ((struct sockaddr_in *)&host)->sin_port : ((struct sockaddr_in6 *)&host)->sin6_port;
		if (app.ss_family == AF_INET6 && ((struct sockaddr_in6 *)&app)->sin6_port == 0)
			((struct sockaddr_in6 *)&app)->sin6_port = host.ss_family == AF_INET ? ((struct sockaddr_in *)&host)->sin_port : ((struct sockaddr_in6 *)&host)->sin6_port;
	}
	return give_name(&app, st.bound_len, sa, len);
}

EXPORT int getpeername(int fd, struct sockaddr *sa, socklen_t *len)
{
	ENSURE();
	struct gs st;
	if (g_transparent || !g_enabled || !sa || !len || !st_get(fd, &st) || !st.dialed || fd_ino(fd) != st.ino)
		return real_getpeername(fd, sa, len);
	struct sockaddr_storage peer;
	socklen_t pl = sizeof(peer);
	if (real_getpeername(fd, (struct sockaddr *)&peer, &pl) != 0)
		return -1; /* not connected (yet): the kernel's answer */
	return graft_name(st.epname, sa, len);
}

EXPORT int close(int fd)
{
	ENSURE();
	if (g_have_table)
		st_del(fd);
	return real_close(fd);
}

EXPORT int dup(int fd)
{
	ENSURE();
	int r = real_dup(fd);
	if (r >= 0 && g_have_table)
		st_copy(fd, r);
	return r;
}

EXPORT int dup2(int fd, int to)
{
	ENSURE();
	int r = real_dup2(fd, to);
	if (r >= 0 && g_have_table)
		st_copy(fd, r);
	return r;
}

EXPORT int dup3(int fd, int to, int flags)
{
	ENSURE();
	int r = real_dup3(fd, to, flags);
	if (r >= 0 && g_have_table)
		st_copy(fd, r);
	return r;
}

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, va_list ap)
{
	void *arg = va_arg(ap, void *);
	int r = real(fd, cmd, arg);
	if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && g_have_table)
		st_copy(fd, r);
	return r;
}

EXPORT int fcntl(int fd, int cmd, ...)
{
	ENSURE();
	va_list ap;
	va_start(ap, cmd);
	int r = fcntl_common(real_fcntl, fd, cmd, ap);
	va_end(ap);
	return r;
}

EXPORT int fcntl64(int fd, int cmd, ...)
{
	ENSURE();
	va_list ap;
	va_start(ap, cmd);
	int r = fcntl_common(real_fcntl64, fd, cmd, ap);
	va_end(ap);
	return r;
}

EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
	ENSURE();
	if (!(flags & CLOSE_RANGE_CLOEXEC) && first <= last)
		st_forget_range(first, last);
	if (real_close_range)
		return real_close_range(first, last, flags);
	return (int)syscall(SYS_close_range, first, last, flags);
}

EXPORT void closefrom(int lowfd)
{
	ENSURE();
	if (lowfd >= 0)
		st_forget_range((unsigned int)lowfd, ~0u);
	if (real_closefrom)
		real_closefrom(lowfd);
	else
		syscall(SYS_close_range, (unsigned int)(lowfd < 0 ? 0 : lowfd), ~0u, 0);
}

