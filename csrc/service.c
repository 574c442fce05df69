/* The fd-service client and the request wire encoding (sockgraft/core/protocol.py is the one
 * definition; tests/modes/preload/test_wire.py compares what this file sends with
 * `Request(...).encode()` byte for byte, through GRAFT_TRACE).
 *
 * One connection per process, made on first use and again after fork (the child's inherited copy
 * is closed), after the service closed it, or when the application closed or replaced its fd
 * number (recognised by its inode: never write to an fd that is not ours). Requests of all
 * threads go over it one at a time, under conn_lock. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "prefilter.h"

/* -- the wire encoding ------------------------------------------------------------------------ */
/* FLAGS: `-` or a comma list, sorted: reuseaddr, reuseport, v6only. */
static const char *flags_word(unsigned f, char *buf, size_t cap)
{
	snprintf(buf, cap, "%s%s%s", (f & FL_REUSEADDR) ? "reuseaddr," : "", (f & FL_REUSEPORT) ? "reuseport," : "",
		 (f & FL_V6ONLY) ? "v6only," : "");
	size_t n = strlen(buf);
	if (n)
		buf[n - 1] = 0;
	else
		snprintf(buf, cap, "-");
	return buf;
}

static int fits(int n, size_t cap)
{
	return n >= 0 && (size_t)n < cap ? n : -1;
}

int wire_bind(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto, unsigned flags)
{
	char fl[40];
	return fits(snprintf(buf, cap, "bind %d %s %d %d %d %s", family, addr, port, type, proto,
			     flags_word(flags, fl, sizeof(fl))), cap);
}

int wire_connect(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto)
{
	return fits(snprintf(buf, cap, "connect %d %s %d %d %d", family, addr, port, type, proto), cap);
}

int wire_pool(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto, int count)
{
	return fits(snprintf(buf, cap, "pool %d %s %d %d %d %d", family, addr, port, type, proto, count), cap);
}

int wire_bindpool(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto, unsigned flags,
		  int count)
{
	char fl[40];
	return fits(snprintf(buf, cap, "bindpool %d %s %d %d %d %s %d", family, addr, port, type, proto,
			     flags_word(flags, fl, sizeof(fl)), count), cap);
}

int wire_sendto(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto)
{
	return fits(snprintf(buf, cap, "sendto %d %s %d %d %d", family, addr, port, type, proto), cap);
}

int wire_named(char *buf, size_t cap, const char *name, int family, int type, int proto, unsigned flags)
{
	char fl[40];
	return fits(snprintf(buf, cap, "named %s %d %d %d %s", name, family, type, proto, flags_word(flags, fl, sizeof(fl))), cap);
}

int wire_dial(char *buf, size_t cap, const char *name, int type, int proto)
{
	return fits(snprintf(buf, cap, "dial %s %d %d", name, type, proto), cap);
}

int wire_resolve(char *buf, size_t cap, const char *name)
{
	return fits(snprintf(buf, cap, "resolve %s", name), cap);
}

/* -- the connection --------------------------------------------------------------------------- */
static __thread char last_error[300]; /* the service's message of the last `err` reply */
static pthread_mutex_t conn_lock = PTHREAD_MUTEX_INITIALIZER;
static int conn_fd = -1;
static ino_t conn_ino;
static pid_t conn_pid;

void service_lock(void) { pthread_mutex_lock(&conn_lock); }
void service_unlock(void) { pthread_mutex_unlock(&conn_lock); }

static void conn_forget(void) /* under conn_lock */
{
	if (conn_fd >= 0 && fd_ino(conn_fd) == conn_ino)
		real_close(conn_fd); /* ours (after fork: the inherited copy, the parent keeps its own) */
	conn_fd = -1;
}

/* A new connection to the fd service: the fd, or -errno (said once). */
int service_dial(void)
{
	int s = real_socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (s < 0)
		return -errno;
	struct sockaddr_un sun = { .sun_family = AF_UNIX };
	memcpy(sun.sun_path, g_service, strlen(g_service) + 1);
	if (real_connect(s, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
		int err = errno;
		static int told; /* said once: a program that retries must not flood its stderr */
		if (g_debug || !__atomic_exchange_n(&told, 1, __ATOMIC_RELAXED))
			say("graft: fd service %s: %s (the socket call fails)", g_service, strerror(err));
		real_close(s);
		return -err;
	}
	return s;
}

static int conn_get(void) /* under conn_lock; the fd or -errno */
{
	if (conn_fd >= 0 && conn_pid == g_pid && fd_ino(conn_fd) == conn_ino)
		return conn_fd;
	conn_forget();
	int s = service_dial();
	if (s < 0)
		return s;
	conn_fd = s;
	conn_ino = fd_ino(s);
	conn_pid = g_pid;
	return s;
}

/* The fds a reply carried (SCM_RIGHTS) into fds[*nfds..max); any more are closed. */
void reply_fds(struct msghdr *mh, int *fds, int max, int *nfds)
{
	for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (*nfds < max)
				fds[(*nfds)++] = fd;
			else
				real_close(fd);
		}
	}
}

/* One request and its reply on the connection; the reply length, or -errno. The fds sent with
 * the reply go to fds[0..max) (*nfds of them; more are closed). */
static ssize_t exchange(int s, const char *req, char *buf, int *fds, int max, int *nfds)
{
	if (real_sendto(s, req, strlen(req), MSG_NOSIGNAL, NULL, 0) < 0)
		return -errno;
	union {
		char b[CMSG_SPACE(sizeof(int) * 16)]; /* a `pool` reply: POOL_BATCH */
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
	reply_fds(&mh, fds, max, nfds);
	return n ? n : -ECONNRESET;
}

static void close_all(int *fds, int *nfds)
{
	for (int i = 0; i < *nfds; i++)
		real_close(fds[i]);
	*nfds = 0;
}

/* Send one request; return D_GRANT with the fds sent (fds[0..*nfds), at most max), D_LOCAL, or
 * D_ERR with errno set. With out, the reply text is copied there (NUL-terminated): an `ok` reply
 * is then a grant with or without fds (`resolve`, `prefilter`, `bindpool`). */
int ask_fds(const char *req, int *fds, int max, int *nfds, char *out, size_t outcap)
{
	int saved = errno, err = 0;
	char buf[MAX_MESSAGE + 1];
	ssize_t n = -EIO;
	*nfds = 0;
	if (g_trace)
		say("graft: request: %s", req);
	service_lock();
	for (int attempt = 0; attempt < 2; attempt++) { /* a closed connection: once more, anew */
		int s = conn_get();
		if (s < 0) {
			n = s;
			break;
		}
		close_all(fds, nfds);
		n = exchange(s, req, buf, fds, max, nfds);
		if (n > 0 || (n != -EPIPE && n != -ECONNRESET && n != -ENOTCONN && n != -EBADF))
			break;
		conn_forget();
	}
	if (n < 0)
		conn_forget();
	service_unlock();
	if (n < 0) {
		err = (int)-n;
		goto fail;
	}
	if (strcmp(buf, "local") == 0) {
		close_all(fds, nfds);
		errno = saved;
		return D_LOCAL;
	}
	if (strncmp(buf, "err ", 4) == 0) {
		char *end;
		long code = strtol(buf + 4, &end, 10);
		err = (code > 0 && code < 4096) ? (int)code : EIO;
		snprintf(last_error, sizeof(last_error), "%s", *end ? end + 1 : strerror(err));
		if (g_debug)
			say("graft: %s: %s", req, last_error);
		goto fail;
	}
	if (strncmp(buf, "ok", 2) == 0 && (buf[2] == 0 || buf[2] == ' ' || buf[2] == '\n')) {
		if (out && outcap)
			snprintf(out, outcap, "%s", buf);
		if (*nfds > 0 || (out && outcap)) {
			errno = saved;
			return D_GRANT;
		}
	}
	err = EIO;
fail:
	close_all(fds, nfds);
	errno = err;
	return D_ERR;
}

int ask(const char *req, int *newfd, char *out, size_t outcap)
{
	int n;
	int r = ask_fds(req, newfd, 1, &n, out, outcap);
	if (n == 0)
		*newfd = -1;
	return r;
}

/* Ask `head` with the environment's rules (*tailp) appended. Rules the service refuses as
 * malformed (or too long to send) are the user's to fix: say so once, on one line, and go on
 * without them (the container's stored rules apply) rather than fail every call of the program. */
int decide_fds(const char *head, char **tailp, const char *vars, int *fds, int max, int *nfds, char *out,
	       size_t outcap)
{
	char req[MAX_MESSAGE + 1];
	char *tail = __atomic_load_n(tailp, __ATOMIC_ACQUIRE);
	if (!tail)
		return ask_fds(head, fds, max, nfds, out, outcap);
	int n = snprintf(req, sizeof(req), "%s%s", head, tail);
	if (n < 0 || n > MAX_MESSAGE) {
		if (__atomic_exchange_n(tailp, NULL, __ATOMIC_ACQ_REL))
			say("graft: %s ignored: longer than a request may be (%d bytes)", vars, MAX_MESSAGE);
		return ask_fds(head, fds, max, nfds, out, outcap);
	}
	int r = ask_fds(req, fds, max, nfds, out, outcap);
	if (r != D_ERR || errno != EINVAL)
		return r;
	char why[sizeof(last_error)];
	snprintf(why, sizeof(why), "%s", last_error);
	int r2 = ask_fds(head, fds, max, nfds, out, outcap);
	if (r2 == D_ERR && errno == EINVAL) /* the request itself is bad, not the rules */
		return r2;
	if (__atomic_exchange_n(tailp, NULL, __ATOMIC_ACQ_REL))
		say("graft: %s ignored: %s", vars, why);
	return r2;
}

int decide(const char *head, char **tailp, const char *vars, int *newfd)
{
	int n;
	int r = decide_fds(head, tailp, vars, newfd, 1, &n, NULL, 0);
	if (n == 0)
		*newfd = -1;
	return r;
}

/* -- the prefilter ---------------------------------------------------------------------------- */
/* The flat rules of this process's effective policy (`prefilter` + its environment's rules),
 * fetched on first use, again in a forked child, and when older than PF_MAX_AGE. While no table
 * can be had (the service refuses, is unreachable, the table does not fit in a reply) every
 * operation is asked about, and the fetch is tried again at most once per PF_MAX_AGE. */
#define PF_MAX_AGE_NS 1000000000LL

static pthread_mutex_t pf_lock = PTHREAD_MUTEX_INITIALIZER;  /* guards the fields below */
static pthread_mutex_t pf_fetching = PTHREAD_MUTEX_INITIALIZER; /* one fetch at a time */
static struct pf pf_cur;
static int pf_ok;          /* pf_cur is a table of process pf_pid */
static pid_t pf_pid;       /* the process the table (or the last attempt) belongs to */
static long long pf_at;    /* when it was fetched or last tried (CLOCK_MONOTONIC_COARSE, ns) */
static unsigned pf_gen;    /* changes whenever the table's text does (pools of an older one are dropped) */
static unsigned long pf_hash;

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void pf_fetch(pid_t pid, long long now)
{
	char req[MAX_MESSAGE + 1], reply[MAX_MESSAGE + 1];
	struct pf fresh;
	int newfd, ok = 0;
	const char *tb = __atomic_load_n(&g_tail_bind, __ATOMIC_ACQUIRE);
	const char *tc = __atomic_load_n(&g_tail_connect, __ATOMIC_ACQUIRE);
	int n = snprintf(req, sizeof(req), "prefilter%s%s", tb ? tb : "", tc ? tc : "");
	if (n > 0 && n <= MAX_MESSAGE && ask(req, &newfd, reply, sizeof(reply)) == D_GRANT &&
	    strncmp(reply, "ok", 2) == 0 && (reply[2] == 0 || reply[2] == '\n'))
		ok = pf_parse(reply[2] ? reply + 3 : "", &fresh) == 0;
	unsigned long h = 5381;
	for (const char *c = reply; ok && *c; c++)
		h = h * 33 + (unsigned char)*c;
	pthread_mutex_lock(&pf_lock);
	if (!ok || h != pf_hash || pid != pf_pid)
		pf_gen++;
	pf_hash = ok ? h : 0;
	if (pf_ok)
		pf_free(&pf_cur);
	pf_ok = ok;
	if (ok)
		pf_cur = fresh;
	pf_pid = pid;
	pf_at = now;
	pthread_mutex_unlock(&pf_lock);
}

/* 0: no rule can apply, the operation stays local without asking; 1: ask the service. */
int might_graft(int verb, int family, const char *addr, int port, int v6only)
{
	if (!g_prefilter)
		return 1;
	int saved = errno;
	pid_t pid = g_pid;
	long long now = now_ns();
	pthread_mutex_lock(&pf_lock);
	int stale = pf_pid != pid || now - pf_at >= PF_MAX_AGE_NS;
	pthread_mutex_unlock(&pf_lock);
	/* one thread fetches; the others go on with the table there is (of this process) or ask */
	if (stale && pthread_mutex_trylock(&pf_fetching) == 0) {
		pf_fetch(pid, now);
		pthread_mutex_unlock(&pf_fetching);
	}
	pthread_mutex_lock(&pf_lock);
	int r = pf_ok && pf_pid == pid ? pf_might(&pf_cur, verb, family, addr, port, v6only) : 1;
	pthread_mutex_unlock(&pf_lock);
	errno = saved;
	return r;
}

/* The pool key of a connect to addr (csrc/pool.c): the row of the prefilter's longest egress prefix
 * holding it and the table's generation; -1 when there is no table of this process to go by. */
int egress_row(const char *addr, unsigned *gen)
{
	pthread_mutex_lock(&pf_lock);
	int row = pf_ok && pf_pid == g_pid ? pf_egress_row(&pf_cur, addr) : -1;
	*gen = pf_gen;
	pthread_mutex_unlock(&pf_lock);
	return row;
}

/* The table's generation for a pool of binds (csrc/pool.c); -1 when there is no table of this
 * process to go by (a table that changes drops its pooled sockets). */
int table_gen(unsigned *gen)
{
	pthread_mutex_lock(&pf_lock);
	int ok = pf_ok && pf_pid == g_pid;
	*gen = pf_gen;
	pthread_mutex_unlock(&pf_lock);
	return ok ? 0 : -1;
}

void prefilter_lock(void) { pthread_mutex_lock(&pf_fetching); pthread_mutex_lock(&pf_lock); }
void prefilter_unlock(void) { pthread_mutex_unlock(&pf_lock); pthread_mutex_unlock(&pf_fetching); }
