/* The seccomp supervisor's connect() in C (see seccomp_fast.h and docs/SECCOMP.md "Fast path").
 *
 * gs_serve receives ONE notification. A connect() of an unbound IP socket of the container whose
 * destination the compiled egress table decides ("grant", or "local" for a non-blocking/datagram
 * socket) is served here with the same steps as modes/seccomp/handlers.py graft_connect and
 * perform_connect; everything else is handed back (GS_HANDBACK) with the notification, untouched,
 * for the Python handlers. A bind an ingress pair takes is granted here too (grant_bind), and what
 * no pair or rule takes answered without Python (serve_unopened, serve_bind, serve_connect: "What
 * no rule matches" in docs/SECCOMP.md). A blocking connect still in progress is handed over (GS_PARK) to the
 * supervisor's parking. Every path closes what it opened. */
#define _GNU_SOURCE
#include "seccomp_fast.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "options.h"

static __thread struct timespec t0; /* when the RECV returned (the steps' stamps count from it) */

#define EXPORT __attribute__((visibility("default")))
#define NR_CONNECT 42
#define NR_SENDTO 44
#define NR_BIND 49
#define NR_GETSOCKNAME 51
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
#ifndef MSG_FASTOPEN
#define MSG_FASTOPEN 0x20000000
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

/* pidfds of the threads seen last (gs_loop): a pidfd names one task, so a cached one of a thread
 * that exited fails with ESRCH (even if its tid was reused) and is opened again. */
#define GS_PIDS 64
#define GS_PIDS_IDLE_NS 500000000ull /* an entry not used for this long is closed (gs_loop_run) */
struct pidcache {
	uint32_t tid[GS_PIDS];
	int fd[GS_PIDS];
	int fdinfo[GS_PIDS]; /* /proc/TID/fdinfo */
	int ns[GS_PIDS];     /* /proc/TID/ns/net (O_PATH) */
	int info[GS_PIDS];   /* /proc/TID/fdinfo/N, N = infonum: read again, it shows fd N as it is then */
	int infonum[GS_PIDS];
	uint64_t used[GS_PIDS];
	int open;            /* entries with fd >= 0 */
	/* /proc/TID/mem of the threads whose memory was read last (read_addr), apart: a bind is
	 * judged from its sockaddr before any pidfd is opened (serve_unopened) */
	uint32_t memtid[GS_PIDS];
	int mem[GS_PIDS];
	uint64_t memused[GS_PIDS];
	int mems;            /* entries with mem >= 0 */
};

/* Close what entry i keeps open of its thread's /proc directory (not its pidfd). */
static void forget_dirs(struct pidcache *pc, int i)
{
	if (pc->fdinfo[i] >= 0)
		close(pc->fdinfo[i]);
	if (pc->info[i] >= 0)
		close(pc->info[i]);
	if (pc->ns[i] >= 0)
		close(pc->ns[i]);
	pc->fdinfo[i] = pc->info[i] = pc->ns[i] = -1;
}

static int getfd(uint32_t tid, int fd, struct pidcache *pc)
{
	int *slot = pc ? &pc->fd[tid % GS_PIDS] : NULL;
	if (pc)
		pc->used[tid % GS_PIDS] = (uint64_t)t0.tv_sec * 1000000000ull + (uint64_t)t0.tv_nsec;
	if (slot && *slot >= 0 && pc->tid[tid % GS_PIDS] == tid) {
		int dup = (int)syscall(SYS_pidfd_getfd, *slot, fd, 0);
		if (dup >= 0 || errno != ESRCH)
			return dup;
	}
	int pidfd = (int)syscall(SYS_pidfd_open, (pid_t)tid, PIDFD_THREAD);
	if (pidfd < 0)
		return -1;
	int dup = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
	int e = errno;
	if (slot) {
		if (*slot >= 0)
			close(*slot);
		else
			pc->open++;
		*slot = pidfd;
		pc->tid[tid % GS_PIDS] = tid;
		forget_dirs(pc, tid % GS_PIDS);
	} else {
		close(pidfd);
	}
	errno = e;
	return dup;
}

static int sockopt_int(int fd, int level, int name, int *v)
{
	socklen_t l = sizeof(*v);
	return getsockopt(fd, level, name, v, &l);
}

static __thread struct pidcache *out_pc; /* the loop's cache, while serve() runs (NULL: gs_serve) */

/* A file of /proc/TID (`name`, opened with `flags`: the directory "fdinfo", or the link "ns/net" as
 * an O_PATH fd) of a thread the cache holds a pidfd of, kept open in `dirs` (`reopen`: opened
 * again, after a lookup in it found nothing: the files of a task that exited find nothing, even if
 * its tid was reused), or -1. */
static int task_dir(uint32_t tid, struct pidcache *pc, int *dirs, const char *name, int flags, int reopen)
{
	if (!pc || pc->tid[tid % GS_PIDS] != tid || pc->fd[tid % GS_PIDS] < 0)
		return -1;
	int *dir = &dirs[tid % GS_PIDS];
	if (reopen && *dir >= 0) {
		close(*dir);
		*dir = -1;
	}
	if (*dir < 0) {
		char path[64];
		snprintf(path, sizeof(path), "/proc/%u/%s", tid, name);
		*dir = open(path, flags | O_CLOEXEC);
	}
	return *dir;
}

/* The target's fd's flags, from /proc/TID/fdinfo/FD: its file's status flags (O_NONBLOCK, as
 * F_GETFL of our dup would say) and O_CLOEXEC where the fd has close-on-exec (a dup cannot show
 * it); with a cache, the file of the fd number seen last is kept open and read again (one pread:
 * it shows the fd as it is at each read), else opened in the thread's fdinfo directory (task_dir).
 * Its first lines only ("pos:", "flags:"). Where it cannot be read: F_GETFL of `dup`, no
 * close-on-exec. */
static int fd_flags(uint32_t tid, int fd, struct pidcache *pc, int dup)
{
	char path[64], buf[128];
	ssize_t n = -1;
	int i = tid % GS_PIDS;
	int *kept = pc && pc->tid[i] == tid && pc->fd[i] >= 0 ? &pc->info[i] : NULL;
	if (kept && *kept >= 0 && pc->infonum[i] == fd)
		n = pread(*kept, buf, sizeof(buf) - 1, 0);
	if (n <= 0) {
		int f = -1;
		snprintf(path, sizeof(path), "%d", fd);
		for (int again = 0; f < 0 && again < 2; again++) {
			int dir = pc ? task_dir(tid, pc, pc->fdinfo, "fdinfo", O_RDONLY | O_DIRECTORY, again) : -1;
			if (dir < 0)
				break;
			f = openat(dir, path, O_RDONLY | O_CLOEXEC);
			if (f < 0 && errno != ENOENT)
				break;
		}
		if (f < 0) {
			snprintf(path, sizeof(path), "/proc/%u/fdinfo/%d", tid, fd);
			f = open(path, O_RDONLY | O_CLOEXEC);
		}
		if (f >= 0) {
			n = pread(f, buf, sizeof(buf) - 1, 0);
			if (kept) {
				if (*kept >= 0)
					close(*kept);
				*kept = f, pc->infonum[i] = fd;
			} else {
				close(f);
			}
		}
	}
	if (n > 0) {
		buf[n] = 0;
		for (char *p = buf; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
			if (strncmp(p, "flags:", 6) == 0)
				return (int)strtoul(p + 6, NULL, 8);
		}
	}
	return fcntl(dup, F_GETFL) & ~O_CLOEXEC;
}

/* The inode of the thread's netns, read from the link /proc/TID/ns/net ("net:[INODE]": a readlink
 * costs half a stat, which follows the link into nsfs), kept open as an O_PATH fd of the link
 * itself (task_dir: read with an empty path, no lookup; the kernel reads the thread's netns at
 * each readlink). 0 where it cannot be read. */
static uint64_t task_netns(uint32_t tid, struct pidcache *pc)
{
	char buf[64];
	ssize_t n = -1;
	for (int again = 0; n < 0 && again < 2; again++) {
		int link = pc ? task_dir(tid, pc, pc->ns, "ns/net", O_PATH | O_NOFOLLOW, again) : -1;
		if (link < 0)
			break;
		n = readlinkat(link, "", buf, sizeof(buf) - 1);
	}
	if (n < 0) {
		char path[64];
		snprintf(path, sizeof(path), "/proc/%u/ns/net", tid);
		n = readlink(path, buf, sizeof(buf) - 1);
	}
	if (n < 6 || memcmp(buf, "net:[", 5) != 0)
		return 0;
	buf[n] = 0;
	return strtoull(buf + 5, NULL, 10);
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

/* The options set on the app's socket `from` (host/optwatch.py: one map lookup; ENOENT: none),
 * as a mask of graft_copied_options, or ~0: not known. */
static uint64_t options_set(const struct gs_table *t, int from)
{
	if (!t || t->optmap < 0)
		return ~0ull;
	uint64_t mask = 0;
	int key = from;
	union bpf_attr a;
	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)t->optmap;
	a.key = (uint64_t)(uintptr_t)&key;
	a.value = (uint64_t)(uintptr_t)&mask;
	if (syscall(SYS_bpf, BPF_MAP_LOOKUP_ELEM, &a, sizeof(a)) != 0)
		return errno == ENOENT ? 0 : ~0ull;
	return mask;
}

/* The options the application set on `from` onto `to`, best effort; buffer sizes read back
 * doubled are set halved. With the option watch's mask (options_set), those it names; without
 * (~0), every option that differs from a fresh socket's. */
static void copy_options(const struct gs_table *t, int from, int to, int family, int type, int to_family)
{
	uint64_t set = options_set(t, from);
	if (!set)
		return;
	const struct fresh *d = set == ~0ull ? defaults(family, type) : NULL;
	for (size_t i = 0; i < N_OPTIONS; i++) {
		const struct graft_opt *o = &graft_copied_options[i];
		if (!(set & (1ull << i)) || !applies(o->level, family, type))
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

/* The sockaddr of an IPv4 (4 bytes of `addr`) or IPv6 address and port; returns its length. */
static socklen_t ip_sockaddr(int family, const uint8_t *addr, uint16_t port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)ss;
		a->sin_family = AF_INET;
		a->sin_port = htons(port);
		memcpy(&a->sin_addr, addr, 4);
		return sizeof(*a);
	}
	struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
	a->sin6_family = AF_INET6;
	a->sin6_port = htons(port);
	memcpy(&a->sin6_addr, addr, 16);
	return sizeof(*a);
}

/* A failed grant: answered with the errno, the app keeps its native socket. */
static int failed(int listener, struct gs_out *out, int err)
{
	if (send_resp(listener, out->id, err) == ENOENT)
		return done(out, GS_DONE_GONE, 0);
	return done(out, GS_DONE_FAILED, err);
}

/* Install host socket `h` over the application's fd (ADDFD with its close-on-exec; `h` closed here)
 * and answer: CONTINUE (`cont`: the application's own call runs on it) or `err` (0: success).
 * Returns what gs_serve returns: a granted record, or gone / failed. */
static int install(int listener, struct gs_out *out, int h, int cont, int err)
{
	struct seccomp_notif_addfd add = {.id = out->id, .flags = SECCOMP_ADDFD_FLAG_SETFD, .srcfd = (uint32_t)h,
					  .newfd = (uint32_t)out->appfd, .newfd_flags = out->cloexec ? O_CLOEXEC : 0};
	int e = ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add) < 0 ? errno : 0;
	close(h);
	if (e)
		return e == ENOENT ? done(out, GS_DONE_GONE, 0) : failed(listener, out, e);
	stamp(out, GS_T_ADDFD);
	int sent = cont ? send_continue(listener, out->id) : send_resp(listener, out->id, err);
	stamp(out, GS_T_SEND);
	return sent == ENOENT ? done(out, GS_DONE_GONE, 0) : done(out, GS_DONE_GRANT, err);
}

/* A granted connect with a pooled host socket: it takes the application's options and blocking
 * mode, replaces its fd, and the application's own connect() then runs on it (CONTINUE). The
 * destination is read again by the kernel: a thread that changed it meanwhile meets the kernel's
 * egress table (the socket's mark), which the pool requires; the socket cannot be re-bound
 * (bind guard). Returns what gs_serve returns. */
static int handover(int listener, const struct gs_table *t, struct gs_out *out, int dup, int h)
{
	int flags = fd_flags(out->pid, out->appfd, out_pc, dup);
	out->cloexec = (flags & O_CLOEXEC) != 0;
	copy_options(t, dup, h, out->family, out->type, out->family);
	if (flags & O_NONBLOCK) /* (pooled sockets are made blocking: gs_pool_fill, hostsock.pooled) */
		fcntl(h, F_SETFL, O_NONBLOCK);
	stamp(out, GS_T_SOCKET);
	out->pooled = 1; /* (read for a granted record only) */
	return install(listener, out, h, 1, 0);
}

/* The granted connect of a native socket `dup` (graft_connect): returns what gs_serve returns. */
static int graft(int listener, const struct gs_table *t, struct gs_out *out, int dup, int hfam, const uint8_t *haddr,
		 uint16_t hport, struct gs_pool *pool)
{
	int type = out->type, appfd = out->appfd;
	if (pool && pool->n > 0 && pool->family == hfam && pool->type == type && hport == 0)
		return handover(listener, t, out, dup, pool->fds[--pool->n]);
	int flags = fd_flags(out->pid, appfd, out_pc, dup), nonblock = (flags & O_NONBLOCK) != 0;
	out->cloexec = (flags & O_CLOEXEC) != 0;
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
		socklen_t sl = ip_sockaddr(hfam, haddr, hport, &ss);
		if (bind(h, (struct sockaddr *)&ss, sl) != 0)
			err = errno;
		/* marked once bound: the bind guard (host/bindguard.py) refuses any later bind */
		else if (t->mark && setsockopt(h, SOL_SOCKET, SO_MARK, &t->mark, sizeof(t->mark)) != 0)
			err = errno;
	}
	if (err) {
		close(h);
		return failed(listener, out, err);
	}
	copy_options(t, dup, h, out->family, type, hfam);
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
	return install(listener, out, h, 0, err);
}

/* `len` bytes of thread `tid`'s memory at `addr`: with the loop's cache, one pread of its kept
 * /proc/TID/mem (opened again once where it fails: a thread that exited or exec'd, its tid reused;
 * a file opened before an exec reads nothing of the new program), else process_vm_readv. Not
 * covered: a vfork child trapped while it shares its parent's memory, which then execs and traps
 * again, is read in its parent's memory while the parent lives (a wrong answer, not a wider grant:
 * a pooled connect's CONTINUE has the kernel read the address itself, the egress table judges it,
 * and a bind grant is the container's own endpoint). */
static int read_mem(uint32_t tid, uint64_t addr, void *buf, size_t len)
{
	struct pidcache *pc = out_pc;
	if (pc && addr < (1ull << 62)) {
		int i = tid % GS_PIDS;
		pc->memused[i] = (uint64_t)t0.tv_sec * 1000000000ull + (uint64_t)t0.tv_nsec;
		for (int again = 0; again < 2; again++) {
			if (again || pc->mem[i] < 0 || pc->memtid[i] != tid) {
				if (pc->mem[i] >= 0)
					close(pc->mem[i]), pc->mems--;
				char path[64];
				snprintf(path, sizeof(path), "/proc/%u/mem", tid);
				pc->mem[i] = open(path, O_RDONLY | O_CLOEXEC);
				pc->memtid[i] = tid;
				if (pc->mem[i] < 0)
					break;
				pc->mems++;
			}
			if (pread(pc->mem[i], buf, len, (off_t)addr) == (ssize_t)len)
				return 0;
		}
	}
	struct iovec local = {buf, len}, remote = {(void *)(uintptr_t)addr, len};
	return syscall(SYS_process_vm_readv, (pid_t)tid, &local, 1UL, &remote, 1UL, 0UL) == (long)len ? 0 : -1;
}

/* The sockaddr of a bind or connect (args[1], args[2]) copied once into out->addr (out->addrlen:
 * its length, 0 until read). 0, or GS_HANDBACK. */
static int read_addr(struct gs_out *out)
{
	if (out->addrlen)
		return 0;
	uint64_t len = out->args[2] & 0xFFFFFFFFu;
	if (len < 2 || len > MAX_SOCKADDR || !out->args[1])
		return GS_HANDBACK;
	if (read_mem(out->pid, out->args[1], out->addr, len) != 0)
		return GS_HANDBACK;
	out->addrlen = (uint32_t)len;
	stamp(out, GS_T_READ);
	return 0;
}

/* The socket (an IP one of the container's netns: a host socket, grafted already, is the
 * engine's own rule) and the sockaddr of a bind or connect (read_addr). `cookie`: its
 * SO_NETNS_COOKIE if read already (0: not). 0, or GS_HANDBACK. */
static int read_call(const struct gs_table *t, struct gs_out *out, int dup, uint64_t cookie)
{
	int fam = 0, type = 0, proto = 0;
	socklen_t cl = sizeof(cookie);
	if (sockopt_int(dup, SOL_SOCKET, SO_DOMAIN, &fam) != 0 || (fam != AF_INET && fam != AF_INET6))
		return GS_HANDBACK;
	if (sockopt_int(dup, SOL_SOCKET, SO_TYPE, &type) != 0 || sockopt_int(dup, SOL_SOCKET, SO_PROTOCOL, &proto) != 0)
		return GS_HANDBACK;
	if ((!cookie && getsockopt(dup, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &cl) != 0) || cookie == t->host_cookie)
		return GS_HANDBACK;
	out->family = fam, out->type = type, out->proto = proto;
	return read_addr(out);
}

static int serve_connect(int listener, const struct gs_table *t, struct gs_out *out, int dup)
{
	uint64_t cookie = 0;
	if (t->pools) {
		/* Where the kernel guards the container's host sockets: a socket of the container's netns
		 * (one getsockopt: no family, type or protocol read) connecting where no rule leads, for
		 * any socket (gs_connect_local), runs its own connect (CONTINUE; see the local branch
		 * below for what a changed fd or address meets). */
		socklen_t cl = sizeof(cookie);
		if (getsockopt(dup, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &cl) != 0)
			cookie = 0;
		else if (cookie != t->host_cookie &&
		    read_addr(out) == 0 && gs_connect_local(t, out->addr, out->addrlen)) {
			uint16_t safam;
			memcpy(&safam, out->addr, 2); /* AF_INET or AF_INET6: gs_connect_local said so */
			out->family = safam, out->type = 0, out->proto = 0; /* the record: type unknown */
			out->decided = GS_LOCAL;
			out->pooled = 1;
			stamp(out, GS_T_JUDGE);
			if (send_continue(listener, out->id) == ENOENT)
				return done(out, GS_DONE_GONE, 0);
			return done(out, GS_DONE_LOCAL, 0);
		}
	}
	if (read_call(t, out, dup, cookie))
		return GS_HANDBACK;
	int fam = out->family, type = out->type, proto = out->proto;
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
		if (t->pools) {
			/* The kernel guards this container's host sockets (Python fills pools only then:
			 * egress.pools_off): the application's own connect runs (CONTINUE), blocking or not.
			 * Whatever the fd and the address are by the time the kernel reads them, a socket
			 * of the container's netns stays there, and a host socket it holds is connected
			 * already (EISCONN), cannot be re-bound (bind guard), or starts flows only where the
			 * kernel's egress table lets its mark go. */
			out->decided = GS_LOCAL;
			out->pooled = 1;
			if (send_continue(listener, out->id) == ENOENT)
				return done(out, GS_DONE_GONE, 0);
			return done(out, GS_DONE_LOCAL, 0);
		}
		if (type == SOCK_STREAM && !(fcntl(dup, F_GETFL) & O_NONBLOCK))
			return GS_HANDBACK; /* a blocking connect: the Python pool waits for it */
		out->decided = GS_LOCAL;
		int err = connect(dup, (struct sockaddr *)out->addr, out->addrlen) == 0 ? 0 : errno;
		if (send_resp(listener, out->id, err) == ENOENT)
			return done(out, GS_DONE_GONE, 0);
		return done(out, GS_DONE_LOCAL, err);
	}
	/* a grant, if the task is in the container's netns and the socket has no address yet */
	uint64_t netns = task_netns(out->pid, out_pc);
	if (!netns || (t->target_netns_ino && netns != t->target_netns_ino))
		return GS_HANDBACK;
	struct sockaddr_storage me;
	socklen_t ml = sizeof(me);
	if (getsockname(dup, (struct sockaddr *)&me, &ml) != 0 || ((struct sockaddr_in *)&me)->sin_port != 0)
		return GS_HANDBACK;
	out->decided = GS_GRANT;
	out->row = row;
	stamp(out, GS_T_JUDGE);
	return graft(listener, t, out, dup, hfam, haddr, hport, t->pools ? &t->pools[row] : NULL);
}

/* A sendto with a destination on a TCP socket, without MSG_FASTOPEN (a register: the application
 * cannot change it after the trap): the kernel ignores the address of a stream socket's send
 * (handlers.on_sendto performs it unjudged), so the call runs as made (CONTINUE). Anything else:
 * handed back. */
static int serve_sendto(int listener, struct gs_out *out, int dup)
{
	int fam = 0, type = 0, proto = 0;
	if (out->args[3] & MSG_FASTOPEN)
		return GS_HANDBACK;
	if (sockopt_int(dup, SOL_SOCKET, SO_DOMAIN, &fam) != 0 || (fam != AF_INET && fam != AF_INET6))
		return GS_HANDBACK;
	if (sockopt_int(dup, SOL_SOCKET, SO_TYPE, &type) != 0 || type != SOCK_STREAM ||
	    sockopt_int(dup, SOL_SOCKET, SO_PROTOCOL, &proto) != 0 || proto != IPPROTO_TCP)
		return GS_HANDBACK;
	out->family = fam, out->type = type, out->proto = proto;
	if (send_continue(listener, out->id) == ENOENT)
		return done(out, GS_DONE_GONE, 0);
	return done(out, GS_DONE_CONTINUE, 0);
}

/* The first ingress row of `t` a bind of `ip` (version 4 or 6) port `port` matches, as
 * IngressTable.lookup matches them (`dual`: a dual-stack [::] bind, matched by IPv4 rows too); -1:
 * none. */
static int in_match(const struct gs_table *t, int version, const uint8_t *ip, uint16_t port, int dual)
{
	for (uint32_t i = 0; i < t->ningress; i++) {
		const struct fs_in_row *r = &t->ingress[i];
		if (port < r->port_lo || port > r->port_hi)
			continue;
		if ((r->version == version && (r->wildcard || memcmp(r->addr, ip, version == 4 ? 4 : 16) == 0)) ||
		    (dual && r->version == 4))
			return (int)i;
	}
	return -1;
}

/* Whether no ingress pair of `t` can take a bind of this sockaddr on a socket of `family` (1), or
 * the engine must judge it (0). Pure; tests/modes/seccomp/test_fast.py holds it against
 * Policy.decide: 1 only where the engine answers "local". */
EXPORT int gs_bind_local(const struct gs_table *t, int family, const uint8_t *sa, uint32_t salen)
{
	static const uint8_t zero[16];
	uint16_t safam;
	uint8_t ip[16];
	if (salen < 2)
		return 0;
	memcpy(&safam, sa, 2);
	int version = safam == family ? dest_of(family, sa, salen, ip) : 0;
	if (!version)
		return 0;
	uint16_t port = (uint16_t)(sa[2] << 8 | sa[3]);
	int dual = family == AF_INET6 && version == 6 && memcmp(ip, zero, 16) == 0;
	return in_match(t, version, ip, port, dual) < 0;
}

/* Whether no egress rule of `t` can take a connect to this sockaddr, whatever socket of the
 * container's netns makes it (1), or the engine must judge it (0): an AF_INET or AF_INET6 sockaddr
 * whose destination no row's prefix holds (a v4-mapped IPv6 address counting as IPv4, as the
 * engine's _ip does). The engine answers "local" there for any family that can use the sockaddr,
 * any socket type, protocol, bound or not, in any netns; a grafted (host) socket it refuses (EPERM):
 * serve_connect asks this only for a socket of the container's netns. Pure; test_fast.py holds it
 * against Policy.decide. */
EXPORT int gs_connect_local(const struct gs_table *t, const uint8_t *sa, uint32_t salen)
{
	uint8_t ip[16];
	int version = dest_of(AF_INET6, sa, salen, ip); /* AF_INET6: the family that takes both sockaddrs */
	if (!version)
		return 0;
	for (uint32_t i = 0; i < t->nrows; i++)
		if (t->rows[i].version == version && in_prefix(ip, t->rows[i].net, t->rows[i].plen))
			return 0;
	return 1;
}

/* A bind that no ingress pair can take, decided from the sockaddr alone, without touching the
 * socket (no pidfd_getfd, getsockopt, close: issue 11, "what no rule matches costs next to
 * nothing"). Only where the kernel guards this container's host sockets (t->pools: Python fills
 * pools only while egress.pools_off says so). The sockaddr's family is the socket's for IP: the
 * kernel refuses any other pairing (inet_bind: EAFNOSUPPORT; inet6_bind: EINVAL or EAFNOSUPPORT),
 * and a non-IP socket refuses an IP sockaddr (the Python handler lets those run anyway). `::`
 * counts as dual-stack (V6ONLY unknown), any type and protocol as possible: the answer is CONTINUE
 * only where no pair could match any socket (gs_bind_local; the engine answers "local" for every
 * one: test_fast.py); -1 otherwise (the socket is looked at: the slow path). What it lets run:
 * - the application changing the sockaddr (or the fd) after our read gets its own call as made:
 *   on a socket of its own netns, a native bind there, which is what "local" means (an address
 *   bound in the container's netns is not the host's); on a host socket, the kernel's guards;
 * - a host socket the application holds (grafted): the Python handler answers EINVAL without
 *   asking the engine; here the kernel does: a socket with a port refuses (EINVAL), one without
 *   (a failed connect's) is marked and the bind guard (host/bindguard.py) refuses it (EPERM).
 * A connect is not decided this way: the engine refuses a grafted socket any destination no rule
 * names (EPERM, audited), and only the socket says whether it is one (serve_connect).
 * A notification no longer valid (the task gone, the tid reused while we read) makes the CONTINUE
 * fail with ENOENT: nothing runs. The record says the sockaddr's family and type/protocol 0
 * (unknown): the audit's "local" holds for every one. */
static int serve_unopened(int listener, const struct gs_table *t, struct gs_out *out)
{
	if (read_addr(out))
		return -1;
	uint16_t safam;
	memcpy(&safam, out->addr, 2);
	if (safam != AF_INET && safam != AF_INET6)
		return -1;
	if (!gs_bind_local(t, safam, out->addr, out->addrlen))
		return -1;
	out->family = safam, out->type = 0, out->proto = 0;
	out->decided = GS_LOCAL;
	out->pooled = 1;
	stamp(out, GS_T_JUDGE);
	if (send_continue(listener, out->id) == ENOENT)
		return done(out, GS_DONE_GONE, 0);
	return done(out, GS_DONE_LOCAL, 0);
}

/* IngressTable.lookup for a bind of a fresh IP socket: GS_LOCAL (no pair matches), GS_GRANT (*row,
 * the host family, address and port the engine grants), or GS_ASK (the engine must say: another
 * socket kind, a row C cannot serve, a family the endpoint cannot take, a sockaddr the kernel
 * rejects, a task outside the container's netns). */
static int lookup_bind(const struct gs_table *t, int family, const uint8_t *sa, uint32_t salen, int type, int proto,
		       int v6only, int *row, int *hfam, uint8_t haddr[16], uint16_t *hport, int *dual)
{
	static const uint8_t zero[16];
	uint8_t ip[16];
	uint16_t safam;
	if (family != AF_INET && family != AF_INET6)
		return GS_ASK;
	if (!((type == SOCK_STREAM && (proto == 0 || proto == IPPROTO_TCP)) ||
	      (type == SOCK_DGRAM && (proto == 0 || proto == IPPROTO_UDP))))
		return GS_ASK;
	if (salen < 2)
		return GS_ASK;
	memcpy(&safam, sa, 2);
	int version = safam == family ? dest_of(family, sa, salen, ip) : 0;
	if (!version)
		return GS_ASK;
	uint16_t port = (uint16_t)(sa[2] << 8 | sa[3]);
	*dual = family == AF_INET6 && !v6only && version == 6 && memcmp(ip, zero, 16) == 0;
	int i = in_match(t, version, ip, port, *dual);
	if (i < 0)
		return GS_LOCAL;
	const struct fs_in_row *r = &t->ingress[i];
	*row = i;
	*dual = *dual && r->version == 4;
	*hport = r->ep_port;
	memset(haddr, 0, 16);
	if (r->kind == 4 && family == AF_INET) {
		*hfam = AF_INET;
		memcpy(haddr, r->ep_addr, 4);
	} else if (r->kind == 6 && family == AF_INET6) {
		*hfam = AF_INET6;
		memcpy(haddr, r->ep_addr, 16);
	} else if (r->kind == 4 && family == AF_INET6) {
		*hfam = AF_INET6;
		haddr[10] = haddr[11] = 0xFF;
		memcpy(haddr + 12, r->ep_addr, 4);
	} else {
		return GS_ASK;
	}
	return GS_GRANT;
}

EXPORT int gs_lookup_bind(const struct gs_table *t, int family, const uint8_t *sa, uint32_t salen, int type, int proto,
			  int v6only, int foreign, int *row, int *host_family, uint8_t host_addr[16], uint16_t *host_port)
{
	int dual = 0;
	if (foreign) /* (serve_bind asks only for a grant: the engine's "local" holds in any netns) */
		return GS_ASK;
	return lookup_bind(t, family, sa, salen, type, proto, v6only, row, host_family, host_addr, host_port, &dual);
}

/* The granted bind (handlers.on_bind, hostsock.open_bound): a host socket of the endpoint's
 * family, the app's SO_REUSEADDR/SO_REUSEPORT and V6ONLY (off for a v4-mapped address), bound to
 * the endpoint (a port always allocated: it can never be bound again), marked, the app's options
 * and O_NONBLOCK copied; a TCP one listens at once (it can never be connect()ed anywhere, not
 * even swapped in under a call answered CONTINUE); installed over the app's fd with its
 * close-on-exec; answered 0. Its inode and address go back in the record for the view. */
static int grant_bind(int listener, const struct gs_table *t, struct gs_out *out, int dup, int hfam,
		      const uint8_t *haddr, uint16_t hport)
{
	int flags = fd_flags(out->pid, out->appfd, out_pc, dup), nonblock = (flags & O_NONBLOCK) != 0;
	out->cloexec = (flags & O_CLOEXEC) != 0;
	int h = socket(hfam, out->type | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), out->proto);
	if (h < 0)
		return failed(listener, out, errno ? errno : EADDRNOTAVAIL);
	int one = 1, v = 0, err = 0;
	if (sockopt_int(dup, SOL_SOCKET, SO_REUSEADDR, &v) == 0 && v)
		setsockopt(h, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (sockopt_int(dup, SOL_SOCKET, SO_REUSEPORT, &v) == 0 && v)
		setsockopt(h, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (hfam == AF_INET6) {
		static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};
		int v6only = out->v6only && memcmp(haddr, mapped, 12) != 0;
		if (setsockopt(h, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only)) != 0)
			err = errno;
	}
	struct sockaddr_storage ss;
	socklen_t sl = ip_sockaddr(hfam, haddr, hport, &ss);
	if (!err && bind(h, (struct sockaddr *)&ss, sl) != 0)
		err = errno;
	if (!err && t->mark && setsockopt(h, SOL_SOCKET, SO_MARK, &t->mark, sizeof(t->mark)) != 0)
		err = errno;
	if (!err) {
		copy_options(t, dup, h, out->family, out->type, hfam);
		if (out->type == SOCK_STREAM && listen(h, SOMAXCONN) != 0)
			err = errno;
	}
	struct stat st;
	socklen_t hl = sizeof(out->host);
	if (!err && (getsockname(h, (struct sockaddr *)out->host, &hl) != 0 || fstat(h, &st) != 0))
		err = errno;
	if (err) {
		close(h);
		return failed(listener, out, err);
	}
	out->hostlen = hl;
	out->host_ino = (uint64_t)st.st_ino;
	stamp(out, GS_T_SOCKET);
	return install(listener, out, h, 0, 0);
}

/* A bind of an IP socket of the container (not a host socket: read_call), TCP or UDP, judged with
 * its V6ONLY as the engine's Op("bind") is (lookup_bind). Local: where the kernel guards the
 * container's host sockets (t->pools: egress.pools_off), answered CONTINUE: the application's own
 * bind runs with its own credentials, and whatever the fd is by then, a host socket it holds is
 * bound already (EINVAL) or refused by the bind guard; else performed on our duplicate with the
 * copied address, as the Python handler does. Grant (the task in the container's netns, the
 * socket not bound yet): grant_bind, on the copied address. Anything else: handed back. */
static int serve_bind(int listener, const struct gs_table *t, struct gs_out *out, int dup)
{
	if (read_call(t, out, dup, 0))
		return GS_HANDBACK;
	int fam = out->family, v6only = 0, row = -1, hfam = 0, dual = 0;
	uint8_t haddr[16];
	uint16_t hport = 0;
	if (fam == AF_INET6 && sockopt_int(dup, IPPROTO_IPV6, IPV6_V6ONLY, &v6only) != 0)
		return GS_HANDBACK;
	int verdict = lookup_bind(t, fam, out->addr, out->addrlen, out->type, out->proto, v6only, &row, &hfam, haddr,
				  &hport, &dual);
	if (verdict == GS_ASK)
		return GS_HANDBACK;
	out->v6only = v6only;
	if (verdict == GS_GRANT) {
		uint64_t netns = task_netns(out->pid, out_pc);
		if (!netns || (t->target_netns_ino && netns != t->target_netns_ino))
			return GS_HANDBACK;
		struct sockaddr_storage me;
		socklen_t ml = sizeof(me);
		if (getsockname(dup, (struct sockaddr *)&me, &ml) != 0 || ((struct sockaddr_in *)&me)->sin_port != 0)
			return GS_HANDBACK; /* bound already: the kernel's EINVAL, from the Python handler */
		if (!id_valid(listener, out->id)) /* the address read was this task's */
			return done(out, GS_DONE_GONE, 0);
		out->decided = GS_GRANT, out->row = row, out->dual = dual;
		stamp(out, GS_T_JUDGE);
		return grant_bind(listener, t, out, dup, hfam, haddr, hport);
	}
	out->decided = GS_LOCAL;
	stamp(out, GS_T_JUDGE);
	if (t->pools) { /* (a notification no longer valid: the CONTINUE fails, nothing runs) */
		out->pooled = 1;
		if (send_continue(listener, out->id) == ENOENT)
			return done(out, GS_DONE_GONE, 0);
		return done(out, GS_DONE_LOCAL, 0);
	}
	if (!id_valid(listener, out->id)) /* the address read was this task's */
		return done(out, GS_DONE_GONE, 0);
	int err = bind(dup, (struct sockaddr *)out->addr, out->addrlen) == 0 ? 0 : errno;
	if (send_resp(listener, out->id, err) == ENOENT)
		return done(out, GS_DONE_GONE, 0);
	return done(out, GS_DONE_LOCAL, err);
}

/* getsockname of a socket of the container's own netns: the kernel's answer is the right one
 * (CONTINUE; a Python server calls it for every accepted connection). A host socket's answer is
 * translated by the Python handler: handed back. (A thread swapping a host socket onto the fd
 * meanwhile would read that socket's host address: the endpoint's, which its table names.) */
static int serve_getsockname(int listener, const struct gs_table *t, struct gs_out *out, int dup)
{
	uint64_t cookie = 0;
	socklen_t cl = sizeof(cookie);
	if (getsockopt(dup, SOL_SOCKET, SO_NETNS_COOKIE, &cookie, &cl) != 0 || cookie == t->host_cookie)
		return GS_HANDBACK;
	if (send_continue(listener, out->id) == ENOENT)
		return done(out, GS_DONE_GONE, 0);
	return done(out, GS_DONE_CONTINUE, 0);
}

/* Receive and serve one notification; `t` NULL: every connect is handed back (stale). */
static int serve(int listener, const struct gs_table *t, struct gs_out *out, struct pidcache *pc)
{
	struct seccomp_notif n;
	memset(&n, 0, sizeof(n));
	memset(out, 0, offsetof(struct gs_out, addr));
	if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &n) != 0)
		return errno == ENOENT || errno == EINTR ? GS_NOTHING : -errno;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	memset(out->ns, 0, sizeof(out->ns));
	out->pooled = 0, out->stale = 0, out->v6only = 0, out->dual = 0, out->host_ino = 0, out->hostlen = 0;
	out->id = n.id, out->pid = n.pid, out->flags = n.flags, out->nr = n.data.nr, out->arch = n.data.arch;
	out->ip = n.data.instruction_pointer;
	memcpy(out->args, n.data.args, sizeof(out->args));
	out->decided = -1, out->row = -1, out->hostfd = -1;
	out->appfd = (int)(uint32_t)n.data.args[0];
	if (n.data.nr != NR_CONNECT && n.data.nr != NR_SENDTO && n.data.nr != NR_BIND && n.data.nr != NR_GETSOCKNAME)
		return GS_HANDBACK;
	if (n.data.nr != NR_SENDTO && !t) {
		out->stale = 1;
		return GS_HANDBACK;
	}
	out_pc = pc;
	if (t && t->pools && n.data.nr == NR_BIND) {
		int r = serve_unopened(listener, t, out);
		if (r >= 0)
			return r;
	}
	int dup = getfd(n.pid, out->appfd, pc);
	stamp(out, GS_T_GETFD);
	if (dup < 0)
		return GS_HANDBACK; /* EBADF, a task gone: the Python handler says which */
	int r = n.data.nr == NR_SENDTO ? serve_sendto(listener, out, dup)
		: n.data.nr == NR_BIND ? serve_bind(listener, t, out, dup)
		: n.data.nr == NR_GETSOCKNAME ? serve_getsockname(listener, t, out, dup)
		: serve_connect(listener, t, out, dup);
	close(dup);
	return r;
}

/* Receive and serve one notification (see seccomp_fast.h). Returns GS_NOTHING (the target went
 * away before it was received), GS_HANDBACK, GS_DONE, GS_PARK, or -errno of a failed RECV. */
EXPORT int gs_serve(int listener, const struct gs_table *t, struct gs_out *out)
{
	return serve(listener, t, out, NULL);
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


/* -- gs_loop (seccomp_fast.h) ------------------------------------------------------------------- */
struct gs_slot {
	int fd;            /* the listener (-1: free) */
	uint32_t gen;      /* bumped at every add: an event of an earlier listener in this slot is ignored */
	int hup;           /* no longer polled: hung up */
	struct gs_table *table;
	struct gs_quiet q; /* what was answered and not recorded (gs_loop_quiet) */
	uint64_t said[2];  /* when the last local answered CONTINUE was recorded (ns): bind, connect */
	uint64_t gsaid[GS_QROWS]; /* when the last pooled grant of each row was recorded (ns; 0: none on this table) */
};

struct gs_loop {
	int ctlfd, evfd, shmfd;
	const volatile uint8_t *shm; /* the WAL index's first page, mapped (NULL: read with pread) */
	volatile int stop;
	int dirty;           /* the slots changed: the poll set is made again */
	pthread_mutex_t mu;  /* the slots, their tables and pools, the pidfd cache, one notification served */
	pthread_mutex_t rmu; /* the ring */
	pthread_cond_t room;
	uint32_t head, tail; /* records [tail, head) are ready */
	uint64_t last_signal;
	uint64_t aged;       /* the pidfd cache was last aged (age_pids) */
	uint64_t counts[4];  /* CONTINUE without a record (sendto on TCP, getsockname of a container socket), notifications, stale hand-backs, records dropped at stop */
	struct pidcache pids;
	struct gs_slot slots[GS_SLOTS];
	struct gs_out ring[GS_RING];
};

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* The first copy of SQLite's WAL index header (48 bytes at the start of the -shm file), hashed:
 * every commit changes it (iChange, mxFrame, salts). ~0 when it cannot be read: no table matches. */
EXPORT uint64_t gs_version(struct gs_loop *l)
{
	uint8_t h[48];
	if (l && l->shm) {
		for (size_t i = 0; i < sizeof(h); i++)
			h[i] = l->shm[i];
	} else if (!l || l->shmfd < 0 || pread(l->shmfd, h, sizeof(h), 0) != (ssize_t)sizeof(h)) {
		return ~0ull;
	}
	uint64_t x = 1469598103934665603ull;
	for (size_t i = 0; i < sizeof(h); i++)
		x = (x ^ h[i]) * 1099511628211ull;
	return x == ~0ull ? x - 1 : x;
}

EXPORT struct gs_loop *gs_loop_new(const char *shm_path)
{
	struct gs_loop *l = calloc(1, sizeof(*l));
	if (!l)
		return NULL;
	/* O_NOATIME: gs_version reads it at every notification (the owner may; others open it plainly) */
	l->shmfd = open(shm_path, O_RDONLY | O_CLOEXEC | O_NOATIME);
	if (l->shmfd < 0 && errno == EPERM)
		l->shmfd = open(shm_path, O_RDONLY | O_CLOEXEC);
	/* gs_version reads it at every notification: mapped, a read costs no system call. SQLite
	 * truncates the file only for a first connection, never while another has it open, and the
	 * caller's own connection to the database stays open while the loop runs (gs_loop_free comes
	 * first); a file too short for the header is read with pread. */
	struct stat st;
	if (l->shmfd >= 0 && fstat(l->shmfd, &st) == 0 && st.st_size >= 48) {
		void *m = mmap(NULL, 4096, PROT_READ, MAP_SHARED, l->shmfd, 0);
		l->shm = m == MAP_FAILED ? NULL : m;
	}
	l->ctlfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	l->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	for (int i = 0; i < GS_SLOTS; i++)
		l->slots[i].fd = -1;
	for (int i = 0; i < GS_PIDS; i++)
		l->pids.fd[i] = l->pids.fdinfo[i] = l->pids.info[i] = l->pids.ns[i] = l->pids.mem[i] = -1;
	pthread_mutex_init(&l->mu, NULL);
	pthread_mutex_init(&l->rmu, NULL);
	pthread_cond_init(&l->room, NULL);
	if (l->shmfd < 0 || l->ctlfd < 0 || l->evfd < 0) {
		int e = errno;
		gs_loop_free(l);
		errno = e;
		return NULL;
	}
	return l;
}

EXPORT int gs_loop_fd(struct gs_loop *l)
{
	return l->evfd;
}

EXPORT void gs_loop_lock(struct gs_loop *l)
{
	pthread_mutex_lock(&l->mu);
}

EXPORT void gs_loop_unlock(struct gs_loop *l)
{
	pthread_mutex_unlock(&l->mu);
}

static void wake_loop(struct gs_loop *l)
{
	uint64_t one = 1;
	if (write(l->ctlfd, &one, sizeof(one)) < 0) {
		/* EAGAIN: already woken */
	}
}

EXPORT int gs_loop_add(struct gs_loop *l, int listener, struct gs_table *t)
{
	int r = -ENOSPC;
	pthread_mutex_lock(&l->mu);
	for (int i = 0; i < GS_SLOTS; i++) {
		struct gs_slot *s = &l->slots[i];
		if (s->fd >= 0)
			continue;
		s->gen++;
		s->fd = listener, s->hup = 0, s->table = t;
		memset(&s->q, 0, sizeof(s->q));
		memset(s->said, 0, sizeof(s->said));
		memset(s->gsaid, 0, sizeof(s->gsaid));
		l->dirty = 1;
		r = i;
		break;
	}
	pthread_mutex_unlock(&l->mu);
	wake_loop(l);
	return r;
}

/* Takes the counts of what was answered without a record (into `q`, zeroed; the kinds and
 * destinations stay); the caller holds l->mu. */
static void take_quiet(struct gs_slot *s, struct gs_quiet *q)
{
	*q = s->q;
	memset(s->q.locals, 0, sizeof(s->q.locals));
	memset(s->q.grants, 0, sizeof(s->q.grants));
}

/* The slot's table swapped for `t` (the old one returned); `q` gets the counts of what the old one
 * answered without a record, and the next grant of each row is recorded (the new table's rows are
 * other rules). */
EXPORT struct gs_table *gs_loop_set_table(struct gs_loop *l, int slot, struct gs_table *t, struct gs_quiet *q)
{
	memset(q, 0, sizeof(*q));
	if (slot < 0 || slot >= GS_SLOTS)
		return NULL;
	pthread_mutex_lock(&l->mu);
	struct gs_slot *s = &l->slots[slot];
	struct gs_table *old = s->table;
	s->table = t;
	take_quiet(s, q);
	memset(s->gsaid, 0, sizeof(s->gsaid));
	pthread_mutex_unlock(&l->mu);
	return old;
}

/* The loop forgets the slot's listener (the caller closes it once this returns). */
EXPORT int gs_loop_remove(struct gs_loop *l, int slot)
{
	if (slot < 0 || slot >= GS_SLOTS)
		return -EINVAL;
	pthread_mutex_lock(&l->mu);
	struct gs_slot *s = &l->slots[slot];
	s->fd = -1, s->hup = 0, s->table = NULL;
	l->dirty = 1;
	pthread_mutex_unlock(&l->mu);
	wake_loop(l);
	return 0;
}

static void signal_caller(struct gs_loop *l)
{
	uint64_t one = 1;
	l->last_signal = now_ns();
	if (write(l->evfd, &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is full, the caller is woken already */
	}
}

/* Queue a record for the caller (waits for room; at stop, a record that finds none is dropped,
 * its host socket closed). */
static void push(struct gs_loop *l, const struct gs_out *rec)
{
	pthread_mutex_lock(&l->rmu);
	while (l->head - l->tail >= GS_RING && !l->stop)
		pthread_cond_wait(&l->room, &l->rmu);
	if (l->head - l->tail >= GS_RING) {
		l->counts[3]++;
		pthread_mutex_unlock(&l->rmu);
		if (rec->kind == GS_PARK && rec->hostfd >= 0)
			close(rec->hostfd);
		return;
	}
	l->ring[l->head % GS_RING] = *rec;
	l->head++;
	uint32_t queued = l->head - l->tail;
	pthread_mutex_unlock(&l->rmu);
	if (rec->kind != GS_DONE || queued >= GS_RING / 2 || now_ns() - l->last_signal >= GS_SIGNAL_NS)
		signal_caller(l);
}

EXPORT int gs_loop_take(struct gs_loop *l, struct gs_out *outs, int max)
{
	uint64_t v;
	if (read(l->evfd, &v, sizeof(v)) < 0) {
		/* EAGAIN: nothing signalled; records may still be queued */
	}
	int n = 0;
	pthread_mutex_lock(&l->rmu);
	while (n < max && l->tail != l->head) {
		outs[n++] = l->ring[l->tail % GS_RING];
		l->tail++;
	}
	pthread_cond_broadcast(&l->room);
	pthread_mutex_unlock(&l->rmu);
	return n;
}

EXPORT void gs_loop_quiet(struct gs_loop *l, int slot, struct gs_quiet *q)
{
	memset(q, 0, sizeof(*q));
	if (slot < 0 || slot >= GS_SLOTS)
		return;
	pthread_mutex_lock(&l->mu);
	take_quiet(&l->slots[slot], q);
	pthread_mutex_unlock(&l->mu);
}

EXPORT int gs_pool_size(void)
{
	return (int)sizeof(struct gs_pool);
}

EXPORT int gs_quiet_size(void)
{
	return (int)sizeof(struct gs_quiet);
}

EXPORT void gs_loop_counts(struct gs_loop *l, uint64_t counts[4])
{
	pthread_mutex_lock(&l->rmu);
	memcpy(counts, l->counts, sizeof(l->counts));
	pthread_mutex_unlock(&l->rmu);
}

static void count(struct gs_loop *l, int i)
{
	pthread_mutex_lock(&l->rmu);
	l->counts[i]++;
	pthread_mutex_unlock(&l->rmu);
}

/* One ready listener: receive and serve one notification under the mutex, then queue its record. */
static void serve_slot(struct gs_loop *l, uint32_t i, uint32_t gen, uint32_t events)
{
	struct gs_out rec;
	int r, low = 0;
	pthread_mutex_lock(&l->mu);
	struct gs_slot *s = &l->slots[i];
	if (s->fd < 0 || s->gen != gen || s->hup) {
		pthread_mutex_unlock(&l->mu);
		return;
	}
	if (!(events & POLLIN)) { /* POLLHUP/ERR: every task under this filter is gone */
		s->hup = 1, l->dirty = 1;
		memset(&rec, 0, sizeof(rec));
		r = GS_HUP;
	} else {
		const struct gs_table *t = s->table;
		if (t && t->version != gs_version(l))
			t = NULL;
		r = serve(s->fd, t, &rec, &l->pids);
		if (r == GS_DONE && rec.pooled && t->pools && rec.row >= 0 && (uint32_t)rec.row < t->nrows)
			low = t->pools[rec.row].n < GS_POOL / 2;
		if (r < 0) { /* the listener is unusable: said once, then treated as hung up */
			s->hup = 1, l->dirty = 1;
			rec.err = -r;
			r = GS_ERROR;
		}
	}
	if (r == GS_DONE && rec.what == GS_DONE_LOCAL && rec.pooled) {
		/* a local answered CONTINUE: the first of a verb per GS_QUIET_NS is recorded (the audit's
		 * line with its address), the others counted (a record costs the caller's Python more
		 * than the whole answer: issue 11, "what no rule matches costs next to nothing") */
		int v = rec.nr == NR_BIND ? 0 : 1;
		uint64_t now = now_ns();
		if (s->said[v] && now - s->said[v] < GS_QUIET_NS) {
			s->q.locals[v]++;
			pthread_mutex_unlock(&l->mu);
			return;
		}
		s->said[v] = now;
	}
	if (r == GS_DONE && rec.what == GS_DONE_GRANT && rec.pooled && rec.nr == NR_CONNECT && rec.err == 0 &&
	    rec.row >= 0 && rec.row < GS_QROWS && rec.addrlen <= sizeof(s->q.addr[0])) {
		/* a connect granted with a pooled socket: the first of a row and socket kind per
		 * GS_QUIET_NS is recorded, the others counted (the audit aggregates them anyway) */
		int k = rec.row;
		struct gs_quiet *q = &s->q;
		int kind = q->family[k] == rec.family && q->type[k] == rec.type && q->proto[k] == rec.proto;
		uint64_t now = now_ns();
		if (s->gsaid[k] && kind && now - s->gsaid[k] < GS_QUIET_NS) {
			q->grants[k]++;
			pthread_mutex_unlock(&l->mu);
			if (low)
				signal_caller(l);
			return;
		}
		if (kind || !q->grants[k]) { /* (another kind while some are counted: recorded, the row's kind stays) */
			s->gsaid[k] = now;
			q->family[k] = rec.family, q->type[k] = rec.type, q->proto[k] = rec.proto;
			q->addrlen[k] = rec.addrlen;
			memcpy(q->addr[k], rec.addr, rec.addrlen);
		}
	}
	pthread_mutex_unlock(&l->mu);
	if (r == GS_NOTHING)
		return;
	rec.kind = r;
	rec.slot = (int32_t)i;
	if (r == GS_DONE && rec.what == GS_DONE_CONTINUE) {
		count(l, 0);
		return;
	}
	if (rec.stale)
		count(l, 2);
	count(l, 1);
	push(l, &rec);
	if (low) /* a pool ran low: the caller fills it now, not at its next look */
		signal_caller(l);
}

/* Close the pidfds and /proc files of threads not seen for GS_PIDS_IDLE_NS (a task that
 * exited must not keep them, nor the supervisor hold fds of tasks long gone). Under l->mu. */
static void age_pids(struct pidcache *pc, uint64_t now)
{
	for (int i = 0; i < GS_PIDS && (pc->open || pc->mems); i++) {
		if (pc->mem[i] >= 0 && now - pc->memused[i] >= GS_PIDS_IDLE_NS) {
			close(pc->mem[i]);
			pc->mem[i] = -1;
			pc->mems--;
		}
		if (pc->fd[i] < 0 || now - pc->used[i] < GS_PIDS_IDLE_NS)
			continue;
		close(pc->fd[i]);
		pc->fd[i] = -1;
		pc->open--;
		forget_dirs(pc, i);
	}
}

/* poll(), not epoll: a wake-up of the listener's waitqueue on the trapping task's CPU
 * (SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP) reaches a poll() waiter as such; epoll's callback wakes
 * its waiter wherever the scheduler likes (measured: ~25 µs more per notification). */
EXPORT int gs_loop_run(struct gs_loop *l)
{
	static __thread struct pollfd pfds[GS_SLOTS + 1];
	static __thread uint32_t idx[GS_SLOTS + 1], gens[GS_SLOTS + 1];
	nfds_t n = 0;
	pthread_mutex_lock(&l->mu);
	l->dirty = 1;
	pthread_mutex_unlock(&l->mu);
	while (!l->stop) {
		pthread_mutex_lock(&l->mu);
		if (l->dirty) {
			n = 0;
			pfds[n++] = (struct pollfd){.fd = l->ctlfd, .events = POLLIN};
			for (uint32_t i = 0; i < GS_SLOTS; i++) {
				if (l->slots[i].fd < 0 || l->slots[i].hup)
					continue;
				idx[n] = i, gens[n] = l->slots[i].gen;
				pfds[n++] = (struct pollfd){.fd = l->slots[i].fd, .events = POLLIN};
			}
			l->dirty = 0;
		}
		uint64_t now = now_ns();
		if ((l->pids.open || l->pids.mems) && now - l->aged >= GS_PIDS_IDLE_NS / 4) {
			age_pids(&l->pids, now);
			l->aged = now;
		}
		int timeout = l->pids.open || l->pids.mems ? (int)(GS_PIDS_IDLE_NS / 4000000) : -1;
		pthread_mutex_unlock(&l->mu);
		int r = poll(pfds, n, timeout);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (pfds[0].revents) {
			uint64_t v;
			if (read(l->ctlfd, &v, sizeof(v)) < 0) {
				/* EAGAIN: another reader took it */
			}
		}
		for (nfds_t k = 1; k < n && !l->stop; k++) {
			if (pfds[k].revents & POLLNVAL) {
				pthread_mutex_lock(&l->mu); /* closed under us: only after gs_loop_remove */
				l->dirty = 1;
				pthread_mutex_unlock(&l->mu);
			} else if (pfds[k].revents) {
				serve_slot(l, idx[k], gens[k], (uint32_t)pfds[k].revents);
			}
		}
	}
	return 0;
}

EXPORT void gs_loop_stop(struct gs_loop *l)
{
	pthread_mutex_lock(&l->rmu);
	l->stop = 1;
	pthread_cond_broadcast(&l->room);
	pthread_mutex_unlock(&l->rmu);
	wake_loop(l);
}

/* After gs_loop_run returned (or never ran): closes what the loop opened, and the host sockets of
 * records never taken. The listeners and tables are the caller's. */
EXPORT void gs_loop_free(struct gs_loop *l)
{
	if (!l)
		return;
	for (; l->tail != l->head; l->tail++) {
		struct gs_out *r = &l->ring[l->tail % GS_RING];
		if (r->kind == GS_PARK && r->hostfd >= 0)
			close(r->hostfd);
	}
	for (int i = 0; i < GS_PIDS; i++) {
		if (l->pids.fd[i] >= 0)
			close(l->pids.fd[i]);
		if (l->pids.mem[i] >= 0)
			close(l->pids.mem[i]);
		forget_dirs(&l->pids, i);
	}
	if (l->shm)
		munmap((void *)l->shm, 4096);
	if (l->shmfd >= 0)
		close(l->shmfd);
	if (l->ctlfd >= 0)
		close(l->ctlfd);
	if (l->evfd >= 0)
		close(l->evfd);
	pthread_mutex_destroy(&l->mu);
	pthread_mutex_destroy(&l->rmu);
	pthread_cond_destroy(&l->room);
	free(l);
}

/* Top up row `row`'s pool of table `t` (installed in the loop or not yet: `l` NULL) to GS_POOL with
 * host sockets as hostsock.pooled makes them: `family` stream socket, IP_BIND_ADDRESS_NO_PORT
 * (V6ONLY off), bound to `addr` port 0, then marked `mark`; not connected. Made outside the mutex,
 * put in under it. Returns how many were added, or -errno of the first that failed (none added). */
EXPORT int gs_pool_fill(struct gs_loop *l, struct gs_table *t, int row, int family, const uint8_t addr[16], uint32_t mark)
{
	if (!t->pools || row < 0 || (uint32_t)row >= t->nrows || (family != AF_INET && family != AF_INET6))
		return -EINVAL;
	struct gs_pool *p = &t->pools[row];
	int made[GS_POOL], n = 0, err = 0, want = GS_POOL - (int)__atomic_load_n(&p->n, __ATOMIC_RELAXED);
	struct sockaddr_storage ss;
	socklen_t sl = ip_sockaddr(family, addr, 0, &ss);
	int one = 1, zero = 0;
	while (n < want) {
		int h = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (h < 0 || setsockopt(h, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) != 0 ||
		    (family == AF_INET6 && setsockopt(h, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) != 0) ||
		    bind(h, (struct sockaddr *)&ss, sl) != 0 || setsockopt(h, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0) {
			err = errno;
			if (h >= 0)
				close(h);
			break;
		}
		made[n++] = h;
	}
	if (l)
		pthread_mutex_lock(&l->mu);
	p->family = family, p->type = SOCK_STREAM;
	int added = 0;
	while (added < n && p->n < GS_POOL)
		p->fds[p->n++] = made[added++];
	if (l)
		pthread_mutex_unlock(&l->mu);
	for (int i = added; i < n; i++)
		close(made[i]);
	return added ? added : (err ? -err : 0);
}
