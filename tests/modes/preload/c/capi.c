/* The AF_GRAFT C API as in the original slides, under preload mode.
 *   capi serve            socket(AF_GRAFT) + bind("ep-http"), serve one connection
 *   capi dial ADDR PORT   socket(AF_GRAFT) + bind("ep-out") (dynamic), connect(), read a line
 *   capi dialname NAME    socket(AF_GRAFT) + connect(sockaddr_gr NAME), read a line
 *   capi udp ADDR PORT    unbound UDP socket: sendto/sendmsg to a host echo server (egress)
 *   capi resolve NAME     getaddrinfo("graft:NAME") */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "graft.h"

_Static_assert(AF_GRAFT == 0x4752, "AF_GRAFT must equal sockgraft.api.AF_GRAFT");
_Static_assert(AF_GRAFT_EPNAME_MAX == 16, "AF_GRAFT_EPNAME_MAX");

static int serve(void)
{
	struct sockaddr_gr saddr_gr;
	int sock, conn;
	memset(&saddr_gr, 0, sizeof(saddr_gr));
	sock = socket(AF_GRAFT, SOCK_STREAM, IPPROTO_TCP);
	if (sock < 0) { perror("socket"); return 1; }
	saddr_gr.sgr_family = AF_GRAFT;
	strncpy(saddr_gr.sgr_epname, "ep-http", 7);
	if (bind(sock, (struct sockaddr *)&saddr_gr, sizeof(saddr_gr)) < 0) { perror("bind"); return 1; }
	if (listen(sock, 16) < 0) { perror("listen"); return 1; }
	struct sockaddr_gr me;
	socklen_t len = sizeof(me);
	if (getsockname(sock, (struct sockaddr *)&me, &len) < 0) { perror("getsockname"); return 1; }
	printf("listening family=%#x name=%s\n", me.sgr_family, me.sgr_epname);
	fflush(stdout);
	conn = accept(sock, NULL, NULL);
	if (conn < 0) { perror("accept"); return 1; }
	const char *msg = "hello from AF_GRAFT\n";
	if (write(conn, msg, strlen(msg)) < 0) { perror("write"); return 1; }
	close(conn);
	close(sock);
	return 0;
}

static int dial(const char *addr, int port)
{
	struct sockaddr_gr src = { .sgr_family = AF_GRAFT };
	strncpy(src.sgr_epname, "ep-out", AF_GRAFT_EPNAME_MAX - 1);
	int sock = socket(AF_GRAFT, SOCK_STREAM, IPPROTO_TCP);
	if (sock < 0) { perror("socket"); return 1; }
	if (bind(sock, (struct sockaddr *)&src, sizeof(src)) < 0) { perror("bind"); return 1; }
	struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, addr, &dst.sin_addr);
	if (connect(sock, (struct sockaddr *)&dst, sizeof(dst)) < 0) { perror("connect"); return 1; }
	char buf[256];
	ssize_t n = read(sock, buf, sizeof(buf) - 1);
	if (n < 0) { perror("read"); return 1; }
	buf[n] = 0;
	printf("got: %s", buf);
	close(sock);
	return 0;
}

/* UDP through the egress decision: sendto/sendmsg with a NULL destination fail cleanly; the first
 * datagram with a destination grafts the unbound socket; the echo comes back on it. */
static int udp(const char *addr, int port)
{
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	char buf[64];
	if (fd < 0) { perror("socket"); return 1; }
	if (sendto(fd, "x", 1, 0, NULL, 0) != -1 || errno != EDESTADDRREQ) { printf("sendto NULL: no EDESTADDRREQ\n"); return 1; }
	struct iovec iov = { "y", 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (sendmsg(fd, &mh, 0) != -1 || errno != EDESTADDRREQ) { printf("sendmsg NULL: no EDESTADDRREQ\n"); return 1; }
	if (sendmsg(fd, NULL, 0) != -1 || errno != EFAULT) { printf("sendmsg(NULL): no EFAULT\n"); return 1; }
	struct sockaddr_in dst = { .sin_family = AF_INET, .sin_port = htons(port) };
	inet_pton(AF_INET, addr, &dst.sin_addr);
	if (sendto(fd, "one", 3, 0, (struct sockaddr *)&dst, sizeof(dst)) != 3) { perror("sendto"); return 1; }
	ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
	if (n < 0) { perror("recv"); return 1; }
	buf[n] = 0;
	printf("echo: %s\n", buf);
	iov = (struct iovec){ "two", 3 };
	mh.msg_name = &dst;
	mh.msg_namelen = sizeof(dst);
	if (sendmsg(fd, &mh, 0) != 3) { perror("sendmsg"); return 1; }
	n = recv(fd, buf, sizeof(buf) - 1, 0);
	if (n < 0) { perror("recv"); return 1; }
	buf[n] = 0;
	printf("echo: %s\n", buf);
	int fd2 = socket(AF_INET, SOCK_DGRAM, 0); /* a fresh socket: sendmsg decides first this time */
	iov = (struct iovec){ "three", 5 };
	if (sendmsg(fd2, &mh, 0) != 5) { perror("sendmsg"); return 1; }
	n = recv(fd2, buf, sizeof(buf) - 1, 0);
	if (n < 0) { perror("recv"); return 1; }
	buf[n] = 0;
	printf("echo: %s\n", buf);
	return 0;
}

/* connect() with a sockaddr_gr: dial an endpoint with a fixed port, by name. */
static int dialname(const char *name)
{
	struct sockaddr_gr dst = { .sgr_family = AF_GRAFT };
	strncpy(dst.sgr_epname, name, AF_GRAFT_EPNAME_MAX - 1);
	int sock = socket(AF_GRAFT, SOCK_STREAM, 0);
	if (sock < 0) { perror("socket"); return 1; }
	if (connect(sock, (struct sockaddr *)&dst, sizeof(dst)) < 0) { perror("connect"); return 1; }
	struct sockaddr_gr peer;
	socklen_t len = sizeof(peer);
	if (getpeername(sock, (struct sockaddr *)&peer, &len) < 0) { perror("getpeername"); return 1; }
	char buf[256];
	ssize_t n = read(sock, buf, sizeof(buf) - 1);
	if (n < 0) { perror("read"); return 1; }
	buf[n] = 0;
	printf("peer=%s got: %s", peer.sgr_family == AF_GRAFT ? peer.sgr_epname : "?", buf);
	return 0;
}

static int resolve(const char *name)
{
	char node[64];
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
	snprintf(node, sizeof(node), "graft:%s", name);
	int rc = getaddrinfo(node, NULL, &hints, &res);
	if (rc) { printf("getaddrinfo: %s\n", gai_strerror(rc)); return 2; }
	for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
		char host[64], serv[16];
		getnameinfo(ai->ai_addr, ai->ai_addrlen, host, sizeof(host), serv, sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV);
		printf("%s %s\n", host, serv);
	}
	freeaddrinfo(res);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && !strcmp(argv[1], "serve"))
		return serve();
	if (argc == 4 && !strcmp(argv[1], "dial"))
		return dial(argv[2], atoi(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "dialname"))
		return dialname(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "udp"))
		return udp(argv[2], atoi(argv[3]));
	if (argc == 3 && !strcmp(argv[1], "resolve"))
		return resolve(argv[2]);
	fprintf(stderr, "usage: capi serve | dial ADDR PORT | resolve NAME\n");
	return 64;
}
