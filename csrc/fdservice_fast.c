/* The fd service's `connect`, `pool`, `bind`, `named`, `bindpool` and `namedpool` requests at native speed (issue 11, lever 5):
 * one call per readable connection, made by sockgraft/modes/api/fast.py (ctypes) in place of
 * Python's recvmsg.
 *
 * It decides nothing of its own. It parses a request exactly as core/protocol.parse_request does
 * (the same words, numbers and addresses: ipaddress's rules, ported below), looks it up in a table
 * the Python engine compiled (engine.EgressTable, `lookup` ported below), and carries out what the
 * table says: "grant" -> the steps of host/hostsock.open_connecting and the reply of
 * protocol.Reply.encode with the fd; "local" -> `local`. Everything else - another verb, a caller
 * outside the container's netns, a malformed request, "ask" - is handed back with its bytes, and
 * the Python service answers it as it always did. tests/modes/api/test_fast.py holds the parser and
 * the lookup equal to the Python ones on random input, through the entry points of this library.
 *
 * Built by csrc/Makefile into libgraft-fdfast.so (no libc wrappers: it runs in the service). */
#define _GNU_SOURCE
#include "fdservice_fast.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <poll.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define PIDFD_GET_NET_NAMESPACE 0xFF04
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

static const uint8_t V4MAPPED[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

/* -- words and numbers, as protocol._int ---------------------------------------------------- */
struct word {
	const char *p;
	size_t n;
};

/* `word.isdigit() and len(word) <= 10 and lo <= int(word) <= hi` */
static int to_int(struct word w, long lo, long hi, long *out)
{
	if (w.n == 0 || w.n > 10)
		return -1;
	long v = 0;
	for (size_t i = 0; i < w.n; i++) {
		if (w.p[i] < '0' || w.p[i] > '9')
			return -1;
		v = v * 10 + (w.p[i] - '0');
	}
	if (v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

/* -- addresses, as ipaddress.IPv4Address / IPv6Address (Python 3.11) parse them ---------------- */
static int octet(const char *p, size_t n, uint8_t *out)
{
	if (n == 0 || n > 3)
		return -1;
	unsigned v = 0;
	for (size_t i = 0; i < n; i++) {
		if (p[i] < '0' || p[i] > '9')
			return -1;
		v = v * 10 + (unsigned)(p[i] - '0');
	}
	if (n > 1 && p[0] == '0')
		return -1; /* leading zeros are not permitted */
	if (v > 255)
		return -1;
	*out = (uint8_t)v;
	return 0;
}

static int parse_v4(const char *p, size_t n, uint8_t out[4])
{
	size_t start = 0;
	int k = 0;
	for (size_t i = 0; i <= n; i++) {
		if (i == n || p[i] == '.') {
			if (k == 4 || octet(p + start, i - start, &out[k]) < 0)
				return -1;
			k++;
			start = i + 1;
		}
	}
	return k == 4 ? 0 : -1;
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int hextet(struct word w, unsigned *out)
{
	if (w.n == 0 || w.n > 4)
		return -1; /* int('', 16) fails too */
	unsigned v = 0;
	for (size_t i = 0; i < w.n; i++) {
		int h = hexval(w.p[i]);
		if (h < 0)
			return -1;
		v = v * 16 + (unsigned)h;
	}
	*out = v;
	return 0;
}

/* IPv6Address._ip_int_from_string, step by step (a '%' is a scope: parse_ip refuses those) */
static int parse_v6(const char *p, size_t n, uint8_t out[16])
{
	struct word parts[11];
	unsigned hex[11];
	char v4text[2][5];
	size_t np = 0, start = 0;
	if (n == 0 || memchr(p, '%', n))
		return -1;
	for (size_t i = 0; i <= n; i++) {
		if (i == n || p[i] == ':') {
			if (np == 10)
				return -1; /* more than 9 parts stays more than 9 */
			parts[np++] = (struct word){ p + start, i - start };
			start = i + 1;
		}
	}
	if (np < 3)
		return -1;
	if (memchr(parts[np - 1].p, '.', parts[np - 1].n)) {
		uint8_t b[4];
		if (parse_v4(parts[np - 1].p, parts[np - 1].n, b) < 0)
			return -1;
		snprintf(v4text[0], sizeof(v4text[0]), "%x", (unsigned)(b[0] << 8 | b[1]));
		snprintf(v4text[1], sizeof(v4text[1]), "%x", (unsigned)(b[2] << 8 | b[3]));
		parts[np - 1] = (struct word){ v4text[0], strlen(v4text[0]) };
		parts[np++] = (struct word){ v4text[1], strlen(v4text[1]) };
	}
	if (np > 9)
		return -1;
	long skip = -1;
	for (size_t i = 1; i + 1 < np; i++) {
		if (parts[i].n == 0) {
			if (skip >= 0)
				return -1;
			skip = (long)i;
		}
	}
	long hi, lo, skipped;
	if (skip >= 0) {
		hi = skip;
		lo = (long)np - skip - 1;
		if (parts[0].n == 0 && --hi)
			return -1;
		if (parts[np - 1].n == 0 && --lo)
			return -1;
		skipped = 8 - (hi + lo);
		if (skipped < 1)
			return -1;
	} else {
		if (np != 8 || parts[0].n == 0 || parts[np - 1].n == 0)
			return -1;
		hi = (long)np;
		lo = 0;
		skipped = 0;
	}
	int k = 0;
	for (long i = 0; i < hi; i++)
		if (hextet(parts[i], &hex[k++]) < 0)
			return -1;
	for (long i = 0; i < skipped; i++)
		hex[k++] = 0;
	for (long i = (long)np - lo; i < (long)np; i++)
		if (hextet(parts[i], &hex[k++]) < 0)
			return -1;
	for (int i = 0; i < 8; i++) {
		out[2 * i] = (uint8_t)(hex[i] >> 8);
		out[2 * i + 1] = (uint8_t)hex[i];
	}
	return 0;
}

/* protocol._flags: `-`, or a comma list of reuseaddr, reuseport, v6only (repeats allowed) */
static int parse_flags(struct word w, int32_t *out)
{
	static const struct {
		const char *name;
		int32_t bit;
	} names[] = { { "reuseaddr", FS_FL_REUSEADDR }, { "reuseport", FS_FL_REUSEPORT }, { "v6only", FS_FL_V6ONLY } };
	*out = 0;
	if (w.n == 1 && w.p[0] == '-')
		return 0;
	size_t start = 0;
	for (size_t i = 0; i <= w.n; i++) {
		if (i < w.n && w.p[i] != ',')
			continue;
		size_t k, n = i - start;
		for (k = 0; k < 3; k++)
			if (strlen(names[k].name) == n && memcmp(names[k].name, w.p + start, n) == 0)
				break;
		if (k == 3)
			return -1;
		*out |= names[k].bit;
		start = i + 1;
	}
	return 0;
}

/* Split `n` words off data[i..len) at single spaces; the offset after the last one. -1: fewer. */
static long split_words(const char *data, size_t len, size_t i, struct word *w, int n)
{
	for (int k = 0; k < n; k++) {
		size_t start = i;
		while (i < len && data[i] != ' ')
			i++;
		w[k] = (struct word){ data + start, i - start };
		if (k < n - 1) {
			if (i == len)
				return -1; /* fewer arguments than the verb takes */
			i++;
		}
	}
	return (long)i;
}

/* `named NAME FAMILY TYPE PROTO FLAGS` or `namedpool NAME FAMILY TYPE PROTO N` (`skip`: the verb's
 * length with its space), as parse_request reads them (a destination after `named`: -1, Python
 * answers); NAME must be the tail of a named table (an endpoint of the container: a valid name). */
static int parse_named(const char *data, size_t len, size_t skip, int verb, const struct fs_table *tables, int ntables,
		       struct fs_req *req)
{
	struct word w[5];
	long end = split_words(data, len, skip, w, 5);
	if (end < 0 || (size_t)end != len)
		return -1;
	for (size_t j = 0; j < len; j++)
		if ((unsigned char)data[j] >= 0x80)
			return -1; /* not ASCII */
	req->table = -1;
	for (int t = 0; t < ntables; t++) {
		if ((tables[t].verbs & FS_FOR_NAMED) && tables[t].tail_len == w[0].n &&
		    memcmp(tables[t].tail, w[0].p, w[0].n) == 0) {
			req->table = t;
			break;
		}
	}
	if (req->table < 0)
		return -1; /* no such endpoint: Python says so */
	long family, type, proto;
	if (to_int(w[1], 0, 65535, &family) < 0 ||
	    (family != 0 && family != AF_UNIX && family != AF_INET && family != AF_INET6))
		return -1;
	long count = 0;
	req->flags = 0;
	if (to_int(w[2], 0, 15, &type) < 0 || to_int(w[3], 0, 65535, &proto) < 0 ||
	    (verb == FS_NAMED ? parse_flags(w[4], &req->flags) : to_int(w[4], 1, FS_MAX_POOL, &count)) < 0)
		return -1;
	req->verb = verb;
	req->family = (int32_t)family;
	req->type = (int32_t)type;
	req->proto = (int32_t)proto;
	req->port = 0;
	req->count = (int32_t)count;
	memset(req->addr, 0, sizeof(req->addr));
	return 0;
}

/* -- the request: `connect FAMILY ADDR PORT TYPE PROTO[ RULES]`, `pool ... PROTO N[ RULES]`,
 *    `bind FAMILY ADDR PORT TYPE PROTO FLAGS[ RULES]`, `bindpool ... FLAGS N[ RULES]` ------------- */
static int starts(const char *data, size_t len, const char *verb)
{
	size_t n = strlen(verb);
	return len >= n && memcmp(data, verb, n) == 0;
}

EXPORT int fs_parse(const char *data, size_t len, const struct fs_table *tables, int ntables, struct fs_req *req)
{
	static const struct {
		const char *verb; /* with its space */
		int id, nargs;
	} verbs[] = { { "connect ", FS_CONNECT, 5 }, { "pool ", FS_POOL, 6 }, { "bind ", FS_BIND, 6 },
		      { "bindpool ", FS_BINDPOOL, 7 } };
	struct word w[7];
	size_t i = 0;
	int nargs = 0;
	if (len > FS_MAX_MESSAGE)
		return -1;
	if (starts(data, len, "named "))
		return parse_named(data, len, sizeof("named ") - 1, FS_NAMED, tables, ntables, req);
	if (starts(data, len, "namedpool "))
		return parse_named(data, len, sizeof("namedpool ") - 1, FS_NAMEDPOOL, tables, ntables, req);
	req->verb = -1;
	for (size_t k = 0; k < sizeof(verbs) / sizeof(*verbs); k++) {
		if (starts(data, len, verbs[k].verb)) {
			req->verb = verbs[k].id;
			i = strlen(verbs[k].verb);
			nargs = verbs[k].nargs;
		}
	}
	if (req->verb < 0)
		return -1;
	int binds = req->verb == FS_BIND || req->verb == FS_BINDPOOL;
	long end = split_words(data, len, i, w, nargs);
	if (end < 0)
		return -1;
	size_t tail = (size_t)end; /* at the end, or at the space before the caller's rules */
	for (size_t j = 0; j < tail; j++)
		if ((unsigned char)data[j] >= 0x80)
			return -1; /* not ASCII */
	req->table = -1;
	uint32_t want = binds ? FS_FOR_BIND : FS_FOR_EGRESS;
	for (int t = 0; t < ntables; t++) {
		if ((tables[t].verbs & want) && tables[t].tail_len == len - tail &&
		    memcmp(tables[t].tail, data + tail, len - tail) == 0) {
			req->table = t;
			break;
		}
	}
	if (req->table < 0)
		return -1; /* no rules, or rules the Python side has not parsed yet */
	long family, port, type, proto, count = 0;
	if (to_int(w[0], 0, 65535, &family) < 0 || (family != AF_INET && family != AF_INET6))
		return -1;
	memset(req->addr, 0, sizeof(req->addr));
	if (family == AF_INET ? parse_v4(w[1].p, w[1].n, req->addr) : parse_v6(w[1].p, w[1].n, req->addr))
		return -1;
	if (to_int(w[2], 0, 65535, &port) < 0 || to_int(w[3], 0, 15, &type) < 0 || to_int(w[4], 0, 65535, &proto) < 0)
		return -1;
	if ((req->verb == FS_POOL || req->verb == FS_BINDPOOL) && to_int(w[nargs - 1], 1, FS_MAX_POOL, &count) < 0)
		return -1;
	req->flags = 0;
	if (binds && parse_flags(w[5], &req->flags) < 0)
		return -1;
	req->family = (int32_t)family;
	req->port = (int32_t)port;
	req->type = (int32_t)type;
	req->proto = (int32_t)proto;
	req->count = (int32_t)count;
	return 0;
}

/* -- engine.EgressTable.lookup --------------------------------------------------------------- */
static int in_net(const uint8_t *ip, const uint8_t *net, int plen)
{
	int full = plen / 8, rest = plen % 8;
	if (memcmp(ip, net, (size_t)full) != 0)
		return 0;
	if (rest == 0)
		return 1;
	uint8_t mask = (uint8_t)(0xff << (8 - rest));
	return (ip[full] & mask) == (net[full] & mask);
}

/* engine.IP_TYPES / IP_PROTOS: the socket types the engine grafts (others: "ask") */
static int ip_type(const struct fs_req *req)
{
	return (req->type == SOCK_STREAM && (req->proto == 0 || req->proto == IPPROTO_TCP)) ||
	       (req->type == SOCK_DGRAM && (req->proto == 0 || req->proto == IPPROTO_UDP));
}

/* engine._ip: the request's address as the engine matches it (a v4-mapped one is IPv4); its version */
static int match_ip(const struct fs_req *req, uint8_t ip[16])
{
	if (req->family == AF_INET) {
		memcpy(ip, req->addr, 4);
		return 4;
	}
	if (memcmp(req->addr, V4MAPPED, 12) == 0) {
		memcpy(ip, req->addr + 12, 4);
		return 4;
	}
	memcpy(ip, req->addr, 16);
	return 6;
}

/* engine._host_for: the host socket of a grant onto an endpoint of `kind` (4, 6; 0: "ask") for a
 * socket of the request's family: its family and address (v4-mapped for an IPv6 socket on ipv4). */
static int grant_host(const struct fs_req *req, int kind, const uint8_t *ep_addr, int ep_port, int *family,
		      uint8_t host[16], int *host_port)
{
	if (kind == 0)
		return FS_LK_ASK;
	memset(host, 0, 16);
	*host_port = ep_port;
	if (req->family == (kind == 4 ? AF_INET : AF_INET6)) {
		*family = req->family;
		memcpy(host, ep_addr, kind == 4 ? 4 : 16);
		return FS_LK_GRANT;
	}
	if (req->family == AF_INET6 && kind == 4) {
		*family = AF_INET6;
		memcpy(host, V4MAPPED, 12);
		memcpy(host + 12, ep_addr, 4);
		return FS_LK_GRANT;
	}
	return FS_LK_ASK;
}

/* FS_LK_*; a grant names the host socket's family and source address (bytes of that family). */
EXPORT int fs_lookup(const struct fs_table *t, const struct fs_req *req, int *row, int *family, uint8_t host[16],
		     int *host_port)
{
	if ((req->family != AF_INET && req->family != AF_INET6) || !ip_type(req))
		return FS_LK_ASK;
	uint8_t ip[16];
	int version = match_ip(req, ip);
	for (uint32_t i = 0; i < t->nrows; i++) {
		const struct fs_row *r = &t->rows[i];
		if (r->version != version || !in_net(ip, r->net, r->plen))
			continue;
		*row = (int)i;
		if ((r->kind == 4) != (version == 4))
			return FS_LK_ASK;
		return grant_host(req, r->kind, r->ep_addr, r->ep_port, family, host, host_port);
	}
	return FS_LK_LOCAL;
}

/* -- engine.IngressTable.lookup -------------------------------------------------------------- */
static int unspecified(const uint8_t *a, int n)
{
	for (int i = 0; i < n; i++)
		if (a[i])
			return 0;
	return 1;
}

EXPORT int fs_lookup_bind(const struct fs_table *t, const struct fs_req *req, int *row, int *family,
			  uint8_t host[16], int *host_port, int *dual)
{
	if ((req->family != AF_INET && req->family != AF_INET6) || !ip_type(req))
		return FS_LK_ASK;
	uint8_t ip[16];
	int version = match_ip(req, ip);
	/* engine._dual_stack: `[::]:P` with V6ONLY off listens on every IPv4 address too */
	int is_dual = req->family == AF_INET6 && !(req->flags & FS_FL_V6ONLY) && version == 6 && unspecified(ip, 16);
	for (uint32_t i = 0; i < t->nin; i++) {
		const struct fs_in_row *r = &t->in_rows[i];
		if (req->port < r->port_lo || req->port > r->port_hi)
			continue;
		int n = r->version == 4 ? 4 : 16;
		if (!((r->version == version && (r->wildcard || memcmp(r->addr, ip, (size_t)n) == 0)) ||
		      (is_dual && r->version == 4)))
			continue;
		*row = (int)i;
		*dual = is_dual && r->version == 4;
		return grant_host(req, r->kind, r->ep_addr, r->ep_port, family, host, host_port);
	}
	return FS_LK_LOCAL;
}

/* -- engine.Policy._by_name, for the endpoint of a named table -------------------------------- */
EXPORT int fs_lookup_named(const struct fs_table *t, const struct fs_req *req, int *row, int *family,
			   uint8_t host[16], int *host_port)
{
	if (t->nin != 1 || !ip_type(req))
		return FS_LK_ASK; /* engine._check_type denies these (or a unix endpoint's): Python */
	const struct fs_in_row *r = &t->in_rows[0];
	struct fs_req as = *req;
	if (as.family == 0) /* the endpoint's own family */
		as.family = r->kind == 4 ? AF_INET : AF_INET6;
	*row = 0;
	return grant_host(&as, r->kind, r->ep_addr, r->ep_port, family, host, host_port);
}

/* -- carrying it out ------------------------------------------------------------------------- */
static socklen_t sockaddr_of(int family, const uint8_t *addr, int port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (family == AF_INET) {
		struct sockaddr_in *sin = (struct sockaddr_in *)ss;
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)port);
		memcpy(&sin->sin_addr, addr, 4);
		return sizeof(*sin);
	}
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
	sin6->sin6_family = AF_INET6;
	sin6->sin6_port = htons((uint16_t)port);
	memcpy(&sin6->sin6_addr, addr, 16);
	return sizeof(*sin6);
}

/* The end of a failed socket setup: close it, keep the errno of the step that failed. */
static int close_failed(int s)
{
	int e = errno;
	close(s);
	errno = e;
	return -1;
}

/* hostsock._source_bound: NO_PORT, dual-stack for IPv6, the source bound, then marked (mark 0: not). */
static int source_bound(int family, int type, const uint8_t *host, int host_port, int proto, uint32_t mark)
{
	struct sockaddr_storage ss;
	int one = 1, zero = 0;
	int s = socket(family, type | SOCK_CLOEXEC, proto);
	if (s < 0)
		return -1;
	if (setsockopt(s, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) < 0 ||
	    (family == AF_INET6 && setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) < 0) ||
	    bind(s, (struct sockaddr *)&ss, sockaddr_of(family, host, host_port, &ss)) < 0 ||
	    (mark && setsockopt(s, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0)) /* once bound: bindguard */
		return close_failed(s);
	return s;
}

/* hostsock.open_connecting: NO_PORT bind of the source, non-blocking connect. -1 with errno. */
static int open_connecting(int family, const uint8_t *host, int host_port, const struct fs_req *req, uint32_t mark,
			   int *code)
{
	struct sockaddr_storage ss;
	int s = source_bound(family, req->type | SOCK_NONBLOCK, host, host_port, req->proto, mark);
	if (s < 0)
		return -1;
	/* the destination as the request wrote it, in the socket's family (as connect_ex((addr, port))) */
	if (connect(s, (struct sockaddr *)&ss, sockaddr_of(req->family, req->addr, req->port, &ss)) == 0) {
		*code = 0;
		return s;
	}
	if (errno == EINPROGRESS) {
		*code = EINPROGRESS;
		return s;
	}
	return close_failed(s);
}

/* hostsock.open_bound: the options the request names, then bound (a port is always allocated at
 * bind, never NO_PORT), then marked. -1 with errno. */
static int open_bound(int family, const uint8_t *host, int host_port, const struct fs_req *req, uint32_t mark)
{
	struct sockaddr_storage ss;
	int one = 1;
	int v6only = (req->flags & FS_FL_V6ONLY) && memcmp(host, V4MAPPED, 12) != 0;
	int s = socket(family, req->type | SOCK_CLOEXEC, req->proto);
	if (s < 0)
		return -1;
	if (((req->flags & FS_FL_REUSEADDR) && setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0) ||
	    ((req->flags & FS_FL_REUSEPORT) && setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) < 0) ||
	    (family == AF_INET6 && setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only)) < 0) ||
	    bind(s, (struct sockaddr *)&ss, sockaddr_of(family, host, host_port, &ss)) < 0 ||
	    (mark && setsockopt(s, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0))
		return close_failed(s);
	return s;
}

static int send_reply(int conn, const char *text, size_t n, const int *fds, int nfds)
{
	struct iovec iov = { (void *)text, n };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(FS_MAX_POOL * sizeof(int))];
	} cm;
	if (nfds > 0) {
		memset(&cm, 0, sizeof(cm));
		mh.msg_control = cm.buf;
		mh.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
		memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
	}
	return sendmsg(conn, &mh, MSG_NOSIGNAL) < 0 ? -1 : 0;
}

/* hostsock.open_unbound: NOT bound, marked UNBOUND_TAG | n so that the bind guard lets it bind only
 * to an endpoint of container n (host/bindguard.py); dual-stack for a v4-mapped address. */
static int unbound(int family, int type, int proto, const uint8_t *host, uint32_t mark)
{
	int zero = 0;
	uint32_t umark = FS_UNBOUND_TAG | (mark & FS_MARK_MAX);
	int s = socket(family, type | SOCK_CLOEXEC, proto);
	if (s < 0)
		return -1;
	if ((family == AF_INET6 && memcmp(host, V4MAPPED, 12) == 0 &&
	     setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) < 0) ||
	    setsockopt(s, SOL_SOCKET, SO_MARK, &umark, sizeof(umark)) < 0)
		return close_failed(s);
	return s;
}

/* The reply of a grant: "ok FAMILY ADDR PORT" (`a`: the address, of `family`), sent with the sockets. */
static void reply_at(int conn, int family, const void *a, int port, const int *fds, int nfds, struct fs_out *out)
{
	char text[128];
	out->host_port = port;
	inet_ntop(family, a, out->host, sizeof(out->host));
	int tn = snprintf(text, sizeof(text), "ok %d %s %d", family, out->host, out->host_port);
	out->send_failed = send_reply(conn, text, (size_t)tn, fds, nfds) < 0;
}

/* The reply of a grant, from the first socket's address. */
static int reply_grant(int conn, int family, const int *fds, int nfds, struct fs_out *out)
{
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	if (getsockname(fds[0], (struct sockaddr *)&ss, &sl) < 0)
		return -1;
	if (family == AF_INET)
		reply_at(conn, family, &((struct sockaddr_in *)&ss)->sin_addr, ntohs(((struct sockaddr_in *)&ss)->sin_port),
			 fds, nfds, out);
	else
		reply_at(conn, family, &((struct sockaddr_in6 *)&ss)->sin6_addr,
			 ntohs(((struct sockaddr_in6 *)&ss)->sin6_port), fds, nfds, out);
	return 0;
}

static int handback(struct fs_out *out, const char *buf, size_t n)
{
	memcpy(out->data, buf, n);
	out->len = (uint32_t)n;
	out->result = FS_HANDBACK;
	return FS_HANDBACK;
}

EXPORT int fs_abi(void) { return FS_ABI; }

/* One request of a readable connection. FS_DROP with out->err 0 and len 0 after EAGAIN means
 * "nothing to read" (out->result is then -1): see fast.py. */
EXPORT int fs_serve(int conn, int pidfd, uint64_t container_ino, uint32_t mark, uint32_t flags,
		    const struct fs_table *tables, int ntables, struct fs_out *out)
{
	char buf[FS_MAX_MESSAGE + 1];
	union {
		struct cmsghdr h;
		char b[CMSG_SPACE(16 * sizeof(int))];
	} cm;
	struct iovec iov = { buf, sizeof(buf) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b, .msg_controllen = sizeof(cm.b) };
	out->ino_ok = out->trunc = out->send_failed = 0;
	out->err = 0;
	out->len = 0;
	out->table = out->row = -1;
	ssize_t n = recvmsg(conn, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	if (n < 0) {
		out->result = (errno == EAGAIN || errno == EINTR) ? -1 : FS_DROP;
		return out->result;
	}
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) { /* nobody sends us fds */
			size_t k = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
			for (size_t j = 0; j < k; j++) {
				int fd;
				memcpy(&fd, CMSG_DATA(c) + j * sizeof(int), sizeof(int));
				close(fd);
			}
		}
	}
	if (n == 0) {
		out->result = FS_DROP;
		return FS_DROP;
	}
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) {
		out->trunc = 1;
		return handback(out, buf, (size_t)n > FS_MAX_MESSAGE ? FS_MAX_MESSAGE : (size_t)n);
	}
	if (pidfd >= 0) { /* the caller's netns now, not when it connected */
		int ns = ioctl(pidfd, PIDFD_GET_NET_NAMESPACE, 0);
		struct stat st;
		if (ns >= 0) {
			if (fstat(ns, &st) == 0) {
				out->ino = st.st_ino;
				out->ino_ok = 1;
			}
			close(ns);
		}
	}
	struct fs_req req;
	if (!out->ino_ok || out->ino != container_ino || fs_parse(buf, (size_t)n, tables, ntables, &req) < 0)
		return handback(out, buf, (size_t)n);
	int row = -1, family = 0, host_port = 0, dual = 0;
	uint8_t host[16];
	int binds = req.verb == FS_BIND || req.verb == FS_BINDPOOL, named = req.verb == FS_NAMED || req.verb == FS_NAMEDPOOL;
	int unbound_pool = req.verb == FS_BINDPOOL || req.verb == FS_NAMEDPOOL;
	int lk = binds	 ? fs_lookup_bind(&tables[req.table], &req, &row, &family, host, &host_port, &dual)
		 : named ? fs_lookup_named(&tables[req.table], &req, &row, &family, host, &host_port)
			 : fs_lookup(&tables[req.table], &req, &row, &family, host, &host_port);
	if (lk == FS_LK_ASK)
		return handback(out, buf, (size_t)n);
	/* a pool is handed over unconnected only where the kernel guards it (egress.pools_off, passed
	 * as FS_POOLS) and only for a marked socket of a dynamic IP endpoint (hostsock.open_pooled);
	 * unbound only where the guard's map holds the container's endpoints too (FS_UNBOUND_POOLS):
	 * anything else is Python's to answer (EOPNOTSUPP) */
	if (req.verb == FS_POOL && lk == FS_LK_GRANT && (!(flags & FS_POOLS) || !mark || host_port != 0))
		return handback(out, buf, (size_t)n);
	if (unbound_pool && lk == FS_LK_GRANT && (!(flags & FS_UNBOUND_POOLS) || !mark))
		return handback(out, buf, (size_t)n);
	out->verb = req.verb;
	out->count = 0;
	out->dual = dual;
	out->table = req.table;
	out->row = row;
	out->family = req.family;
	out->port = req.port;
	memcpy(out->addr, req.addr, 16);
	if (lk == FS_LK_LOCAL) {
		out->send_failed = send_reply(conn, "local", 5, NULL, 0) < 0;
		out->result = FS_LOCAL;
		return FS_LOCAL;
	}
	if (req.verb == FS_POOL || unbound_pool) {
		int fds[FS_MAX_POOL], k;
		for (k = 0; k < req.count; k++) {
			fds[k] = unbound_pool ? unbound(family, req.type, req.proto, host, mark)
					      : source_bound(family, req.type, host, 0, req.proto, mark); /* hostsock.pooled */
			if (fds[k] < 0)
				break;
		}
		int e = errno;
		if (k == req.count && unbound_pool) /* the address to bind them to: the endpoint's */
			reply_at(conn, family, host, host_port, fds, k, out);
		if (k < req.count || (!unbound_pool && reply_grant(conn, family, fds, k, out) < 0)) {
			e = k < req.count ? e : errno;
			for (int j = 0; j < k; j++)
				close(fds[j]);
			out->err = e ? e : EIO;
			out->result = FS_FAIL; /* the Python side replies `err` (a pool failure is not audited) */
			return FS_FAIL;
		}
		for (int j = 0; j < k; j++)
			close(fds[j]);
		out->count = k;
		out->result = FS_GRANT;
		return FS_GRANT;
	}
	int code = 0;
	int s = binds || named ? open_bound(family, host, host_port, &req, mark)
			       : open_connecting(family, host, host_port, &req, mark, &code);
	if (s < 0) {
		out->err = errno ? errno : EIO;
		out->result = FS_FAIL; /* the Python side replies `err` and audits the failure */
		return FS_FAIL;
	}
	if (reply_grant(conn, family, &s, 1, out) < 0) {
		out->err = errno;
		close(s);
		out->result = FS_FAIL;
		return FS_FAIL;
	}
	close(s);
	out->err = code;
	out->result = FS_GRANT;
	return FS_GRANT;
}

/* -- back-to-back requests ------------------------------------------------------------------ */
static long long mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A request is waiting on conn, or arrives within spin_ns (polled without sleeping: a caller that
 * asks again at once finds the service awake, no wake-up of a halted vCPU, no Python in between).
 * Each empty poll yields the CPU: the caller's send woke the service with the sync hint, which puts
 * it on the caller's vCPU, so the caller is often runnable on this very CPU, and a spin that did not
 * yield would keep it from sending the request the spin waits for (a Python API client's loop of
 * binds: 157 -> 77 us/op, docs/PRELOAD.md). */
static int next_request(int conn, long long spin_ns)
{
	struct pollfd p = { .fd = conn, .events = POLLIN };
	long long end = mono_ns() + spin_ns;
	do {
		int r = poll(&p, 1, 0);
		if (r > 0)
			return 1;
		if (r < 0 && errno != EINTR)
			return 0;
		sched_yield();
	} while (mono_ns() < end);
	return 0;
}

/* fs_serve, then while it granted or answered `local` (nothing for Python to reply), the next
 * request of the same connection if one comes within spin_us, at most max requests and budget_us in
 * all: the answers go to outs[0..n), n returned; only outs[n-1] can be anything else (a handback, a
 * failure, a drop, nothing). Python audits every one of them, in order, as it does one. */
EXPORT int fs_serve_batch(int conn, int pidfd, uint64_t container_ino, uint32_t mark, uint32_t flags,
			  const struct fs_table *tables, int ntables, struct fs_out *outs, int max, int spin_us,
			  int budget_us)
{
	long long end = mono_ns() + (long long)budget_us * 1000;
	int n = 0;
	for (;;) {
		int r = fs_serve(conn, pidfd, container_ino, mark, flags, tables, ntables, &outs[n]);
		n++;
		if ((r != FS_GRANT && r != FS_LOCAL) || outs[n - 1].send_failed || n >= max || spin_us <= 0)
			return n;
		if (mono_ns() >= end || !next_request(conn, (long long)spin_us * 1000))
			return n;
	}
}
