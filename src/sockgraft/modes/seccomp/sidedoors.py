"""The side doors of a socket the seccomp supervisor guards: socket ioctls (0x89xx) and
SO_BINDTODEVICE/SO_BINDTOIFINDEX. Part of `handlers.Handlers` (which provides `store` and
`audit_decision`)."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from sockgraft.core.engine import Op
from sockgraft.modes.seccomp import kernel as K
from sockgraft.modes.seccomp.targets import Call, Errno

MAX_OPTVAL = 64


class SideDoors:
    def on_sidedoor(self, call: Call) -> None:
        """ioctl(fd, 0x89xx, arg) and setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE|SO_BINDTOIFINDEX).
        A grafted socket: judged by the engine (`Op("ioctl"|"bindtodevice", grafted=True)`: always
        denied, EPERM), audited. A native socket: performed by the supervisor on its duplicate
        (never CONTINUE: another thread could put a grafted socket at that fd number between the
        check and the kernel's lookup) — see native_ioctl; the setsockopt with the copied value.
        Answers the result or the errno; not a socket: ENOTTY (ioctl) / ENOTSOCK."""
        is_ioctl = call.n.nr == K.SYS["ioctl"]
        dup = call.dup(call.appfd)
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            raise Errno(errno.ENOTTY if is_ioctl else errno.ENOTSOCK) from None
        with s:
            cmd = call.args[1] & 0xFFFFFFFF
            if call.kernel.is_host(s):
                verb = "ioctl" if is_ioctl else "bindtodevice"
                d = self.store.cached_policy(call.target.key).decide(Op(verb, s.family, grafted=True))
                self.audit_decision(call, f"ioctl {cmd:#x}" if is_ioctl else "setsockopt SO_BINDTODEVICE", d)
                raise Errno(d.errno)
            if is_ioctl:
                return self.native_ioctl(call, s, cmd, call.args[2])
            size = call.args[4] & 0xFFFFFFFF
            if size > MAX_OPTVAL:
                raise Errno(errno.EINVAL)
            optval = call.read(call.args[3], size)
            call.valid()
            try:
                s.setsockopt(cmd, call.args[2] & 0xFFFFFFFF, optval)
            except OSError as e:
                raise Errno(e.errno) from None
            call.send()

    def native_ioctl(self, call: Call, s: socket.socket, cmd: int, arg: int) -> None:
        """The socket ioctls a container may use on its own sockets, performed on our duplicate (the
        socket's netns is the container's): SIOCGSKNS (the netns fd installed and returned),
        SIOCGIFCONF, the ifreq getters, the ifreq setters with CAP_NET_ADMIN, SIOCGSTAMP(NS),
        SIOCATMARK, SIOCGPGRP. Anything carrying a pointer the kernel would follow in the caller's
        memory (ethtool, MII, bonding, device-private, routes, ARP) is judged unsupported by the
        engine (EPERM) and audited."""
        if cmd == K.SIOCGSKNS:
            call.valid()
            nsfd = fcntl.ioctl(s.fileno(), cmd)
            try:
                call.install_and_send(nsfd)
            finally:
                os.close(nsfd)
            return
        if cmd == K.SIOCGIFCONF:
            return self.ifconf(call, s, arg)
        size = K.IOCTL_OUT.get(cmd) or (K.IFREQ_SIZE if cmd in K.IFREQ_GET else 0)
        if not size and cmd in K.IFREQ_SET and call.has_cap(K.CAP_NET_ADMIN):
            size = K.IFREQ_SIZE
        if not size:
            d = self.store.cached_policy(call.target.key).decide(Op("ioctl", s.family, supported=False))
            self.audit_decision(call, f"ioctl {cmd:#x}", d)
            raise Errno(d.errno)
        buf = bytearray(call.read(arg, size) if cmd not in K.IOCTL_OUT else size)
        try:
            ret = fcntl.ioctl(s.fileno(), cmd, buf, True)
        except OSError as e:
            raise Errno(e.errno) from None
        call.write_back([(arg, bytes(buf))])
        call.send(val=ret)

    @staticmethod
    def ifconf(call: Call, s: socket.socket, arg: int) -> None:
        """SIOCGIFCONF on our duplicate: the container's interfaces written into the caller's
        struct ifconf and buffer."""
        length, ptr = K.IFCONF.unpack(call.read(arg, K.IFCONF.size))
        if length < 0 or length > 1 << 20:
            raise Errno(errno.EINVAL)
        got, data = K.ifconf(s.fileno(), length if ptr else 0, bool(ptr))
        writes = [(arg, struct.pack("=i", got))]
        if ptr and got:
            writes.append((ptr, data[:got]))
        call.write_back(writes)
        call.send()
