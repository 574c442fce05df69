"""The floor of a seccomp supervisor on this machine: `seccomp-floor` (csrc/seccomp_floor.c, installed
beside libgraft-seccomp.so) runs a command under seccomp mode's own filter, installed with the
launcher's flags, and answers every trapped call with the fewest calls possible: CONTINUE alone
(`continue`), or, for a connect, the socket swap a pooled grant cannot do without (`swap`:
pidfd_getfd, ADDFD of a host socket made ahead, CONTINUE, close). Nothing is judged, read or
copied: what any supervisor pays here before it does its work. cost.py and graft bench's
seccomp-floor topology show it next to seccomp mode. A measurement, not part of the product."""
from __future__ import annotations

import os

from sockgraft.core.tables import trapped_for
from sockgraft.modes.seccomp import bpf
from sockgraft.modes.seccomp.attach import FILTER_FLAGS
from sockgraft.modes.seccomp.fastlib import LIB_DIR

FLOOR = os.path.join(LIB_DIR, "seccomp-floor")
HOW = ("continue", "swap")


def write_filter(path: str, ingress: bool = True) -> str:
    """Seccomp mode's filter for a container with endpoints (and ingress pairs), written to `path`."""
    with open(path, "wb") as f:
        f.write(bpf.filter_program(trapped_for(endpoints=True, ingress=ingress)).assemble())
    return path


def argv(how: str, source: str, filter_path: str, cmd: list[str]) -> list[str]:
    """The command line running `cmd` under the floor (`how`: HOW; `source`: the IPv4 address a
    swapped-in host socket is bound to; `filter_path`: write_filter's file)."""
    if how not in HOW:
        raise ValueError(f"floor: {how!r} is not one of {HOW}")
    return [FLOOR, how, source, filter_path, str(FILTER_FLAGS), *cmd]
