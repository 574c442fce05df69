"""What the seccomp supervisor does with each trapped syscall.

Every handler gets a `Call` (one notification: target, arguments, kernel calls), works on the
supervisor's own duplicate of the application's fd and on memory copied once, asks the engine
(`Policy.decide(Op)`: the only place decisions are made), audits what it judged, performs the
operation ITSELF and answers. It never answers CONTINUE for an operation whose memory it judged.
A task outside the container's netns (nested) is never granted: the engine's `foreign` rule.
Side doors (socket ioctls, SO_BINDTODEVICE) are in `sidedoors.py`.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import socket
import struct
import sys
import time

from sockgraft.core.engine import DENY, LOCAL, Op
from sockgraft.host import hostsock
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp.sidedoors import SideDoors
from sockgraft.modes.seccomp.targets import Call, Errno, Gone

MODE = "seccomp"
MAX_DATAGRAM = 65535
TCP_ESTABLISHED = 1
IP = (socket.AF_INET, socket.AF_INET6)


def decode(s: socket.socket, raw: bytes, v4_on_v6: bool = True):
    """(addr, port) the engine judges, or None when the kernel must reject it or it is AF_UNSPEC.
    An IPv6 socket may connect/sendto an AF_INET address (v4_on_v6), never bind one."""
    try:
        fam, addr, port = K.decode_sockaddr(raw)
    except K.BadSockaddr:
        return None
    if fam == s.family or (v4_on_v6 and s.family == socket.AF_INET6 and fam == socket.AF_INET):
        return addr, port
    return None


def nonblocking(s: socket.socket) -> bool:
    return bool(fcntl.fcntl(s.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK)


class Handlers(SideDoors):
    def __init__(self, store, audit, jobs, park, stats, optwatch=None):
        """`park(call, host, appfd, cloexec, deadline, raw)`: the loop takes over a blocking connect
        whose host-side connect to `raw` is in progress (and answers when it completes).
        `optwatch`: host/optwatch.Watch, which options each app socket was given (None: not known)."""
        self.store, self.audit, self.jobs, self.park, self.stats = store, audit, jobs, park, stats
        self.optwatch = optwatch
        self.table = {
            K.SYS["bind"]: self.on_bind,
            K.SYS["connect"]: self.on_connect,
            K.SYS["sendto"]: self.on_sendto,
            K.SYS["getsockname"]: self.on_getsockname,
            K.SYS["ioctl"]: self.on_sidedoor,
            K.SYS["setsockopt"]: self.on_sidedoor,
        }

    def serve(self, call: Call) -> None:
        """Run the handler of this notification; whatever happens, the target gets an answer
        (an errno for `Errno` and for unexpected errors) unless it is gone."""
        handler = self.table.get(call.n.nr)
        try:
            if handler is None:
                raise Errno(errno.ENOSYS)
            handler(call)
        except Gone:
            self.stats["gone"] += 1
        except Errno as e:
            call.send(err=e.err)
        except Exception as e:  # never leave a target hanging
            err = e.errno if isinstance(e, OSError) and e.errno else errno.EIO
            print(f"graft: seccomp supervisor: {K.NR_NAME.get(call.n.nr, call.n.nr)}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            call.send(err=err)

    # -- the engine and the audit log ------------------------------------------------------------
    def decide(self, call: Call, op: Op):
        """The engine's decision. Whether the task is in a nested netns is asked (a stat) only
        where the answer can change it: a grant."""
        policy = self.store.cached_policy(call.target.key)
        d = policy.decide(op)
        if d.granted and call.nested():
            d = policy.decide(dataclasses.replace(op, foreign=True))
        return d

    def audit_decision(self, call: Call, op: str, d, **fields) -> None:
        self.audit.decision(call.target.key, MODE, op, d, pid=call.n.pid, **fields)

    @staticmethod
    def egress_op(verb: str, s: socket.socket, target, is_host: bool) -> Op:
        bound = not is_host and s.getsockname()[1] != 0  # bound or connected in the container already
        return Op(verb, s.family, target[0], target[1], s.type, s.proto, bound=bound, grafted=is_host)

    # -- the host socket that replaces the app's ---------------------------------------------------
    def options_set(self, s: socket.socket) -> int | None:
        """The options the app gave its socket `s` (hostsock.copy_options' mask), None: not known."""
        return self.optwatch.options_set(s.fileno()) if self.optwatch is not None else None

    def replacement(self, call: Call, s: socket.socket, d) -> tuple[socket.socket, int, bool, bool]:
        """The host socket that will replace the app's fd (arg 0), bound as the decision says, the
        app's options copied, with what installing it needs: the fd number, its close-on-exec flag
        and the app socket's O_NONBLOCK."""
        appfd = call.appfd
        cloexec = call.cloexec(appfd)
        nonblock = nonblocking(s)
        try:
            h = hostsock.open_bound(d, s.type, s.proto, hostsock.socket_flags(s))
        except OSError as e:
            raise Errno(e.errno or errno.EADDRNOTAVAIL) from None
        try:
            hostsock.copy_options(s, h, self.options_set(s))
        except OSError as e:
            h.close()
            raise Errno(e.errno or errno.EINVAL) from None
        except BaseException:
            h.close()
            raise
        return h, appfd, cloexec, nonblock

    # -- bind ------------------------------------------------------------------------------------
    def on_bind(self, call: Call) -> None:
        """bind(fd, addr, len). Judges an IP socket's bind address against the ingress pairs
        (`Op("bind")`, with V6ONLY so that a dual-stack `[::]:P` matches IPv4 pairs); audits it.
        Grant: a host socket bound to the endpoint (a TCP one listening at once), the app's options
        and O_NONBLOCK copied, installed over the app's fd; answers 0. Local: the bind performed
        on the app's native socket, answers its result. Deny: the engine's errno. Non-IP sockets:
        CONTINUE (a unix path resolves in the task's root); a grafted socket: EINVAL, never
        performed; an address the kernel rejects: bind performed on our duplicate, the kernel's
        answer."""
        s, raw = call.prologue(1, 2)
        with s:
            if s.family not in IP:
                return call.send(cont=True)
            if call.kernel.is_host(s):
                # a grafted socket is bound already; one whose connect failed has lost its port
                # (the kernel releases a port not bound explicitly) but never moves on the host
                raise Errno(errno.EINVAL)
            target = decode(s, raw, v4_on_v6=False)
            if target is None:
                return call.send(err=K.raw_call("bind", s.fileno(), raw))
            v6only = "v6only" in hostsock.socket_flags(s)
            d = self.decide(call, Op("bind", s.family, target[0], target[1], s.type, s.proto, v6only=v6only))
            self.audit_decision(call, "bind", d, addr=target[0], port=target[1])
            if d.verdict == DENY:
                raise Errno(d.errno)
            if d.verdict == LOCAL or s.getsockname()[1] != 0:
                # (a socket bound already gets the kernel's EINVAL, as natively)
                return call.send(err=K.raw_call("bind", s.fileno(), raw))
            h, appfd, cloexec, nonblock = self.replacement(call, s, d)
            with h:
                h.setblocking(not nonblock)
                if s.type == socket.SOCK_STREAM:
                    # a grafted server socket listens at once (the app's own listen() then sets
                    # its backlog): it can never be connect()ed to a host address no rule grants,
                    # not even by swapping it in under a call the supervisor lets CONTINUE
                    h.listen(socket.SOMAXCONN)
                host_addr = h.getsockname()
                view = raw if target[1] else K.with_port(raw, host_addr[1])
                call.install(h, appfd, cloexec)
                t = call.target
                t.bound(os.fstat(h.fileno()).st_ino, host_addr[:2], view)
                self.stats["grafted_bind"] += 1
            call.send()

    # -- connect ---------------------------------------------------------------------------------
    def on_connect(self, call: Call) -> None:
        """connect(fd, addr, len) of an IP socket. Judges the destination: a native unbound
        socket against the egress rules, a grafted (host) socket too (`grafted=True`: only a
        destination an egress rule names, else EPERM); audits it. Grant on a native socket: a host
        socket bound to the source endpoint connects to the copied address and replaces the app's
        (see graft_connect). Grant on a grafted socket, and local: the connect performed on our
        duplicate (blocking stream sockets in the pool), the kernel's answer. Deny: the engine's
        errno. AF_UNSPEC or a malformed address: performed, the kernel says. Non-IP: CONTINUE."""
        s, raw = call.prologue(1, 2)
        keep = False
        try:
            if s.family not in IP:
                return call.send(cont=True)
            target = decode(s, raw)
            if target is None:  # AF_UNSPEC (dissolve the association) or malformed: the kernel says
                return call.send(err=K.raw_call("connect", s.fileno(), raw))
            is_host = call.kernel.is_host(s)
            d = self.decide(call, self.egress_op("connect", s, target, is_host))
            self.audit_decision(call, "connect", d, addr=target[0], port=target[1], grafted=is_host or None)
            if d.verdict == DENY:
                raise Errno(d.errno)
            if is_host or d.verdict == LOCAL:  # a grafted socket's destination was granted above
                keep = self.perform_connect(call, s, raw)
                return
            self.graft_connect(call, s, d, raw)
        finally:
            if not keep:
                s.close()

    def perform_connect(self, call: Call, s: socket.socket, raw: bytes) -> bool:
        """connect() on our duplicate with the copied bytes. Blocking stream sockets go to the
        pool (returns True: the pool job now owns `s`)."""
        if nonblocking(s) or s.type != socket.SOCK_STREAM:
            call.send(err=K.raw_call("connect", s.fileno(), raw))
            return False
        self.jobs.submit(call, s, lambda: (0, K.raw_call("connect", s.fileno(), raw)))
        return True

    def graft_connect(self, call: Call, s: socket.socket, d, raw: bytes) -> None:
        """The granted connect of a native socket, done as the kernel does a plain connect():
        `hostsock.open_connecting` binds the source endpoint with IP_BIND_ADDRESS_NO_PORT (the
        port is chosen per 4-tuple at connect time, TIME_WAIT reused: no bind(addr, 0) that
        reserves a port per socket) and connects non-blocking to the copied address; the app's
        options are copied before the connect. A host socket leaves here connected or connecting,
        never bound without a port. A non-blocking app gets it installed and EINPROGRESS (or 0);
        a blocking app's connect that is still in progress is parked in the loop, which installs
        the socket (blocking again) and answers when it completes or the app's SO_SNDTIMEO
        passes; a failed one is never installed (the app keeps its native socket)."""
        appfd = call.appfd
        cloexec = call.cloexec(appfd)
        nonblock = nonblocking(s)

        def connect(fd: int, dest: bytes) -> int:
            h = socket.socket(fileno=fd)  # a view of open_connecting's socket, detached below
            try:
                hostsock.copy_options(s, h, self.options_set(s))
            finally:
                h.detach()
            return K.raw_call("connect", fd, dest)

        try:
            h, err = hostsock.open_connecting(d, s.type, s.proto, raw, connect=connect)
        except OSError as e:
            raise Errno(e.errno or errno.EADDRNOTAVAIL) from None
        try:
            if err == errno.EINPROGRESS and not nonblock:
                # loopback handshakes are often over by now: a second connect says so (0) and
                # leaves the socket connected as a blocking connect would (a third: EISCONN)
                again = K.raw_call("connect", h.fileno(), raw)
                err = again if again != errno.EALREADY else errno.EINPROGRESS
            if err == errno.EINPROGRESS and not nonblock:
                sec, usec = struct.unpack("=qq", s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16))
                deadline = time.monotonic() + sec + usec / 1e6 if sec or usec else None
                self.park(call, h, appfd, cloexec, deadline, raw)
                h = None  # the loop owns it now
                self.stats["connect_pending"] += 1
                return
            if err not in (0, errno.EINPROGRESS):
                raise Errno(err)
            if not nonblock:
                h.setblocking(True)
            call.install(h, appfd, cloexec)
            self.stats["grafted_connect"] += 1
            call.send(err=err)
        finally:
            if h is not None:
                h.close()

    # -- sendto ----------------------------------------------------------------------------------
    def on_sendto(self, call: Call) -> None:
        """sendto(fd, buf, len, flags, addr, alen) with a destination (the filter traps no other),
        IP sockets. Judges the destination like connect (native unbound sockets: egress rules;
        grafted sockets: only a destination an egress rule names, else EPERM); audits it. Grant on
        a native datagram socket: a host socket bound to the source endpoint replaces the app's
        and the supervisor sends the copied datagram from it; grant on a grafted socket, and
        local: the send performed on our duplicate (a blocking one that would wait: in the pool).
        Answers the bytes sent or the errno. A stream socket's address is ignored by the kernel
        (except MSG_FASTOPEN): performed unjudged. Non-IP: CONTINUE."""
        s, raw = call.prologue(4, 5)
        keep = False
        try:
            if s.family not in IP:
                return call.send(cont=True)
            size = call.args[2]
            flags = call.args[3] & 0xFFFFFFFF
            if s.type == socket.SOCK_DGRAM and size > MAX_DATAGRAM:
                raise Errno(errno.EMSGSIZE)
            data = call.read(call.args[1], min(size, 1 << 20))
            call.valid()
            target = decode(s, raw)
            is_host = call.kernel.is_host(s)
            fastopen = flags & getattr(socket, "MSG_FASTOPEN", 0x20000000)
            if target is None or (s.type == socket.SOCK_STREAM and not fastopen):
                # the kernel rejects it, or ignores the address (connected stream socket)
                if is_host and target is not None and s.type != socket.SOCK_STREAM:
                    raise Errno(errno.EINVAL)
                keep = self.perform_sendto(call, s, data, flags, raw)
                return
            d = self.decide(call, self.egress_op("sendto", s, target, is_host))
            self.audit_decision(call, "sendto", d, addr=target[0], port=target[1], grafted=is_host or None)
            if d.verdict == DENY:
                raise Errno(d.errno)
            if is_host or d.verdict == LOCAL or s.type != socket.SOCK_DGRAM:
                keep = self.perform_sendto(call, s, data, flags, raw)
                return
            h, appfd, cloexec, nonblock = self.replacement(call, s, d)
            with h:
                h.setblocking(not nonblock)
                sent, err = K.raw_sendto(h.fileno(), data, flags | socket.MSG_DONTWAIT, raw)
                call.install(h, appfd, cloexec)
                self.stats["grafted_sendto"] += 1
                call.send(val=sent, err=err)
        finally:
            if not keep:
                s.close()

    def perform_sendto(self, call: Call, s: socket.socket, data: bytes, flags: int, raw: bytes) -> bool:
        """The send on our duplicate; one that would block a blocking app goes to the pool
        (returns True: the pool job now owns `s`)."""
        sent, err = K.raw_sendto(s.fileno(), data, flags | socket.MSG_DONTWAIT, raw)
        blocking = not nonblocking(s) and not flags & socket.MSG_DONTWAIT
        if err != errno.EAGAIN or not blocking:
            call.send(val=sent, err=err)
            return False
        self.jobs.submit(call, s, lambda: K.raw_sendto(s.fileno(), data, flags, raw))
        return True

    # -- getsockname -----------------------------------------------------------------------------
    def on_getsockname(self, call: Call) -> None:
        """getsockname(fd, addr, lenp). Nothing is judged. A grafted IP socket: the app's view
        (see view) written into the target, answers 0. Anything else: CONTINUE, the kernel answers."""
        # our duplicate is closed before the answer: the application may close its socket and bind
        # the same host port at once (the C loop serves that bind while this thread still runs)
        with call.sock(call.appfd) as s:
            view = self.view(call, s) if s.family in IP and call.kernel.is_host(s) else None
        if view is None:
            return call.send(cont=True)  # nothing judged: the kernel answers
        addr, lenp = call.args[1], call.args[2]
        size = struct.unpack("=i", call.read(lenp, 4))[0]
        if size < 0:
            raise Errno(errno.EINVAL)
        call.write_back([(addr, view[:size]), (lenp, struct.pack("=i", len(view)))])
        call.send()

    @staticmethod
    def view(call: Call, s: socket.socket) -> bytes:
        """The address a grafted socket shows its application: the sockaddr it bound (port filled
        in for port 0); for a socket accepted from a grafted listener, the listener's app-side
        port (with the real local address if the app bound a wildcard); a client: its real source."""
        t = call.target
        view = t.views.get(os.fstat(s.fileno()).st_ino)
        if view is not None:
            return view
        real = s.getsockname()
        raw = K.encode_sockaddr(s.family, *real[:2], *real[2:])
        wildcard = "0.0.0.0" if s.family == socket.AF_INET else "::"
        app = t.served.get(real[:2]) or t.served.get((wildcard, real[1]))
        if app is None:
            return raw  # a client socket: its real source
        _fam, app_addr, app_port = K.decode_sockaddr(app)
        if app_addr in ("0.0.0.0", "::"):
            return K.with_port(raw, app_port)  # an accepted socket of a wildcard listener
        return app
