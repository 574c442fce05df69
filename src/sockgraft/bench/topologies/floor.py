"""seccomp-floor: the floor of seccomp mode on this machine, measured beside it. As native (both ends
in the host netns over loopback), but what runs on a container side runs under seccomp mode's own
filter (the one of a container with endpoints and ingress pairs) and a supervisor that does the
least it can (modes/seccomp/floor.py, `swap`): a connect gets a host socket made ahead put in place
of its own (pidfd_getfd, ADDFD, CONTINUE, close), every other trapped call CONTINUE. Nothing is
judged, read or copied: what graft-seccomp could at best reach here."""
from __future__ import annotations

import os
import shutil
import tempfile

from sockgraft.bench.debris import tag
from sockgraft.bench.topologies.native import Native


class SeccompFloor(Native):
    name = "seccomp-floor"
    kind = "floor"

    def __init__(self, state_dir: str | None = None):
        super().__init__(state_dir)
        self.dir: str | None = None

    def describe(self) -> str:
        return ("as native, the container side under seccomp mode's filter and a supervisor doing the least "
                "(connect: a host socket swapped in; other trapped calls: CONTINUE): graft-seccomp's floor")

    def unavailable(self) -> str | None:
        from sockgraft.modes.seccomp import kernel as K
        from sockgraft.modes.seccomp.floor import FLOOR

        try:
            K.check_arch()
        except K.UnsupportedArch as e:
            return str(e)
        if not os.access(FLOOR, os.X_OK):
            return f"{FLOOR} is not installed (scripts/setup)"
        return None

    def setup(self) -> None:
        from sockgraft.modes.seccomp.floor import write_filter

        self.dir = tempfile.mkdtemp(prefix=tag() + "-floor")
        write_filter(os.path.join(self.dir, "filter"))

    def teardown(self) -> None:
        super().teardown()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def command(self, side: str, cmd: list[str], ports: list[int]) -> list[str]:
        from sockgraft.modes.seccomp.floor import argv

        if side == "host":
            return cmd
        return argv("swap", "127.0.0.1", os.path.join(self.dir, "filter"), cmd)
