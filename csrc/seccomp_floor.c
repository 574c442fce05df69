/* The floor of a seccomp supervisor on this machine (modes/seccomp/floor.py, cost.py, graft bench's
 * seccomp-floor topology, docs/SECCOMP.md): the fewest calls a supervisor can make, with nothing
 * judged, read or copied.
 *
 *   seccomp-floor continue|swap ADDR FILTER FLAGS CMD [ARG...]
 *
 * runs CMD under the classic BPF program in file FILTER (seccomp mode's own: floor.py writes it),
 * installed with FLAGS (seccomp mode's, SECCOMP_FILTER_FLAG_*), and, woken by poll() as the
 * supervisor's loop is (SYNC_WAKE_UP set where the kernel has it), answers every trapped call:
 *   continue  CONTINUE (the trap's round trip alone);
 *   swap      a connect of an IPv4 socket: pidfd_getfd of it, ADDFD of a host socket made ahead (bound
 *             to ADDR with IP_BIND_ADDRESS_NO_PORT, as the supervisor's pools are; O_NONBLOCK
 *             as the caller's) over its fd, CONTINUE, close of the replaced socket: what the
 *             supervisor's pooled connect cannot do without. Any other call: CONTINUE.
 * CMD runs in this process's netns (the swap's cost does not depend on it). Exits with CMD's
 * status. Not part of the product: a measurement tool. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP 1
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#define AHEAD 256

static int send_fd(int sock, int fd)
{
	char byte = 0, buf[CMSG_SPACE(sizeof(int))];
	struct iovec io = {&byte, 1};
	struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof(buf)};
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	return sendmsg(sock, &m, 0) == 1 ? 0 : -1;
}

static int recv_fd(int sock)
{
	char byte, buf[CMSG_SPACE(sizeof(int))];
	struct iovec io = {&byte, 1};
	struct msghdr m = {.msg_iov = &io, .msg_iovlen = 1, .msg_control = buf, .msg_controllen = sizeof(buf)};
	if (recvmsg(sock, &m, 0) != 1 || !CMSG_FIRSTHDR(&m))
		return -1;
	int fd;
	memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof(int));
	return fd;
}

/* In the child: the filter, its listener sent to the parent, then CMD once the parent is ready. */
static void child(int sock, struct sock_fprog *prog, unsigned long flags, char **cmd)
{
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		_exit(126);
	int listener = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, prog);
	if (listener < 0 || send_fd(sock, listener) != 0)
		_exit(126);
	close(listener);
	char ready;
	if (read(sock, &ready, 1) != 1)
		_exit(126);
	close(sock);
	execvp(cmd[0], cmd);
	_exit(127);
}

static int ahead(struct sockaddr_in *src)
{
	int h = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
	if (h < 0 || setsockopt(h, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one)) != 0 ||
	    bind(h, (struct sockaddr *)src, sizeof(*src)) != 0) {
		perror("seccomp-floor: host socket");
		exit(1);
	}
	return h;
}

/* The classic BPF program in file `path` (struct sock_filter records), or exit 2. */
static void load_filter(const char *path, struct sock_fprog *prog)
{
	static struct sock_filter insns[BPF_MAXINSNS];
	FILE *f = fopen(path, "rb");
	size_t n = f ? fread(insns, sizeof(insns[0]), BPF_MAXINSNS, f) : 0;
	if (f)
		fclose(f);
	if (n == 0) {
		fprintf(stderr, "seccomp-floor: no filter program in %s\n", path);
		exit(2);
	}
	prog->len = (unsigned short)n, prog->filter = insns;
}

int main(int argc, char **argv)
{
	if (argc < 6 || (strcmp(argv[1], "continue") && strcmp(argv[1], "swap"))) {
		fprintf(stderr, "usage: seccomp-floor continue|swap ADDR FILTER FLAGS CMD [ARG...]\n");
		return 2;
	}
	int swap = !strcmp(argv[1], "swap");
	struct sockaddr_in src = {.sin_family = AF_INET};
	if (inet_pton(AF_INET, argv[2], &src.sin_addr) != 1) {
		fprintf(stderr, "seccomp-floor: not an IPv4 address: %s\n", argv[2]);
		return 2;
	}
	struct sock_fprog prog;
	load_filter(argv[3], &prog);
	char *end;
	unsigned long flags = strtoul(argv[4], &end, 0);
	if (*end || !*argv[4]) {
		fprintf(stderr, "seccomp-floor: not a number: %s\n", argv[4]);
		return 2;
	}
	int sp[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) != 0)
		return 1;
	pid_t pid = fork();
	if (pid < 0)
		return 1;
	if (pid == 0) {
		close(sp[0]);
		child(sp[1], &prog, flags, argv + 5);
	}
	close(sp[1]);
	int listener = recv_fd(sp[0]), pidfd = -1;
	uint32_t pidfd_of = 0; /* the thread pidfd names (the one seen last: kept, as the supervisor keeps them) */
	if (listener < 0) {
		fprintf(stderr, "seccomp-floor: no filter installed (%s)\n", argv[3]);
		return 1;
	}
	__u64 sync = SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP;
	ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, sync); /* (a kernel before 6.6: woken as usual) */
	int pool[AHEAD], n = 0;
	if (write(sp[0], "g", 1) != 1)
		return 1;
	for (;;) {
		if (swap && n == 0) /* in a batch, when empty (the supervisor's are filled beside it) */
			while (n < AHEAD)
				pool[n++] = ahead(&src);
		struct pollfd p = {.fd = listener, .events = POLLIN}; /* (as the supervisor's loop waits) */
		if (poll(&p, 1, -1) < 0 && errno != EINTR)
			break;
		if (!(p.revents & POLLIN)) {
			if (p.revents & (POLLHUP | POLLERR))
				break; /* every task under the filter is gone */
			continue;
		}
		struct seccomp_notif req;
		memset(&req, 0, sizeof(req));
		if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0)
			continue; /* ENOENT: the caller is gone */
		int dup = -1;
		if (swap && req.data.nr == SYS_connect) {
			if (req.pid != pidfd_of) {
				if (pidfd >= 0)
					close(pidfd);
				pidfd = (int)syscall(SYS_pidfd_open, (pid_t)req.pid, PIDFD_THREAD);
				pidfd_of = req.pid;
			}
			dup = (int)syscall(SYS_pidfd_getfd, pidfd, (int)req.data.args[0], 0);
			int family = 0;
			socklen_t fl = sizeof(family);
			if (dup < 0 || getsockopt(dup, SOL_SOCKET, SO_DOMAIN, &family, &fl) != 0 || family != AF_INET)
				goto answer; /* (seccomp mode swaps IPv4 and IPv6 sockets: this floor IPv4 ones) */
			int h = pool[--n];
			if (fcntl(dup, F_GETFL) & O_NONBLOCK) /* (an event loop's socket stays one) */
				fcntl(h, F_SETFL, O_NONBLOCK);
			struct seccomp_notif_addfd add = {.id = req.id, .flags = SECCOMP_ADDFD_FLAG_SETFD, .srcfd = (__u32)h,
							  .newfd = (__u32)req.data.args[0]};
			ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
			close(h);
		}
	answer:;
		struct seccomp_notif_resp resp = {.id = req.id, .flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE};
		ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &resp);
		if (dup >= 0)
			close(dup);
	}
	int status = 0;
	waitpid(pid, &status, 0);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
