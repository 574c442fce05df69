"""Pooled host sockets (csrc/pool.c, the fd service's `pool` and `bindpool`): a connect through an
egress rule takes a host socket fetched ahead (bound with NO_PORT, marked, not connected) and the
program's own connect() runs on it; a bind an ingress pair takes, from the second of its kind on, a
host socket fetched ahead unbound, which the library binds to the endpoint itself. The kernel guards what such a socket can do (tests/host/test_bindguard.py,
tests/security/test_kernel_egress.py); these tests hold the library's side."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from sockgraft.core.protocol import FIRST_POOL, MAX_POOL, Request
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
    # the first connect waits for a batch of FIRST_POOL (16); the next, of MAX_POOL, is asked for ahead,
    # without waiting, when a connect leaves POOL_LOW (8) of them: after the 8th (20 connects: 48
    # sockets, 28 left)
    assert len(pools) == 2 and not requests(err, "connect"), err
    assert err.count("graft: reply (refill): ok ") >= 1, err  # a batch asked ahead was collected
    # the requests are the protocol's, byte for byte (POOL_FIRST and POOL_BATCH equal FIRST_POOL and MAX_POOL)
    for line, count in zip(pools, (FIRST_POOL, MAX_POOL)):
        want = Request("pool", family=2, addr="127.0.0.1", port=acceptor, type=1, count=count).encode().decode()
        assert line == f"graft: request: {want} out:127.0.0.1/32=ep-out"


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


def _serve_binds(run_preload, n: int, env: dict) -> tuple[dict, str]:
    """pool_cases.py binds: N binds of 0.0.0.0:P (the pair 0.0.0.0:P=ep-web), then a server there,
    which the host reaches through the endpoint."""
    import socket as so

    port, host_port = free_port(), free_port()
    p = run_preload([*ep("ep-web", host_port), *ep("ep-six", free_port(), "::"), "--ingress", f"0.0.0.0:{port}=ep-web",
                     "--ingress", f"[::]:{port}=ep-six"],
                    [PY, CASES, "binds", str(port), str(n)], env={"GRAFT_TRACE": "1", **env})
    assert json.loads(p.stdout.readline()) == {"ready": True}
    with so.create_connection(("127.0.0.1", host_port), timeout=10) as c:
        c.sendall(b"hello")
        assert c.recv(10) == b"hello"
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    got = json.loads(out)
    assert got["name"] == ["0.0.0.0", port] and got["mark"] & MARK_MASK == MARK_TAG, got
    assert got["reuseaddr"] == 1 and got["reuseport"] == 1, got
    assert got["loop reuseaddr"] == [1] and got["v6only"] == [1, 1, 1], got  # the bind flags, pooled or not
    assert got["second"] == "EADDRINUSE" and got["second local"] == "127.0.0.1", got
    return got, err


def test_a_pooled_unbound_socket_the_program_takes_itself_binds_nowhere_else(run_preload):
    """The attack: the program finds the unbound sockets of its bind pool in its own fd table.
    Bound elsewhere: EPERM (the bind guard); listening unbound: nothing reaches it; connected
    unbound: refused (the egress table); a listener where that connect is aimed sees nothing."""
    import socket as so

    port = free_port()
    with so.socket() as unlisted:
        unlisted.bind(("127.0.0.1", 0))
        unlisted.listen(16)
        other = unlisted.getsockname()[1]
        p = run_preload([*ep("ep-web", free_port()), "--ingress", f"0.0.0.0:{port}=ep-web"],
                        [PY, CASES, "steal", str(port), str(other)])
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        unlisted.setblocking(False)
        with pytest.raises(BlockingIOError):
            unlisted.accept()
    got = json.loads(out)
    assert got["found"] >= 3, got
    assert (got["elsewhere"], got["served"], got["connect"]) == ("EPERM", "ECONNREFUSED", "ECONNREFUSED"), got


def test_binds_draw_on_pools_after_the_first_and_behave_as_the_services(run_preload):
    """The first bind of a kind asks `bind`, the next come from `bindpool` batches (asked ahead);
    the program's options are kept, getsockname shows what it bound, a second bind while the server
    listens is EADDRINUSE (asked of the service then), the server answers the host."""
    got, err = _serve_binds(run_preload, 40, {})
    binds, pools = requests(err, "bind"), requests(err, "bindpool")
    # `bind`: the first of the 40 (the server's SO_REUSEPORT makes another kind: its first), the
    # refused second, the first V6ONLY [::] one. A kind may ask `bind` once more, after a `bindpool`
    # of its own: its first pooled socket met EADDRINUSE because the service had not yet closed its
    # copy of the socket it bound for that kind's first bind (hooks.c pooled_bind then asks the
    # service, whose answer comes once its copies are closed; seen once in four suites on 2 vCPUs).
    kinds, asked = [], []
    for line in err.splitlines():
        words = line.split()
        if line.startswith(("graft: request: bind ", "graft: request: bindpool ")):
            asked.append((words[2], tuple(words[3:9])))
    for i, (verb, kind) in enumerate(asked):
        if verb == "bind" and kind in kinds:
            assert ("bindpool", kind) in asked[:i] and kinds.count(kind) == 1, err
        if verb == "bind":
            kinds.append(kind)
    assert len(set(kinds)) == 4 and 3 <= len(pools) <= 6, err
    assert err.count("graft: reply (refill): ok ") >= 1, err  # a batch asked ahead was collected
    want = Request("bindpool", family=2, addr="0.0.0.0", port=int(binds[0].split()[5]), type=1,
                   flags=frozenset({"reuseaddr"}), count=FIRST_POOL).encode().decode()
    assert pools[0].startswith(f"graft: request: {want} in:"), pools[0]


def test_without_pools_binds_ask_the_service(run_preload):
    got, err = _serve_binds(run_preload, 5, {"GRAFT_POOLS": "0"})
    assert len(requests(err, "bindpool")) == 1 and len(requests(err, "bind")) == 10, err  # refused: asked again a second later


def test_socket_speculates_after_a_streak_of_pooled_connects(run_preload, acceptor):
    """After 4 connects of a kind that all took pooled sockets of one egress row, socket() hands out
    the next pooled socket itself (no socket of the container's made and swapped out at connect).
    Until a connect through that row, it looks like a fresh socket (lowest fd number, unspecified
    name, the flags asked for); any other use - a local connect, a bind, a listen, a device -
    first swaps a socket of the container's in, with the options set meanwhile, duplicates
    included, and ends the streak. The kernel still guards it: a raw bind() past the library is EPERM."""
    got, _ = run(run_preload, "speculate", acceptor)
    assert got.pop("first") is False and got.pop("after local") is False
    assert got == {"not lowest": [], "mostly speculative": True, "speculative": True, "name before": ["0.0.0.0", 0], "raw rebind": "EPERM",
                   "grafted": [True, "127.0.0.2", 1, 1, "EINVAL", True],
                   "local": [True, False, False, ["127.0.0.5", got["local"][3][1]], 1, got["local"][5]],
                   "nonblocking": [True, True, True, "EINPROGRESS", 0],
                   "bind": [True, False, "127.0.0.5"], "listen": [True, False, "0.0.0.0", False]}, got
    native = socket.socket()
    native.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert got["local"][5] == native.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    native.close()


def test_without_speculation_socket_makes_the_containers(run_preload, acceptor):
    got, _ = run(run_preload, "speculate", acceptor, env={"GRAFT_SPECULATE": "0"})
    assert got["speculative"] is False and got["grafted"][:2] == [True, "127.0.0.2"] and got["raw rebind"] == "0"


def _bindspec(run_preload, env: dict) -> tuple[dict, str]:
    port, host_port = free_port(), free_port()
    p = run_preload([*ep("ep-web", host_port), "--ingress", f"0.0.0.0:{port}=ep-web"],
                    [PY, CASES, "bindspec", str(port)], env={"GRAFT_TRACE": "1", **env})
    assert json.loads(p.stdout.readline()) == {"ready": True}
    with socket.create_connection(("127.0.0.1", host_port), timeout=10) as c:  # the speculative server
        c.sendall(b"hello")
        assert c.recv(10) == b"hello"
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return json.loads(out), err


def test_socket_speculates_after_a_streak_of_pooled_binds(run_preload):
    """After 4 binds of one pair that all took pooled unbound sockets, socket() hands out the next one
    itself: a bind of that pair binds it where it stands (no socket of the container's made and
    swapped out), and the server it makes answers the host. Until then it looks like a fresh socket;
    a bind elsewhere, a listen or a connect first swaps a socket of the container's in, with the
    options and bind flags set meanwhile, and ends the streak. A raw bind() past the library to an
    address that is no endpoint of the container's is EPERM (the bind guard)."""
    got, err = _bindspec(run_preload, {})
    tag = MARK_TAG >> 16
    assert got == {"first": 0, "before": [True, ["0.0.0.0", 0]], "raw elsewhere": "EPERM",
                   "bound": [tag, ["0.0.0.0", got["bound"][1][1]], 1, True, ["0.0.0.0", got["bound"][1][1]], tag],
                   "local bind": [True, 0, "127.0.0.5", 1, 1], "after local": 0,
                   "listen": [True, 0, 0], "connect": [True, 0, True],
                   "nonblocking": [True, True, True, tag, True]}, got
    # each speculative bind was made without asking: no `bind` beyond the pair's first (and, once
    # in a while, the one a pooled socket's EADDRINUSE sends to the service: see the test above)
    assert len(requests(err, "bind")) <= 2, err


def test_without_speculation_binds_take_the_container_socket_first(run_preload):
    got, _ = _bindspec(run_preload, {"GRAFT_SPECULATE": "0"})
    assert got["before"][0] is False and got["bound"][0] == MARK_TAG >> 16 and got["raw elsewhere"] == "0"
