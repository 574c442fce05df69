/* Socket options: those the application set before its socket was grafted (seen by the
 * setsockopt wrapper of hooks.c) are copied onto the host socket; the flags a bind request carries
 * are read from the socket. The list is
 * options.h, written by `python3 -m sockgraft.core.tables --c-options` (core/tables.py:
 * COPIED_OPTIONS, the same list the Python modes copy; tests/core/test_tables.py keeps them equal). */
#include "internal.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>

#include "options.h"

#define N_OPTIONS (sizeof(graft_copied_options) / sizeof(*graft_copied_options))
_Static_assert(N_OPTIONS <= 64, "struct gs.optset has a bit per option");

/* An option of `level` applies to a host socket of family `dom` and type `type`. */
static int applies(int level, int dom, int app_family, int type)
{
	switch (level) {
	case SOL_SOCKET:
		return 1;
	case IPPROTO_TCP:
		return type == SOCK_STREAM && (dom == AF_INET || dom == AF_INET6);
	case IPPROTO_IP:
		return dom == AF_INET && app_family == AF_INET;
	case IPPROTO_IPV6:
		return dom == AF_INET6 && app_family == AF_INET6;
	}
	return 0;
}

int option_index(int level, int name)
{
	for (size_t i = 0; i < N_OPTIONS; i++)
		if (graft_copied_options[i].level == level && graft_copied_options[i].name == name)
			return (int)i;
	return -1;
}

/* Each option the application set on `from` (its setsockopt calls, st->optset) is read back and set
 * on `to`: nothing to read when it set none. Buffer sizes read back doubled (`halved`): set half.
 * Failures are ignored (best effort). */
void copy_options(int from, int to, const struct gs *st)
{
	if (!st->optset)
		return;
	int fam = st->family == AF_GRAFT ? AF_INET : st->family;
	int dom = 0;
	socklen_t l = sizeof(dom);
	getsockopt(to, SOL_SOCKET, SO_DOMAIN, &dom, &l);
	for (size_t i = 0; i < N_OPTIONS; i++) {
		const struct graft_opt *o = &graft_copied_options[i];
		if (!(st->optset & (1ULL << i)) || !applies(o->level, dom, fam, st->type))
			continue;
		char a[32];
		socklen_t la = (socklen_t)o->size;
		if (getsockopt(from, o->level, o->name, a, &la) != 0)
			continue;
		if (o->halved && la == sizeof(int)) {
			int v;
			memcpy(&v, a, sizeof(v));
			v /= 2;
			memcpy(a, &v, sizeof(v));
		}
		real_setsockopt(to, o->level, o->name, a, la);
	}
}

/* The bind flags set on fd, as socket_flags reads them (V6ONLY, of an IPv6 socket, set either way).
 * 0, or -1 (errno). */
int set_socket_flags(int fd, int family, unsigned flags)
{
	int one = 1, v6only = (flags & FL_V6ONLY) != 0;
	if (((flags & FL_REUSEADDR) && real_setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0) ||
	    ((flags & FL_REUSEPORT) && real_setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) ||
	    (family == AF_INET6 && real_setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only)) != 0))
		return -1;
	return 0;
}

unsigned socket_flags(int fd, int family)
{
	unsigned f = 0;
	int v = 0;
	socklen_t l = sizeof(v);
	if (getsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &v, &l) == 0 && v)
		f |= FL_REUSEADDR;
	l = sizeof(v);
	if (getsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &v, &l) == 0 && v)
		f |= FL_REUSEPORT;
	l = sizeof(v);
	if (family == AF_INET6 && getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v, &l) == 0 && v)
		f |= FL_V6ONLY;
	return f;
}
