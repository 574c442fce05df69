/* internal.h: what the files of libgraft-hijack.so share (private; graft.h is the public API).
 *
 *   env.c      configuration from the environment, the real libc functions, init, fork handlers
 *   fdtable.c  per-fd state, and installing a granted host socket in place of the application's fd
 *   options.c  socket options copied onto the host socket (list: options.h, generated from Python)
 *   service.c  the fd-service client (one connection per process) and the request wire encoding
 *   hooks.c    the wrapped socket calls: socket, bind, connect, send*, getsockname, close, dup...
 *   gai.c      getaddrinfo("graft:NAME")
 *   prefilter.c  Prefilter.might_graft of the Python engine, in C (pure; the cache is service.c's)
 *   pool.c     host sockets fetched ahead of their connects (the `pool` request)
 */
#ifndef GRAFT_INTERNAL_H
#define GRAFT_INTERNAL_H

#define _GNU_SOURCE
#include <netdb.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "graft.h"

#define EXPORT __attribute__((visibility("default")))
#define MAX_MESSAGE 4096 /* sockgraft.core.protocol.MAX_MESSAGE */

/* -- env.c ------------------------------------------------------------------------------------ */
extern int (*real_socket)(int, int, int);
extern int (*real_bind)(int, const struct sockaddr *, socklen_t);
extern int (*real_connect)(int, const struct sockaddr *, socklen_t);
extern int (*real_listen)(int, int);
extern ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
extern ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
extern int (*real_sendmmsg)(int, struct mmsghdr *, unsigned int, int);
extern int (*real_getsockname)(int, struct sockaddr *, socklen_t *);
extern int (*real_getpeername)(int, struct sockaddr *, socklen_t *);
extern int (*real_setsockopt)(int, int, int, const void *, socklen_t);
extern int (*real_close)(int);
extern int (*real_dup)(int);
extern int (*real_dup2)(int, int);
extern int (*real_dup3)(int, int, int);
extern int (*real_fcntl)(int, int, ...);
extern int (*real_fcntl64)(int, int, ...);
extern int (*real_close_range)(unsigned int, unsigned int, int);
extern void (*real_closefrom)(int);
extern int (*real_getaddrinfo)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

extern int g_enabled;       /* GRAFT_SOCKET set and GRAFT != disable */
extern int g_transparent;   /* GRAFT_NAME_TRANSPARENT: getsockname reports the host's view */
extern int g_debug;         /* GRAFT_DEBUG: report every denial on stderr */
extern int g_trace;         /* GRAFT_TRACE: report every request on stderr, before it is sent */
extern int g_prefilter;     /* GRAFT_PREFILTER (default 1; 0: ask about every operation) */
extern int g_speculate;     /* GRAFT_SPECULATE (default 1; 0: socket() never takes a pooled socket) */
extern char *g_service;     /* $GRAFT_SOCKET */
extern char *g_tail_bind;   /* " in:PAIR ..." from GRAFT_CONV_PAIRS */
extern char *g_tail_connect; /* " out:RULE ... bbconn:NAME" from GRAFT_EGRESS, GRAFT_BBCONN */
extern pid_t g_pid;         /* getpid(), kept by env.c (init, fork child): no system call per use */

void graft_init(void);
#define ENSURE() graft_init()
void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* -- fdtable.c -------------------------------------------------------------------------------- */
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
	uint64_t optset;   /* the options of options.h the application set (bit i: graft_copied_options[i]) */
	int spec;          /* socket() gave a pooled host socket of egress row spec_row (generation
			    * spec_gen), not connected yet: a connect through that row runs on it as it is;
			    * anything else first swaps a socket of the container's in (st_unspeculate) */
	int spec_row;
	unsigned spec_gen;
	int duped;         /* dup()ed once: other entries may describe this socket (st_put_same) */
};

extern int g_have_table; /* an entry was ever made: close/dup must keep the table in step */
ino_t fd_ino(int fd);
int st_get(int fd, struct gs *out);
void st_put(int fd, const struct gs *in);
void st_del(int fd);
void st_copy(int from, int to);
void st_forget_range(unsigned int first, unsigned int last);
int st_fresh(int fd, struct gs *st);
/* fd's state, and its duplicates' (the entries of the same socket): a speculative socket used as it is */
void st_put_same(int fd, const struct gs *in);
void st_mark_decided(int fd);
int st_install(int fd, int newfd, struct gs *st);
/* the same, for a newfd whose inode the caller knows (a pooled socket) */
int st_install_ino(int fd, int newfd, ino_t newino, struct gs *st);
/* fd (a speculative socket: st->spec) becomes a fresh socket of the container's netns, with the
 * options the application set and its O_NONBLOCK, as socket() would have made it: 0, or -1 (errno) */
int st_unspeculate(int fd, struct gs *st);
void st_note_option(int fd, int level, int name);
void table_lock(void);
void table_unlock(void);

/* -- options.c -------------------------------------------------------------------------------- */
void copy_options(int from, int to, const struct gs *st);
int option_index(int level, int name);
enum { FL_REUSEADDR = 1, FL_REUSEPORT = 2, FL_V6ONLY = 4 };
unsigned socket_flags(int fd, int family);
int set_socket_flags(int fd, int family, unsigned flags);

/* -- service.c -------------------------------------------------------------------------------- */
enum { D_LOCAL, D_GRANT, D_ERR };
/* The requests of sockgraft.core.protocol, encoded into buf; the length, or -1 if it does not fit. */
int wire_bind(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto, unsigned flags);
int wire_connect(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto);
int wire_sendto(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto);
int wire_named(char *buf, size_t cap, const char *name, int family, int type, int proto, unsigned flags);
int wire_dial(char *buf, size_t cap, const char *name, int type, int proto);
int wire_resolve(char *buf, size_t cap, const char *name);
int wire_pool(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto, int count);
int wire_bindpool(char *buf, size_t cap, int family, const char *addr, int port, int type, int proto, unsigned flags,
		  int count);
int ask(const char *req, int *newfd, char *out, size_t outcap);
int ask_fds(const char *req, int *fds, int max, int *nfds, char *out, size_t outcap);
int decide(const char *head, char **tailp, const char *vars, int *newfd);
int decide_fds(const char *head, char **tailp, const char *vars, int *fds, int max, int *nfds, char *out,
	       size_t outcap);
void service_lock(void);
void service_unlock(void);
int service_dial(void); /* a new connection to the fd service: the fd, or -errno */
void reply_fds(struct msghdr *mh, int *fds, int max, int *nfds); /* a reply's fds; more than max are closed */
/* 0 when no rule of this process's policy can apply (prefilter.h: PF_BIND, PF_CONNECT, PF_SENDTO) */
int might_graft(int verb, int family, const char *addr, int port, int v6only);
int egress_row(const char *addr, unsigned *gen);
int table_gen(unsigned *gen);

/* -- pool.c ----------------------------------------------------------------------------------- */
enum { POOL_LOCAL = -1, POOL_OFF = -2, POOL_ERR = -3 };
/* a pooled host socket for a connect (>= 0: install it, then connect), or POOL_LOCAL (no rule:
 * the real call), POOL_OFF (no pool: ask `connect`), POOL_ERR (denied, errno set); *ino: its inode */
int pool_get(int family, const char *addr, int port, int type, int proto, ino_t *ino);
/* a pooled host socket, NOT bound, for a bind of (family, addr, port) with flags (>= 0: bind it to
 * *host, then install it; *row, *gen: its bind key's row, for pool_spec_used; *row -1: none), or
 * POOL_LOCAL, POOL_OFF (ask `bind`), POOL_ERR as pool_get */
int pool_bind(int family, const char *addr, int port, int type, int proto, unsigned flags,
	      struct sockaddr_storage *host, socklen_t *hostlen, ino_t *ino, int *row, unsigned *gen);
/* A bind of (family, addr, port) with flags on a speculative socket of bind row `row` (generation
 * gen): 0 and where to bind it (*host) when it is that row's bind, -1 otherwise (settle it). */
int pool_bind_spec(int family, const char *addr, int port, int type, int proto, unsigned flags, int row, unsigned gen,
		   struct sockaddr_storage *host, socklen_t *hostlen);
/* socket(): a pooled host socket for the connect or bind this process most likely makes next (its
 * last SPEC_STREAK connects, or binds, of this kind all took pooled sockets of one egress row, or of
 * one bind key: BIND_ROW, negative), or -1 (make a socket of the container's); *row, *gen: that row;
 * *ino: the socket's inode. Never waits, makes no fd: the application's fd number is taken first,
 * then pool_spec_refill collects and asks ahead (as a pooled connect does; its fds would otherwise
 * take the number socket() is to return). */
int pool_speculate(int family, int type, int proto, int *row, unsigned *gen, ino_t *ino);
void pool_spec_refill(int family, int type, int proto, int row, unsigned gen);
/* a connect (or bind) of this kind took a pooled socket of row/gen (a speculative one included): the
 * streak grows; pool_spec_reset: it did not (a connect or bind of the container's), the streak ends */
void pool_spec_used(int family, int type, int proto, int row, unsigned gen);
void pool_spec_reset(int family, int type, int proto);
void pool_lock(void);
void pool_unlock(void);
void prefilter_lock(void);
void prefilter_unlock(void);

#endif
