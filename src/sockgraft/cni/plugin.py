"""`graft` CNI plugin (CNI spec 1.0: ADD, DEL, CHECK, VERSION), installed as `graft` in the CNI
bin dir (a link to the `graft-cni` command).

Network configuration (in a conflist, after the plugin that makes the pod's interface):

    {"type": "graft",
     "stateDir": "/var/lib/sockgraft",   graftd's tables (default $GRAFT_STATE_DIR or that)
     "hostIP": "127.0.0.1",              node address of mappings without hostIP ("" = none)
     "hostIPv6": "::1",                  the same for the IPv6 twin ("" = no IPv6 twin)
     "capabilities": {"portMappings": true, "io.kubernetes.cri.pod-annotations": true}}

For every `runtimeConfig.portMappings` entry {hostPort H, containerPort C, hostIP A}: endpoint
`hp-H` (`type ipv4 addr A port H`) with the pair `0.0.0.0:C=hp-H`, and `hp6-H` (`type ipv6 addr
A6 port H`) with `[::]:C=hp6-H` (a dual-stack `[::]:C` listener is matched by the IPv4 pair,
which comes first). A mapping with hostPort 0 asks for no host port and is skipped. The pod
annotations `io.sockgraft.endpoints/ingress/egress` add their endpoints and rules (egress, extra
endpoints). Errors are CNI error objects on stdout (code 7: bad configuration; 4: bad
environment; 6: undecodable input; 1: unsupported version; 101: a host port that another
container holds; 102: CHECK found the table changed; 5: the state database failed).
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
import time

from sockgraft.cni import records
from sockgraft.core.endpoint import Endpoint, SpecError, parse_endpoint
from sockgraft.core.rules import parse_egress, parse_ingress
from sockgraft.host.paths import state_dir as default_state_dir

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]
POD_ANNOTATIONS = "io.kubernetes.cri.pod-annotations"
MODE = "seccomp"  # pods run under graft-runtime: graftd's agent supervises their containers

E_VERSION, E_ENV, E_DECODE, E_IO, E_CONFIG = 1, 4, 6, 5, 7
E_PORT_TAKEN, E_CHECK = 101, 102


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# -- the table a configuration asks for --------------------------------------------------------------
def _port(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise CniError(E_CONFIG, f"portMappings: {what} {value!r} is not a port number (0-65535)")
    return value


def _addr(text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise CniError(E_CONFIG, f"{what} {text!r} is not an IP address") from None


def table_for(conf: dict) -> tuple[list[Endpoint], list[str], list[str]]:
    """Endpoints, ingress pairs and egress rules for this network configuration (ADD's input)."""
    host4 = conf.get("hostIP", "127.0.0.1")
    host6 = conf.get("hostIPv6", "::1")
    for key, value, version in (("hostIP", host4, 4), ("hostIPv6", host6, 6)):
        if not isinstance(value, str) or (value and _addr(value, key).version != version):
            raise CniError(E_CONFIG, f"{key} must be an IPv{version} address or \"\", not {value!r}")
    rc = conf.get("runtimeConfig") or {}
    if not isinstance(rc, dict):
        raise CniError(E_CONFIG, "runtimeConfig must be an object")
    mappings = rc.get("portMappings") or []
    if not isinstance(mappings, list) or not all(isinstance(m, dict) for m in mappings):
        raise CniError(E_CONFIG, "runtimeConfig.portMappings must be a list of objects")
    endpoints: dict[str, Endpoint] = {}
    ingress: list[str] = []
    for m in mappings:
        m = {k.lower(): v for k, v in m.items()}  # containerd writes HostPort, the kubelet's CNI docs hostPort
        hp = _port(m.get("hostport", 0), "hostPort")
        cp = _port(m.get("containerport", 0), "containerPort")
        proto = str(m.get("protocol") or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise CniError(E_CONFIG, f"portMappings: unknown protocol {m.get('protocol')!r}")
        if proto == "sctp":
            raise CniError(E_CONFIG, f"portMappings: hostPort {hp}/sctp cannot be grafted (tcp and udp only)")
        if hp == 0:
            continue  # no host port asked for
        if cp == 0:
            raise CniError(E_CONFIG, f"portMappings: hostPort {hp} without a containerPort")
        hip = m.get("hostip") or ""
        if not isinstance(hip, str):
            raise CniError(E_CONFIG, f"portMappings: hostIP {hip!r} is not a string")
        wanted = []
        if hip:
            a = _addr(hip, "portMappings: hostIP")
            wanted.append((a.version, a.compressed))
        else:
            wanted += [(4, host4)] if host4 else []
            wanted += [(6, host6)] if host6 else []
        if not wanted:
            raise CniError(E_CONFIG, f"portMappings: hostPort {hp} has no hostIP and neither hostIP nor hostIPv6 is configured")
        for version, addr in wanted:
            name = f"hp-{hp}" if version == 4 else f"hp6-{hp}"
            ep = parse_endpoint(f"{name} type ipv{version} addr {addr} port {hp}")
            pair = f"{'0.0.0.0' if version == 4 else '[::]'}:{cp}={name}"
            if name in endpoints:
                if endpoints[name] != ep:
                    raise CniError(E_CONFIG, f"portMappings: hostPort {hp} is mapped to two host addresses")
                if pair not in ingress:
                    raise CniError(E_CONFIG, f"portMappings: hostPort {hp} is mapped to two container ports")
                continue  # tcp and udp of one port: one endpoint serves both
            endpoints[name] = ep
            ingress.append(pair)
    # IPv4 pairs first: a dual-stack [::]:C listener is then grafted onto the IPv4 endpoint
    ingress.sort(key=lambda p: p.startswith("["))
    ann = rc.get(POD_ANNOTATIONS) or {}
    if not isinstance(ann, dict):
        raise CniError(E_CONFIG, f"runtimeConfig.{POD_ANNOTATIONS} must be an object")
    from sockgraft.runtime import annotations  # the one parser of io.sockgraft.* annotations

    try:
        spec = annotations.parse({k: str(v) for k, v in ann.items()})
    except SpecError as e:
        raise CniError(E_CONFIG, f"pod {e}") from None
    for ep in spec.endpoints:
        if ep.name in endpoints:
            raise CniError(E_CONFIG, f"pod annotation endpoint {ep.name!r} clashes with the endpoint of a hostPort")
        endpoints[ep.name] = ep
    ingress += [str(p) for p in spec.ingress]
    egress = [str(r) for r in spec.egress]
    return list(endpoints.values()), ingress, egress


# -- environment -------------------------------------------------------------------------------------
def _env(name: str, required: bool = True) -> str:
    value = os.environ.get(name, "")
    if required and not value:
        raise CniError(E_ENV, f"{name} is not set")
    return value


def cni_args() -> dict[str, str]:
    out = {}
    for item in os.environ.get("CNI_ARGS", "").split(";"):
        k, eq, v = item.partition("=")
        if eq:
            out[k.strip()] = v.strip()
    return out


def _netns_ino(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError as e:
        raise CniError(E_ENV, f"CNI_NETNS {path}: {e.strerror}") from None


def _state(conf: dict) -> str:
    sd = conf.get("stateDir")
    if sd is not None and (not isinstance(sd, str) or not sd.startswith("/")):
        raise CniError(E_CONFIG, f"stateDir must be an absolute path, not {sd!r}")
    return default_state_dir(sd)


def _store(state: str):
    from sockgraft.host.store import Store, StoreError

    try:
        return Store(state)
    except StoreError as e:
        raise CniError(E_IO, str(e)) from None


# -- the verbs ---------------------------------------------------------------------------------------
def _result(conf: dict) -> dict:
    prev = conf.get("prevResult")
    if isinstance(prev, dict):
        return dict(prev, cniVersion=conf["cniVersion"])
    return {"cniVersion": conf["cniVersion"], "interfaces": [], "ips": [], "dns": {}}


def cmd_add(conf: dict) -> dict:
    from sockgraft.host import netns
    from sockgraft.host.store import StoreError

    cid, ifname, nspath = _env("CNI_CONTAINERID"), _env("CNI_IFNAME"), _env("CNI_NETNS")
    state = _state(conf)
    endpoints, ingress, egress = table_for(conf)
    ino = _netns_ino(nspath)
    key = netns.key_for_ino(ino)
    want = {"endpoints": [ep.line() for ep in endpoints], "ingress": ingress, "egress": egress}
    old = records.read(state, cid, ifname)
    if old is not None:
        if old.get("key") == key and old.get("ino") == ino and all(old.get(k) == v for k, v in want.items()) \
                and not _differences(state, old):
            return _result(conf)  # ADD again: already so
        _undo(state, old)
    args = cni_args()
    rec = {"container_id": cid, "ifname": ifname, "netns": nspath, "key": key, "ino": ino, **want,
           "pod": {"namespace": args.get("K8S_POD_NAMESPACE", ""), "name": args.get("K8S_POD_NAME", ""),
                   "uid": args.get("K8S_POD_UID", "")},
           "added": [], "time": time.time()}
    with _store(state) as store:
        try:
            row = store.container(key)
            fresh = row is None or row.netns_ino != ino  # another netns's table under a reused key: stale
            have = None if fresh else store.policy(key)
            keep_in = [str(p) for p in have.ingress] if have else []
            keep_eg = [str(r) for r in have.egress] if have else []
            all_in = keep_in + [p for p in ingress if p not in keep_in]
            all_eg = keep_eg + [r for r in egress if r not in keep_eg]
            added_before = set(have.endpoints) if have else set()
            store.install(key, ino, MODE, endpoints, [parse_ingress(p) for p in all_in],
                          [parse_egress(r) for r in all_eg], fresh=fresh)
            rec["added"] = [ep.name for ep in endpoints if ep.name not in added_before]
            rec["registered"] = fresh  # this ADD registered the netns: its DEL may forget it
            rec["ingress_added"] = [p for p in ingress if p not in keep_in]
            rec["egress_added"] = [r for r in egress if r not in keep_eg]
        except SpecError as e:
            code = E_PORT_TAKEN if "already granted" in str(e) else E_CONFIG
            raise CniError(code, str(e)) from None
        except StoreError as e:
            raise CniError(E_IO, str(e)) from None
    records.write(state, rec)
    return _result(conf)


def _differences(state: str, rec: dict) -> list[str]:
    """What of this record's table is no longer in the tables (CHECK)."""
    from sockgraft.host.store import StoreError

    out = []
    with _store(state) as store:
        try:
            row = store.container(rec["key"])
            if row is None or row.netns_ino != rec.get("ino"):
                return [f"no table for {rec['key']}"]
            pol = store.policy(rec["key"])
        except StoreError as e:
            raise CniError(E_IO, str(e)) from None
    lines = {ep.line() for ep in pol.endpoints.values()}
    out += [f"endpoint missing: {line}" for line in rec.get("endpoints", []) if line not in lines]
    have_in, have_eg = {str(p) for p in pol.ingress}, {str(r) for r in pol.egress}
    out += [f"ingress pair missing: {p}" for p in rec.get("ingress", []) if p not in have_in]
    out += [f"egress rule missing: {r}" for r in rec.get("egress", []) if r not in have_eg]
    return out


def _undo(state: str, rec: dict) -> None:
    """Remove what this record's ADD wrote (and the record). Idempotent."""
    from sockgraft.host.store import StoreError
    from sockgraft.runtime.wrapper import records as oci_records

    key = rec.get("key")
    with _store(state) as store:
        try:
            row = store.container(key) if key else None
            if row is not None and row.netns_ino == rec.get("ino"):
                pol = store.policy(key)
                mine = {line for line in rec.get("endpoints", [])}
                for name in rec.get("added", []):
                    ep = pol.endpoints.get(name)
                    if ep is not None and ep.line() in mine:
                        store.delete(key, name)
                drop_in, drop_eg = set(rec.get("ingress_added", [])), set(rec.get("egress_added", []))
                left_in = [p for p in pol.ingress if str(p) not in drop_in]
                left_eg = [r for r in pol.egress if str(r) not in drop_eg]
                if len(left_in) != len(pol.ingress) or len(left_eg) != len(pol.egress):
                    store.set_rules(key, left_in, left_eg)
                others = [r for r in records.for_key(state, key, rec.get("ino")) if r.get("container_id") != rec.get("container_id")]
                oci = [i for i, r in oci_records(state).items() if r.get("key") == key]
                left = store.policy(key)
                empty = not (left.endpoints or left.ingress or left.egress)
                if not others and not oci and (rec.get("registered") or empty):
                    store.forget(key)  # nobody else holds this netns's table: it goes with the pod
        except StoreError as e:
            raise CniError(E_IO, str(e)) from None
    records.remove(state, rec["container_id"], rec["ifname"])


def cmd_del(conf: dict) -> None:
    cid, ifname = _env("CNI_CONTAINERID"), _env("CNI_IFNAME")
    state = _state(conf)
    rec = records.read(state, cid, ifname)
    if rec is not None:
        _undo(state, rec)


def cmd_check(conf: dict) -> None:
    cid, ifname, nspath = _env("CNI_CONTAINERID"), _env("CNI_IFNAME"), _env("CNI_NETNS")
    state = _state(conf)
    rec = records.read(state, cid, ifname)
    if rec is None:
        raise CniError(E_CHECK, f"no graft table was added for container {cid} ({ifname})")
    if rec.get("ino") != _netns_ino(nspath):
        raise CniError(E_CHECK, f"container {cid}: the graft table belongs to another network namespace")
    endpoints, ingress, egress = table_for(conf)
    want = {"endpoints": [ep.line() for ep in endpoints], "ingress": ingress, "egress": egress}
    changed = [k for k, v in want.items() if rec.get(k) != v]
    if changed:
        raise CniError(E_CHECK, f"container {cid}: the configuration asks for other {', '.join(changed)} than ADD wrote")
    diff = _differences(state, rec)
    if diff:
        raise CniError(E_CHECK, f"container {cid}: {'; '.join(diff)}")


# -- entry point -------------------------------------------------------------------------------------
def run(command: str, stdin: str) -> tuple[int, str]:
    """One invocation: (exit status, stdout text)."""
    version = "1.0.0"
    try:
        if command == "VERSION":
            return 0, json.dumps({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED})
        if command not in ("ADD", "DEL", "CHECK"):
            raise CniError(E_ENV, f"CNI_COMMAND {command!r} is not one of ADD, DEL, CHECK, VERSION" if command
                           else "CNI_COMMAND is not set")
        try:
            conf = json.loads(stdin)
        except ValueError as e:
            raise CniError(E_DECODE, f"network configuration is not JSON: {e}") from None
        if not isinstance(conf, dict):
            raise CniError(E_DECODE, "network configuration must be a JSON object")
        version = conf.get("cniVersion") or ""
        if version not in SUPPORTED:
            bad, version = version, "1.0.0"
            raise CniError(E_VERSION, f"cniVersion {bad!r} is not supported (supported: {', '.join(SUPPORTED)})")
        if command == "ADD":
            return 0, json.dumps(cmd_add(conf))
        if command == "CHECK" and version in ("0.3.0", "0.3.1"):
            raise CniError(E_VERSION, f"CHECK needs cniVersion 0.4.0 or later, not {version}")
        (cmd_del if command == "DEL" else cmd_check)(conf)
        return 0, ""
    except CniError as e:
        err = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            err["details"] = e.details
        return 1, json.dumps(err)


def main() -> None:
    command = os.environ.get("CNI_COMMAND", "")
    stdin = "" if command == "VERSION" else sys.stdin.read()
    try:
        code, out = run(command, stdin)
    except Exception as e:  # never a traceback: one CNI error
        code, out = 1, json.dumps({"cniVersion": "1.0.0", "code": 999, "msg": f"graft: internal error: {type(e).__name__}: {e}"})
    if out:
        print(out)
    if code:
        print(f"graft: {json.loads(out)['msg']}", file=sys.stderr)
    sys.exit(code)
