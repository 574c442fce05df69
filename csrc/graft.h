/* graft.h: the AF_GRAFT socket API of sockgraft.
 *
 * A socket of family AF_GRAFT is bound (or connected) by endpoint NAME, an entry of the container's
 * graft table, instead of by address:
 *
 *     int s = socket(AF_GRAFT, SOCK_STREAM, IPPROTO_TCP);
 *     struct sockaddr_gr sa = { .sgr_family = AF_GRAFT };
 *     strncpy(sa.sgr_epname, "ep-http", AF_GRAFT_EPNAME_MAX - 1);
 *     bind(s, (struct sockaddr *)&sa, sizeof(sa));   // now a host socket bound to ep-http
 *     listen(s, 128);                                  // an ordinary TCP socket from here on
 *
 * The calls are served by libgraft-hijack.so (LD_PRELOAD, set up by `graft run --mode preload`),
 * which asks sockgraft's fd service for the endpoint. Without it the kernel refuses AF_GRAFT
 * (EAFNOSUPPORT): the value lies above AF_MAX. Names are 1-15 printable ASCII characters; a name
 * of 16 characters without a terminating NUL is refused with EINVAL.
 */
#ifndef SOCKGRAFT_GRAFT_H
#define SOCKGRAFT_GRAFT_H

#include <sys/socket.h>

#define AF_GRAFT 0x4752 /* "GR"; equals sockgraft.api.AF_GRAFT */
#define PF_GRAFT AF_GRAFT
#define AF_GRAFT_EPNAME_MAX 16

struct sockaddr_gr {
	sa_family_t sgr_family;                /* AF_GRAFT */
	char sgr_epname[AF_GRAFT_EPNAME_MAX];  /* endpoint name, NUL-terminated if shorter than 16 */
};

#endif
