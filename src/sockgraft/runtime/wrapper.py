"""`graft-runtime`: an OCI runtime wrapper around runc.

It takes runc's command line. On `create` and `run` it reads the bundle's config.json, gives the
container a network namespace with only `lo` when it has none of its own yet, registers the
container's table from the `io.sockgraft.*` annotations under the key of that netns, adds the
seccomp notify rules with graftd's agent socket as `listenerPath`, and runs the real runc with the
original arguments. `delete` removes the table and the netns it created once runc has deleted the
container. Everything else goes to runc untouched.

Inside a Kubernetes pod (containerd's CRI) the netns is the sandbox's, named in config.json, and the
`graft` CNI plugin has already written the pod's table (hostPorts, pod annotations): every
container of the pod, the sandbox's pause included, joins that table and is supervised by graftd;
its `delete` leaves the table to CNI's DEL while CNI still holds it. The CRI names of the container
(namespace, pod, container) go into its record for `graft status` and the metrics.

Settings (flags before the subcommand, which runc never sees, or environment):
  --graft-state-dir DIR  / GRAFT_STATE_DIR      tables (must be graftd's)
  --graft-agent PATH     / GRAFT_AGENT_SOCKET   graftd's OCI agent socket
  --graft-runc PATH      / GRAFT_RUNC           the real runtime (default: runc on PATH)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

from sockgraft.cni import records as cni_records
from sockgraft.host import netns, paths
from sockgraft.host.audit import Audit
from sockgraft.core.endpoint import SpecError
from sockgraft.host.children import wait_forwarding
from sockgraft.host.paths import AGENT_SOCKET, state_dir
from sockgraft.host.store import Store, StoreError
from sockgraft.core.tables import trapped_for
from sockgraft.runtime import annotations, ociconfig

# written into config.json by create: runc's `state` shows them to a later `delete`, whose command
# line may lack the settings create had (podman's cleanup process drops --runtime-flag)
KEY_ANNOTATION = "io.sockgraft.key"
STATE_ANNOTATION = "io.sockgraft.state-dir"
RECORDS = "oci"  # STATE_DIR/oci/<container id>.json: what create made, for delete
NETNS_PREFIX = "graft-oci-"  # `graft run` uses graft-run-PID
MODE = "seccomp"

# runc's global flags that take a value (all others are booleans)
_RUNC_VALUE_FLAGS = {"log", "log-format", "root", "criu", "rootless"}
_OURS = {"graft-state-dir": "state_dir", "graft-agent": "agent", "graft-runc": "runc"}
# create/run flags that take a value
_CREATE_VALUE_FLAGS = {"bundle", "b", "console-socket", "pid-file", "preserve-fds"}
_ID_RE = re.compile(r"^[\w+.-]+$")


@dataclass
class Invocation:
    runc_globals: list[str] = field(default_factory=list)
    command: str | None = None
    args: list[str] = field(default_factory=list)
    log: str | None = None
    log_format: str = "text"
    state_dir: str | None = None
    agent: str | None = None
    runc: str | None = None

    def argv(self, runc: str) -> list[str]:
        return [runc, *self.runc_globals, *([self.command] if self.command else []), *self.args]


def _flag(arg: str) -> tuple[str, str | None] | None:
    """`--name=value` / `-name value` -> (name, value or None); None if not a flag."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    name, eq, value = arg.lstrip("-").partition("=")
    return name, (value if eq else None)


def parse_argv(argv: list[str]) -> Invocation:
    inv = Invocation()
    i = 0
    while i < len(argv):
        arg = argv[i]
        f = _flag(arg)
        if f is None:
            inv.command, inv.args = arg, argv[i + 1:]
            break
        name, value = f
        takes = name in _RUNC_VALUE_FLAGS or name in _OURS
        if takes and value is None:
            if i + 1 >= len(argv):
                raise SpecError(f"flag {arg} needs a value")
            value = argv[i + 1]
            i += 1
        if name in _OURS:
            setattr(inv, _OURS[name], value)
        else:
            inv.runc_globals += [arg] if "=" in arg or not takes else [arg, value]
            if name == "log":
                inv.log = value
            elif name == "log-format":
                inv.log_format = value
        i += 1
    inv.state_dir = inv.state_dir or os.environ.get("GRAFT_STATE_DIR")
    inv.agent = inv.agent or os.environ.get("GRAFT_AGENT_SOCKET") or AGENT_SOCKET
    inv.runc = inv.runc or os.environ.get("GRAFT_RUNC")
    return inv


def bundle_and_id(args: list[str]) -> tuple[str, str]:
    """The bundle directory and container id of a `create`/`run` command line."""
    bundle, cid, i = os.getcwd(), None, 0
    while i < len(args):
        f = _flag(args[i])
        if f is None:
            cid = cid or args[i]
        elif f[0] in _CREATE_VALUE_FLAGS:
            value = f[1]
            if value is None:
                i += 1
                value = args[i] if i < len(args) else None
            if f[0] in ("bundle", "b") and value is not None:
                bundle = value
        i += 1
    if cid is None:
        raise SpecError("no container id on the command line")
    return os.path.abspath(bundle), check_id(cid)


def netns_name(cid: str) -> str:
    """The netns graft-runtime makes for a container: `graft-oci-ID` (Docker's 64-hex ids cut to 24,
    which keeps paths derived from the name within sun_path)."""
    return NETNS_PREFIX + cid[:24]


def check_id(cid: str) -> str:
    if not _ID_RE.match(cid) or cid in (".", ".."):
        raise SpecError(f"bad container id {cid!r}")
    return cid


def find_runc(explicit: str | None) -> str:
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise SpecError(f"runtime {explicit} is not executable")
        return explicit
    me = os.path.realpath(sys.argv[0])
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", "runc")
        if os.access(path, os.X_OK) and os.path.realpath(path) != me:
            return path
    for path in ("/usr/bin/runc", "/usr/sbin/runc", "/usr/local/sbin/runc"):
        if os.access(path, os.X_OK):
            return path
    raise SpecError("runc not found on PATH (set GRAFT_RUNC or --graft-runc)")


# -- records: what create made, so that delete can undo it -------------------------------------------
def record_path(state: str, cid: str) -> str:
    return os.path.join(state, RECORDS, check_id(cid) + ".json")


def read_record(state: str, cid: str) -> dict | None:
    try:
        with open(record_path(state, cid)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def records(state: str) -> dict[str, dict]:
    """Every OCI container graft-runtime created and not yet deleted, by container id."""
    out = {}
    try:
        names = sorted(os.listdir(os.path.join(state, RECORDS)))
    except FileNotFoundError:
        return out
    for name in names:
        if name.endswith(".json"):
            rec = read_record(state, name[:-5])
            if rec:
                out[name[:-5]] = rec
    return out


def _write_record(state: str, cid: str, rec: dict) -> None:
    path = record_path(state, cid)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    paths.write_json(path, rec)


# -- create -----------------------------------------------------------------------------------------
def prepare(inv: Invocation, bundle: str, cid: str) -> dict:
    """Everything before runc runs: netns, tables, config.json. Returns the record."""
    state = state_dir(inv.state_dir)
    config = ociconfig.load(bundle)
    graft_ann = annotations.from_config(config)
    spec = annotations.parse(graft_ann)
    ns = ociconfig.network_namespace(config)
    if ns is None:
        raise SpecError("the container shares the host network namespace; graft-runtime needs its own (--network none)")
    rec = {"id": cid, "bundle": bundle, "created_netns": None, "key": None, "ino": None, "time": time.time()}
    if not paths.privileged():
        return _prepare_rootless(inv, bundle, config, graft_ann, spec, state, rec)
    old = read_record(state, cid)
    if old:  # a create of the same id that never got its delete
        cleanup(state, old)
    name = netns_name(cid)
    if ns.get("path") == netns.netns_path(name):
        del ns["path"]  # ours, from an earlier create of this bundle: made afresh below
    if ns.get("path"):
        c = _container_at(ns["path"])
    else:
        if netns.named_ino(name) is not None:
            owner = [i for i, r in records(state).items() if r.get("created_netns") == name and i != cid]
            if owner:
                raise SpecError(f"network namespace {name} belongs to container {owner[0]}")
            netns.remove(name)  # debris of a create that died before writing its record
        c = netns.create(name)
        rec["created_netns"] = name
        ns["path"] = c.path
    rec["key"], rec["ino"] = c.key, c.ino
    cri = cri_names(config)
    if cri:
        rec["cri"] = cri
    _write_record(state, cid, rec)
    try:
        with Store(state) as store:
            others = [i for i, r in records(state).items() if r.get("key") == c.key and i != cid]
            if cni_records.for_key(state, c.key, c.ino):  # a pod whose table the graft CNI plugin wrote
                _join_pod(store, c.key, c.ino, spec, others)
            elif others:  # containers of one pod share its netns, and so its table
                _join(store, c.key, spec, others[0])
            else:
                # fresh: a stale table of an earlier netns with the same name or inode goes
                store.install(c.key, c.ino, MODE, spec.endpoints, spec.ingress, spec.egress, fresh=True)
            policy = store.policy(c.key)  # the table as installed (a pod's: shared)
        # trap what this table needs; a pod's later container with another table is refused by _join
        trapped = trapped_for(bool(policy.endpoints), bool(policy.ingress))
        untrapped = ociconfig.merge_seccomp(config, inv.agent, trapped=trapped)
        if untrapped:
            log(inv, "warning", f"the container's seccomp profile does not allow {', '.join(untrapped)}: not grafted")
        config["annotations"] = {**(config.get("annotations") or {}), **graft_ann,
                                 KEY_ANNOTATION: c.key, STATE_ANNOTATION: os.path.abspath(state)}
        ociconfig.save(bundle, config)
    except BaseException:
        cleanup(state, rec)
        raise
    return rec


def _prepare_rootless(inv: Invocation, bundle: str, config: dict, graft_ann: dict, spec, state: str, rec: dict) -> dict:
    """Rootless (rootless Podman runs its runtime as root of its user namespace, not host root): no
    named netns (/run/netns is root's) and no table written here. runc makes the container's netns
    (--network none: only lo) inside the engine's user namespace; the per-user graftd's OCI agent
    registers the table from the annotations in the state runc sends with the listener, keyed by
    that netns, and forgets it with the container's last listener."""
    trapped = trapped_for(bool(spec.endpoints), bool(spec.ingress))
    untrapped = ociconfig.merge_seccomp(config, inv.agent, trapped=trapped)
    if untrapped:
        log(inv, "warning", f"the container's seccomp profile does not allow {', '.join(untrapped)}: not grafted")
    config["annotations"] = {**(config.get("annotations") or {}), **graft_ann, STATE_ANNOTATION: os.path.abspath(state)}
    ociconfig.save(bundle, config)
    rec["rootless"] = True
    _write_record(state, rec["id"], rec)
    return rec


def _join(store: Store, key: str, spec: annotations.GraftSpec, other: str) -> None:
    """A container joining a netns that another container registered: same table or none."""
    if spec.empty():
        return
    pol = store.policy(key)
    have = (sorted(ep.line() for ep in pol.endpoints.values()), [str(p) for p in pol.ingress], [str(r) for r in pol.egress])
    want = (sorted(ep.line() for ep in spec.endpoints), [str(p) for p in spec.ingress], [str(r) for r in spec.egress])
    if have != want:
        raise SpecError(f"network namespace {key} is shared with container {other}, whose graft table differs")


def _join_pod(store: Store, key: str, ino: int, spec: annotations.GraftSpec, others: list[str]) -> None:
    """A container of a pod whose table the graft CNI plugin wrote (hostPorts, pod annotations):
    its own annotations must be in that table. The pod's first container (the sandbox) may add
    what is missing (CNI without the pod-annotations capability); a later one may not."""
    pol = store.policy(key)
    have_in, have_eg = [str(p) for p in pol.ingress], [str(r) for r in pol.egress]
    new_eps = [ep for ep in spec.endpoints if pol.endpoints.get(ep.name) != ep]
    new_in = [str(p) for p in spec.ingress if str(p) not in have_in]
    new_eg = [str(r) for r in spec.egress if str(r) not in have_eg]
    if not (new_eps or new_in or new_eg):
        return
    if others:
        raise SpecError(f"network namespace {key} is shared with container {others[0]}, whose graft table lacks "
                        f"{', '.join([ep.name for ep in new_eps] + new_in + new_eg)}")
    store.install(key, ino, MODE, new_eps, [*pol.ingress, *(p for p in spec.ingress if str(p) in new_in)],
                  [*pol.egress, *(r for r in spec.egress if str(r) in new_eg)], fresh=False)


# CRI annotations naming a container (containerd's, then CRI-O's): for `graft status` and metrics
_CRI = {
    "namespace": ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace"),
    "pod": ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name"),
    "container": ("io.kubernetes.cri.container-name", "io.kubernetes.container.name"),
    "type": ("io.kubernetes.cri.container-type", "io.kubernetes.cri-o.ContainerType"),
    "sandbox_id": ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID"),
}


def cri_names(config: dict) -> dict[str, str]:
    """namespace, pod, container (absent for the sandbox), type, sandbox_id: what the CRI says."""
    ann = config.get("annotations") or {}
    out = {}
    for field_, names in _CRI.items():
        for n in names:
            if ann.get(n):
                out[field_] = str(ann[n])
                break
    return out if "pod" in out else {}


def _container_at(path: str) -> netns.Container:
    try:
        ino = os.stat(path).st_ino
    except OSError as e:
        raise SpecError(f"network namespace {path}: {e.strerror}") from None
    return netns.Container(netns.key_for_ino(ino), ino, path)


def cleanup(state: str, rec: dict) -> None:
    """Undo what create did for this record: table, netns, record. Idempotent."""
    key = rec.get("key")
    sharing = [i for i, r in records(state).items() if r.get("key") == key and i != rec["id"]]
    # a pod's table written by the graft CNI plugin goes with its DEL, when no container is left
    if key and not sharing and not cni_records.for_key(state, key, rec.get("ino")):
        with Store(state) as store:
            row = store.container(key)
            if row is not None and row.netns_ino == rec.get("ino"):
                store.forget(key)
    if rec.get("created_netns"):
        netns.remove(rec["created_netns"])
    try:
        os.unlink(record_path(state, rec["id"]))
    except FileNotFoundError:
        pass


# -- the command ------------------------------------------------------------------------------------
def log(inv: Invocation, level: str, message: str) -> None:
    """One line on stderr and, like runc, in --log (JSON when --log-format json): the container
    manager shows the runtime's last error from there."""
    print(f"graft-runtime: {message}", file=sys.stderr)
    if inv.log:
        if inv.log_format == "json":
            line = json.dumps({"level": level, "msg": f"graft-runtime: {message}", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        else:
            line = f'time="{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}" level={level} msg="graft-runtime: {message}"'
        try:
            with open(inv.log, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass


def _check_only_lo(rec: dict | None) -> None:
    """A netns graft-runtime made must still have only `lo` at start: an engine that plugged an
    interface in (Docker without --network none) would give the container a second, ungrafted way
    out."""
    if not rec or not rec.get("created_netns"):
        return
    p = subprocess.run(["ip", "-n", rec["created_netns"], "-o", "link", "show"], capture_output=True, text=True)
    if p.returncode != 0:
        raise SpecError(f"cannot list the interfaces of netns {rec['created_netns']}: {p.stderr.strip()}")
    names = [line.split(":")[1].strip().split("@")[0] for line in p.stdout.splitlines() if ":" in line]
    extra = [n for n in names if n != "lo"]
    if extra:
        raise SpecError(f"container {rec['id']} has network interfaces besides lo ({', '.join(extra)}): "
                        "run it with --network none")


def _state_dir_of(inv: Invocation, runc: str, cid: str) -> str | None:
    """The state dir create used for this container, from runc's view of its annotations."""
    p = subprocess.run([runc, *inv.runc_globals, "state", cid], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    try:
        return (json.loads(p.stdout).get("annotations") or {}).get(STATE_ANNOTATION)
    except ValueError:
        return None


def _gone(inv: Invocation, runc: str, cid: str) -> bool:
    p = subprocess.run([runc, *inv.runc_globals, "state", cid], capture_output=True)
    return p.returncode != 0


def _audit(state: str, event: str, **fields) -> None:
    """graft-runtime's lifecycle steps, in the one audit log (JSON lines)."""
    a = Audit(state)
    a.record(event, pid=os.getpid(), **fields)
    a.close()


def _run_child(argv: list[str]) -> int:
    """runc as a child, with the signals a foreground `runc run` would get passed on to it."""
    return wait_forwarding(subprocess.Popen(argv))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    inv = Invocation()
    try:
        inv = parse_argv(argv)
        runc = find_runc(inv.runc)
        state = state_dir(inv.state_dir)
        if inv.command == "create":
            bundle, cid = bundle_and_id(inv.args)
            rec = prepare(inv, bundle, cid)
            code = subprocess.call(inv.argv(runc))
            if code != 0:
                cleanup(state, rec)
            _audit(state, "oci-create", container=rec["key"], container_id=cid, runc_exit=code)
            sys.exit(code)
        if inv.command == "run":
            bundle, cid = bundle_and_id(inv.args)
            rec = prepare(inv, bundle, cid)
            code = _run_child(inv.argv(runc))
            if code != 0 or not any(_flag(a) in (("d", None), ("detach", None)) for a in inv.args):
                if _gone(inv, runc, cid):  # runc run removes the container when it ends (unless --keep)
                    cleanup(state, rec)
            sys.exit(code)
        if inv.command == "start":
            cids = [a for a in inv.args if _flag(a) is None]
            for cid in cids:
                _check_only_lo(read_record(state, check_id(cid)))
        if inv.command == "delete":
            cids = [a for a in inv.args if _flag(a) is None]
            states = {cid: _state_dir_of(inv, runc, cid) or state for cid in cids}
            code = subprocess.call(inv.argv(runc))
            for cid in cids:
                state = states[cid]
                rec = read_record(state, check_id(cid))
                done = bool(rec) and (code == 0 or _gone(inv, runc, cid))
                if done:
                    cleanup(state, rec)
                _audit(state, "oci-delete", container=rec and rec["key"], container_id=cid, runc_exit=code, removed=done)
            sys.exit(code)
        os.execv(runc, inv.argv(runc))
    except (SpecError, StoreError) as e:
        log(inv, "error", str(e))
        sys.exit(1)
    except OSError as e:
        log(inv, "error", f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
