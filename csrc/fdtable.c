/* Per-fd state, and installing a granted host socket in place of the application's fd.
 *
 * The table grows with the highest fd seen (no fixed size) and is guarded by a mutex, kept
 * consistent across fork by the pthread_atfork handlers of env.c. Each entry records the socket's
 * inode, so an entry left behind by a close this library did not see is recognised as stale. */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct gs **tab;
static size_t tab_cap;
int g_have_table;

void table_lock(void) { pthread_mutex_lock(&lock); }
void table_unlock(void) { pthread_mutex_unlock(&lock); }

ino_t fd_ino(int fd)
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
		__atomic_store_n(&g_have_table, 1, __ATOMIC_RELEASE);
	}
	return &tab[fd];
}

int st_get(int fd, struct gs *out)
{
	int found = 0;
	table_lock();
	struct gs **s = slot(fd, 0);
	if (s && *s) {
		*out = **s;
		found = 1;
	}
	table_unlock();
	return found;
}

static void put_locked(int fd, const struct gs *in)
{
	struct gs **s = slot(fd, 1);
	if (s) {
		if (!*s)
			*s = malloc(sizeof(**s));
		if (*s)
			**s = *in;
	}
}

void st_put(int fd, const struct gs *in)
{
	table_lock();
	put_locked(fd, in);
	table_unlock();
}

static void del_locked(int fd)
{
	struct gs **s = slot(fd, 0);
	if (s && *s) {
		free(*s);
		*s = NULL;
	}
}

void st_del(int fd)
{
	table_lock();
	del_locked(fd);
	table_unlock();
}

/* fd `to` now refers to what `from` refers to. */
void st_copy(int from, int to)
{
	if (from == to)
		return;
	table_lock();
	struct gs **f = slot(from, 0);
	if (f && *f) {
		(*f)->duped = 1;
		struct gs copy = **f;
		put_locked(to, &copy);
	} else {
		del_locked(to);
	}
	table_unlock();
}

void st_forget_range(unsigned int first, unsigned int last)
{
	table_lock();
	for (size_t i = first; i < tab_cap && i <= last; i++)
		del_locked((int)i);
	table_unlock();
}

/* The state of a socket on which bind/connect must still be decided. */
int st_fresh(int fd, struct gs *st)
{
	if (!g_enabled || !st_get(fd, st) || st->decided)
		return 0;
	if (fd_ino(fd) != st->ino) { /* closed behind our back and reused */
		st_del(fd);
		return 0;
	}
	return 1;
}

/* setsockopt succeeded on fd: remember an option copy_options carries over at a grant */
void st_note_option(int fd, int level, int name)
{
	int i = option_index(level, name);
	if (i < 0)
		return;
	table_lock();
	struct gs **s = slot(fd, 0);
	if (s && *s && (!(*s)->grafted || (*s)->spec)) /* a speculative socket may be swapped back */
		(*s)->optset |= 1ULL << i;
	table_unlock();
}

void st_put_same(int fd, const struct gs *in)
{
	table_lock();
	put_locked(fd, in);
	for (size_t i = 0; in->duped && i < tab_cap; i++) {
		struct gs *e = tab[i];
		if (e && (int)i != fd && e->ino == in->ino && fd_ino((int)i) == in->ino)
			*e = *in;
	}
	table_unlock();
}

void st_mark_decided(int fd)
{
	table_lock();
	struct gs **s = slot(fd, 0);
	if (s && *s)
		(*s)->decided = 1;
	table_unlock();
}

static int install(int fd, int newfd, ino_t newino, struct gs *st);

/* Replace the application's fd (and its duplicates in this process) by host socket newfd, with
 * the options the application set and its O_NONBLOCK; update the state. newfd is consumed. */
int st_install(int fd, int newfd, struct gs *st)
{
	return st_install_ino(fd, newfd, 0, st);
}

/* newino: newfd's inode when the caller knows it (0: asked here). */
int st_install_ino(int fd, int newfd, ino_t newino, struct gs *st)
{
	st->grafted = 1;
	st->decided = 1;
	st->spec = 0;
	return install(fd, newfd, newino, st);
}

int st_unspeculate(int fd, struct gs *st)
{
	int c = real_socket(st->family, st->type | SOCK_CLOEXEC, st->proto); /* never AF_GRAFT: see hooks.c socket() */
	if (c < 0)
		return -1;
	/* the bind flags the program set on the speculative socket, which copy_options leaves to a
	 * grant's request flags: a bind of the container's socket has them too */
	set_socket_flags(c, st->family, socket_flags(fd, st->family));
	st->grafted = 0;
	st->decided = 0;
	st->spec = 0;
	return install(fd, c, 0, st);
}

/* fd and its duplicates in this process now hold newfd's socket (consumed), with st (the flags
 * grafted, decided and spec the caller's): the options the application set and its O_NONBLOCK
 * carried over. */
static int install(int fd, int newfd, ino_t newino, struct gs *st)
{
	int fl = real_fcntl(fd, F_GETFL);
	copy_options(fd, newfd, st);
	/* The service's sockets carry no status flag but O_NONBLOCK (never O_APPEND, O_ASYNC, O_DIRECT
	 * or O_NOATIME), so newfd's flags become the application's O_NONBLOCK without reading them. */
	real_fcntl(newfd, F_SETFL, fl >= 0 ? (fl & O_NONBLOCK) : 0);
	ino_t old = st->ino, ino = newino ? newino : fd_ino(newfd);
	int rc = 0;
	table_lock();
	if (fd_ino(fd) != old) { /* the application closed or replaced fd meanwhile */
		rc = EBADF;
	} else {
		st->ino = ino;
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
	table_unlock();
	real_close(newfd);
	if (rc) {
		errno = rc;
		return -1;
	}
	return 0;
}
