"""Pooled host sockets (csrc/pool.c, the fd service's `pool`): a connect through an egress rule
takes a host socket fetched ahead (bound with NO_PORT, marked, not connected) and the program's own
connect() runs on it. The kernel guards what such a socket can do (tests/host/test_bindguard.py,
tests/security/test_kernel_egress.py); these tests hold the library's side."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sockgraft.core.protocol import MAX_POOL, Request
from sockgraft.core.tables import MARK_MASK, MARK_TAG
from tests.helpers import free_port, graft_cmd
from tests.modes.preload.conftest import ep
from tests.modes.preload.test_connect import acceptor  # noqa: F401  (a fixture)

PY = sys.executable
CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pool_cases.py")
OUT = [*ep("ep-out", None, "127.0.0.2"), "--egress", "127.0.0.1/32=ep-out"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pools need the bind guard (root)")


def run(run_preload, case: str, *args, env=None) -> tuple[dict, str]:
    p = run_preload(OUT, [PY, CASES, case, *map(str, args)], env={"GRAFT_TRACE": "1", **(env or {})})
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return json.loads(out), err


def requests(err: str, verb: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"graft: request: {verb} ")]


def test_connects_draw_on_pools_fetched_in_batches(run_preload, acceptor):
    got, err = run(run_preload, "batch", acceptor, 20)
    assert got["errors"] == 0
    assert len(got["marks"]) == 1 and got["marks"][0] & MARK_MASK == MARK_TAG  # the container's mark
    assert got["sources"] == ["127.0.0.2"]  # the endpoint's address
    pools = requests(err, "pool")
    # the first connect waits for a batch of 16; the next is asked for ahead, without waiting, when a
    # connect leaves POOL_LOW (8) of them: after the 8th (20 connects: 32 sockets, 12 left)
    assert len(pools) == 2 and not requests(err, "connect"), err
    assert err.count("graft: reply (refill): ok ") >= 1, err  # a batch asked ahead was collected
    # the request is the protocol's, byte for byte (the library asks for MAX_POOL: POOL_BATCH equals it)
    want = Request("pool", family=2, addr="127.0.0.1", port=acceptor, type=1, count=MAX_POOL).encode().decode()
    assert pools[0] == f"graft: request: {want} out:127.0.0.1/32=ep-out"


def test_without_pools_the_service_connects(run_preload, acceptor):
    got, err = run(run_preload, "batch", acceptor, 5, env={"GRAFT_POOLS": "0"})
    assert got["errors"] == 0 and got["sources"] == ["127.0.0.2"]
    assert len(requests(err, "pool")) == 1 and len(requests(err, "connect")) == 5, err  # asked once a second


def test_a_pooled_socket_cannot_be_bound_elsewhere(run_preload):
    """The re-bind attack on a socket handed over unconnected: a refused connect leaves the pooled
    socket bound with NO_PORT and no port; the kernel refuses to bind it anywhere (EPERM)."""
    got, _ = run(run_preload, "rebind", free_port())
    assert got["connect"] == "ECONNREFUSED" and got["rebind"] == "EPERM"
    assert got["mark"] & MARK_MASK == MARK_TAG


def test_a_forked_child_never_uses_its_parents_pool(run_preload, acceptor):
    got, err = run(run_preload, "fork", acceptor)
    assert got == {"first": 0, "child": 0, "parent": 0}
    assert len(requests(err, "pool")) == 2, err  # the parent's, then the child's own


def test_fds_the_program_closed_are_not_used(run_preload, acceptor):
    got, _ = run(run_preload, "closed", acceptor)
    assert got == {"first": 0, "after": 0}


def test_a_table_change_drops_the_pool(run_preload, acceptor, ns):
    """An endpoint moved to another address: pooled sockets bound to the old one are not used
    for connections made after the library's next look at its table (at most a second)."""
    p = run_preload(OUT, [PY, CASES, "table", str(acceptor)], stdin=subprocess.PIPE)
    assert json.loads(p.stdout.readline()) == {"ready": True}
    for args in (["del", "ep-out"], ["add", "ep-out", "type", "ipv4", "addr", "127.0.0.3", "port", "dynamic"]):
        subprocess.run([*graft_cmd(), "-n", ns, *args], check=True, capture_output=True, text=True)
    out, err = p.communicate("go\n", timeout=60)
    assert p.returncode == 0, err
    assert json.loads(out) == {"before": "127.0.0.2", "after": "127.0.0.3"}


def test_the_options_the_program_set_are_on_its_pooled_socket(run_preload, acceptor):
    """The library notes the program's setsockopt calls and copies those options (only those) onto
    the pooled socket it installs; the values are what the kernel reports natively."""
    native = subprocess.run([PY, CASES, "options", str(acceptor)], capture_output=True, text=True, check=True)
    want = json.loads(native.stdout)
    got, _ = run(run_preload, "options", acceptor)
    assert got.pop("mark") and not want.pop("mark")
    assert got == want and want["keepalive"] == 1 and want["nodelay"] == 1 and want["plain"] == [0, 0]
