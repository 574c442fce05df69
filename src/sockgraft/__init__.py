"""sockgraft: socket grafting for containers."""
from socket import SOCK_DGRAM, SOCK_SEQPACKET, SOCK_STREAM  # noqa: F401  (for `sockgraft.socket(...)` callers)

from sockgraft.modes.api.graftsocket import (  # noqa: F401
    AF_GRAFT,
    AF_GRAFT_EPNAME_MAX,
    GraftSocket,
    create_connection,
    create_server,
    open_connection,
    resolve,
    socket,
    start_server,
)

__version__ = "0.1.0"
