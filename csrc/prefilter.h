/* prefilter.c: sockgraft.core.engine.Prefilter.might_graft in C (pure; see prefilter.c). */
#ifndef GRAFT_PREFILTER_H
#define GRAFT_PREFILTER_H

#include <stddef.h>

enum { PF_BIND, PF_CONNECT, PF_SENDTO };

struct pf_ip {
	int version;        /* 4 or 6, after v4-mapped addresses are taken as IPv4 */
	unsigned char b[16];
};

struct pf_bind {
	int version;        /* the pair's address family as written */
	int wildcard;       /* written 0.0.0.0 or :: */
	struct pf_ip ip;
	int lo, hi;
};

struct pf_egress {
	int version;
	unsigned char net[16];
	int plen;
};

struct pf {
	size_t nbinds, negress;
	struct pf_bind *binds;
	struct pf_egress *egress;
};

int pf_parse(const char *text, struct pf *out);
void pf_free(struct pf *pf);
int pf_egress_row(const struct pf *pf, const char *addr);
int pf_might(const struct pf *pf, int verb, int family, const char *addr, int port, int v6only);

#endif
