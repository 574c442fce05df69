"""The command-line contract of DESIGN.md, driven exactly as a user types it."""
import json
import os
import subprocess

import pytest

from tests.helpers import graft, graft_cmd, wait_for


def test_add_show_del(ns, state_dir):
    graft("-n", ns, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.1", "port", "8080")
    graft("-n", ns, "add", "ep-out", "type", "ipv4", "addr", "127.0.0.1", "port", "dynamic")
    graft("-n", ns, "add", "ep6", "type", "ipv6", "addr", "::1", "port", "8443")
    graft("-n", ns, "add", "sock", "type", "unix", "path", "/run/x.sock")
    assert graft("-n", ns, "show").stdout.splitlines() == [
        "ep-http type ipv4 addr 127.0.0.1 port 8080",
        "ep-out type ipv4 addr 127.0.0.1 port dynamic",
        "ep6 type ipv6 addr ::1 port 8443",
        "sock type unix path /run/x.sock",
    ]
    table = json.loads(graft("-j", "-n", ns, "show").stdout)
    assert table[0] == {"name": "ep-http", "type": "ipv4", "addr": "127.0.0.1", "port": 8080, "path": None}
    assert table[1]["port"] == "dynamic"
    assert table[3] == {"name": "sock", "type": "unix", "addr": None, "port": None, "path": "/run/x.sock"}
    graft("-n", ns, "del", "ep-out")
    assert "ep-out" not in graft("-n", ns, "show").stdout


def test_pid_and_current_netns_name_the_same_container(ns, state_dir):
    graft("-n", ns, "add", "a", "type", "ipv4", "addr", "127.0.0.1", "port", "1")
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "30"])
    try:
        wait_for(lambda: os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino,
                 what="the child to enter the netns")
        assert graft("--pid", str(sleeper.pid), "show").stdout.startswith("a type ipv4")
    finally:
        sleeper.kill()
        sleeper.wait()
    inside = subprocess.run(["ip", "netns", "exec", ns, *graft_cmd(), "show"],
                            capture_output=True, text=True, env=dict(os.environ, GRAFT_STATE_DIR=state_dir))
    assert inside.stdout.startswith("a type ipv4"), inside.stderr


def test_tables_of_two_containers_are_separate(make_netns, state_dir):
    a, b = make_netns(), make_netns()
    graft("-n", a, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.1", "port", "8080")
    graft("-n", b, "add", "ep-http", "type", "ipv4", "addr", "127.0.0.2", "port", "8080")
    assert "127.0.0.2" in graft("-n", b, "show").stdout and "127.0.0.2" not in graft("-n", a, "show").stdout


BAD = [
    (["add", "0123456789abcdef", "type", "ipv4", "addr", "127.0.0.1", "port", "1"], "1 to 15"),
    (["add", "a\tb", "type", "ipv4", "addr", "127.0.0.1", "port", "1"], "without whitespace"),
    (["add", "x", "type", "ipv4", "addr", "127.0.0.256", "port", "1"], "bad address"),
    (["add", "x", "type", "ipv6", "addr", "::g", "port", "1"], "bad address"),
    (["add", "x", "type", "ipv4", "addr", "127.0.0.1", "port", "65536"], "bad port"),
    (["add", "x", "type", "ipv4", "addr", "127.0.0.1", "port", "-5"], "bad port"),
    (["add", "x", "type", "unix", "path", "/" + "p" * 107], "too long"),
    (["add", "x", "type", "sctp", "addr", "127.0.0.1", "port", "1"], "type must be"),
    (["add", "x", "type", "ipv4", "addr", "127.0.0.1"], "takes exactly"),
    (["add"], "missing endpoint name"),
    (["del", "nosuch"], "no endpoint 'nosuch'"),
    (["frobnicate"], "No such command"),
]


@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_is_one_line_and_nonzero(ns, state_dir, args, msg):
    p = graft("-n", ns, *args, check=False)
    assert p.returncode != 0
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("graft: ") and msg in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_duplicate_name(ns, state_dir):
    graft("-n", ns, "add", "a", "type", "ipv4", "addr", "127.0.0.1", "port", "1")
    p = graft("-n", ns, "add", "a", "type", "ipv4", "addr", "127.0.0.1", "port", "2", check=False)
    assert p.returncode == 1 and "already exists" in p.stderr


def test_unknown_netns_and_pid(state_dir):
    p = graft("-n", "sgt-no-such-netns", "show", check=False)
    assert p.returncode == 1 and p.stderr == "graft: netns 'sgt-no-such-netns' does not exist (no /run/netns/sgt-no-such-netns)\n"
    p = graft("--pid", "999999999", "show", check=False)
    assert p.returncode == 1 and "no process" in p.stderr
    p = graft("-n", "../etc", "show", check=False)
    assert p.returncode == 1 and "bad netns name" in p.stderr


def test_unusable_state_dir_is_one_line(ns, tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("")
    p = graft("-n", ns, "show", check=False, env=dict(os.environ, GRAFT_STATE_DIR=str(blocker / "x")))
    assert p.returncode == 1 and p.stderr.startswith("graft: state database") and p.stderr.count("\n") == 1
