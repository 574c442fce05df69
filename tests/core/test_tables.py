"""core/tables.py is the one list of copied socket options: the preload library compiles the
generated csrc/options.h, and the numbers Python holds are those of the system headers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from sockgraft.core import tables

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_committed_options_h_is_the_generated_text():
    with open(os.path.join(ROOT, "csrc", "options.h"), "rb") as f:
        committed = f.read()
    assert committed == tables.c_options().encode()
    # and the command the Makefile names prints exactly that
    out = subprocess.run([sys.executable, "-m", "sockgraft.core.tables", "--c-options"], capture_output=True, check=True)
    assert out.stdout == committed


PROGRAM = r"""
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

/* level, name, the length getsockopt reports on a fresh socket of the option's kind, and for
 * buffer sizes what a set value reads back as */
static void one(const char *cname, int level, int name)
{
    int fam = level == IPPROTO_IPV6 ? AF_INET6 : AF_INET;
    int s = socket(fam, SOCK_STREAM, 0);
    char buf[64];
    socklen_t len = sizeof(buf);
    if (getsockopt(s, level, name, buf, &len) != 0)
        len = 0;
    int set = 65536, back = 0;
    socklen_t bl = sizeof(back);
    if (setsockopt(s, level, name, &set, sizeof(set)) != 0 || getsockopt(s, level, name, &back, &bl) != 0)
        back = -1;
    printf("%s %d %d %u %d\n", cname, level, name, (unsigned)len, back == 2 * set);
    close(s);
}

int main(void)
{
%s
    return 0;
}
"""


def test_numbers_and_sizes_are_those_of_the_system_headers(tmp_path):
    calls = "\n".join(f'    one("{o.name}", {tables.LEVEL_NAMES[o.level]}, {o.name});' for o in tables.COPIED_OPTIONS)
    src = tmp_path / "opts.c"
    src.write_text(PROGRAM.replace("%s\n    return", calls + "\n    return", 1))
    exe = tmp_path / "opts"
    subprocess.run(["gcc", "-O0", "-Wall", "-o", str(exe), str(src)], check=True)
    rows = [line.split() for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines()]
    got = {r[0]: (int(r[1]), int(r[2]), int(r[3]), r[4] == "1") for r in rows}
    want = {o.name: (o.level, o.number, o.size, o.halved) for o in tables.COPIED_OPTIONS}
    assert got == want
    assert len(got) == len(tables.COPIED_OPTIONS)  # no option listed twice


def test_python_socket_module_agrees_where_it_knows_the_name():
    for o in tables.COPIED_OPTIONS:
        if hasattr(socket, o.name):
            assert getattr(socket, o.name) == o.number, o.name
    assert {socket.SOL_SOCKET, socket.IPPROTO_IP, socket.IPPROTO_TCP, socket.IPPROTO_IPV6} == set(tables.LEVEL_NAMES)
