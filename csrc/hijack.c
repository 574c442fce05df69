/* libgraft-hijack.so: sockgraft's preload mode for unmodified, dynamically linked programs.
 *
 * This library holds NO policy. It notices the socket calls whose outcome depends on an address
 * (bind, connect, sendto/sendmsg/sendmmsg with a destination, AF_GRAFT sockets, getaddrinfo of
 * "graft:NAME"), forwards the container-side address to sockgraft's fd service ($GRAFT_SOCKET,
 * protocol in sockgraft/protocol.py) and carries out the answer:
 *   ok + fd   the host socket it received replaces the application's fd (dup3), keeping the fd's
 *             O_NONBLOCK/FD_CLOEXEC and the socket options the application set before;
 *   local     the real libc call runs, inside the container's own netns;
 *   err N     the call fails with errno N.
 * The rules of the environment (GRAFT_CONV_PAIRS, GRAFT_EGRESS, GRAFT_BBCONN) travel, unparsed,
 * on each request; the service evaluates them with the engine against the container's table.
 *
 * Per-fd state lives in a table that grows with the highest fd seen (no fixed size), guarded by a
 * mutex (fork-safe through pthread_atfork). Each entry records the socket's inode, so an entry
 * left behind by a close this library did not see is recognised as stale and ignored. dup, dup2,
 * dup3, fcntl(F_DUPFD*), close, close_range and closefrom keep the table in step. One connection
 * to the service per request: nothing to repair after fork.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include "graft.h"

#define EXPORT __attribute__((visibility("default")))
#define MAX_MESSAGE 4096 /* sockgraft.protocol.MAX_MESSAGE */

/* -- the real functions ----------------------------------------------------------------------- */
static int (*real_socket)(int, int, int);
static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_connect)(int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static int (*real_sendmmsg)(int, struct mmsghdr *, unsigned int, int);
static int (*real_getsockname)(int, struct sockaddr *, socklen_t *);
static int (*real_getpeername)(int, struct sockaddr *, socklen_t *);
static int (*real_close)(int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);
static int (*real_fcntl)(int, int, ...);
static int (*real_fcntl64)(int, int, ...);
static int (*real_close_range)(unsigned int, unsigned int, int);
static void (*real_closefrom)(int);
static int (*real_getaddrinfo)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

/* -- configuration, read once from the environment -------------------------------------------- */
static int enabled;       /* GRAFT_SOCKET set and GRAFT != disable */
static int transparent;   /* GRAFT_NAME_TRANSPARENT: getsockname reports the host's view */
static int debug;         /* GRAFT_DEBUG: report every denial on stderr */
static char *service;     /* $GRAFT_SOCKET */
static char *tail_bind;   /* " in:PAIR ..." from GRAFT_CONV_PAIRS */
static char *tail_connect; /* " out:RULE ... bbconn:NAME" from GRAFT_EGRESS, GRAFT_BBCONN */

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void say(const char *fmt, ...)
{
	char buf[600];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(buf) - 2)
		n = sizeof(buf) - 2;
	buf[n++] = '\n';
	int saved = errno;
	ssize_t w = write(2, buf, (size_t)n);
	(void)w;
	errno = saved;
}

/* " PREFIX:WORD" for each whitespace-separated word of env var NAME, appended to *out. */
static void add_words(char **out, const char *name, const char *prefix)
{
	const char *v = getenv(name);
	if (!v)
		return;
	size_t have = *out ? strlen(*out) : 0, plen = strlen(prefix);
	size_t cap = have + strlen(v) * (plen + 2) + 2;
	char *s = realloc(*out, cap);
	if (!s)
		return;
	if (!*out)
		s[0] = 0;
	*out = s;
	char *p = s + have;
	while (*v) {
		while (*v == ' ' || *v == '\t' || *v == '\n')
			v++;
		if (!*v)
			break;
		*p++ = ' ';
		memcpy(p, prefix, plen);
		p += plen;
		while (*v && *v != ' ' && *v != '\t' && *v != '\n')
			*p++ = *v++;
	}
	*p = 0;
}

static void lock_table(void) { pthread_mutex_lock(&lock); }
static void unlock_table(void) { pthread_mutex_unlock(&lock); }
static void fork_prepare(void);
static void fork_parent(void);
static void fork_child(void);

static void *next(const char *name)
{
	return dlsym(RTLD_NEXT, name);
}

static void init(void)
{
	real_socket = next("socket");
	real_bind = next("bind");
	real_connect = next("connect");
	real_sendto = next("sendto");
	real_sendmsg = next("sendmsg");
	real_sendmmsg = next("sendmmsg");
	real_getsockname = next("getsockname");
	real_getpeername = next("getpeername");
	real_close = next("close");
	real_dup = next("dup");
	real_dup2 = next("dup2");
	real_dup3 = next("dup3");
	real_fcntl = next("fcntl");
	real_fcntl64 = next("fcntl64");
	real_close_range = next("close_range");
	real_closefrom = next("closefrom");
	real_getaddrinfo = next("getaddrinfo");
	if (!real_fcntl64)
		real_fcntl64 = real_fcntl;

	const char *g = getenv("GRAFT"), *sock = getenv("GRAFT_SOCKET");
	const char *t = getenv("GRAFT_NAME_TRANSPARENT"), *d = getenv("GRAFT_DEBUG");
	transparent = t && *t && strcmp(t, "0") != 0;
	debug = d && *d && strcmp(d, "0") != 0;
	if (g && strcmp(g, "disable") == 0)
		return;
	if (!sock || !*sock) {
		if (getenv("GRAFT_CONV_PAIRS") || getenv("GRAFT_EGRESS") || getenv("GRAFT_BBCONN"))
			say("graft: GRAFT_SOCKET is not set: no fd service, nothing is grafted (run under `graft run --mode preload`)");
		return;
	}
	if (strlen(sock) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		say("graft: GRAFT_SOCKET is too long for a unix socket path: nothing is grafted");
		return;
	}
	service = strdup(sock);
	add_words(&tail_bind, "GRAFT_CONV_PAIRS", "in:");
	add_words(&tail_connect, "GRAFT_EGRESS", "out:");
	add_words(&tail_connect, "GRAFT_BBCONN", "bbconn:");
	pthread_atfork(fork_prepare, fork_parent, fork_child);
	enabled = service != NULL;
}

__attribute__((constructor)) static void ctor(void) { pthread_once(&once, init); }
#define ENSURE() pthread_once(&once, init)

/* -- per-fd state ----------------------------------------------------------------------------- */
struct gs {
	ino_t ino;         /* the socket this entry describes; another inode on the fd: stale */
	int family;        /* what the application asked for: AF_INET, AF_INET6 or AF_GRAFT */
	int type;          /* SOCK_STREAM, SOCK_DGRAM... without SOCK_NONBLOCK/SOCK_CLOEXEC */
	int proto;
	int decided;       /* bound, connected, or already decided: nothing more to ask */
	int grafted;       /* the fd holds a host socket */
	int dialed;        /* connected by endpoint name (AF_GRAFT) */
	char epname[AF_GRAFT_EPNAME_MAX]; /* bound or dialed by this name (AF_GRAFT) */
	socklen_t bound_len; /* what the application bound (getsockname's default answer) */
	struct sockaddr_storage bound;
};

static struct gs **tab;
static size_t tab_cap;

static ino_t fd_ino(int fd)
{
	struct stat sb;
	if (fstat(fd, &sb) != 0 || !S_ISSOCK(sb.st_mode))
		return 0;
	return sb.st_ino;
}

/* Under the lock: the slot of fd, growing the table if `grow`. */
static struct gs **slot(int fd, int grow)
{
	if (fd < 0)
		return NULL;
	if ((size_t)fd >= tab_cap) {
		if (!grow)
			return NULL;
		size_t cap = tab_cap ? tab_cap : 64;
		while (cap <= (size_t)fd)
			cap *= 2;
		struct gs **t = realloc(tab, cap * sizeof(*t));
		if (!t)
			return NULL;
		memset(t + tab_cap, 0, (cap - tab_cap) * sizeof(*t));
		tab = t;
		tab_cap = cap;
	}
	return &tab[fd];
}

static int st_get(int fd, struct gs *out)
{
	int found = 0;
	lock_table();
	struct gs **s = slot(fd, 0);
	if (s && *s) {
		*out = **s;
		found = 1;
	}
	unlock_table();
	return found;
}

static void st_put(int fd, const struct gs *in)
{
	lock_table();
	struct gs **s = slot(fd, 1);
	if (s) {
		if (!*s)
			*s = malloc(sizeof(**s));
		if (*s)
			**s = *in;
	}
	unlock_table();
}

static void st_del_locked(int fd)
{
	struct gs **s = slot(fd, 0);
	if (s && *s) {
		free(*s);
		*s = NULL;
	}
}

static void st_del(int fd)
{
	lock_table();
	st_del_locked(fd);
	unlock_table();
}

/* fd `to` now refers to what `from` refers to. */
static void st_copy(int from, int to)
{
	if (from == to)
		return;
	lock_table();
	struct gs **f = slot(from, 0);
	if (f && *f) {
		struct gs copy = **f;
		struct gs **t = slot(to, 1);
		if (t) {
			if (!*t)
				*t = malloc(sizeof(**t));
			if (*t)
				**t = copy;
		}
	} else {
		st_del_locked(to);
	}
	unlock_table();
}

/* The state of a socket on which bind/connect must still be decided. */
static int fresh(int fd, struct gs *st)
{
	if (!enabled || !st_get(fd, st) || st->decided)
		return 0;
	if (fd_ino(fd) != st->ino) { /* closed behind our back and reused */
		st_del(fd);
		return 0;
	}
	return 1;
}

static void mark_decided(int fd)
{
	lock_table();
	struct gs **s = slot(fd, 0);
	if (s && *s)
		(*s)->decided = 1;
	unlock_table();
}

/* -- asking the fd service -------------------------------------------------------------------- */
enum { D_LOCAL, D_GRANT, D_ERR };
static __thread char last_error[300]; /* the service's message of the last `err` reply */

/* The connection to the service: one per process, made on first use and again after fork (the
 * child's inherited copy is closed), after the service closed it, or when the application closed
 * or replaced its fd number (recognised by its inode: never write to an fd that is not ours). */
static pthread_mutex_t conn_lock = PTHREAD_MUTEX_INITIALIZER;
static int conn_fd = -1;
static ino_t conn_ino;
static pid_t conn_pid;

static void conn_forget(void) /* under conn_lock */
{
	if (conn_fd >= 0 && fd_ino(conn_fd) == conn_ino)
		real_close(conn_fd); /* ours (after fork: the inherited copy, the parent keeps its own) */
	conn_fd = -1;
}

static int conn_get(void) /* under conn_lock; the fd or -errno */
{
	if (conn_fd >= 0 && conn_pid == getpid() && fd_ino(conn_fd) == conn_ino)
		return conn_fd;
	conn_forget();
	int s = real_socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -errno;
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	memcpy(sun.sun_path, service, strlen(service) + 1);
	if (real_connect(s, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
		int err = errno;
		static int told; /* said once: a program that retries must not flood its stderr */
		if (debug || !__atomic_exchange_n(&told, 1, __ATOMIC_RELAXED))
			say("graft: fd service %s: %s (the socket call fails)", service, strerror(err));
		real_close(s);
		return -err;
	}
	conn_fd = s;
	conn_ino = fd_ino(s);
	conn_pid = getpid();
	return s;
}

/* One request and its reply on the connection; the reply length, or -errno. */
static ssize_t exchange(int s, const char *req, char *buf, int *newfd)
{
	if (real_sendto(s, req, strlen(req), MSG_NOSIGNAL, NULL, 0) < 0)
		return -errno;
	union {
		char b[CMSG_SPACE(sizeof(int) * 8)];
		struct cmsghdr align;
	} cbuf;
	struct iovec iov = { buf, MAX_MESSAGE };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf.b, .msg_controllen = sizeof(cbuf.b) };
	ssize_t n;
	do
		n = recvmsg(s, &mh, MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	buf[n] = 0;
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (*newfd < 0)
				*newfd = fd;
			else
				real_close(fd);
		}
	}
	return n ? n : -ECONNRESET;
}

/* fork: no lock may be held by a thread that does not exist in the child. */
static void fork_prepare(void)
{
	pthread_mutex_lock(&conn_lock);
	lock_table();
}

static void fork_parent(void)
{
	unlock_table();
	pthread_mutex_unlock(&conn_lock);
}

static void fork_child(void)
{
	unlock_table();
	pthread_mutex_unlock(&conn_lock); /* conn_pid differs now: the first request reconnects */
}

/* Send one request; return D_GRANT with *newfd, D_LOCAL, or D_ERR with errno set.
 * For `resolve`, the reply text is copied into out (NUL-terminated). */
static int ask(const char *req, int *newfd, char *out, size_t outcap)
{
	int saved = errno, err = 0;
	char buf[MAX_MESSAGE + 1];
	ssize_t n = -EIO;
	*newfd = -1;
	pthread_mutex_lock(&conn_lock);
	for (int attempt = 0; attempt < 2; attempt++) { /* a closed connection: once more, anew */
		int s = conn_get();
		if (s < 0) {
			n = s;
			break;
		}
		n = exchange(s, req, buf, newfd);
		if (n > 0 || (n != -EPIPE && n != -ECONNRESET && n != -ENOTCONN && n != -EBADF))
			break;
		conn_forget();
	}
	if (n < 0)
		conn_forget();
	pthread_mutex_unlock(&conn_lock);
	if (n < 0) {
		err = (int)-n;
		goto fail;
	}
	if (strcmp(buf, "local") == 0) {
		if (*newfd >= 0)
			real_close(*newfd);
		*newfd = -1;
		errno = saved;
		return D_LOCAL;
	}
	if (strncmp(buf, "err ", 4) == 0) {
		char *end;
		long code = strtol(buf + 4, &end, 10);
		err = (code > 0 && code < 4096) ? (int)code : EIO;
		snprintf(last_error, sizeof(last_error), "%s", *end ? end + 1 : strerror(err));
		if (debug)
			say("graft: %s: %s", req, last_error);
		goto fail;
	}
	if (strncmp(buf, "ok", 2) == 0 && (buf[2] == 0 || buf[2] == ' ' || buf[2] == '\n')) {
		if (out && outcap) {
			snprintf(out, outcap, "%s", buf);
			if (*newfd >= 0)
				real_close(*newfd);
			*newfd = -1;
			errno = saved;
			return D_GRANT;
		}
		if (*newfd >= 0) {
			errno = saved;
			return D_GRANT;
		}
	}
	err = EIO;
fail:
	if (*newfd >= 0)
		real_close(*newfd);
	*newfd = -1;
	errno = err;
	return D_ERR;
}

/* Ask `head` with the environment's rules (*tailp) appended. Rules the service refuses as
 * malformed (or too long to send) are the user's to fix: say so once, on one line, and go on
 * without them (the container's stored rules apply) rather than fail every call of the program. */
static int decide(const char *head, char **tailp, const char *vars, int *newfd)
{
	char req[MAX_MESSAGE + 1];
	char *tail = __atomic_load_n(tailp, __ATOMIC_ACQUIRE);
	if (!tail)
		return ask(head, newfd, NULL, 0);
	int n = snprintf(req, sizeof(req), "%s%s", head, tail);
	if (n < 0 || n > MAX_MESSAGE) {
		if (__atomic_exchange_n(tailp, NULL, __ATOMIC_ACQ_REL))
			say("graft: %s ignored: longer than a request may be (%d bytes)", vars, MAX_MESSAGE);
		return ask(head, newfd, NULL, 0);
	}
	int r = ask(req, newfd, NULL, 0);
	if (r != D_ERR || errno != EINVAL)
		return r;
	char why[sizeof(last_error)];
	snprintf(why, sizeof(why), "%s", last_error);
	int r2 = ask(head, newfd, NULL, 0);
	if (r2 == D_ERR && errno == EINVAL) /* the request itself is bad, not the rules */
		return r2;
	if (__atomic_exchange_n(tailp, NULL, __ATOMIC_ACQ_REL))
		say("graft: %s ignored: %s", vars, why);
	return r2;
}

/* -- installing a granted host socket --------------------------------------------------------- */
struct opt { int level, name; };
static const struct opt sol_opts[] = {
	{ SOL_SOCKET, SO_KEEPALIVE }, { SOL_SOCKET, SO_BROADCAST }, { SOL_SOCKET, SO_LINGER },
	{ SOL_SOCKET, SO_OOBINLINE }, { SOL_SOCKET, SO_RCVLOWAT }, { SOL_SOCKET, SO_RCVTIMEO },
	{ SOL_SOCKET, SO_SNDTIMEO }, { SOL_SOCKET, SO_PRIORITY }, { SOL_SOCKET, SO_RCVBUF },
	{ SOL_SOCKET, SO_SNDBUF }, { SOL_SOCKET, SO_TIMESTAMP }, { SOL_SOCKET, SO_TIMESTAMPNS },
	{ SOL_SOCKET, SO_BUSY_POLL },
};
static const struct opt tcp_opts[] = {
	{ IPPROTO_TCP, TCP_NODELAY }, { IPPROTO_TCP, TCP_KEEPIDLE }, { IPPROTO_TCP, TCP_KEEPINTVL },
	{ IPPROTO_TCP, TCP_KEEPCNT }, { IPPROTO_TCP, TCP_DEFER_ACCEPT }, { IPPROTO_TCP, TCP_FASTOPEN },
	{ IPPROTO_TCP, TCP_USER_TIMEOUT }, { IPPROTO_TCP, TCP_NOTSENT_LOWAT }, { IPPROTO_TCP, TCP_MAXSEG },
	{ IPPROTO_TCP, TCP_QUICKACK },
};
static const struct opt ip_opts[] = {
	{ IPPROTO_IP, IP_TOS }, { IPPROTO_IP, IP_TTL }, { IPPROTO_IP, IP_RECVERR }, { IPPROTO_IP, IP_PKTINFO },
	{ IPPROTO_IP, IP_RECVTOS }, { IPPROTO_IP, IP_MTU_DISCOVER },
};
static const struct opt ip6_opts[] = {
	{ IPPROTO_IPV6, IPV6_TCLASS }, { IPPROTO_IPV6, IPV6_UNICAST_HOPS }, { IPPROTO_IPV6, IPV6_RECVERR },
	{ IPPROTO_IPV6, IPV6_RECVPKTINFO }, { IPPROTO_IPV6, IPV6_MTU_DISCOVER },
};

/* Each option the application set on `from` (its value differs from a fresh socket's) is set
 * on `to`. Buffer sizes read back doubled: set half. Failures are ignored (best effort). */
static void copy_list(int from, int fresh_fd, int to, const struct opt *o, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		char a[32], b[32];
		socklen_t la = sizeof(a), lb = sizeof(b);
		if (getsockopt(from, o[i].level, o[i].name, a, &la) != 0)
			continue;
		if (getsockopt(fresh_fd, o[i].level, o[i].name, b, &lb) != 0 || (la == lb && memcmp(a, b, la) == 0))
			continue;
		if (o[i].level == SOL_SOCKET && (o[i].name == SO_RCVBUF || o[i].name == SO_SNDBUF) && la == sizeof(int)) {
			int v;
			memcpy(&v, a, sizeof(v));
			v /= 2;
			memcpy(a, &v, sizeof(v));
		}
		setsockopt(to, o[i].level, o[i].name, a, la);
	}
}

static void copy_options(int from, int to, const struct gs *st)
{
	int fam = st->family == AF_GRAFT ? AF_INET : st->family;
	int fresh_fd = real_socket(fam, st->type | SOCK_CLOEXEC, st->proto);
	if (fresh_fd < 0)
		return;
	int to_dom = 0;
	socklen_t l = sizeof(to_dom);
	getsockopt(to, SOL_SOCKET, SO_DOMAIN, &to_dom, &l);
	copy_list(from, fresh_fd, to, sol_opts, sizeof(sol_opts) / sizeof(*sol_opts));
	if (st->type == SOCK_STREAM && (to_dom == AF_INET || to_dom == AF_INET6))
		copy_list(from, fresh_fd, to, tcp_opts, sizeof(tcp_opts) / sizeof(*tcp_opts));
	if (to_dom == fam && fam == AF_INET)
		copy_list(from, fresh_fd, to, ip_opts, sizeof(ip_opts) / sizeof(*ip_opts));
	if (to_dom == fam && fam == AF_INET6)
		copy_list(from, fresh_fd, to, ip6_opts, sizeof(ip6_opts) / sizeof(*ip6_opts));
	real_close(fresh_fd);
}

/* Replace the application's fd (and its duplicates) by host socket newfd; update the state. */
static int install(int fd, int newfd, struct gs *st)
{
	int fl = real_fcntl(fd, F_GETFL);
	copy_options(fd, newfd, st);
	if (fl >= 0 && (fl & O_NONBLOCK))
		real_fcntl(newfd, F_SETFL, real_fcntl(newfd, F_GETFL) | O_NONBLOCK);
	else
		real_fcntl(newfd, F_SETFL, real_fcntl(newfd, F_GETFL) & ~O_NONBLOCK);
	ino_t old = st->ino, ino = fd_ino(newfd);
	int rc = 0;
	lock_table();
	if (fd_ino(fd) != old) { /* the application closed or replaced fd meanwhile */
		rc = EBADF;
	} else {
		st->ino = ino;
		st->grafted = 1;
		st->decided = 1;
		for (size_t i = 0; i < tab_cap; i++) {
			struct gs *e = tab[i];
			if (!e || e->ino != old || ((int)i != fd && fd_ino((int)i) != old))
				continue;
			int cloexec = real_fcntl((int)i, F_GETFD);
			if (real_dup3(newfd, (int)i, (cloexec >= 0 && (cloexec & FD_CLOEXEC)) ? O_CLOEXEC : 0) < 0) {
				if ((int)i == fd)
					rc = errno;
				continue;
			}
			*e = *st;
		}
	}
	unlock_table();
	real_close(newfd);
	if (rc) {
		errno = rc;
		return -1;
	}
	return 0;
}

/* -- the decisions ---------------------------------------------------------------------------- */
static const char *flags_of(int fd, int family, char *buf, size_t cap)
{
	int v = 0;
	socklen_t l = sizeof(v);
	buf[0] = 0;
	if (getsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &v, &l) == 0 && v)
		strncat(buf, "reuseaddr,", cap - strlen(buf) - 1);
	l = sizeof(v);
	if (getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &v, &l) == 0 && v)
		strncat(buf, "reuseport,", cap - strlen(buf) - 1);
	l = sizeof(v);
	if (family == AF_INET6 && getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, &l) == 0 && v)
		strncat(buf, "v6only,", cap - strlen(buf) - 1);
	size_t n = strlen(buf);
	if (n)
		buf[n - 1] = 0;
	else
		snprintf(buf, cap, "-");
	return buf;
}

/* The text form of an inet sockaddr: family, address and port, or -1 if it is not one. */
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
	if (sa->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 in6;
		memcpy(&in6, sa, sizeof(in6));
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

/* An unbound socket is about to reach `sa` (connect, sendto, sendmsg): the egress decision.
 * Returns 0 to go on with the real call, -1 with errno to fail it. */
static int egress(int fd, struct gs *st, const struct sockaddr *sa, socklen_t len)
{
	char addr[INET6_ADDRSTRLEN], head[160];
	int fam, port, newfd;
	if (inet_words(sa, len, &fam, addr, &port) != 0 || (st->family != AF_GRAFT && st->family != fam))
		return 0; /* not an address we can decide on: the kernel answers */
	snprintf(head, sizeof(head), "connect %d %s %d %d %d", fam, addr, port, st->type, st->proto);
	switch (decide(head, &tail_connect, "GRAFT_EGRESS/GRAFT_BBCONN", &newfd)) {
	case D_LOCAL:
		mark_decided(fd);
		return 0;
	case D_GRANT:
		return install(fd, newfd, st);
	default:
		return -1;
	}
}

/* -- the wrapped calls ------------------------------------------------------------------------ */
EXPORT int socket(int family, int type, int proto)
{
	ENSURE();
	if (!enabled || (family != AF_INET && family != AF_INET6 && family != AF_GRAFT))
		return real_socket(family, type, proto);
	int fd = real_socket(family == AF_GRAFT ? AF_INET : family, type, proto);
	if (fd < 0)
		return fd;
	struct gs st = { .family = family, .type = type & ~(SOCK_NONBLOCK | SOCK_CLOEXEC), .proto = proto };
	st.ino = fd_ino(fd);
	st_put(fd, &st);
	return fd;
}

EXPORT int bind(int fd, const struct sockaddr *sa, socklen_t len)
{
	ENSURE();
	struct gs st;
	if (!sa || len < (socklen_t)sizeof(sa_family_t) || !fresh(fd, &st))
		return real_bind(fd, sa, len);
	char head[200], flags[48], addr[INET6_ADDRSTRLEN];
	int fam, port, newfd, r;
	if (sa->sa_family == AF_GRAFT && st.family == AF_GRAFT) {
		char name[AF_GRAFT_EPNAME_MAX];
		if (gr_name(sa, len, name) != 0)
			return -1;
		snprintf(head, sizeof(head), "named %s 0 %d %d %s", name, st.type, st.proto, flags_of(fd, AF_INET, flags, sizeof(flags)));
		if ((r = ask(head, &newfd, NULL, 0)) != D_GRANT) {
			if (r == D_LOCAL)
				errno = EADDRNOTAVAIL; /* the service never answers `local` to a name */
			return -1;
		}
		memcpy(st.epname, name, sizeof(name));
		st.bound_len = 0;
		return install(fd, newfd, &st);
	}
	if (inet_words(sa, len, &fam, addr, &port) != 0 || (st.family != AF_GRAFT && st.family != fam))
		return real_bind(fd, sa, len);
	snprintf(head, sizeof(head), "bind %d %s %d %d %d %s", fam, addr, port, st.type, st.proto,
		 flags_of(fd, fam, flags, sizeof(flags)));
	switch (decide(head, &tail_bind, "GRAFT_CONV_PAIRS", &newfd)) {
	case D_LOCAL:
		r = real_bind(fd, sa, len);
		if (r == 0)
			mark_decided(fd);
		return r;
	case D_GRANT:
		st.bound_len = len < (socklen_t)sizeof(st.bound) ? len : (socklen_t)sizeof(st.bound);
		memcpy(&st.bound, sa, st.bound_len);
		return install(fd, newfd, &st);
	default:
		return -1;
	}
}

/* A blocking connect by name: wait for the host socket's connect to complete. */
static int finish_dial(int fd)
{
	int fl = real_fcntl(fd, F_GETFL);
	struct pollfd p = { .fd = fd, .events = POLLOUT };
	if (fl >= 0 && (fl & O_NONBLOCK)) {
		if (poll(&p, 1, 0) == 0) {
			errno = EINPROGRESS;
			return -1;
		}
	} else {
		int n;
		do
			n = poll(&p, 1, -1);
		while (n < 0 && errno == EINTR);
	}
	int err = 0;
	socklen_t l = sizeof(err);
	if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) == 0 && err) {
		errno = err;
		return -1;
	}
	return 0;
}

EXPORT int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	ENSURE();
	struct gs st;
	if (!sa || len < (socklen_t)sizeof(sa_family_t) || !fresh(fd, &st))
		return real_connect(fd, sa, len);
	if (sa->sa_family == AF_GRAFT && st.family == AF_GRAFT) {
		char name[AF_GRAFT_EPNAME_MAX], head[160];
		int newfd;
		if (gr_name(sa, len, name) != 0)
			return -1;
		snprintf(head, sizeof(head), "dial %s %d %d", name, st.type, st.proto);
		int r = ask(head, &newfd, NULL, 0);
		if (r != D_GRANT) {
			if (r == D_LOCAL)
				errno = EADDRNOTAVAIL;
			return -1;
		}
		memcpy(st.epname, name, sizeof(name));
		st.dialed = 1;
		if (install(fd, newfd, &st) != 0)
			return -1;
		return finish_dial(fd);
	}
	if (egress(fd, &st, sa, len) != 0)
		return -1;
	int r = real_connect(fd, sa, len);
	if (r == 0 || errno == EINPROGRESS)
		mark_decided(fd);
	return r;
}

EXPORT ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *sa, socklen_t len)
{
	ENSURE();
	struct gs st;
	if (sa && len >= (socklen_t)sizeof(sa_family_t) && fresh(fd, &st) && egress(fd, &st, sa, len) != 0)
		return -1;
	return real_sendto(fd, buf, n, flags, sa, len);
}

EXPORT ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
	ENSURE();
	struct gs st;
	if (msg && msg->msg_name && msg->msg_namelen >= sizeof(sa_family_t) && fresh(fd, &st) &&
	    egress(fd, &st, msg->msg_name, msg->msg_namelen) != 0)
		return -1;
	return real_sendmsg(fd, msg, flags);
}

EXPORT int sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags)
{
	ENSURE();
	struct gs st;
	if (vec && vlen && vec[0].msg_hdr.msg_name && vec[0].msg_hdr.msg_namelen >= sizeof(sa_family_t) &&
	    fresh(fd, &st) && egress(fd, &st, vec[0].msg_hdr.msg_name, vec[0].msg_hdr.msg_namelen) != 0)
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

EXPORT int getsockname(int fd, struct sockaddr *sa, socklen_t *len)
{
	ENSURE();
	struct gs st;
	if (transparent || !enabled || !sa || !len || !st_get(fd, &st) || !st.grafted || fd_ino(fd) != st.ino)
		return real_getsockname(fd, sa, len);
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
	if (transparent || !enabled || !sa || !len || !st_get(fd, &st) || !st.dialed || fd_ino(fd) != st.ino)
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
	if (tab)
		st_del(fd);
	return real_close(fd);
}

EXPORT int dup(int fd)
{
	ENSURE();
	int r = real_dup(fd);
	if (r >= 0 && tab)
		st_copy(fd, r);
	return r;
}

EXPORT int dup2(int fd, int to)
{
	ENSURE();
	int r = real_dup2(fd, to);
	if (r >= 0 && tab)
		st_copy(fd, r);
	return r;
}

EXPORT int dup3(int fd, int to, int flags)
{
	ENSURE();
	int r = real_dup3(fd, to, flags);
	if (r >= 0 && tab)
		st_copy(fd, r);
	return r;
}

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, va_list ap)
{
	void *arg = va_arg(ap, void *);
	int r = real(fd, cmd, arg);
	if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && tab)
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

static void forget_range(unsigned int first, unsigned int last)
{
	lock_table();
	for (size_t i = first; i < tab_cap && i <= last; i++)
		st_del_locked((int)i);
	unlock_table();
}

EXPORT int close_range(unsigned int first, unsigned int last, int flags)
{
	ENSURE();
	if (!(flags & CLOSE_RANGE_CLOEXEC) && first <= last)
		forget_range(first, last);
	if (real_close_range)
		return real_close_range(first, last, flags);
	return (int)syscall(SYS_close_range, first, last, flags);
}

EXPORT void closefrom(int lowfd)
{
	ENSURE();
	if (lowfd >= 0)
		forget_range((unsigned int)lowfd, ~0u);
	if (real_closefrom)
		real_closefrom(lowfd);
	else
		syscall(SYS_close_range, (unsigned int)(lowfd < 0 ? 0 : lowfd), ~0u, 0);
}

/* getaddrinfo("graft:NAME"): the endpoint's address (its port when fixed), asked with `resolve`. */
EXPORT int getaddrinfo(const char *node, const char *serv, const struct addrinfo *hints, struct addrinfo **res)
{
	ENSURE();
	if (!enabled || !node || strncmp(node, "graft:", 6) != 0)
		return real_getaddrinfo(node, serv, hints, res);
	const char *name = node + 6;
	size_t n = strlen(name);
	if (n == 0 || n >= AF_GRAFT_EPNAME_MAX)
		return EAI_NONAME;
	for (size_t i = 0; i < n; i++)
		if (name[i] <= ' ' || name[i] > '~')
			return EAI_NONAME;
	char req[64], out[MAX_MESSAGE + 1];
	int fd;
	snprintf(req, sizeof(req), "resolve %s", name);
	if (ask(req, &fd, out, sizeof(out)) != D_GRANT)
		return EAI_NONAME;
	/* out: "ok\nNAME type ipv4 addr A port P|dynamic" */
	char *line = strchr(out, '\n');
	if (!line)
		return EAI_NONAME;
	char *words[12], *save = NULL;
	int k = 0;
	for (char *w = strtok_r(line + 1, " \n", &save); w && k < 12; w = strtok_r(NULL, " \n", &save))
		words[k++] = w;
	const char *type = NULL, *addr = NULL, *port = NULL;
	for (int i = 1; i + 1 < k; i += 2) {
		if (!strcmp(words[i], "type"))
			type = words[i + 1];
		else if (!strcmp(words[i], "addr"))
			addr = words[i + 1];
		else if (!strcmp(words[i], "port"))
			port = words[i + 1];
	}
	if (!type || !addr || (strcmp(type, "ipv4") && strcmp(type, "ipv6")))
		return EAI_FAMILY; /* a unix endpoint has no address to resolve */
	struct addrinfo h = { 0 };
	if (hints)
		h = *hints;
	h.ai_flags |= AI_NUMERICHOST;
	h.ai_flags &= ~AI_CANONNAME;
	const char *p = (port && strcmp(port, "dynamic")) ? port : serv;
	if (p == port)
		h.ai_flags |= AI_NUMERICSERV;
	return real_getaddrinfo(addr, p, &h, res);
}
