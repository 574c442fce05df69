/* Drives the preload library through the calls that send fd-service requests, one case per
 * argument, so that tests/modes/preload/test_wire.py can compare what the library sends
 * (GRAFT_TRACE) with sockgraft.core.protocol.Request(...).encode(). Before each case it writes
 * "case: N" on stderr (the library's trace lines follow it).
 *   bind FAM ADDR PORT TYPE FLAGS     socket(FAM, TYPE) with FLAGS (comma list or -), bind
 *   connect|sendto|sendmsg FAM ADDR PORT TYPE
 *   named NAME TYPE FLAGS             socket(AF_GRAFT, TYPE), bind(sockaddr_gr NAME)
 *   dial NAME TYPE                    socket(AF_GRAFT, TYPE), connect(sockaddr_gr NAME)
 *   resolve NAME                      getaddrinfo("graft:NAME")
 *   raw FAM HEX                       socket(FAM, SOCK_STREAM), bind with these bytes as sockaddr */
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "graft.h"

static void set_flags(int s, const char *flags)
{
	int one = 1, zero = 0;
	if (strstr(flags, "reuseaddr"))
		setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (strstr(flags, "reuseport"))
		setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	/* v6only is set either way: the library must report what the socket says */
	setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, strstr(flags, "v6only") ? &one : &zero, sizeof(one));
}

static socklen_t inet(int fam, const char *addr, int port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof(*ss));
	if (fam == AF_INET) {
		struct sockaddr_in *in = (struct sockaddr_in *)ss;
		in->sin_family = AF_INET;
		in->sin_port = htons(port);
		inet_pton(AF_INET, addr, &in->sin_addr);
		return sizeof(*in);
	}
	struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
	in6->sin6_family = AF_INET6;
	in6->sin6_port = htons(port);
	inet_pton(AF_INET6, addr, &in6->sin6_addr);
	return sizeof(*in6);
}

static socklen_t gr(const char *name, struct sockaddr_gr *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sgr_family = AF_GRAFT;
	strncpy(sa->sgr_epname, name, AF_GRAFT_EPNAME_MAX - 1);
	return sizeof(*sa);
}

static void one(char *spec)
{
	char *w[8] = { 0 }, *save = NULL;
	int n = 0;
	for (char *t = strtok_r(spec, " ", &save); t && n < 8; t = strtok_r(NULL, " ", &save))
		w[n++] = t;
	struct sockaddr_storage ss;
	struct sockaddr_gr sg;
	int s = -1;
	if (!strcmp(w[0], "bind")) {
		s = socket(atoi(w[1]), atoi(w[4]), 0);
		set_flags(s, w[5]);
		bind(s, (struct sockaddr *)&ss, inet(atoi(w[1]), w[2], atoi(w[3]), &ss));
	} else if (!strcmp(w[0], "connect") || !strcmp(w[0], "sendto") || !strcmp(w[0], "sendmsg")) {
		s = socket(atoi(w[1]), atoi(w[4]), 0);
		socklen_t len = inet(atoi(w[1]), w[2], atoi(w[3]), &ss);
		if (!strcmp(w[0], "connect")) {
			connect(s, (struct sockaddr *)&ss, len);
		} else if (!strcmp(w[0], "sendto")) {
			sendto(s, "x", 1, MSG_DONTWAIT, (struct sockaddr *)&ss, len);
		} else {
			struct iovec iov = { "x", 1 };
			struct msghdr mh = { .msg_name = &ss, .msg_namelen = len, .msg_iov = &iov, .msg_iovlen = 1 };
			sendmsg(s, &mh, MSG_DONTWAIT);
		}
	} else if (!strcmp(w[0], "named")) {
		s = socket(AF_GRAFT, atoi(w[2]), 0);
		set_flags(s, w[3]);
		bind(s, (struct sockaddr *)&sg, gr(w[1], &sg));
	} else if (!strcmp(w[0], "dial")) {
		s = socket(AF_GRAFT, atoi(w[2]), 0);
		connect(s, (struct sockaddr *)&sg, gr(w[1], &sg));
	} else if (!strcmp(w[0], "resolve")) {
		char node[64];
		struct addrinfo *res = NULL;
		snprintf(node, sizeof(node), "graft:%s", w[1]);
		if (getaddrinfo(node, "80", NULL, &res) == 0)
			freeaddrinfo(res);
	} else if (!strcmp(w[0], "raw")) {
		unsigned char raw[sizeof(ss)];
		size_t k = 0;
		for (const char *h = w[2]; h[0] && h[1] && k < sizeof(raw); h += 2)
			sscanf(h, "%2hhx", &raw[k++]);
		s = socket(atoi(w[1]), SOCK_STREAM, 0);
		if (bind(s, (struct sockaddr *)raw, (socklen_t)k) != 0)
			fprintf(stderr, "bind: %m\n");
	}
	if (s >= 0)
		close(s);
}

int main(int argc, char **argv)
{
	for (int i = 1; i < argc; i++) {
		fprintf(stderr, "case: %d\n", i - 1);
		one(argv[i]);
	}
	fprintf(stderr, "case: end\n");
	return 0;
}
