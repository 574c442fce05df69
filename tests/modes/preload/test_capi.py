"""The AF_GRAFT C API (graft.h) and the library's bookkeeping under threads, forks and dups."""
from __future__ import annotations

import os
import socket
import subprocess
import threading

from sockgraft.core.tables import UNBOUND_TAG
from tests.helpers import free_port
from tests.modes.preload.conftest import ep


def test_af_graft_server_from_the_slides(cc, run_preload):
    exe = cc("capi")
    port = free_port()
    p = run_preload(ep("ep-http", port), [exe, "serve"])
    assert p.stdout.readline().strip() == "listening family=0x4752 name=ep-http"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.makefile().readline() == "hello from AF_GRAFT\n"
    assert p.wait(10) == 0, p.stderr.read()


def test_af_graft_dynamic_endpoint_then_connect(cc, run_preload):
    exe = cc("capi")
    seen = {}
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def serve():
            c, seen["peer"] = srv.accept()
            c.sendall(b"hi from the host\n")
            c.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        p = run_preload([*ep("ep-out", None), "--egress", "127.0.0.1/32=ep-out"], [exe, "dial", "127.0.0.1", str(srv.getsockname()[1])])
        out, err = p.communicate(timeout=20)
        t.join(5)
    assert p.returncode == 0, err
    assert out == "got: hi from the host\n"
    assert seen["peer"][0] == "127.0.0.1"  # it came from the host's loopback, through ep-out


def test_af_graft_connect_by_name(cc, run_preload):
    exe = cc("capi")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def serve():
            c, _ = srv.accept()
            c.sendall(b"dialed by name\n")
            c.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        p = run_preload(ep("ep-db", srv.getsockname()[1]), [exe, "dialname", "ep-db"])
        out, err = p.communicate(timeout=20)
        t.join(5)
    assert p.returncode == 0, err
    assert out == "peer=ep-db got: dialed by name\n"


def test_getaddrinfo_graft_prefix(cc, run_preload):
    exe = cc("capi")
    port = free_port()
    p = run_preload([*ep("ep-http", port), *ep("ep-out", None)],
                    ["sh", "-c", f"{exe} resolve ep-http; {exe} resolve ep-out; {exe} resolve ep-none; echo rc=$?"])
    out, err = p.communicate(timeout=20)
    assert out.splitlines() == [f"127.0.0.1 {port}", "127.0.0.1 0", "getaddrinfo: Name or service not known", "rc=2"], err


def test_threads_forks_dups_thousands_of_sockets(cc, run_preload):
    """8 threads x 400 sockets (2/3 grafted, 1/3 local), dups before and after bind, forks in
    between, close_range: each socket lives in the right netns, getsockname reports what was
    bound, and no fd leaks."""
    exe = cc("stress")
    host_ino = os.stat("/proc/self/ns/net").st_ino
    p = run_preload([*ep("ep-dyn", None), "--ingress", "0.0.0.0:40000-40099=ep-dyn"],
                    [exe, "8", "400", "40000", "40099", str(host_ino), str(UNBOUND_TAG)])
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    checked = int(out.split()[1])
    assert checked > 8 * 400, out


def test_stress_program_sees_a_missing_graft(cc, ns, state_dir, procs):
    """The stress check can fail: without the library (api mode) nothing is grafted."""
    exe = cc("stress")
    host_ino = os.stat("/proc/self/ns/net").st_ino
    from tests.helpers import graft_cmd

    p = subprocess.run([*graft_cmd(), "run", "-n", ns, *ep("ep-dyn", None), "--ingress", "0.0.0.0:40000-40099=ep-dyn",
                        "--", exe, "1", "5", "40000", "40099", str(host_ino), str(UNBOUND_TAG)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "expected" in p.stderr, p.stderr


def test_udp_sendto_sendmsg_take_the_egress_decision(cc, run_preload):
    exe = cc("capi")
    peers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo:
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(20)

        def serve():
            for _ in range(3):
                data, peer = echo.recvfrom(64)
                peers.append(peer)
                echo.sendto(data, peer)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        p = run_preload([*ep("ep-out", None), "--egress", "127.0.0.1/32=ep-out"],
                        [exe, "udp", "127.0.0.1", str(echo.getsockname()[1])])
        out, err = p.communicate(timeout=30)
        t.join(5)
    assert p.returncode == 0, out + err
    assert out.splitlines() == ["echo: one", "echo: two", "echo: three"]
    assert peers[0] == peers[1] and peers[2] != peers[0]  # one grafted socket each
