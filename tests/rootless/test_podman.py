"""Rootless Podman through graft-runtime: `podman run --runtime graft-runtime --network none` as the
test's unprivileged user (subuid/subgid from conftest), served by the user's own graftd: a server
grafted onto its endpoint, a client leaving by an egress endpoint, the table gone with the container."""
from __future__ import annotations

import json
import socket

import pytest

from tests.helpers import free_port, wait_for, wait_port
from tests.rootless.podman import IMAGE, LIMITS, RootlessPodman
from tests.rootless.test_run import HostServer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def podman(user):
    p = RootlessPodman(user)
    try:
        p.start_graftd()
        yield p
    finally:
        p.close()


def _get(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := c.recv(4096):
            data += chunk
    return data.decode()


def _events(podman) -> list[dict]:
    return [json.loads(line) for line in podman.graftd_events().splitlines() if line.startswith("{")]


def test_rootless_podman_serves_and_leaves(podman):
    port = free_port()
    host = HostServer()
    try:
        cid = podman("run", "-d", *LIMITS,
                     *podman.graft_args(f"ep-h type ipv4 addr 127.0.0.1 port {port};"
                                        "ep-out type ipv4 addr 127.0.0.1 port dynamic",
                                        ingress="0.0.0.0:80=ep-h", egress="127.0.0.1/32=ep-out"),
                     IMAGE, "httpd", "-f", "-p", "80", "-h", "/www").stdout.strip()
        wait_port("127.0.0.1", port, 20)
        assert "sockgraft-ok" in _get(port)
        out = podman("exec", cid, "sh", "-c", f"echo hi | nc 127.0.0.1 {host.port}").stdout
        assert out.strip() == "ok:hi"
        key = wait_for(lambda: [e["container"] for e in _events(podman) if e.get("event") == "container"], 10,
                       "graftd to serve the container")[-1]
        podman("rm", "-f", "-t", "0", cid)
        wait_for(lambda: any(e.get("event") == "agent-forget" and e.get("container") == key for e in _events(podman)),
                 15, "graftd to forget the container")
    finally:
        host.close()
    with pytest.raises(OSError):
        _get(port)
