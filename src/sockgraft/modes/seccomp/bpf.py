"""The classic-BPF seccomp program of seccomp mode, built by a tiny assembler with labels.

The program is derived from the one trapped-syscall list, `core.tables.TRAPPED`/`REFUSED` (the
OCI profile of `runtime.ociconfig` is derived from the same list), or from the subset a
container's policy needs (`core.tables.trapped_for`: the launcher passes it):
- any other audit arch than x86_64 kills the process; x32 syscall numbers fail with ENOSYS;
- a trapped syscall notifies the supervisor where its argument condition holds (bind, connect,
  getsockname always; sendto with a destination; socket ioctls 0x89xx; setsockopt(SOL_SOCKET,
  SO_BINDTODEVICE | SO_BINDTOIFINDEX)) and is allowed elsewhere;
- a refused syscall (io_uring_setup) fails with ENOSYS;
- everything else is allowed.
"""
from __future__ import annotations

import errno
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from sockgraft.core.tables import LOW32, POINTER, REFUSED, TRAPPED
from sockgraft.modes.seccomp.kernel import AUDIT_ARCH_X86_64, SYS, X32_SYSCALL_BIT

# classic BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
AND_K = 0x54
RET_K = 0x06

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_ALLOW = 0x7FFF0000

OFF_NR, OFF_ARCH = 0, 4


def off_arg(i: int, high: bool = False) -> int:
    """Offset of the low (or high) 32 bits of args[i] in struct seccomp_data (little endian)."""
    return 16 + 8 * i + (4 if high else 0)


@dataclass(frozen=True)
class Insn:
    code: int
    k: int = 0
    jt: str | int = 0  # a label, or 0 for "next"
    jf: str | int = 0


class Program:
    """Instructions with symbolic jump targets; `assemble()` resolves them."""

    def __init__(self) -> None:
        self.insns: list[Insn] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> "Program":
        if name in self.labels:
            raise ValueError(f"label {name} defined twice")
        self.labels[name] = len(self.insns)
        return self

    def ld(self, off: int) -> "Program":
        self.insns.append(Insn(LD_W_ABS, off))
        return self

    def jeq(self, k: int, jt: str | int = 0, jf: str | int = 0) -> "Program":
        self.insns.append(Insn(JEQ_K, k, jt, jf))
        return self

    def jge(self, k: int, jt: str | int = 0, jf: str | int = 0) -> "Program":
        self.insns.append(Insn(JGE_K, k, jt, jf))
        return self

    def and_(self, k: int) -> "Program":
        self.insns.append(Insn(AND_K, k))
        return self

    def ret(self, k: int) -> "Program":
        self.insns.append(Insn(RET_K, k))
        return self

    def _offset(self, at: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        if target not in self.labels:
            raise ValueError(f"undefined label {target}")
        off = self.labels[target] - at - 1
        if not 0 <= off <= 255:
            raise ValueError(f"jump to {target} out of range ({off})")
        return off

    def assemble(self) -> bytes:
        if len(self.insns) > 4096:
            raise ValueError("program too long")
        out = b""
        for i, ins in enumerate(self.insns):
            out += struct.pack("=HBBI", ins.code, self._offset(i, ins.jt), self._offset(i, ins.jf), ins.k & 0xFFFFFFFF)
        return out


def _condition(p: Program, name: str, condition) -> None:
    """Notify where `condition` holds (every argument index; one cube of each), else allow."""
    idx = sorted(condition)
    for k, i in enumerate(idx):
        held = f"{name}.{k + 1}" if k + 1 < len(idx) else "notify"  # this index holds: the next one
        p.label(f"{name}.{k}")
        if condition[i] == POINTER:  # 64 bits: either half not zero
            p.ld(off_arg(i)).jeq(0, 0, held)
            p.ld(off_arg(i, high=True)).jeq(0, "allow", held)
            continue
        cubes = list(condition[i])
        loaded = False  # the accumulator holds the argument's low 32 bits unmasked
        for c, (mask, value) in enumerate(cubes):
            if not loaded:
                p.ld(off_arg(i))
                loaded = True
            if mask != LOW32:
                p.and_(mask)
                loaded = False
            p.jeq(value, held, "allow" if c == len(cubes) - 1 else 0)


def filter_program(trapped: Mapping[str, Mapping | None] = TRAPPED) -> Program:
    """The filter trapping `trapped` (TRAPPED, or the subset a container's policy needs:
    `core.tables.trapped_for`); REFUSED are always refused."""
    p = Program()
    p.ld(OFF_ARCH).jeq(AUDIT_ARCH_X86_64, 0, "kill")
    p.ld(OFF_NR).jge(X32_SYSCALL_BIT, "enosys")
    for name, condition in trapped.items():
        p.jeq(SYS[name], "notify" if condition is None else f"{name}.0")
    for name in REFUSED:
        p.jeq(SYS[name], "enosys")
    p.ret(RET_ALLOW)
    for name, condition in trapped.items():
        if condition is not None:
            _condition(p, name, condition)
    p.label("allow").ret(RET_ALLOW)  # classic BPF jumps only forward: shared exits come last
    p.label("notify").ret(RET_USER_NOTIF)
    p.label("enosys").ret(RET_ERRNO | errno.ENOSYS)
    p.label("kill").ret(RET_KILL_PROCESS)
    return p


def run(prog: bytes, data: bytes) -> int:
    """Interpret `prog` on a struct seccomp_data (for tests: the kernel is the real judge)."""
    insns = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == LD_W_ABS:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == AND_K:
            acc &= k
        elif code == JEQ_K:
            pc += jt if acc == k else jf
        elif code == JGE_K:
            pc += jt if acc >= k else jf
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x}")


def seccomp_data(nr: int, args=(0,) * 6, arch: int = AUDIT_ARCH_X86_64, ip: int = 0) -> bytes:
    args = tuple(args) + (0,) * (6 - len(args))
    return struct.pack("=iIQ6Q", nr, arch, ip, *[a & 0xFFFFFFFFFFFFFFFF for a in args])
