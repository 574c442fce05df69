"""A hostile program in a container, in every attach mode: it must not reach any host address,
port or protocol outside its table. Each attempt is a real syscall in a real netns; the host side
counts what arrived. Escapes must be 0."""
import json
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from sockgraft.modes.registry import MODES as ATTACH_MODES
from tests.helpers import free_port, graft_cmd, wait_port

MODES = [m for m in ("api", "preload", "seccomp") if m in ATTACH_MODES]

ATTACKER = r"""
import errno, json, socket, sys
host_port, unmapped, victim_port = map(int, sys.argv[1:4])
mode = sys.argv[4]
out = {}

def attempt(name, fn):
    try:
        out[name] = ["done", fn()]
    except OSError as e:
        out[name] = ["refused", errno.errorcode.get(e.errno, e.errno)]

def connect_host():  # a host loopback service, no egress rule
    s = socket.create_connection(("127.0.0.1", host_port), timeout=2)
    s.sendall(b"ESCAPE"); return s.recv(10).decode()
attempt("connect_host_loopback", connect_host)

keep = []
def bind_unmapped():  # a port no pair maps: must stay inside the container
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", unmapped)); s.listen(); keep.append(s); return s.getsockname()[1]
attempt("bind_unmapped", bind_unmapped)

def reuseport_hijack():  # SO_REUSEPORT on the victim container's host port
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", victim_port)); s.listen(); keep.append(s); return "bound"
attempt("reuseport_hijack", reuseport_hijack)

attempt("netlink_links", lambda: sorted(n for _, n in socket.if_nameindex()))

def packet_host_if():  # a packet socket on the host's interface index 2
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind((socket.if_indextoname(2), 0)); return "bound"
attempt("packet_on_host_interface", packet_host_if)

def graft_foreign():  # the victim's endpoint name through the fd service
    import sockgraft
    s = sockgraft.socket(); s.bind("victim-ep"); return s.getsockname()
attempt("foreign_endpoint", graft_foreign)

def ifconf_on_grafted():  # SIOCGIFCONF on a grafted (host) socket
    import array, fcntl, struct
    if mode == "api":
        import sockgraft
        s = sockgraft.socket(); s.bind("ep-out")
    else:
        s = socket.socket(); s.bind(("0.0.0.0", 1))  # the ingress pair grafts it onto ep-out
    keep.append(s)
    buf = array.array("B", bytes(40 * 32))
    n = struct.unpack("iL", fcntl.ioctl(s, 0x8912, struct.pack("iL", len(buf), buf.buffer_info()[0])))[0]
    return sorted({bytes(buf[i:i + 16]).split(b"\0")[0].decode() for i in range(0, n, 40)})
attempt("ifconf_on_grafted_socket", ifconf_on_grafted)

print(json.dumps(out), flush=True)
sys.stdin.readline()  # hold the sockets while the host probes
"""


class Counter:
    """A host loopback server that counts what reaches it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            c.close()


@pytest.mark.parametrize("mode", MODES)
def test_hostile_program_reaches_nothing_outside_its_table(mode, tmp_path, state_dir, make_netns, procs):
    victim_ns, attacker_ns = make_netns(), make_netns()
    victim_port = free_port()
    victim = subprocess.Popen([*graft_cmd(), "run", "-n", victim_ns,
                               "--endpoint", f"victim-ep type ipv4 addr 127.0.0.1 port {victim_port}", "--",
                               sys.executable, "-c", textwrap.dedent("""
                                   import sockgraft
                                   s = sockgraft.create_server("victim-ep", reuse_port=True)
                                   while True:
                                       c, _ = s.accept(); c.sendall(b"victim"); c.close()
                               """)])
    procs.append(victim)
    wait_port("127.0.0.1", victim_port)
    host = Counter()
    unmapped = free_port()
    script = tmp_path / "attacker.py"
    script.write_text(ATTACKER)
    attacker = subprocess.Popen([*graft_cmd(), "run", "-n", attacker_ns, "--mode", mode,
                                 "--endpoint", "ep-out type ipv4 addr 127.0.0.1 port dynamic",
                                 "--ingress", "0.0.0.0:1=ep-out",
                                 "--", sys.executable, str(script), str(host.port), str(unmapped), str(victim_port), mode],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    procs.append(attacker)
    out = json.loads(attacker.stdout.readline())
    escapes = []
    if host.hits or out["connect_host_loopback"][0] == "done":
        escapes.append(f"reached a host loopback service: {out['connect_host_loopback']}")
    with socket.socket() as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", unmapped)) == 0:
            escapes.append("an unmapped bind appeared on the host")
    answers = set()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", victim_port), timeout=5) as c:
            answers.add(c.recv(10))
    if answers != {b"victim"}:
        escapes.append(f"the victim's port was hijacked: {answers}")
    if out["netlink_links"][0] == "done" and out["netlink_links"][1] != ["lo"]:
        escapes.append(f"netlink shows host interfaces: {out['netlink_links']}")
    if out["packet_on_host_interface"][0] == "done":
        escapes.append("a packet socket bound to a host interface")
    if out["foreign_endpoint"][0] == "done":
        escapes.append(f"got another container's endpoint: {out['foreign_endpoint']}")
    # interface ioctls on a grafted socket: refused by seccomp mode; api and preload cannot see
    # them (docs/SECURITY.md: the listing of host interface names is their documented limit)
    if mode == "seccomp" and out["ifconf_on_grafted_socket"] != ["refused", "EPERM"]:
        escapes.append(f"interface ioctl on a grafted socket: {out['ifconf_on_grafted_socket']}")
    attacker.stdin.close()
    attacker.wait(10)
    print(f"mode {mode}: {len(out)} attacks, {len(escapes)} escapes: {json.dumps(out)}")
    assert escapes == []
    # the local half of the attacks did work, inside the container: the test is not vacuous
    assert out["bind_unmapped"] == ["done", unmapped]
    assert out["foreign_endpoint"] == ["refused", "EADDRNOTAVAIL"]
