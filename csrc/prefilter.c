/* The prefilter: "might a rule apply to this operation?", in C, from the flat lines of
 * sockgraft.core.engine.Prefilter (the fd service answers them to a `prefilter` request). It is
 * `Prefilter.might_graft` rewritten, and nothing more: a superset of what the engine grants, so
 * that an operation it rejects can stay local without a round trip; every operation it accepts
 * is still decided by the service. tests/modes/preload/test_prefilter.py compiles this file with
 * a driver and requires the same answers as the Python method on random tables and operations.
 *
 * Pure code: no libc wrappers, no state (service.c keeps the cached table of the process). */
#include "prefilter.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

static const unsigned char V4MAPPED[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

/* An address as engine._ip sees it: a v4-mapped IPv6 address is the IPv4 address. */
static int parse_ip(const char *text, struct pf_ip *ip, int *written_version)
{
	unsigned char b[16];
	memset(ip, 0, sizeof(*ip));
	if (inet_pton(AF_INET, text, b) == 1) {
		ip->version = 4;
		memcpy(ip->b, b, 4);
	} else if (inet_pton(AF_INET6, text, b) == 1) {
		ip->version = 6;
		memcpy(ip->b, b, 16);
	} else {
		return -1;
	}
	if (written_version)
		*written_version = ip->version;
	if (ip->version == 6 && memcmp(ip->b, V4MAPPED, 12) == 0) {
		ip->version = 4;
		memmove(ip->b, ip->b + 12, 4);
		memset(ip->b + 4, 0, 12);
	}
	return 0;
}

static int ip_eq(const struct pf_ip *a, const struct pf_ip *b)
{
	return a->version == b->version && memcmp(a->b, b->b, a->version == 4 ? 4 : 16) == 0;
}

static int in_prefix(const unsigned char *ip, const unsigned char *net, int plen)
{
	int whole = plen / 8, rest = plen % 8;
	if (memcmp(ip, net, (size_t)whole) != 0)
		return 0;
	if (!rest)
		return 1;
	unsigned char mask = (unsigned char)(0xff << (8 - rest));
	return (ip[whole] & mask) == (net[whole] & mask);
}

void pf_free(struct pf *pf)
{
	free(pf->binds);
	free(pf->egress);
	memset(pf, 0, sizeof(*pf));
}

/* Lines `bind V ADDR LO HI`, `egress V NET PLEN` and `version DIGEST`, separated by '\n'; 0, or -1 on anything else
 * (a table the library cannot read is not used: every operation is then asked about). */
int pf_parse(const char *text, struct pf *out)
{
	memset(out, 0, sizeof(*out));
	size_t cap = 1;
	for (const char *p = text; *p; p++)
		cap += *p == '\n';
	out->binds = calloc(cap, sizeof(*out->binds));
	out->egress = calloc(cap, sizeof(*out->egress));
	if (!out->binds || !out->egress)
		goto bad;
	const char *line = text;
	while (*line) {
		const char *end = strchr(line, '\n');
		size_t n = end ? (size_t)(end - line) : strlen(line);
		char buf[160], addr[64], extra[2];
		int v, a, b;
		if (n >= sizeof(buf))
			goto bad;
		memcpy(buf, line, n);
		buf[n] = 0;
		if (sscanf(buf, "bind %d %63s %d %d %1s", &v, addr, &a, &b, extra) == 4) {
			struct pf_bind *r = &out->binds[out->nbinds];
			int written;
			if (parse_ip(addr, &r->ip, &written) != 0 || written != v || a < 0 || b > 65535 || a > b)
				goto bad;
			r->version = v;
			r->wildcard = strcmp(addr, "0.0.0.0") == 0 || strcmp(addr, "::") == 0;
			r->lo = a;
			r->hi = b;
			out->nbinds++;
		} else if (sscanf(buf, "egress %d %63s %d %1s", &v, addr, &a, extra) == 3) {
			struct pf_egress *r = &out->egress[out->negress];
			unsigned char raw[16];
			if ((v != 4 && v != 6) || inet_pton(v == 4 ? AF_INET : AF_INET6, addr, raw) != 1 || a < 0 ||
			    a > (v == 4 ? 32 : 128))
				goto bad;
			r->version = v;
			memcpy(r->net, raw, v == 4 ? 4 : 16);
			r->plen = a;
			out->negress++;
		} else if (sscanf(buf, "version %63s %1s", addr, extra) == 1) {
			/* the policy's digest: nothing to match (service.c drops the pools when it changes) */
		} else if (n) {
			goto bad;
		}
		line += n + (end ? 1 : 0);
	}
	return 0;
bad:
	pf_free(out);
	return -1;
}

/* Prefilter.might_graft for a socket of `family` (AF_INET/AF_INET6) that is not grafted yet. */
int pf_might(const struct pf *pf, int verb, int family, const char *addr, int port, int v6only)
{
	struct pf_ip ip;
	if (family != AF_INET && family != AF_INET6)
		return 0;
	if (parse_ip(addr, &ip, NULL) != 0)
		return 1; /* not an address the table speaks of: ask */
	if (verb == PF_BIND) {
		static const unsigned char zero[16];
		int dual = family == AF_INET6 && !v6only && ip.version == 6 && memcmp(ip.b, zero, 16) == 0;
		for (size_t i = 0; i < pf->nbinds; i++) {
			const struct pf_bind *r = &pf->binds[i];
			if (r->lo <= port && port <= r->hi &&
			    ((r->version == ip.version && (r->wildcard || ip_eq(&r->ip, &ip))) || (dual && r->version == 4)))
				return 1;
		}
		return 0;
	}
	for (size_t i = 0; i < pf->negress; i++) {
		const struct pf_egress *r = &pf->egress[i];
		if (r->version == ip.version && in_prefix(ip.b, r->net, r->plen))
			return 1;
	}
	return 0;
}

/* The egress row (index) whose prefix holds `addr` longest, or -1: the key of the preload
 * library's pools (csrc/pool.c), never a decision (the service decides each pool). */
int pf_egress_row(const struct pf *pf, const char *addr)
{
	struct pf_ip ip;
	int best = -1;
	if (parse_ip(addr, &ip, NULL) != 0)
		return -1;
	for (size_t i = 0; i < pf->negress; i++) {
		const struct pf_egress *r = &pf->egress[i];
		if (r->version == ip.version && in_prefix(ip.b, r->net, r->plen) && (best < 0 || r->plen > pf->egress[best].plen))
			best = (int)i;
	}
	return best;
}
