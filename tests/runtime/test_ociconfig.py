"""config.json merging: the notify rules equal the seccomp mode's own filter, argument for
argument, and an existing profile is never widened."""
from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings, strategies as st

from sockgraft.core.endpoint import SpecError
from sockgraft.runtime import ociconfig
from sockgraft.modes.seccomp import bpf
from sockgraft.modes.seccomp.kernel import SYS

AGENT = "/run/sockgraft/agent.sock"
MASK64 = (1 << 64) - 1


def _cmp(arg: dict, values: tuple[int, ...]) -> bool:
    """libseccomp's comparison of one argument (64-bit)."""
    v = values[arg["index"]] & MASK64
    op = arg["op"]
    if op == "SCMP_CMP_MASKED_EQ":
        return v & arg["value"] == arg["valueTwo"]
    return {"SCMP_CMP_EQ": v == arg["value"], "SCMP_CMP_NE": v != arg["value"],
            "SCMP_CMP_LT": v < arg["value"], "SCMP_CMP_GT": v > arg["value"]}[op]


def oci_action(profile: dict, name: str, args: tuple[int, ...]) -> str:
    """What the merged profile does with this call (our rules never overlap: first match)."""
    hits = [r["action"] for r in profile["syscalls"]
            if name in r["names"] and all(_cmp(a, args) for a in r.get("args", []))]
    assert len(set(hits)) <= 1, f"{name}{args}: overlapping actions {hits}"
    return hits[0] if hits else profile["defaultAction"]


def bpf_action(name: str, args: tuple[int, ...]) -> str:
    ret = bpf.run(bpf.filter_program().assemble(), bpf.seccomp_data(SYS[name], args))
    if ret == bpf.RET_USER_NOTIF:
        return "SCMP_ACT_NOTIFY"
    if ret == bpf.RET_ALLOW:
        return "SCMP_ACT_ALLOW"
    return f"ret {ret:#x}"


DOCKER_LIKE = {  # a default-deny profile with one big unconditional allow list
    "defaultAction": "SCMP_ACT_ERRNO",
    "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
    "syscalls": [{"names": ["bind", "connect", "getsockname", "sendto", "ioctl", "setsockopt", "io_uring_setup",
                            "read", "write", "socket"], "action": "SCMP_ACT_ALLOW"},
                 {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}],
}

special = st.sampled_from([0, 1, 25, 62, 0x8900, 0x8912, 0x89FF, 0x8A00, 0x88FF, 0x5401, 0x541B,
                           1 << 32, (1 << 32) | 0x8912, (1 << 32) | 1, (1 << 32) | 25, MASK64])
value = st.one_of(special, st.integers(0, MASK64), st.integers(0, 0xFFFF))


@pytest.mark.parametrize("base", [None, DOCKER_LIKE], ids=["no-profile", "default-deny"])
@settings(max_examples=400, deadline=None)
@given(name=st.sampled_from(["bind", "connect", "getsockname", "sendto", "ioctl", "setsockopt"]),
       args=st.tuples(value, value, value, value, value, value))
def test_notify_rules_equal_the_seccomp_filter(base, name, args):
    import copy

    config = {"linux": {"seccomp": copy.deepcopy(base)}} if base else {}
    ociconfig.merge_seccomp(config, AGENT)
    profile = config["linux"]["seccomp"]
    got = oci_action(profile, name, args)
    want = bpf_action(name, args)
    assert got == want, f"{name}{tuple(hex(a) for a in args)}: OCI {got}, seccomp filter {want}"


def test_merge_keeps_the_rest_and_refuses_io_uring():
    import copy

    config = {"linux": {"seccomp": copy.deepcopy(DOCKER_LIKE)}}
    assert ociconfig.merge_seccomp(config, AGENT) == []
    p = config["linux"]["seccomp"]
    assert p["listenerPath"] == AGENT and p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert p["architectures"] == ["SCMP_ARCH_X86_64"]
    assert oci_action(p, "read", (0,) * 6) == "SCMP_ACT_ALLOW"
    assert oci_action(p, "socket", (0,) * 6) == "SCMP_ACT_ALLOW"
    assert oci_action(p, "clone", (1, 0, 0, 0, 0, 0)) == "SCMP_ACT_ALLOW"
    assert oci_action(p, "clone", (2, 0, 0, 0, 0, 0)) == "SCMP_ACT_ERRNO"
    (uring,) = [r for r in p["syscalls"] if "io_uring_setup" in r["names"]]
    assert uring["action"] == "SCMP_ACT_ERRNO" and uring["errnoRet"] == errno.ENOSYS
    # a second merge of the same bundle changes nothing
    before = copy.deepcopy(config)
    ociconfig.merge_seccomp(config, AGENT)
    assert config == before


def test_merge_never_widens_a_profile():
    config = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["read", "connect"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 1, "value": 0x5401, "op": "SCMP_CMP_EQ"}]}]}}}
    untrapped = ociconfig.merge_seccomp(config, AGENT)
    assert set(untrapped) == {"bind", "getsockname", "sendto", "ioctl", "setsockopt"}
    p = config["linux"]["seccomp"]
    assert oci_action(p, "connect", (0,) * 6) == "SCMP_ACT_NOTIFY"
    assert oci_action(p, "bind", (0,) * 6) == "SCMP_ACT_ERRNO"
    assert oci_action(p, "ioctl", (0, 0x8912, 0, 0, 0, 0)) == "SCMP_ACT_ERRNO"
    assert oci_action(p, "ioctl", (0, 0x5401, 0, 0, 0, 0)) == "SCMP_ACT_ALLOW"


def test_another_agent_is_refused():
    config = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/elsewhere.sock",
                                    "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}}}
    with pytest.raises(SpecError, match="/elsewhere.sock"):
        ociconfig.merge_seccomp(config, AGENT)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=4), st.integers(0, 0xFFFFFFFF))
def test_complement_is_exact(values, x):
    cubes = [(0xFFFFFFFF, v) for v in values]
    out = ociconfig.complement(cubes)
    inside = x in values
    assert any(x & m == v for m, v in out) != inside
