"""The attach modes by name (`graft run --mode`, the bench's grafted topologies)."""
from __future__ import annotations

from sockgraft.modes.api.attach import ApiAttach
from sockgraft.modes.base import Attach
from sockgraft.modes.preload.attach import PreloadAttach
from sockgraft.modes.seccomp.attach import SeccompAttach

MODES: dict[str, type[Attach]] = {"api": ApiAttach, "preload": PreloadAttach, "seccomp": SeccompAttach}
