"""The graft API: sockets bound by endpoint name, mirroring the original C API.

    s = sockgraft.socket(sockgraft.AF_GRAFT, socket.SOCK_STREAM)
    s.bind("ep-http")          # now an ordinary socket in the host netns, bound to ep-http
    s.listen()

Before bind() the object holds a placeholder socket inside the container; bind(NAME) replaces its
file descriptor, in place, with the host socket the fd service hands over, carrying over the socket
options the program set on the placeholder (its setsockopt calls through this object, replayed). A
socket made as AF_INET/AF_INET6 asks for its own family: AF_INET6 on an ipv4 endpoint is bound to the v4-mapped address. Binds and
connects to addresses (tuples) are the plain socket calls: the api mode has no transparent path.
"""
from __future__ import annotations

import _socket as _csocket
import asyncio
import errno
import os
import socket as _socket

from sockgraft.host.hostsock import socket_flags
from sockgraft.modes.api import pool
from sockgraft.modes.api.client import ask
from sockgraft.core.endpoint import Endpoint, parse_endpoint
from sockgraft.core.protocol import Request

AF_GRAFT = 0x4752  # above AF_MAX: without grafting, the kernel refuses it (EAFNOSUPPORT)
AF_GRAFT_EPNAME_MAX = 16
# a socket's family and type as plain ints: socket.socket's properties make an enum of each (~0.5 µs)
_family = _csocket.socket.family.__get__
_type = _csocket.socket.type.__get__


class GraftSocket(_socket.socket):
    """A socket.socket that grafts itself onto an endpoint when bound or connected by name."""

    def __init__(self, family: int = AF_GRAFT, type: int = _socket.SOCK_STREAM, proto: int = 0, fileno=None):
        # the family a bind by name asks for: 0 (AF_GRAFT) is the endpoint's own; an AF_INET6
        # socket bound onto an ipv4 endpoint gets the v4-mapped address (a dual-stack socket)
        self._named_family = 0 if family == AF_GRAFT else family
        if family == AF_GRAFT:
            family = _socket.AF_INET  # placeholder until bind(NAME)
        super().__init__(family, type, proto, fileno)
        self.endpoint: str | None = None
        self._setopts: list[tuple] = []  # setsockopt calls on the placeholder: replayed on the host socket

    def setsockopt(self, level, optname, value, optlen=None) -> None:
        if optlen is None:
            super().setsockopt(level, optname, value)
        else:
            super().setsockopt(level, optname, value, optlen)
        if self.endpoint is None:
            self._setopts.append((level, optname, value, optlen))

    @classmethod
    def _pooled(cls, fd: int, family: int, type: int, proto: int, source: str) -> "GraftSocket":
        """A new GraftSocket on pooled host socket `fd` (family, type and protocol given: no syscall),
        as `cls(family, type, proto, fileno=fd)` then `endpoint = source` make it, without the two
        Python __init__ calls (~1 µs of a pooled connect's ~10): the C socket's own init, then the
        attributes socket.socket.__init__ and ours set (test_api holds the two objects equal)."""
        s = cls.__new__(cls)
        _csocket.socket.__init__(s, family, type, proto, fd)
        s._io_refs, s._closed = 0, False
        s._named_family, s.endpoint, s._setopts = family, source, []
        return s

    def _adopt(self, fd: int, family: int, name: str, replay: bool = True) -> None:
        """The host socket `fd` (of `family`, this socket's type and protocol) takes this socket's fd
        number. The options the program set on the placeholder are set again - its own setsockopt
        calls replayed, so it gets the values it gets natively - instead of reading every option of
        core.tables.COPIED_OPTIONS back (IP-level ones only onto a host socket of the placeholder's
        family, none onto a unix one, as host.hostsock.copy_options)."""
        timeout, sotype, proto, placeholder = self.gettimeout(), _type(self), self.proto, _family(self)
        number = self.detach()
        try:
            os.dup2(fd, number, inheritable=False)
        finally:
            os.close(fd)
        _socket.socket.__init__(self, family, sotype, proto, number)
        self.settimeout(timeout)
        if replay:
            self._replay(self, placeholder)
        self.endpoint = name

    def _replay(self, host: _socket.socket, placeholder: int) -> None:
        """The program's setsockopt calls on the placeholder (of family `placeholder`), made again on `host`."""
        host_family = _family(host)
        for level, optname, value, optlen in self._setopts if host_family != _socket.AF_UNIX else ():
            if level in (_socket.IPPROTO_IP, _socket.IPPROTO_IPV6) and placeholder != host_family:
                continue
            try:
                if optlen is None:
                    _socket.socket.setsockopt(host, level, optname, value)
                else:
                    _socket.socket.setsockopt(host, level, optname, value, optlen)
            except OSError:
                continue

    def bind(self, address) -> None:
        if isinstance(address, str) and _family(self) != _socket.AF_UNIX:
            got = pool.take_unbound(address, self._named_family, _type(self), self.proto) if self.endpoint is None else None
            if got is not None and self._bind_pooled(*got, address):
                return
            reply, fd = ask(Request("named", name=address, family=self._named_family, type=_type(self),
                                    proto=self.proto, flags=socket_flags(self)))
            self._adopt(fd, reply.family, address)
        else:
            super().bind(address)

    def _bind_pooled(self, fd: int, family: int, host: tuple, name: str) -> bool:
        """Bind a pooled unbound host socket to `host`, the endpoint's address, with the program's
        options set first, then take it in place of the placeholder: no round trip. False (the
        socket closed, the placeholder as it was) where _bind_host says so."""
        s = _csocket.socket(family, _type(self), self.proto, fd)  # the C type: no socket.py wrapper
        try:
            self._replay(s, _family(self))
            bound = _bind_host(s, family, host)
        except BaseException:
            s.close()
            raise
        if not bound:
            s.close()
            return False
        self._adopt(s.detach(), family, name, replay=False)
        return True

    def connect(self, address) -> None:
        if isinstance(address, str) and _family(self) != _socket.AF_UNIX:
            self._dial(address)
            if self.gettimeout() != 0.0:
                _wait_connected(self)
        else:
            super().connect(address)

    def _dial(self, name: str) -> None:
        reply, fd = ask(Request("dial", name=name, type=self.type, proto=self.proto))
        self._adopt(fd, reply.family, name)

    def connect_from(self, source: str, address: tuple) -> None:
        """Connect to `address` (an IP and port) leaving by endpoint `source`. Where the kernel guards
        pooled sockets, this takes one (bound to the endpoint's address, its port chosen per 4-tuple
        by the connect) from the process's pool (modes/api/pool.py) and runs the kernel's connect()
        on it: blocking, non-blocking (EINPROGRESS) and timeouts exactly as a plain socket's.
        Otherwise the fd service connects and hands the socket over connected or connecting; a
        blocking socket waits (within its timeout); a non-blocking one raises BlockingIOError
        (EINPROGRESS) like socket.connect."""
        got = pool.take(source, address, _type(self), self.proto, self._named_family) if self.endpoint is None else None
        if got is None:
            return self._connect_from_service(source, address)
        fd, family = got
        self._adopt(fd, family, source)
        _socket.socket.connect(self, _host_destination(address, family))

    def _connect_from_service(self, source: str, address: tuple) -> None:
        reply, fd = ask(Request("named", name=source, family=self._named_family, type=self.type, proto=self.proto,
                                flags=socket_flags(self), addr=address[0], port=address[1]))
        self._adopt(fd, reply.family, source)
        if self.gettimeout() != 0.0:
            _wait_connected(self)
            # a connect done in the background leaves the kernel's socket "connecting", where a later
            # connect() to anywhere answers 0: one to its own peer settles it (re-aiming: EISCONN)
            _socket.socket.connect_ex(self, self.getpeername())
        elif self.type == _socket.SOCK_STREAM:
            raise BlockingIOError(errno.EINPROGRESS, os.strerror(errno.EINPROGRESS))


class _Unopened(GraftSocket):
    """What socket(AF_GRAFT, SOCK_STREAM or SOCK_DGRAM) returns: a GraftSocket whose placeholder is
    not made yet. A bind by name takes its host socket in at once - a pooled unbound one bound
    where it stands, or the service's answer - with no socket of the container's made, replaced
    and freed (~8 µs of a pooled bind's ~30). Any other call (_OPENING: a setsockopt, fileno, a bind
    to an address, a connect..., and a close) first makes the placeholder as GraftSocket(AF_GRAFT) does, so it
    answers as it always did; either way the object then becomes a GraftSocket (its class is
    switched), and a socket in use pays nothing for having been one of these."""

    @classmethod
    def _make(cls, type: int, proto: int) -> "_Unopened":
        s = cls.__new__(cls)  # the C socket's fd is -1 until one is taken in
        s._io_refs, s._closed = 0, False
        s._named_family, s.endpoint, s._setopts = 0, None, []
        s._kind = (type, proto)
        return s

    family = property(lambda self: _socket.AddressFamily.AF_INET)  # the placeholder's
    type = property(lambda self: _socket.SocketKind(self._kind[0]))
    proto = property(lambda self: self._kind[1])
    timeout = property(lambda self: self._opened().timeout)

    def _opened(self) -> GraftSocket:
        """The placeholder made, the object a GraftSocket from now on."""
        _csocket.socket.__init__(self, _socket.AF_INET, *self._kind)
        self._became(None)
        return self

    def close(self) -> None:
        """Closed unused: made and closed, so that it is then what a closed GraftSocket is."""
        GraftSocket.close(self._opened())

    def __repr__(self) -> str:
        return GraftSocket.__repr__(self._opened())

    def _became(self, name: str | None) -> None:
        del self._kind
        self.__class__ = GraftSocket
        self.endpoint = name

    def bind(self, address) -> None:
        if not isinstance(address, str):
            return GraftSocket.bind(self._opened(), address)
        type, proto = self._kind
        got = pool.take_unbound(address, 0, type, proto)
        if got is not None:
            fd, family, host = got
            _csocket.socket.__init__(self, family, type, proto, fd)
            try:
                bound = _bind_host(self, family, host)
            except BaseException:
                os.close(_csocket.socket.detach(self))
                raise
            if bound:
                return self._became(address)
            os.close(_csocket.socket.detach(self))
        reply, fd = ask(Request("named", name=address, family=0, type=type, proto=proto, flags=frozenset()))
        _csocket.socket.__init__(self, reply.family, type, proto, fd)
        self._became(address)


# every call of a GraftSocket but bind (and close, above) makes an _Unopened's placeholder first
# (test_api holds this list equal to GraftSocket's callables)
_OPENING = ("accept", "connect", "connect_ex", "connect_from", "detach", "dup", "fileno", "get_inheritable",
            "getblocking", "getpeername", "getsockname", "getsockopt", "gettimeout", "listen", "makefile", "recv",
            "recv_into", "recvfrom", "recvfrom_into", "recvmsg", "recvmsg_into", "send", "sendall", "sendfile",
            "sendmsg", "sendmsg_afalg", "sendto", "set_inheritable", "setblocking", "setsockopt", "settimeout",
            "shutdown")


def _opening(name: str):
    call = getattr(GraftSocket, name)

    def opening(self, *args, **kwargs):
        return call(self._opened(), *args, **kwargs)
    opening.__name__ = opening.__qualname__ = name
    return opening


for _name in _OPENING:
    if hasattr(GraftSocket, _name):  # (sendmsg_afalg: Linux only)
        setattr(_Unopened, _name, _opening(_name))


def _bind_host(s: _csocket.socket, family: int, host: tuple) -> bool:
    """Bind pooled unbound host socket `s` to `host`, its endpoint's address (an IPv6 socket on a
    v4-mapped one: dual-stack). False where the kernel refused with EPERM (the bind guard: the
    table changed since the pool was fetched) or EADDRINUSE (the port may still be held by the
    service's copy of a pooled socket the program bound and closed a moment ago: the service
    closes its copies only after sending them): the service's answer, given once it has closed
    them, is the one to give; the caller closes the socket."""
    try:
        if family == _socket.AF_INET6 and host[0].startswith("::ffff:"):
            _csocket.socket.setsockopt(s, _socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0)
        _csocket.socket.bind(s, host)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EADDRINUSE):
            return False
        raise
    return True


def _host_destination(address: tuple, family: int) -> tuple:
    """The destination as a host socket of `family` takes it (an IPv4 one on an IPv6 socket: mapped)."""
    if family == _socket.AF_INET6 and ":" not in address[0]:
        return f"::ffff:{address[0]}", address[1]
    return address[0], address[1]


def _wait_connected(s: _socket.socket) -> None:
    import select

    p = select.poll()
    p.register(s, select.POLLOUT)
    timeout = s.gettimeout()
    if not p.poll(None if timeout is None else int(timeout * 1000)):
        raise TimeoutError("timed out")
    code = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
    if code:
        raise OSError(code, os.strerror(code))


def socket(family: int = AF_GRAFT, type: int = _socket.SOCK_STREAM, proto: int = 0) -> GraftSocket:
    if family == AF_GRAFT and type in (_socket.SOCK_STREAM, _socket.SOCK_DGRAM):
        return _Unopened._make(type, proto)
    return GraftSocket(family, type, proto)


def resolve(name: str) -> Endpoint:
    """The host endpoint a name stands for in this container's table."""
    reply, _ = ask(Request("resolve", name=name))
    return parse_endpoint(reply.lines[0])


def create_server(endpoint: str, *, type: int = _socket.SOCK_STREAM, backlog: int | None = None,
                  reuse_port: bool = False) -> GraftSocket:
    s = socket(AF_GRAFT, type)
    try:
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
        s.bind(endpoint)
        if type == _socket.SOCK_STREAM:
            s.listen(backlog) if backlog is not None else s.listen()
        return s
    except BaseException:
        s.close()
        raise


def create_connection(address, timeout=_socket._GLOBAL_DEFAULT_TIMEOUT, source: str | None = None) -> _socket.socket:
    """Like socket.create_connection; `source` names the (usually dynamic) endpoint to leave by
    (GraftSocket.connect_from: a pooled host socket and the kernel's connect, or the fd service
    connects). Without a source the connection stays inside the container's netns."""
    if source is None:
        return _socket.create_connection(address, timeout)
    host, port = address[:2]
    error: OSError | None = None
    for sockaddr in _addresses(host, port):
        got = pool.take(source, sockaddr[:2], _socket.SOCK_STREAM)
        if got is None:
            s = socket(AF_GRAFT, _socket.SOCK_STREAM)
        else:  # no placeholder to make and replace: the pooled socket is the connection's
            s = GraftSocket._pooled(got[0], got[1], _socket.SOCK_STREAM, 0, source)
        try:
            if timeout is not _socket._GLOBAL_DEFAULT_TIMEOUT:
                s.settimeout(timeout)
            if got is None:
                s._connect_from_service(source, sockaddr[:2])
            else:
                _socket.socket.connect(s, _host_destination(sockaddr, got[1]))
            return s
        except OSError as e:
            s.close()
            error = e
        except BaseException:
            s.close()
            raise
    raise error if error is not None else OSError(errno.EADDRNOTAVAIL, f"no address for {host!r}")


_LITERALS: dict[str, bool] = {}  # host -> whether it is an IP literal (at most 256 remembered)


def _addresses(host, port) -> list[tuple]:
    """getaddrinfo's stream addresses; an IP literal is its own (no resolver call per connect, and
    known as one from the second connect on: ~1 µs of a pooled connect's ~10 in Python)."""
    if isinstance(host, str) and isinstance(port, int):
        literal = _LITERALS.get(host)
        if literal is None:
            if len(_LITERALS) >= 256:
                _LITERALS.clear()
            literal = _LITERALS[host] = _is_literal(host)
        if literal:
            return [(host, port)]
    return [sockaddr for *_, sockaddr in _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)]


def _is_literal(host: str) -> bool:
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            _socket.inet_pton(family, host)
        except OSError:
            continue
        return True
    return False


async def start_server(client_connected_cb, endpoint: str, **kwargs) -> asyncio.Server:
    sock = create_server(endpoint)
    sock.setblocking(False)
    return await asyncio.start_server(client_connected_cb, sock=sock, **kwargs)


async def open_connection(host: str, port: int, *, source: str | None = None, **kwargs):
    if source is None:
        return await asyncio.open_connection(host, port, **kwargs)
    loop = asyncio.get_running_loop()
    error: OSError | None = None
    for *_, sockaddr in await loop.getaddrinfo(host, port, type=_socket.SOCK_STREAM):
        sock = socket(AF_GRAFT, _socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.connect_from(source, sockaddr[:2])
            except BlockingIOError:
                await _writable(loop, sock)
            code = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
        except OSError as e:
            sock.close()
            error = e
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, **kwargs)
    raise error if error is not None else OSError(errno.EADDRNOTAVAIL, f"no address for {host!r}")


async def _writable(loop: asyncio.AbstractEventLoop, sock: _socket.socket) -> None:
    done = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_writer(sock.fileno())
