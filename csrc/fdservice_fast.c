/* The fd service's `connect` requests at native speed (issue 11, lever 5): one call per readable
 * connection, made by sockgraft/modes/api/fast.py (ctypes) in place of Python's recvmsg.
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

/* -- the request: `connect FAMILY ADDR PORT TYPE PROTO[ RULES]` ----------------------------------- */
EXPORT int fs_parse(const char *data, size_t len, const struct fs_table *tables, int ntables, struct fs_req *req)
{
	static const char verb[] = "connect ";
	struct word w[5];
	if (len > FS_MAX_MESSAGE || len < sizeof(verb) - 1 || memcmp(data, verb, sizeof(verb) - 1) != 0)
		return -1;
	size_t i = sizeof(verb) - 1, tail = len;
	for (int k = 0; k < 5; k++) {
		size_t start = i;
		while (i < len && data[i] != ' ')
			i++;
		w[k] = (struct word){ data + start, i - start };
		if (k < 4) {
			if (i == len)
				return -1; /* fewer than 5 arguments */
			i++;
		}
	}
	tail = i; /* at the end, or at the space before the caller's rules */
	for (size_t j = 0; j < tail; j++)
		if ((unsigned char)data[j] >= 0x80)
			return -1; /* not ASCII */
	req->table = -1;
	for (int t = 0; t < ntables; t++) {
		if (tables[t].tail_len == len - tail && memcmp(tables[t].tail, data + tail, len - tail) == 0) {
			req->table = t;
			break;
		}
	}
	if (req->table < 0)
		return -1; /* no rules, or rules the Python side has not parsed yet */
	long family, port, type, proto;
	if (to_int(w[0], 0, 65535, &family) < 0 || (family != AF_INET && family != AF_INET6))
		return -1;
	memset(req->addr, 0, sizeof(req->addr));
	if (family == AF_INET ? parse_v4(w[1].p, w[1].n, req->addr) : parse_v6(w[1].p, w[1].n, req->addr))
		return -1;
	if (to_int(w[2], 0, 65535, &port) < 0 || to_int(w[3], 0, 15, &type) < 0 || to_int(w[4], 0, 65535, &proto) < 0)
		return -1;
	req->family = (int32_t)family;
	req->port = (int32_t)port;
	req->type = (int32_t)type;
	req->proto = (int32_t)proto;
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

/* FS_LK_*; a grant names the host socket's family and source address (bytes of that family). */
EXPORT int fs_lookup(const struct fs_table *t, const struct fs_req *req, int *row, int *family, uint8_t host[16],
		     int *host_port)
{
	if (req->family != AF_INET && req->family != AF_INET6)
		return FS_LK_ASK;
	if (!((req->type == SOCK_STREAM && (req->proto == 0 || req->proto == IPPROTO_TCP)) ||
	      (req->type == SOCK_DGRAM && (req->proto == 0 || req->proto == IPPROTO_UDP))))
		return FS_LK_ASK;
	uint8_t ip[16];
	int version;
	if (req->family == AF_INET) {
		version = 4;
		memcpy(ip, req->addr, 4);
	} else if (memcmp(req->addr, V4MAPPED, 12) == 0) {
		version = 4; /* engine._ip: a v4-mapped destination is an IPv4 destination */
		memcpy(ip, req->addr + 12, 4);
	} else {
		version = 6;
		memcpy(ip, req->addr, 16);
	}
	for (uint32_t i = 0; i < t->nrows; i++) {
		const struct fs_row *r = &t->rows[i];
		if (r->version != version || !in_net(ip, r->net, r->plen))
			continue;
		*row = (int)i;
		if (r->kind == 0 || (r->kind == 4) != (version == 4))
			return FS_LK_ASK;
		memset(host, 0, 16);
		*host_port = r->ep_port;
		if (req->family == (r->kind == 4 ? AF_INET : AF_INET6)) {
			*family = req->family;
			memcpy(host, r->ep_addr, r->kind == 4 ? 4 : 16);
			return FS_LK_GRANT;
		}
		if (req->family == AF_INET6 && r->kind == 4) {
			*family = AF_INET6;
			memcpy(host, V4MAPPED, 12);
			memcpy(host + 12, r->ep_addr, 4);
			return FS_LK_GRANT;
		}
		return FS_LK_ASK;
	}
	return FS_LK_LOCAL;
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

/* hostsock.open_connecting: NO_PORT bind of the source, non-blocking connect. -1 with errno. */
static int open_connecting(int family, const uint8_t *host, int host_port, const struct fs_req *req, uint32_t mark,
			   int *code)
{
	struct sockaddr_storage ss;
	int one = 1, zero = 0;
	int s = socket(family, req->type | SOCK_CLOEXEC | SOCK_NONBLOCK, req->proto);
	if (s < 0)
		return -1;
	if (setsockopt(s, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) < 0)
		goto fail;
	if (family == AF_INET6 && setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero)) < 0)
		goto fail;
	if (bind(s, (struct sockaddr *)&ss, sockaddr_of(family, host, host_port, &ss)) < 0)
		goto fail;
	if (mark && setsockopt(s, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) < 0) /* once bound: bindguard */
		goto fail;
	/* the destination as the request wrote it, in the socket's family (as connect_ex((addr, port))) */
	if (connect(s, (struct sockaddr *)&ss, sockaddr_of(req->family, req->addr, req->port, &ss)) == 0) {
		*code = 0;
		return s;
	}
	if (errno == EINPROGRESS) {
		*code = EINPROGRESS;
		return s;
	}
fail:;
	int e = errno;
	close(s);
	errno = e;
	return -1;
}

static int send_reply(int conn, const char *text, size_t n, int fd)
{
	struct iovec iov = { (void *)text, n };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} cm;
	if (fd >= 0) {
		memset(&cm, 0, sizeof(cm));
		mh.msg_control = cm.buf;
		mh.msg_controllen = sizeof(cm.buf);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	return sendmsg(conn, &mh, MSG_NOSIGNAL) < 0 ? -1 : 0;
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
EXPORT int fs_serve(int conn, int pidfd, uint64_t container_ino, uint32_t mark, const struct fs_table *tables,
		    int ntables, struct fs_out *out)
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
	int row = -1, family = 0, host_port = 0;
	uint8_t host[16];
	int lk = fs_lookup(&tables[req.table], &req, &row, &family, host, &host_port);
	if (lk == FS_LK_ASK)
		return handback(out, buf, (size_t)n);
	out->table = req.table;
	out->row = row;
	out->family = req.family;
	out->port = req.port;
	memcpy(out->addr, req.addr, 16);
	if (lk == FS_LK_LOCAL) {
		out->send_failed = send_reply(conn, "local", 5, -1) < 0;
		out->result = FS_LOCAL;
		return FS_LOCAL;
	}
	int code = 0;
	int s = open_connecting(family, host, host_port, &req, mark, &code);
	if (s < 0) {
		out->err = errno ? errno : EIO;
		out->result = FS_FAIL; /* the Python side replies `err` and audits the failure */
		return FS_FAIL;
	}
	struct sockaddr_storage ss;
	socklen_t sl = sizeof(ss);
	char text[128];
	if (getsockname(s, (struct sockaddr *)&ss, &sl) < 0) {
		out->err = errno;
		close(s);
		out->result = FS_FAIL;
		return FS_FAIL;
	}
	const void *a = family == AF_INET ? (void *)&((struct sockaddr_in *)&ss)->sin_addr
					  : (void *)&((struct sockaddr_in6 *)&ss)->sin6_addr;
	out->host_port = ntohs(family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
						 : ((struct sockaddr_in6 *)&ss)->sin6_port);
	inet_ntop(family, a, out->host, sizeof(out->host));
	int tn = snprintf(text, sizeof(text), "ok %d %s %d", family, out->host, out->host_port);
	out->send_failed = send_reply(conn, text, (size_t)tn, s) < 0;
	close(s);
	out->err = code;
	out->result = FS_GRANT;
	return FS_GRANT;
}
