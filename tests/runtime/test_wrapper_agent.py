"""graft-runtime's command line and annotations; the agent's reading of what runc sends."""
from __future__ import annotations

import json
import os
import socket

import pytest

from sockgraft.core.endpoint import SpecError
from sockgraft.runtime import annotations
from sockgraft.runtime.ociagent import AgentError, parse_message, receive
from sockgraft.runtime.wrapper import bundle_and_id, parse_argv


# -- annotations -------------------------------------------------------------------------------------
def test_annotations_parse():
    spec = annotations.parse({
        annotations.ENDPOINTS: "http type ipv4 addr 127.0.0.1 port 8080 ;out type ipv6 addr ::1 port dynamic;",
        annotations.INGRESS: "0.0.0.0:80=http  [::]:80=http",
        annotations.EGRESS: "::1/128=out",
        "org.other": "ignored",
    })
    assert [e.line() for e in spec.endpoints] == ["http type ipv4 addr 127.0.0.1 port 8080",
                                                  "out type ipv6 addr ::1 port dynamic"]
    assert [str(p) for p in spec.ingress] == ["0.0.0.0:80=http", "[::]:80=http"]
    assert [str(r) for r in spec.egress] == ["::1/128=out"]
    assert annotations.parse({}).empty()


@pytest.mark.parametrize("ann, message", [
    ({annotations.ENDPOINTS: "a type ipv4 addr 127.0.0.1 port 70000"}, "io.sockgraft.endpoints: bad port"),
    ({annotations.ENDPOINTS: "a type ipv4 addr 127.0.0.1 port 1; a type ipv4 addr 127.0.0.1 port 2"}, "given twice"),
    ({annotations.INGRESS: "0.0.0.0:80=web"}, "which io.sockgraft.endpoints does not define"),
    ({annotations.ENDPOINTS: "web type ipv4 addr 127.0.0.1 port 1", annotations.EGRESS: "10.0.0.0/33=web"}, "io.sockgraft.egress"),
])
def test_annotation_errors_name_the_annotation(ann, message):
    with pytest.raises(SpecError, match=message):
        annotations.parse(ann)


def test_environment_fills_in_for_missing_annotations():
    config = {"annotations": {annotations.ENDPOINTS: "a type ipv4 addr 127.0.0.1 port 1"},
              "process": {"env": ["PATH=/bin", "SOCKGRAFT_ENDPOINTS=b type ipv4 addr 127.0.0.1 port 2",
                                  "SOCKGRAFT_INGRESS=0.0.0.0:80=a"]}}
    assert annotations.from_config(config) == {annotations.ENDPOINTS: "a type ipv4 addr 127.0.0.1 port 1",
                                               annotations.INGRESS: "0.0.0.0:80=a"}


# -- runc's command line ------------------------------------------------------------------------------
def test_argv_keeps_runc_flags_and_takes_ours(monkeypatch):
    monkeypatch.delenv("GRAFT_STATE_DIR", raising=False)
    argv = ["--root", "/run/x", "--log=/l.json", "--log-format", "json", "--systemd-cgroup",
            "--graft-state-dir=/s", "--graft-agent", "/a.sock", "create", "--bundle", "/b", "--pid-file", "/p", "cid"]
    inv = parse_argv(argv)
    assert inv.runc_globals == ["--root", "/run/x", "--log=/l.json", "--log-format", "json", "--systemd-cgroup"]
    assert (inv.command, inv.log, inv.log_format, inv.state_dir, inv.agent) == ("create", "/l.json", "json", "/s", "/a.sock")
    assert inv.argv("/usr/bin/runc") == ["/usr/bin/runc", *inv.runc_globals, "create", "--bundle", "/b", "--pid-file", "/p", "cid"]
    assert bundle_and_id(inv.args) == ("/b", "cid")


def test_bundle_and_id_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bundle_and_id(["-b", "/x", "--console-socket", "/c.sock", "id1"]) == ("/x", "id1")
    assert bundle_and_id(["--no-pivot", "-bundle=/y", "id2"]) == ("/y", "id2")
    assert bundle_and_id(["id3"]) == (str(tmp_path), "id3")
    with pytest.raises(SpecError, match="no container id"):
        bundle_and_id(["--bundle", "/x"])
    with pytest.raises(SpecError, match="bad container id"):
        bundle_and_id(["../../etc"])


# -- the agent protocol ----------------------------------------------------------------------------------
def _state(pid=4242, fds=("seccompFd",)) -> dict:
    return {"ociVersion": "1.0.2", "fds": list(fds), "pid": pid, "metadata": "sockgraft",
            "state": {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": pid,
                      "bundle": "/b", "annotations": {annotations.ENDPOINTS: "a type unix path /x"}}}


def _send(payload: bytes, fds: list[int], close: bool) -> tuple[bytes, list[int]]:
    a, b = socket.socketpair()
    with a, b:
        socket.send_fds(a, [payload], fds)
        if close:
            a.shutdown(socket.SHUT_WR)
        return receive(b)


@pytest.mark.parametrize("close", [True, False], ids=["runc-create-closes", "runc-run-keeps-open"])
def test_receive_and_parse_what_runc_sends(close):
    r, w = os.pipe()
    try:
        data, fds = _send(json.dumps(_state()).encode(), [r], close)
        ps = parse_message(data, fds)
        assert (ps.pid, ps.container_id, ps.status, ps.bundle, ps.metadata) == (4242, "c1", "creating", "/b", "sockgraft")
        assert os.path.sameopenfile(ps.listener_fd, r) and ps.extra_fds == []
        os.close(ps.listener_fd)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("msg, fds_sent, error", [
    (b"not json", 1, "not JSON"),
    (json.dumps({"fds": ["seccompFd"]}).encode(), 1, "without a `state`"),
    (json.dumps(_state(fds=("seccompFd", "other"))).encode(), 1, "names 2 descriptors but 1 arrived"),
    (json.dumps(_state(fds=("other",))).encode(), 1, "no seccompFd"),
    (json.dumps(_state(pid=-1)).encode(), 1, "bad pid"),
])
def test_bad_messages_are_refused(msg, fds_sent, error):
    r, w = os.pipe()
    try:
        data, fds = _send(msg, [r] * fds_sent, True)
        with pytest.raises(AgentError, match=error):
            parse_message(data, fds)
        for fd in fds:
            os.close(fd)
    finally:
        os.close(r)
        os.close(w)


def test_cri_names_from_containerd_and_cri_o_annotations():
    from sockgraft.runtime.wrapper import cri_names

    containerd = {"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "abc",
                                  "io.kubernetes.cri.sandbox-name": "web", "io.kubernetes.cri.sandbox-namespace": "prod",
                                  "io.kubernetes.cri.container-name": "nginx"}}
    assert cri_names(containerd) == {"namespace": "prod", "pod": "web", "container": "nginx", "type": "container",
                                     "sandbox_id": "abc"}
    crio = {"annotations": {"io.kubernetes.pod.name": "web", "io.kubernetes.pod.namespace": "prod"}}
    assert cri_names(crio) == {"namespace": "prod", "pod": "web"}
    assert cri_names({"annotations": {"io.kubernetes.cri.container-name": "x"}}) == {}  # no pod: not CRI's
    assert cri_names({}) == {}
