"""The bundle's config.json: seccomp notify rules for graftd merged into whatever profile is there.

The container's socket syscalls go to graftd through `linux.seccomp.listenerPath`
(`SCMP_ACT_NOTIFY`). Rules of the existing profile stay as they are, except that the trapped
syscalls are taken out of its allow rules and get notify rules (plus, for a syscall trapped on
some arguments only, allow rules for all the other arguments). A syscall that the existing profile does not allow unconditionally is
left alone: grafting never widens what a profile permits.
"""
from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping

from sockgraft.core.endpoint import SpecError
from sockgraft.core.tables import POINTER, REFUSED, TRAPPED
from sockgraft.host.paths import write_json

NOTIFY = "SCMP_ACT_NOTIFY"
ALLOWING = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
METADATA = "sockgraft"
ENOSYS = 38

# The trapped syscalls and their argument conditions are core.tables.TRAPPED/REFUSED, the list the
# seccomp mode's own BPF filter is built from too. libseccomp lets an unconditional allow rule win
# over a conditional notify rule, so when the profile's default action is not "allow" the
# complement of each condition becomes explicit allow rules, built from masked comparisons only.
# Architectures: the native one only (the supervisor decodes x86_64 syscalls; like the seccomp
# mode, others are killed).

_ARCHES = {"x86_64": ["SCMP_ARCH_X86_64"], "aarch64": ["SCMP_ARCH_AARCH64"]}


def _in(cubes: list[tuple[int, int]], mask: int, prefix: int) -> str:
    """How the values x with x & mask == prefix relate to the union of cubes:
    'all' (inside), 'none' (disjoint) or 'some'."""
    for m, v in cubes:
        if m & ~mask == 0 and (prefix ^ v) & m == 0:
            return "all"
    if all((prefix ^ v) & m & mask for m, v in cubes):
        return "none"
    return "some"


def complement(cubes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Masked-equality cubes covering exactly the 32-bit values outside the union of `cubes`."""
    out: list[tuple[int, int]] = []

    def walk(mask: int, prefix: int, bit: int) -> None:
        rel = _in(cubes, mask, prefix)
        if rel == "none":
            out.append((mask, prefix))
        elif rel == "some":
            b = 1 << bit
            walk(mask | b, prefix, bit - 1)
            walk(mask | b, prefix | b, bit - 1)

    walk(0, 0, 31)
    return out


def _arg(index: int, cube) -> dict:
    if cube == POINTER:
        return {"index": index, "value": 0, "op": "SCMP_CMP_NE"}
    if cube == "null":
        return {"index": index, "value": 0, "op": "SCMP_CMP_EQ"}
    mask, value = cube
    return {"index": index, "value": mask, "valueTwo": value, "op": "SCMP_CMP_MASKED_EQ"}


def _product(parts: list[list[dict]]) -> list[list[dict]]:
    rules: list[list[dict]] = [[]]
    for options in parts:
        rules = [r + [o] for r in rules for o in options]
    return rules


def trap_rules(name: str, condition, with_complement: bool) -> list[dict]:
    """OCI rules for one trapped syscall: notify where the condition holds and, if asked, allow
    everywhere else."""
    if condition is None:
        return [{"names": [name], "action": NOTIFY}]
    idx = sorted(condition)
    sets = {i: ([POINTER] if condition[i] == POINTER else list(condition[i])) for i in idx}
    rules = [{"names": [name], "action": NOTIFY, "args": [_arg(i, c) for i, c in zip(idx, combo)]}
             for combo in _product([sets[i] for i in idx])]
    if with_complement:
        # not (A1 and A2 and ...) == not A1, or A1 and not A2, or A1 and A2 and not A3, ...
        for k, i in enumerate(idx):
            outside = ["null"] if condition[i] == POINTER else complement(condition[i])
            for combo in _product([sets[j] for j in idx[:k]] + [outside]):
                rules.append({"names": [name], "action": "SCMP_ACT_ALLOW",
                              "args": [_arg(j, c) for j, c in zip(idx[:k] + [i], combo)]})
    return rules


def _allowed_unconditionally(profile: dict, name: str) -> bool:
    """Does the existing profile let `name` through whatever its arguments?"""
    rules = [r for r in profile.get("syscalls") or [] if name in (r.get("names") or [])]
    if not rules:
        return profile.get("defaultAction") in ALLOWING
    return any(r.get("action") in ALLOWING and not r.get("args") for r in rules) and all(
        r.get("action") in ALLOWING for r in rules
    )


def merge_seccomp(config: dict, listener_path: str, metadata: str = METADATA,
                  trapped: Mapping[str, Mapping | None] = TRAPPED) -> list[str]:
    """Add graftd's notify rules for `trapped` (TRAPPED, or the subset the container's policy
    needs: `core.tables.trapped_for`) and listenerPath to `config` (in place). With nothing to
    trap, only REFUSED is added and no listener is handed to graftd. Returns the syscalls left
    untrapped because the existing profile does not allow them."""
    linux = config.setdefault("linux", {})
    profile = linux.get("seccomp")
    if profile is None:
        profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    old_listener = profile.get("listenerPath")
    if old_listener and old_listener != listener_path:
        raise SpecError(f"config.json already hands its seccomp listener to {old_listener}: one agent per container")
    if old_listener == listener_path and profile.get("listenerMetadata") == metadata:
        return []  # merged already (a second create of the same bundle)
    syscalls = profile.get("syscalls") or []
    if any(r.get("action") == NOTIFY for r in syscalls):
        raise SpecError("config.json already has SCMP_ACT_NOTIFY rules for another agent")
    trap, refuse = trapped, REFUSED
    untrapped = [n for n in trap if not _allowed_unconditionally(profile, n)]
    take = {n for n in trap if n not in untrapped} | {n for n in refuse if _allowed_unconditionally(profile, n)}
    default_allows = profile.get("defaultAction") in ALLOWING
    kept = []
    for rule in syscalls:
        names = rule.get("names") or []
        if take & set(names):  # only allow rules can name them (else they were not allowed)
            names = [n for n in names if n not in take]
            if not names:
                continue
            rule = dict(rule, names=names)
        kept.append(rule)
    for name, condition in trap.items():
        if name in take:
            kept += trap_rules(name, condition, not default_allows)
    for name in refuse:
        if name in take:
            kept.append({"names": [name], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    native = _ARCHES.get(platform.machine())
    if trap:
        profile = dict(profile, syscalls=kept, listenerPath=listener_path, listenerMetadata=metadata)
    else:
        profile = dict(profile, syscalls=kept)
    if native:
        profile["architectures"] = native
    linux["seccomp"] = profile
    return untrapped


def network_namespace(config: dict) -> dict | None:
    for ns in (config.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "network":
            return ns
    return None


def load(bundle: str) -> dict:
    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SpecError(f"no config.json in bundle {bundle}") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"cannot read {path}: {e}") from None


def save(bundle: str, config: dict) -> None:
    """Replace config.json atomically (same directory, same mode)."""
    path = os.path.join(bundle, "config.json")
    write_json(path, config, os.stat(path).st_mode & 0o7777)
