"""`graft run --mode seccomp` traps what the container's table needs (core.tables.trapped_for), seen
in the audit log: what is not trapped is never judged, so never audited."""
from __future__ import annotations

import json
import os
import socket
import sys

from tests.modes.seccomp.util import run

APP = r"""
import socket, sys
port = int(sys.argv[1])
b = socket.socket(); b.bind(("127.0.0.2", 0)); b.listen(); b.getsockname()
c = socket.socket(); c.connect(b.getsockname()); c.getsockname()   # container-local
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.sendto(b"x", ("127.0.0.1", port))
print("ok")
"""


def audited(state_dir: str) -> list[str]:
    path = os.path.join(state_dir, "audit.log")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted({json.loads(line)["op"] for line in f})


def test_empty_table_nothing_trapped(state_dir, ns):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        r = run(ns, [sys.executable, "-c", APP, str(rx.getsockname()[1])])
    assert r.stdout.strip() == "ok"
    assert "same-CPU" not in r.stderr  # SYNC_WAKE_UP accepted (kernel >= 6.6)
    assert audited(state_dir) == []


def test_egress_table_traps_the_egress_path(state_dir, ns):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(10)
        r = run(ns, [sys.executable, "-c", APP, str(rx.getsockname()[1])],
                endpoints=["out type ipv4 addr 127.0.0.1 port dynamic"], egress=["127.0.0.1/32=out"])
        assert rx.recv(16) == b"x"  # the datagram was grafted: it reached the host
    assert r.stdout.strip() == "ok"
    assert "same-CPU" not in r.stderr
    assert audited(state_dir) == ["bind", "connect", "sendto"]


def test_oci_profile_follows_the_table():
    from sockgraft.core.tables import trapped_for
    from sockgraft.runtime import ociconfig

    def notified(trapped) -> tuple[set, dict]:
        config = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}}}
        ociconfig.merge_seccomp(config, "/run/agent.sock", trapped=trapped)
        prof = config["linux"]["seccomp"]
        return {n for r in prof["syscalls"] if r["action"] == ociconfig.NOTIFY for n in r["names"]}, prof

    names, prof = notified(trapped_for(endpoints=False, ingress=False))
    assert names == set() and "listenerPath" not in prof  # nothing handed to graftd
    assert any(r["names"] == ["io_uring_setup"] and r["action"] == "SCMP_ACT_ERRNO" for r in prof["syscalls"])
    names, prof = notified(trapped_for(endpoints=True, ingress=False))
    assert names == {"bind", "connect", "sendto", "ioctl", "setsockopt"} and prof["listenerPath"] == "/run/agent.sock"
    names, _ = notified(trapped_for(endpoints=True, ingress=True))
    assert "getsockname" in names
