"""The preload library's prefilter (csrc/prefilter.c, compiled from the production source with a
small driver) answers exactly what `sockgraft.core.engine.Prefilter.might_graft` answers, on
thousands of seeded random tables and operations. The library uses it to skip the round trip for
operations no rule can apply to; the service still decides every other one."""
from __future__ import annotations

import ipaddress
import os
import random
import socket
import subprocess

import pytest

from sockgraft.core.engine import Op, Policy, Prefilter
from sockgraft.core.rules import parse_egress, parse_ingress
from tests.modes.preload.conftest import C_TESTS, CSRC

V4 = ["0.0.0.0", "127.0.0.1", "127.0.0.2", "10.1.2.3", "10.1.255.255", "192.168.7.1", "255.255.255.255", "1.2.3.4"]
V6 = ["::", "::1", "::2", "fd00::1", "fd00:0:0:1::7", "2001:db8::5", "fe80::1", "::ffff:127.0.0.1", "::ffff:0.0.0.0",
      "::ffff:10.1.2.3", "::127.0.0.1"]
PORTS = [0, 1, 79, 80, 81, 8000, 8005, 8010, 8011, 65535]


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> str:
    exe = str(tmp_path_factory.mktemp("pf") / "prefilter_driver")
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-I", CSRC, "-o", exe, os.path.join(C_TESTS, "prefilter_driver.c"),
                    os.path.join(CSRC, "prefilter.c")], check=True)
    return exe


def random_ip(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(V4 + V6)
    if rng.random() < 0.5:
        return str(ipaddress.IPv4Address(rng.getrandbits(32)))
    return str(ipaddress.IPv6Address(rng.getrandbits(128)))


def random_table(rng: random.Random) -> Prefilter:
    binds, egress = [], []
    for _ in range(rng.randint(0, 5)):
        ip = ipaddress.ip_address(random_ip(rng))
        lo = rng.choice(PORTS)
        hi = min(65535, lo + rng.choice([0, 0, 1, 10, 100]))
        binds.append((ip.version, str(ip), lo, hi))
    for _ in range(rng.randint(0, 5)):
        ip = ipaddress.ip_address(random_ip(rng))
        plen = rng.choice([0, 1, 8, 12, 16, 24, 31, 32] if ip.version == 4 else [0, 7, 64, 96, 104, 120, 127, 128])
        net = ipaddress.ip_network(f"{ip}/{plen}", strict=False)
        egress.append((net.version, str(net.network_address), plen))
    return Prefilter(tuple(binds), tuple(egress))


def random_op(rng: random.Random) -> Op:
    addr = random_ip(rng)
    version = ipaddress.ip_address(addr).version
    if version == 4 and rng.random() < 0.3:  # an IPv4 destination of an IPv6 socket: v4-mapped
        addr, version = f"::ffff:{addr}", 6
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    return Op(rng.choice(["bind", "connect", "sendto"]), family, addr, rng.choice(PORTS + [rng.randint(0, 65535)]),
              rng.choice([socket.SOCK_STREAM, socket.SOCK_DGRAM]), v6only=rng.random() < 0.5)


def run(driver: str, cases: list[tuple[Prefilter, list[Op]]]) -> list[str]:
    text = []
    for table, ops in cases:
        lines = table.lines()
        text += [f"T {len(lines)}", *lines]
        text += [f"O {op.verb} {op.family} {op.addr} {op.port} {int(op.v6only)}" for op in ops]
    out = subprocess.run([driver], input="\n".join(text) + "\n", capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_c_prefilter_equals_python_on_random_tables(driver):
    rng = random.Random(20261130)
    cases = [(random_table(rng), [random_op(rng) for _ in range(40)]) for _ in range(400)]
    got = run(driver, cases)
    flat = [(table, op) for table, ops in cases for op in ops]
    want = [str(int(table.might_graft(op))) for table, op in flat]
    assert len(got) == len(want) == 16000
    mismatches = [(table.lines(), op, g) for (table, op), g, w in zip(flat, got, want) if g != w]
    assert not mismatches, mismatches[:5]
    assert 0.05 < want.count("1") / len(want) < 0.95  # both answers are exercised


def test_tables_of_real_policies(driver):
    """Tables as Policy.prefilter makes them, from the rule syntax users write."""
    policy = Policy(ingress=[parse_ingress(p) for p in ("0.0.0.0:80=a", "[::]:8000-8010=b", "127.0.0.1:9000=c",
                                                        "[::1]:53=d")],
                    egress=[parse_egress(r) for r in ("10.0.0.0/8=a", "127.0.0.0/8=b", "fd00::/8=c", "::/0=d")])
    table = policy.prefilter()
    ops = [Op("bind", socket.AF_INET, "127.0.0.1", 80), Op("bind", socket.AF_INET6, "::", 80),
           Op("bind", socket.AF_INET6, "::", 80, v6only=True), Op("bind", socket.AF_INET, "127.0.0.1", 0),
           Op("bind", socket.AF_INET, "127.0.0.2", 9000), Op("bind", socket.AF_INET6, "::1", 53),
           Op("connect", socket.AF_INET, "10.9.9.9", 1), Op("connect", socket.AF_INET, "192.168.1.1", 1),
           Op("sendto", socket.AF_INET6, "2001:db8::1", 1), Op("connect", socket.AF_INET6, "::ffff:127.0.0.1", 1)]
    got = run(driver, [(table, ops)])
    assert got == [str(int(table.might_graft(op))) for op in ops] == ["1", "1", "0", "0", "0", "1", "1", "0", "1", "1"]


@pytest.mark.parametrize("text", ["bind 4 1.2.3.4 80", "bind 6 1.2.3.4 80 80", "egress 4 10.0.0.0 33",
                                  "egress 4 10.0.0.0 8 x", "hello", "bind 4 1.2.3.4 90 80"])
def test_a_table_it_cannot_read_is_not_used(driver, text):
    out = subprocess.run([driver], input=f"T 1\n{text}\nO bind 2 1.2.3.4 80 0\n", capture_output=True, text=True,
                         check=True).stdout
    assert out == "bad table\n"
