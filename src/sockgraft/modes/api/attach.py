"""Api mode: programs written for grafting ask the fd service themselves (`sockgraft.socket`, the C
API of graft.h); attaching them needs nothing beyond the fd service `graft run` already serves."""
from __future__ import annotations

from sockgraft.modes.base import Attach


class ApiAttach(Attach):
    name = "api"
