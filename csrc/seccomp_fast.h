/* libgraft-seccomp.so: the seccomp supervisor's native fast path for connect() and bind() (loaded with ctypes
 * by src/sockgraft/modes/seccomp/fastlib.py, used by fast.py). It decides only from a table the Python engine compiled
 * (core/engine.py EgressTable: `gs_lookup` mirrors EgressTable.lookup, a property test holds them
 * equal) and hands everything else back to the Python handlers. x86_64, Linux >= 6.9. */
#ifndef GRAFT_SECCOMP_FAST_H
#define GRAFT_SECCOMP_FAST_H

#include <stdint.h>

#include "fdservice_fast.h" /* struct fs_in_row: the ingress rows both native paths read */

/* One egress rule, in the engine's match order (longest prefix first). */
struct gs_row {
	uint8_t version;  /* 4 or 6: the rule's network */
	uint8_t plen;     /* its prefix length */
	uint8_t eptype;   /* 0: ask the engine; 4: ipv4 endpoint; 6: ipv6 endpoint */
	uint8_t pad;
	uint16_t epport;  /* the endpoint's port (0: dynamic) */
	uint16_t pad2;
	uint8_t net[16];  /* network address (IPv4 in the first 4 bytes) */
	uint8_t epaddr[16]; /* endpoint address (IPv4 in the first 4 bytes) */
};

/* Host sockets made ahead for one row (issue 11, lever 4): the endpoint's address bound with
 * IP_BIND_ADDRESS_NO_PORT, marked, not connected. The Python loop fills them between calls (only
 * while the kernel guards such sockets: host/bindguard.py, host/egress.py); C takes them. */
#define GS_POOL 64
struct gs_pool {
	int32_t family;   /* of the sockets (0: this row has no pool) */
	int32_t type;
	uint32_t n;       /* fds[0..n) are ready */
	int32_t fds[GS_POOL];
};

struct gs_table {
	uint64_t host_cookie;       /* SO_NETNS_COOKIE of the supervisor's (host) netns */
	uint64_t version;           /* gs_loop: the state database's version it was compiled at
	                             * (gs_version); a table of another version is not used */
	uint64_t target_netns_ino;  /* the container's netns inode (0: unknown, never foreign) */
	uint32_t nrows;
	uint32_t mark;              /* SO_MARK of every host socket made (the container's; 0: none) */
	const struct gs_row *rows;
	struct gs_pool *pools;      /* one per row, or NULL: no pools */
	uint32_t ningress;
	int32_t optmap;             /* host/optwatch.py's map of the options set on each container socket
	                             * (-1: not known: every option is read back) */
	const struct fs_in_row *ingress; /* Policy.ingress_table's rows, compiled by modes/api/fast.compile_in_rows */
};

enum { GS_NOTHING = 0, GS_HANDBACK = 1, GS_DONE = 2, GS_PARK = 3, GS_HUP = 4, GS_ERROR = 5 };
/* GS_DONE_CONTINUE: a sendto with a destination on a TCP socket (no MSG_FASTOPEN), answered CONTINUE:
 * the kernel ignores the address of a stream socket's send */
enum { GS_DONE_GRANT = 1, GS_DONE_LOCAL = 2, GS_DONE_FAILED = 3, GS_DONE_GONE = 4, GS_DONE_CONTINUE = 5 };
/* the steps timed in gs_out.ns (cost.py prints them) */
enum { GS_T_GETFD, GS_T_READ, GS_T_JUDGE, GS_T_SOCKET, GS_T_CONNECT, GS_T_ADDFD, GS_T_SEND, GS_STEPS };
enum { GS_LOCAL = 0, GS_GRANT = 1, GS_ASK = 2 };

struct gs_out {
	/* the notification (struct seccomp_notif) */
	uint64_t id;
	uint32_t pid;
	uint32_t flags;
	int32_t nr;
	uint32_t arch;
	uint64_t ip;
	uint64_t args[6];
	/* what was done (GS_DONE, GS_PARK) */
	int32_t what;     /* GS_DONE_* */
	int32_t decided;  /* -1: nothing judged; GS_LOCAL or GS_GRANT */
	int32_t row;      /* the rule's index (grant) */
	int32_t err;      /* the errno answered (0: success) */
	int32_t family, type, proto; /* the app socket */
	int32_t hostfd;   /* GS_PARK: the host socket, connecting (the caller owns it) */
	int32_t appfd;
	int32_t cloexec;
	int64_t sndtimeo_us; /* GS_PARK: the app socket's SO_SNDTIMEO (0: none) */
	uint32_t addrlen;
	uint8_t addr[128]; /* the copied sockaddr (as judged) */
	/* nanoseconds since the RECV returned, at the end of each step (0: not reached); see GS_STEPS */
	uint32_t ns[8];
	int32_t kind;     /* gs_serve_batch: what gs_serve returned for this record */
	uint32_t pooled;  /* the application's connect ran (CONTINUE): GS_DONE_GRANT with a pooled socket,
			   * or GS_DONE_LOCAL where the kernel guards the container's host sockets */
	int32_t slot;     /* gs_loop: the listener's slot (gs_loop_add) */
	int32_t stale;    /* gs_loop: handed back because the slot's table was missing or of an old version */
	/* a bind (decided >= 0): the app socket's IPV6_V6ONLY as judged, and whether an IPv4 pair took a
	 * dual-stack [::] bind; a granted one (GS_DONE_GRANT): the host socket's inode and address
	 * (getsockname), for the view the Python getsockname shows (Target.views, Target.served) */
	int32_t v6only;
	int32_t dual;
	uint64_t host_ino;
	uint32_t hostlen;
	uint8_t host[28];
};

int gs_serve(int listener, const struct gs_table *t, struct gs_out *out);
/* gs_serve again while the listener has a notification ready and the last was served here (at
 * most `max`): one record per notification received; returns how many (or -errno of a RECV). */
int gs_serve_batch(int listener, const struct gs_table *t, struct gs_out *outs, int max);
int gs_bind_local(const struct gs_table *t, int family, const uint8_t *sa, uint32_t salen);
int gs_connect_local(const struct gs_table *t, const uint8_t *sa, uint32_t salen);
/* IngressTable.lookup in C (the test entry point of the bind serve_bind grants): GS_LOCAL, GS_ASK,
 * or GS_GRANT with the row, the host socket's family, address and port (0: dynamic) */
int gs_lookup_bind(const struct gs_table *t, int family, const uint8_t *sa, uint32_t salen, int type, int proto,
		   int v6only, int foreign, int *row, int *host_family, uint8_t host_addr[16], uint16_t *host_port);
int gs_lookup(const struct gs_table *t, int family, const uint8_t *sa, uint32_t salen, int type, int proto,
	      int bound, int foreign, int *host_family, uint8_t host_addr[16], uint16_t *host_port);
int gs_abi(void);
int gs_quiet_size(void);

/* -- gs_loop: the wait-and-serve loop in its own thread (issue 11, lever 5) ----------------------
 * gs_loop_run (called from a thread of its own: ctypes releases the GIL) epolls the listeners it
 * was given and serves each notification with gs_serve, under the loop's mutex. What it cannot
 * serve (GS_HANDBACK), a blocking connect in progress (GS_PARK), a listener that hung up (GS_HUP,
 * removed from the loop's epoll; the caller closes it after gs_loop_remove) and a record of every
 * notification served (GS_DONE: for the audit and the stats) go to the caller through a ring it
 * reads with gs_loop_take when gs_loop_fd (an eventfd) is readable. Records other than GS_DONE
 * signal at once; GS_DONE ones at most every GS_SIGNAL_NS, or when the ring is half full (the
 * caller also reads the ring on a short timer while records come). A sendto answered CONTINUE
 * makes no record: gs_loop_counts says how many; nor does a bind or connect answered CONTINUE as
 * local (GS_DONE_LOCAL, pooled) within GS_QUIET_NS of the last such record of its listener and
 * verb, nor a connect granted with a pooled socket (GS_DONE_GRANT, pooled, answered 0) within
 * GS_QUIET_NS of the last such record of its listener and rule (rows < GS_QROWS) and of the same
 * socket kind: gs_loop_quiet says how many (and forgets them), with the kind and destination of each
 * rule's last recorded grant (which the engine audits alike). gs_loop_set_table hands over the
 * counts of the table it swaps out (they are that table's), and the first grant of each rule on
 * the new one is recorded again. The tables and their pools belong to the caller:
 * it swaps them (gs_loop_set_table) and fills pools (gs_loop_lock/unlock around its writes) while
 * the loop runs; a table swapped out is no longer used once gs_loop_set_table returns. The loop
 * uses a table only if its `version` is the database's current one (the WAL index header in the
 * `-shm` file, read on every notification: a commit by anyone changes it): a notification seen
 * with an older table is handed back (`stale`), and the caller, which decides from the engine,
 * compiles the table again. */
#define GS_RING 1024
#define GS_SLOTS 1024
#define GS_SIGNAL_NS 20000000ull
#define GS_QUIET_NS 1000000000ull
struct gs_loop;
#define GS_QROWS 8
struct gs_quiet {
	uint64_t locals[2];             /* locals answered CONTINUE and not recorded: bind, connect */
	uint64_t grants[GS_QROWS];      /* pooled grants not recorded, per row of the table */
	int32_t family[GS_QROWS], type[GS_QROWS], proto[GS_QROWS]; /* the app socket of a row's counted grants */
	uint32_t addrlen[GS_QROWS];
	uint8_t addr[GS_QROWS][28];     /* the destination of the row's last recorded grant */
};
struct gs_loop *gs_loop_new(const char *shm_path);
int gs_loop_fd(struct gs_loop *l);
int gs_loop_add(struct gs_loop *l, int listener, struct gs_table *t);
struct gs_table *gs_loop_set_table(struct gs_loop *l, int slot, struct gs_table *t, struct gs_quiet *q);
int gs_loop_remove(struct gs_loop *l, int slot);
int gs_loop_run(struct gs_loop *l);
void gs_loop_stop(struct gs_loop *l);
int gs_loop_take(struct gs_loop *l, struct gs_out *outs, int max);
void gs_loop_counts(struct gs_loop *l, uint64_t counts[4]);
void gs_loop_quiet(struct gs_loop *l, int slot, struct gs_quiet *q);
void gs_loop_lock(struct gs_loop *l);
void gs_loop_unlock(struct gs_loop *l);
uint64_t gs_version(struct gs_loop *l);
int gs_pool_fill(struct gs_loop *l, struct gs_table *t, int row, int family, const uint8_t addr[16], uint32_t mark);
void gs_loop_free(struct gs_loop *l);

#endif
