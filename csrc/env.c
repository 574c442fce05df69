/* Configuration, read once from the environment; the real libc functions; fork handlers. */
#include "internal.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/un.h>
#include <unistd.h>

int (*real_socket)(int, int, int);
int (*real_bind)(int, const struct sockaddr *, socklen_t);
int (*real_connect)(int, const struct sockaddr *, socklen_t);
int (*real_listen)(int, int);
ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
int (*real_sendmmsg)(int, struct mmsghdr *, unsigned int, int);
int (*real_getsockname)(int, struct sockaddr *, socklen_t *);
int (*real_getpeername)(int, struct sockaddr *, socklen_t *);
int (*real_setsockopt)(int, int, int, const void *, socklen_t);
int (*real_close)(int);
int (*real_dup)(int);
int (*real_dup2)(int, int);
int (*real_dup3)(int, int, int);
int (*real_fcntl)(int, int, ...);
int (*real_fcntl64)(int, int, ...);
int (*real_close_range)(unsigned int, unsigned int, int);
void (*real_closefrom)(int);
int (*real_getaddrinfo)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int g_enabled, g_transparent, g_debug, g_trace, g_prefilter = 1, g_speculate = 1;
char *g_service, *g_tail_bind, *g_tail_connect;

static pthread_once_t once = PTHREAD_ONCE_INIT;

void say(const char *fmt, ...)
{
	char buf[MAX_MESSAGE + 200];
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

static int flag(const char *name)
{
	const char *v = getenv(name);
	return v && *v && strcmp(v, "0") != 0;
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

/* fork: no lock may be held by a thread that does not exist in the child. The child's service
 * connection is made anew on its first request (service.c compares the pid). */
static void fork_prepare(void)
{
	prefilter_lock();
	service_lock();
	pool_lock();
	table_lock();
}

static void fork_after(void)
{
	table_unlock();
	pool_unlock();
	service_unlock();
	prefilter_unlock();
}

/* This process's id, kept here: getpid() is a system call (glibc caches it no more), and the pool,
 * the prefilter and the service connection asked it up to 3 times per connect. Set at init and in
 * the child of every fork() (pthread_atfork); a child made without fork()'s handlers (a raw clone,
 * glibc's _Fork) that then makes sockets is not supported (it would see its parent's pid). */
pid_t g_pid;

static void fork_child(void)
{
	g_pid = getpid();
	fork_after();
}

static void *next(const char *name)
{
	return dlsym(RTLD_NEXT, name);
}

static void init(void)
{
	real_socket = next("socket");
	real_bind = next("bind");
	real_connect = next("connect");
	real_listen = next("listen");
	real_sendto = next("sendto");
	real_sendmsg = next("sendmsg");
	real_sendmmsg = next("sendmmsg");
	real_getsockname = next("getsockname");
	real_getpeername = next("getpeername");
	real_setsockopt = next("setsockopt");
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
	g_transparent = flag("GRAFT_NAME_TRANSPARENT");
	g_debug = flag("GRAFT_DEBUG");
	g_trace = flag("GRAFT_TRACE");
	const char *pf = getenv("GRAFT_PREFILTER");
	g_prefilter = !(pf && strcmp(pf, "0") == 0);
	const char *sp = getenv("GRAFT_SPECULATE");
	g_speculate = !(sp && strcmp(sp, "0") == 0);
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
	g_service = strdup(sock);
	add_words(&g_tail_bind, "GRAFT_CONV_PAIRS", "in:");
	add_words(&g_tail_connect, "GRAFT_EGRESS", "out:");
	add_words(&g_tail_connect, "GRAFT_BBCONN", "bbconn:");
	g_pid = getpid();
	pthread_atfork(fork_prepare, fork_after, fork_child);
	g_enabled = g_service != NULL;
}

void graft_init(void)
{
	pthread_once(&once, init);
}

__attribute__((constructor)) static void ctor(void) { graft_init(); }
