/* libgraft-fdfast.so: the fd service's per-request `connect`, `pool` and `bind` paths in C (csrc/fdservice_fast.c).
 * The Python side is sockgraft/modes/api/fast.py (ctypes): it compiles the tables below from
 * `Policy.egress_table()` and mirrors these structures field for field. */
#ifndef GRAFT_FDSERVICE_FAST_H
#define GRAFT_FDSERVICE_FAST_H

#include <stdint.h>
#include <stddef.h>

#define FS_MAX_MESSAGE 4096 /* core/protocol.py MAX_MESSAGE */
#define FS_ABI 4 /* fs_abi(): modes/api/fast.py refuses a library of another interface (4: `bindpool`, `namedpool`) */
#define FS_MAX_POOL 32 /* core/protocol.py MAX_POOL */
#define FS_POOLS 1 /* fs_serve flags: the container's sockets may be handed over unconnected (egress.pools_off says "") */
#define FS_UNBOUND_POOLS 2 /* ... and unbound (egress.pools_off(unbound=True) says "") */
#define FS_UNBOUND_TAG 0x5CA10000 /* core/tables.py UNBOUND_TAG: an unbound pooled socket's mark is this | (mark & FS_MARK_MAX) */
#define FS_MARK_MAX 0xFFFF /* core/tables.py MARK_MAX */

/* A row of engine.EgressTable, in its order: kind 0 = "ask", 4 = an ipv4 endpoint, 6 = ipv6. */
struct fs_row {
	uint8_t version; /* 4 or 6: the rule's network */
	uint8_t plen;
	uint8_t kind;
	uint8_t pad;
	uint16_t ep_port; /* host byte order; 0: dynamic */
	uint16_t pad2;
	uint8_t net[16];     /* network address (4 bytes for IPv4) */
	uint8_t ep_addr[16]; /* the endpoint's address (4 bytes for ipv4) */
};

/* A row of engine.IngressTable, in its order: kind 0 = "ask", 4 = an ipv4 endpoint, 6 = ipv6. */
struct fs_in_row {
	uint8_t version; /* 4 or 6: the pair's address */
	uint8_t wildcard; /* the pair's address is unspecified (0.0.0.0 or ::) */
	uint8_t kind;
	uint8_t pad;
	uint16_t port_lo, port_hi;
	uint16_t ep_port; /* host byte order; 0: dynamic */
	uint16_t pad2;
	uint8_t addr[16];    /* the pair's address (4 bytes for IPv4) */
	uint8_t ep_addr[16]; /* the endpoint's address (4 bytes for ipv4) */
};

/* The table of one set of rules: the container's own (tail_len 0: requests without caller rules)
 * or those a caller sends, recognised by the exact bytes of the request after its fixed arguments
 * (" out:...=ep ...", " in:...=ep ..."): the Python side compiled that table from the same words it
 * parsed, for the verbs it names (a `connect` tail is no `bind` tail). A `named` table is one
 * endpoint of the container's table: `tail` is its name, in_rows[0] the host address the engine
 * grants it (kind, ep_addr, ep_port; kind 0: a unix endpoint, "ask"); fast.py compiles them from
 * Policy.decide. */
enum { FS_FOR_EGRESS = 1, FS_FOR_BIND = 2, FS_FOR_NAMED = 4 };
struct fs_table {
	const char *tail;
	uint32_t tail_len;
	uint32_t nrows;
	const struct fs_row *rows;
	uint32_t verbs; /* FS_FOR_*: the requests this tail may end */
	uint32_t nin;
	const struct fs_in_row *in_rows;
};

/* A parsed `connect`, `pool`, `bind`, `named` (`named NAME FAMILY TYPE PROTO FLAGS`: the graft API's
 * bind by endpoint name), `bindpool` (`bind`'s words and N) or `namedpool` (`namedpool NAME FAMILY
 * TYPE PROTO N`) request, as core/protocol.parse_request would parse it. */
enum { FS_CONNECT = 0, FS_POOL = 1, FS_BIND = 2, FS_NAMED = 3, FS_BINDPOOL = 4, FS_NAMEDPOOL = 5 };
struct fs_req {
	int32_t verb;     /* FS_CONNECT ... FS_NAMEDPOOL */
	int32_t count;    /* pool, bindpool, namedpool: how many sockets (1..FS_MAX_POOL) */
	int32_t flags;    /* bind, bindpool, named: FS_FL_* */
	int32_t family;
	int32_t type;
	int32_t proto;
	int32_t port;
	uint8_t addr[16]; /* the destination as written (family's size) */
	int32_t table;    /* index of the table its tail names */
};

enum { FS_DROP = 0, FS_HANDBACK = 1, FS_GRANT = 2, FS_LOCAL = 3, FS_FAIL = 4 };
enum { FS_LK_ASK = 0, FS_LK_LOCAL = 1, FS_LK_GRANT = 2 };
enum { FS_FL_REUSEADDR = 1, FS_FL_REUSEPORT = 2, FS_FL_V6ONLY = 4 }; /* a bind's FLAGS word */

struct fs_out {
	int32_t result;   /* FS_* */
	int32_t err;      /* FAIL: the errno of the failed step; GRANT: 0 or EINPROGRESS */
	int32_t table;    /* GRANT/LOCAL/FAIL: the table and row of the decision */
	int32_t row;
	int32_t family;   /* the request's family, destination and port */
	int32_t port;
	uint8_t addr[16];
	int32_t ino_ok;   /* HANDBACK: the caller's netns was read */
	int32_t trunc;    /* HANDBACK: the request was truncated (MSG_TRUNC/MSG_CTRUNC) */
	int32_t send_failed; /* GRANT/LOCAL: the reply could not be sent: drop the connection */
	int32_t host_port;   /* GRANT: the host socket's address after connect (pool: its bound address, port 0;
			      * bindpool, namedpool: the endpoint's address to bind them to) */
	int32_t verb;        /* GRANT/LOCAL/FAIL: FS_CONNECT ... FS_NAMEDPOOL */
	int32_t count;       /* GRANT of a pool, bindpool or namedpool: the sockets sent */
	int32_t dual;        /* bind: a dual-stack [::] bind matched by an IPv4 pair (the reason says so) */
	uint64_t ino;        /* the caller's netns inode (ino_ok) */
	char host[64];
	uint32_t len;        /* HANDBACK: the request */
	char data[FS_MAX_MESSAGE + 1];
};

int fs_abi(void);
int fs_parse(const char *data, size_t len, const struct fs_table *tables, int ntables, struct fs_req *req);
int fs_lookup(const struct fs_table *t, const struct fs_req *req, int *row, int *family, uint8_t host[16],
	      int *host_port);
int fs_lookup_bind(const struct fs_table *t, const struct fs_req *req, int *row, int *family, uint8_t host[16],
		   int *host_port, int *dual);
/* mark: SO_MARK of a granted host socket (the container's; 0: none); flags: FS_POOLS, FS_UNBOUND_POOLS */
int fs_serve(int conn, int pidfd, uint64_t container_ino, uint32_t mark, uint32_t flags,
	     const struct fs_table *tables, int ntables, struct fs_out *out);
/* fs_serve, then the requests that follow back to back on the same connection (within spin_us of the
 * last answer; at most max, budget_us in all): outs[0..n), n returned */
int fs_serve_batch(int conn, int pidfd, uint64_t container_ino, uint32_t mark, uint32_t flags,
		   const struct fs_table *tables, int ntables, struct fs_out *outs, int max, int spin_us, int budget_us);

#endif
