/* The seccomp supervisor's connect() in C (see seccomp_fast.h and docs/SECCOMP.md "Fast path").
 *
 * gs_serve receives ONE notification. A connect() of an unbound IP socket of the container whose
 * destination the compiled egress table decides ("grant", or "local" for a non-blocking/datagram
 * socket) is served here with the same steps as modes/seccomp/handlers.py graft_connect and
 * perform_connect; everything else is handed back (GS_HANDBACK) with the notification, untouched,
 * for the Python handlers. A blocking connect still in progress is handed over (GS_PARK) to the
 * supervisor's parking. Every path closes what it opened. */
#define _GNU_SOURCE
#include "seccomp_fast.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include "options.h"

#define EXPORT __attribute__((visibility("default")))
#define NR_CONNECT 42
#define MAX_SOCKADDR 128
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif
#define N_OPTIONS (sizeof(graft_copied_options) / sizeof(*graft_copied_options))

EXPORT int gs_abi(void)
{
	return (int)sizeof(struct gs_table) * 1000000 + (int)sizeof(struct gs_out) * 1000 + (int)sizeof(struct gs_row);
}

/* -- the lookup: EgressTable.lookup in C ------------------------------------------------------- */
static int in_prefix(const uint8_t *ip, const uint8_t *net, int plen)
{
	int full = plen / 8, rest = plen % 8;
	if (memcmp(ip, net, (size_t)full) != 0)
		return 0;
	if (rest) {
		uint8_t mask = (uint8_t)(0xFF << (8 - rest));
		if ((ip[full] & mask) != (net[full] & mask))
			return 0;
	}
	return 1;
}

/* The destination of a sockaddr the socket (family `family`) may connect: its version (4 or 6,
 * a v4-mapped IPv6 address counting as IPv4, as the engine's _ip does) and address bytes; 0 when
 * the Python side must judge it (AF_UNSPEC, malformed, a family the socket cannot use). */
static int dest_of(int family, const uint8_t *sa, uint32_t salen, uint8_t ip[16])
{
	static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
	if (salen < 2)
		return 0;
	uint16_t fam;
	memcpy(&fam, sa, 2);
	if (fam == AF_INET && salen >= 16 && (family == AF_INET || family == AF_INET6)) {
		memcpy(ip, sa + 4, 4);
		return 4;
	}
	if (fam == AF_INET6 && salen >= 24 && family == AF_INET6) {
		if (memcmp(sa + 8, mapped, 12) == 0) {
			memcpy(ip, sa + 20, 4);
			return 4;
		}
		memcpy(ip, sa + 8, 16);
		return 6;
	}
	return 0;
}

static int lookup(const struct gs_table *t, int family, int version, const uint8_t *ip, int type, int proto,
		  int *hfam, uint8_t haddr[16], uint16_t *hport, int *row)
{
	if (family != AF_INET && family != AF_INET6)
		return GS_ASK;
	if (type == SOCK_STREAM) {
		if (proto != 0 && proto != IPPROTO_TCP)
			return GS_ASK;
	} else if (type == SOCK_DGRAM) {
		if (proto != 0 && proto != IPPROTO_UDP)
			return GS_ASK;
	} else {
		return GS_ASK;
	}
	for (uint32_t i = 0; i < t->nrows; i++) {
		const struct gs_row *r = &t->rows[i];
		if (r->version != version || !in_prefix(ip, r->net, r->plen))
			continue;
		*row = (int)i;
		if (r->eptype == 0 || (r->eptype == 4) != (version == 4))
			return GS_ASK;
		*hport = r->epport;
		memset(haddr, 0, 16);
		if (family == (r->eptype == 4 ? AF_INET : AF_INET6)) {
			*hfam = family;
			memcpy(haddr, r->epaddr, r->eptype == 4 ? 4 : 16);
			return GS_GRANT;
		}
		if (family == AF_INET6 && r->eptype == 4) {
			*hfam = AF_INET6;
			haddr[10] = haddr[11] = 0xFF;
			memcpy(haddr + 12, r->epaddr, 4);
			return GS_GRANT;
		}
		return GS_ASK;
	}
	return GS_LOCAL;
}

/* The test entry point: the production lookup, for an operation described as EgressTable.lookup's. */
EXPORT int gs_lookup(const struct gs_table *t, int family, const uint8_t *sa, uint32_t salen, int type, int proto,
		     int bound, int foreign, int *host_family, uint8_t host_addr[16], uint16_t *host_port)
{
	uint8_t ip[16];
	int row = -1;
	if (bound || foreign || (family != AF_INET && family != AF_INET6))
		return GS_ASK;
	int version = dest_of(family, sa, salen, ip);
	if (!version)
		return GS_ASK;
	return lookup(t, family, version, ip, type, proto, host_family, host_addr, host_port, &row);
}

/* -- the kernel calls -------------------------------------------------------------------------- */
static int send_resp(int listener, uint64_t id, int err)
{
	struct seccomp_notif_resp r = {.id = id, .val = 0, .error = err ? -err : 0, .flags = 0};
	return ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &r) == 0 ? 0 : errno;
}

/* Let the trapped call run in the kernel as the task made it (on the fd we just replaced). */
static int send_continue(int listener, uint64_t id)
{
	struct seccomp_notif_resp r = {.id = id, .val = 0, .error = 0, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE};
	return ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &r) == 0 ? 0 : errno;
}

static int id_valid(int listener, uint64_t id)
{
	return ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) == 0;
}

static int getfd(uint32_t tid, int fd)
{
	int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)tid, PIDFD_THREAD);
	if (pidfd < 0)
		return -1;
	int dup = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
	close(pidfd);
	return dup;
}

static int sockopt_int(int fd, int level, int name, int *v)
{
	socklen_t l = sizeof(*v);
	return getsockopt(fd, level, name, v, &l);
}

/* Close-on-exec of the target's fd, from /proc/TID/fdinfo/FD (a dup cannot show it). */
static int fd_cloexec(uint32_t tid, int fd)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%u/fdinfo/%d", tid, fd);
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0)
		return 0;
	ssize_t n = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	for (char *p = buf; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		if (strncmp(p, "flags:", 6) == 0) {
			unsigned long fl = strtoul(p + 6, NULL, 8);
			return (fl & O_CLOEXEC) != 0;
		}
	}
	return 0;
}

/* -- the option copy: hostsock.copy_options in C ------------------------------------------------ */
struct fresh { int ready; int ok[N_OPTIONS]; socklen_t len[N_OPTIONS]; char val[N_OPTIONS][32]; };
static struct fresh fresh_values[2][2]; /* [AF_INET6?][SOCK_DGRAM?] */

static int applies(int level, int family, int type)
{
	if (level == IPPROTO_TCP)
		return type == SOCK_STREAM;
	if (level == IPPROTO_IP)
		return family == AF_INET;
	if (level == IPPROTO_IPV6)
		return family == AF_INET6;
	return 1;
}

static const struct fresh *defaults(int family, int type)
{
	struct fresh *d = &fresh_values[family == AF_INET6][type == SOCK_DGRAM];
	if (__atomic_load_n(&d->ready, __ATOMIC_ACQUIRE))
		return d;
	int fd = socket(family, type | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return NULL;
	for (size_t i = 0; i < N_OPTIONS; i++) {
		const struct graft_opt *o = &graft_copied_options[i];
		d->len[i] = (socklen_t)o->size;
		d->ok[i] = applies(o->level, family, type) && getsockopt(fd, o->level, o->name, d->val[i], &d->len[i]) == 0;
	}
	close(fd);
	__atomic_store_n(&d->ready, 1, __ATOMIC_RELEASE);
	return d;
}

/* The options the application set on `from` (differing from a fresh socket's) onto `to`, best
 * effort; buffer sizes read back doubled are set halved. */
static void copy_options(int from, int to, int family, int type, int to_family)
{
	const struct fresh *d = defaults(family, type);
	for (size_t i = 0; i < N_OPTIONS; i++) {
		const struct graft_opt *o = &graft_copied_options[i];
		if (!applies(o->level, family, type))
			continue;
		if ((o->level == IPPROTO_IP || o->level == IPPROTO_IPV6) && family != to_family)
			continue;
		char v[32];
		socklen_t l = (socklen_t)o->size;
		if (getsockopt(from, o->level, o->name, v, &l) != 0)
			continue;
		if (d && d->ok[i] && d->len[i] == l && memcmp(d->val[i], v, l) == 0)
			continue;
		if (o->halved && l >= 4) {
			uint32_t x;
			memcpy(&x, v, 4);
			x /= 2;
			memcpy(v, &x, 4);
		}
		setsockopt(to, o->level, o->name, v, l);
	}
}

/* -- timing of the steps (cost.py) -- */
#include <time.h>
static __thread struct timespec t0;
static void stamp(struct gs_out *out, int step)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	out->ns[step] = (uint32_t)((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec));
}

/* -- serving ----------------------------------------------------------------------------------- */
static int done(struct gs_out *out, int what, int err)
{
	out->what = what;
	out->err = err;
	return GS_DONE;
}

/* A failed grant: answered with the errno, the app keeps its native socket. */
static int failed(int listener, struct gs_out *out, int err)
{
	if (send_resp(listener, out->id, err) == ENOENT)
		return done(out, GS_DONE_GONE, 0);
	return done(out, GS_DONE_FAILED, err);
}

/* A granted connect with a pooled host socket: it takes the application's options and blocking
 * mode, replaces its fd, and the application's own connect() then runs on it (CONTINUE). The
 * destination is read again by the kernel: a thread that changed it meanwhile meets the kernel's
 * egress table (the socket's mark), which the pool requires; the socket cannot be re-bound
 * (bind guard). Returns what gs_serve returns. */
static int handover(int listener, struct gs_out *out, int dup, int h)
{
	int nonblock = (fcntl(dup, F_GETFL) & O_NONBLOCK) != 0;
	out->cloexec = fd_cloexec(out->pid, out->appfd);
	copy_options(dup, h, out->family, out->type, out->family);
	fcntl(h, F_SETFL, nonblock ? (fcntl(h, F_GETFL) | O_NONBLOCK) : (fcntl(h, F_GETFL) & ~O_NONBLOCK));
	stamp(out, GS_T_SOCKET);
	struct seccomp_notif_addfd add = {.id = out->id, .flags = SECCOMP_ADDFD_FLAG_SETFD, .srcfd = (uint32_t)h,
					  .newfd = (uint32_t)out->appfd, .newfd_flags = out->cloexec ? O_CLOEXEC : 0};
	int e = ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0 ? errno : 0;
	close(h);
	if (e)
		return e == ENOENT ? done(out, GS_DONE_GONE, 0) : failed(listener, out, e);
	stamp(out, GS_T_ADDFD);
	out->pooled = 1;
	int sent = send_continue(listener, out->id);
	stamp(out, GS_T_SEND);
	return sent == ENOENT ? done(out, GS_DONE_GONE, 0) : done(out, GS_DONE_GRANT, 0);
}

/* The granted connect of a native socket `dup` (graft_connect): returns what gs_serve returns. */
static int graft(int listener, struct gs_out *out, int dup, int hfam, const uint8_t *haddr, uint16_t hport,
		 uint32_t mark, struct gs_pool *pool)
{
	int type = out->type, appfd = out->appfd;
	if (pool && pool->n > 0 && pool->family == hfam && pool->type == type && hport == 0)
		return handover(listener, out, dup, pool->fds[--pool->n]);
	int nonblock = (fcntl(dup, F_GETFL) & O_NONBLOCK) != 0;
	out->cloexec = fd_cloexec(out->pid, appfd);
	int h = socket(hfam, type | SOCK_NONBLOCK | SOCK_CLOEXEC, out->proto);
	if (h < 0)
		return failed(listener, out, errno ? errno : EADDRNOTAVAIL);
	int one = 1, zero = 0, v = 0, err = 0;
	if (sockopt_int(dup, SOL_SOCKET, SO_REUSEADDR, &v) == 0 && v)
		setsockopt(h, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (sockopt_int(dup, SOL_SOCKET, SO_REUSEPORT, &v) == 0 && v)
		setsockopt(h, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (setsockopt(h, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) != 0)
		err = errno;
	if (!err && hfam == AF_INET6 && setsockopt(h, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) != 0)
		err = errno;
	if (!err) {
		struct sockaddr_storage ss;
		memset(&ss, 0, sizeof(ss));
		socklen_t sl;
		if (hfam == AF_INET) {
			struct sockaddr_in *a = (struct sockaddr_in *)&ss;
			a->sin_family = AF_INET;
			a->sin_port = htons(hport);
			memcpy(&a->sin_addr, haddr, 4);
			sl = sizeof(*a);
		} else {
			struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
			a->sin6_family = AF_INET6;
			a->sin6_port = htons(hport);
			memcpy(&a->sin6_addr, haddr, 16);
			sl = sizeof(*a);
		}
		if (bind(h, (struct sockaddr *)&ss, sl) != 0)
			err = errno;
		/* marked once bound: the bind guard (host/bindguard.py) refuses any later bind */
		else if (mark && setsockopt(h, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0)
			err = errno;
	}
	if (err) {
		close(h);
		return failed(listener, out, err);
	}
	copy_options(dup, h, out->family, type, hfam);
	stamp(out, GS_T_SOCKET);
	err = connect(h, (struct sockaddr *)out->addr, out->addrlen) == 0 ? 0 : errno;
	if (err == EINPROGRESS && !nonblock) {
		/* loopback handshakes are often over by now: a second connect says so (0) and leaves the
		 * socket connected as a blocking connect would (a third: EISCONN) */
		int again = connect(h, (struct sockaddr *)out->addr, out->addrlen) == 0 ? 0 : errno;
		err = again == EALREADY ? EINPROGRESS : again;
	}
	stamp(out, GS_T_CONNECT);
	if (err == EINPROGRESS && !nonblock) {
		struct timeval tv = {0, 0};
		socklen_t l = sizeof(tv);
		getsockopt(dup, SOL_SOCKET, SO_SNDTIMEO, &tv, &l);
		out->sndtimeo_us = (int64_t)tv.tv_sec * 1000000 + tv.tv_usec;
		out->hostfd = h; /* the loop owns it now */
		return GS_PARK;
	}
	if (err != 0 && err != EINPROGRESS) {
		close(h);
		return failed(listener, out, err);
	}
	if (!nonblock)
		fcntl(h, F_SETFL, fcntl(h, F_GETFL) & ~O_NONBLOCK);
	struct seccomp_notif_addfd add = {.id = out->id, .flags = SECCOMP_ADDFD_FLAG_SETFD, .srcfd = (uint32_t)h,
					  .newfd = (uint32_t)appfd, .newfd_flags = out->cloexec ? O_CLOEXEC : 0};
	if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0) {
		int e = errno;
		close(h);
		if (e == ENOENT)
			return done(out, GS_DONE_GONE, 0);
		return failed(listener, out, e);
	}
	close(h);
	stamp(out, GS_T_ADDFD);
	int sent = send_resp(listener, out->id, err);
	stamp(out, GS_T_SEND);
	if (sent == ENOENT)
		return done(out, GS_DONE_GONE, 0);
	return done(out, GS_DONE_GRANT, err);
}

static int serve_connect(int listener, const struct gs_table *t, struct gs_out *out, int dup)
{
	int fam = 0, type = 0, proto = 0;
	uint64_t cookie = 0;
	socklen_t cl = sizeof(cookie);
	if (sockopt_int(dup, SOL_SOCKET, SO_DOMAIN, &fam) != 0 || (fam != AF_INET && fam != AF_INET6))
		return GS_HANDBACK;
	if (sockopt_int(dup, SOL_SOCKET, SO_TYPE, &type) != 0 || sockopt_int(dup, SOL_SOCKET, SO_PROTOCOL, &proto) != 0)
		return GS_HANDBACK;
	if (getsockopt(dup, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &cl) != 0 || cookie == t->host_cookie)
		return GS_HANDBACK; /* a grafted socket: the engine's own rule */
	out->family = fam, out->type = type, out->proto = proto;
	uint64_t len = out->args[2] & 0xFFFFFFFFu;
	if (len < 2 || len > MAX_SOCKADDR || !out->args[1])
		return GS_HANDBACK;
	struct iovec local = {out->addr, len}, remote = {(void *)(uintptr_t)out->args[1], len};
	if (syscall(SYS_process_vm_readv, (pid_t)out->pid, &local, 1UL, &remote, 1UL, 0UL) != (long)len)
		return GS_HANDBACK;
	out->addrlen = (uint32_t)len;
	stamp(out, GS_T_READ);
	if (!id_valid(listener, out->id))
		return done(out, GS_DONE_GONE, 0);
	uint8_t ip[16], haddr[16];
	int version = dest_of(fam, out->addr, out->addrlen, ip);
	if (!version)
		return GS_HANDBACK;
	int hfam = 0, row = -1;
	uint16_t hport = 0;
	int verdict = lookup(t, fam, version, ip, type, proto, &hfam, haddr, &hport, &row);
	if (verdict == GS_ASK)
		return GS_HANDBACK;
	if (verdict == GS_LOCAL) {
		if (type == SOCK_STREAM && !(fcntl(dup, F_GETFL) & O_NONBLOCK))
			return GS_HANDBACK; /* a blocking connect: the Python pool waits for it */
		out->decided = GS_LOCAL;
		int err = connect(dup, (struct sockaddr *)out->addr, out->addrlen) == 0 ? 0 : errno;
		if (send_resp(listener, out->id, err) == ENOENT)
			return done(out, GS_DONE_GONE, 0);
		return done(out, GS_DONE_LOCAL, err);
	}
	/* a grant, if the task is in the container's netns and the socket has no address yet */
	char path[64];
	struct stat st;
	snprintf(path, sizeof(path), "/proc/%u/ns/net", out->pid);
	if (stat(path, &st) != 0 || (t->target_netns_ino && st.st_ino != t->target_netns_ino))
		return GS_HANDBACK;
	struct sockaddr_storage me;
	socklen_t ml = sizeof(me);
	if (getsockname(dup, (struct sockaddr *)&me, &ml) != 0 || ((struct sockaddr_in *)&me)->sin_port != 0)
		return GS_HANDBACK;
	out->decided = GS_GRANT;
	out->row = row;
	stamp(out, GS_T_JUDGE);
	return graft(listener, out, dup, hfam, haddr, hport, t->mark, t->pools ? &t->pools[row] : NULL);
}

/* Receive and serve one notification (see seccomp_fast.h). Returns GS_NOTHING (the target went
 * away before it was received), GS_HANDBACK, GS_DONE, GS_PARK, or -errno of a failed RECV. */
EXPORT int gs_serve(int listener, const struct gs_table *t, struct gs_out *out)
{
	struct seccomp_notif n;
	memset(&n, 0, sizeof(n));
	memset(out, 0, offsetof(struct gs_out, addr));
	if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &n) != 0)
		return errno == ENOENT || errno == EINTR ? GS_NOTHING : -errno;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	memset(out->ns, 0, sizeof(out->ns));
	out->pooled = 0;
	out->id = n.id, out->pid = n.pid, out->flags = n.flags, out->nr = n.data.nr, out->arch = n.data.arch;
	out->ip = n.data.instruction_pointer;
	memcpy(out->args, n.data.args, sizeof(out->args));
	out->decided = -1, out->row = -1, out->hostfd = -1;
	out->appfd = (int)(uint32_t)n.data.args[0];
	if (n.data.nr != NR_CONNECT)
		return GS_HANDBACK;
	int dup = getfd(n.pid, out->appfd);
	stamp(out, GS_T_GETFD);
	if (dup < 0)
		return GS_HANDBACK; /* EBADF, a task gone: the Python handler says which */
	int r = serve_connect(listener, t, out, dup);
	close(dup);
	return r;
}

/* With same-CPU wake-ups the application runs as soon as it is answered and often traps again
 * before the supervisor's Python loop would even look: serve it here at once. */
EXPORT int gs_serve_batch(int listener, const struct gs_table *t, struct gs_out *outs, int max)
{
	int n = 0;
	while (n < max) {
		int r = gs_serve(listener, t, &outs[n]);
		if (r < 0)
			return n ? n : r;
		if (r == GS_NOTHING)
			return n;
		outs[n++].kind = r;
		if (r != GS_DONE)
			break;
		struct pollfd p = {.fd = listener, .events = POLLIN};
		if (poll(&p, 1, 0) != 1 || !(p.revents & POLLIN))
			break;
	}
	return n;
}
