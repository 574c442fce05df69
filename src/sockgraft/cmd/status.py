"""`graft status`: the containers in the tables, their mode, and their live grafted sockets.

A grafted socket is a file descriptor of a process in the container's netns that refers to a
socket of the host netns: found by scanning the container's processes' fds and looking their
socket inodes up in the host's /proc/net tables (this command runs in the host netns). graftd's
view (its agent socket, live seccomp listeners) comes from RUNTIME_DIR/graftd.json.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import time

import click

from sockgraft.host.netns import pids_in_netns
from sockgraft.host.paths import RUNTIME_DIR, state_dir
from sockgraft.host.store import Store

TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}


def _addr(hexaddr: str, family: int) -> str:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if family == socket.AF_INET:
        text = socket.inet_ntop(family, struct.pack("<I", int.from_bytes(raw, "big")))
    else:  # four host-order 32-bit words
        words = struct.unpack(">4I", raw)
        text = socket.inet_ntop(family, struct.pack("<4I", *words))
        text = f"[{text}]"
    return f"{text}:{int(port, 16)}"


def host_sockets(proc_net: str = "/proc/self/net") -> dict[int, dict]:
    """Sockets of the netns of this process, by inode: proto, local, remote, state."""
    out: dict[int, dict] = {}
    for proto, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6), ("udp", socket.AF_INET), ("udp6", socket.AF_INET6)):
        try:
            with open(os.path.join(proc_net, proto)) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            ino = int(f[9])
            if ino == 0:
                continue
            st = int(f[3], 16)
            out[ino] = {
                "proto": proto, "local": _addr(f[1], family), "remote": _addr(f[2], family),
                "state": TCP_STATES.get(st, str(st)) if proto.startswith("tcp") else ("UNCONN" if st == 7 else "ESTAB"),
            }
    try:
        with open(os.path.join(proc_net, "unix")) as f:
            for line in f.read().splitlines()[1:]:
                f2 = line.split()
                if len(f2) >= 7:
                    out.setdefault(int(f2[6]), {"proto": "unix", "local": f2[7] if len(f2) > 7 else "", "remote": "", "state": ""})
    except OSError:
        pass
    return out


def grafted_sockets(ino: int, host: dict[int, dict], host_ino: int) -> list[dict]:
    """Fds of the container's processes that are sockets of the host netns."""
    if ino == host_ino:
        return []  # a container in the host netns: nothing is grafted, everything is the host's
    out = []
    for pid in pids_in_netns(ino):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                sino = int(target[8:-1])
                if sino in host:
                    out.append({"pid": pid, "fd": int(fd), "inode": sino, **host[sino]})
    return sorted(out, key=lambda s: (s["pid"], s["fd"]))


def read_graftd(runtime_dir: str) -> dict | None:
    try:
        with open(os.path.join(runtime_dir, "graftd.json")) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    try:
        os.kill(status["pid"], 0)
    except (ProcessLookupError, KeyError, TypeError):
        return None  # left behind by a graftd that died
    except PermissionError:
        pass
    return status


def collect(state: str | None = None, runtime_dir: str = RUNTIME_DIR) -> dict:
    from sockgraft.runtime.wrapper import records

    sd = state_dir(state)
    with Store(sd) as store:
        rows = store.containers()
    from sockgraft.cni.records import all_records

    oci: dict[str, list[str]] = {}
    cri: dict[str, set[str]] = {}  # CRI names: namespace/pod (the pod, its sandbox), namespace/pod/container
    for cid, rec in sorted(records(sd).items(), key=lambda kv: kv[1].get("time", 0)):
        oci.setdefault(rec.get("key"), []).append(cid)  # a pod: several containers, one netns
        names = rec.get("cri") or {}
        if names.get("pod"):
            cri.setdefault(rec.get("key"), set()).add("/".join(filter(None, (names.get("namespace"), names["pod"], names.get("container")))))
    for rec in all_records(sd):  # pods whose table the graft CNI plugin wrote
        pod = rec.get("pod") or {}
        if pod.get("name"):
            cri.setdefault(rec.get("key"), set()).add("/".join(filter(None, (pod.get("namespace"), pod["name"]))))
    graftd = read_graftd(runtime_dir)
    listeners = (graftd or {}).get("seccomp_listeners", {})
    host = host_sockets()
    host_ino = os.stat("/proc/self/ns/net").st_ino
    containers = []
    for row in rows:
        socks = grafted_sockets(row.netns_ino, host, host_ino) if row.netns_ino else []
        containers.append({
            "key": row.key, "mode": row.mode or "api", "netns_ino": row.netns_ino,
            "oci_id": (oci.get(row.key) or [None])[0], "oci_ids": oci.get(row.key, []), "created": row.created,
            "processes": len(pids_in_netns(row.netns_ino)) if row.netns_ino else 0,
            "seccomp_listeners": listeners.get(row.key, 0), "sockets": socks, "cri": sorted(cri.get(row.key, ())),
        })
    return {"state_dir": sd, "graftd": graftd, "containers": containers}


@click.command()
@click.option("-j", "--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--state-dir", metavar="DIR", help="Tables (default $GRAFT_STATE_DIR or /var/lib/sockgraft).")
@click.option("--runtime-dir", metavar="DIR", default=RUNTIME_DIR, show_default=True, help="graftd's runtime directory.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, state_dir: str | None, runtime_dir: str) -> None:
    """Containers, their mode and their live grafted sockets."""
    as_json = as_json or bool((ctx.obj or {}).get("json"))
    info = collect(state_dir, runtime_dir)
    if as_json:
        click.echo(json.dumps(info))
        return
    g = info["graftd"]
    click.echo(f"graftd: pid {g['pid']}, agent {g.get('agent_socket') or '-'}, metrics {g.get('metrics') or '-'}" if g else "graftd: not running")
    if not info["containers"]:
        click.echo("no containers")
    for c in info["containers"]:
        age = time.time() - c["created"]
        extra = f" oci {','.join(i[:12] for i in c['oci_ids'])}" if c["oci_ids"] else ""
        click.echo(f"{c['key']} mode {c['mode']}{extra} processes {c['processes']} "
                   f"seccomp-listeners {c['seccomp_listeners']} sockets {len(c['sockets'])} age {age:.0f}s"
                   + (f" cri {','.join(c['cri'])}" if c["cri"] else ""))
        for s in c["sockets"]:
            remote = f" -> {s['remote']}" if s["state"] not in ("LISTEN", "UNCONN") and s["remote"] else ""
            click.echo(f"  {s['proto']} {s['local']}{remote} {s['state']} pid {s['pid']} fd {s['fd']}")
