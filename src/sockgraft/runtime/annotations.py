"""A container's graft table as OCI annotations (see the package docstring for the names)."""
from __future__ import annotations

from dataclasses import dataclass, field

from sockgraft.core.endpoint import Endpoint, SpecError, parse_endpoint
from sockgraft.core.rules import EgressRule, IngressPair, parse_egress, parse_ingress

ENDPOINTS = "io.sockgraft.endpoints"
INGRESS = "io.sockgraft.ingress"
EGRESS = "io.sockgraft.egress"
NAMES = (ENDPOINTS, INGRESS, EGRESS)
# For engines that cannot set annotations (Docker before 24 / API 1.43): the same values in the
# container's environment. Annotations win when both are given.
ENV = {ENDPOINTS: "SOCKGRAFT_ENDPOINTS", INGRESS: "SOCKGRAFT_INGRESS", EGRESS: "SOCKGRAFT_EGRESS"}


@dataclass
class GraftSpec:
    endpoints: list[Endpoint] = field(default_factory=list)
    ingress: list[IngressPair] = field(default_factory=list)
    egress: list[EgressRule] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.endpoints or self.ingress or self.egress)


def from_config(config: dict) -> dict[str, str]:
    """The io.sockgraft.* annotations of an OCI config, completed from SOCKGRAFT_* variables of
    the container's environment."""
    ann = dict(config.get("annotations") or {})
    env = {}
    for item in (config.get("process") or {}).get("env") or []:
        k, _, v = item.partition("=")
        env[k] = v
    for name, var in ENV.items():
        if name not in ann and var in env:
            ann[name] = env[var]
    return {k: v for k, v in ann.items() if k in NAMES}


def parse(annotations: dict[str, str] | None) -> GraftSpec:
    """The graft table carried by these annotations; SpecError names the bad annotation."""
    annotations = annotations or {}
    spec = GraftSpec()
    seen: set[str] = set()
    for text in filter(str.strip, annotations.get(ENDPOINTS, "").split(";")):
        try:
            ep = parse_endpoint(text.strip())
        except SpecError as e:
            raise SpecError(f"annotation {ENDPOINTS}: {e}") from None
        if ep.name in seen:
            raise SpecError(f"annotation {ENDPOINTS}: endpoint {ep.name!r} given twice")
        seen.add(ep.name)
        spec.endpoints.append(ep)
    for name, parser, out in ((INGRESS, parse_ingress, spec.ingress), (EGRESS, parse_egress, spec.egress)):
        for word in annotations.get(name, "").split():
            try:
                rule = parser(word)
            except SpecError as e:
                raise SpecError(f"annotation {name}: {e}") from None
            if rule.endpoint not in seen:
                raise SpecError(f"annotation {name}: {word!r} names endpoint {rule.endpoint!r}, which {ENDPOINTS} does not define")
            out.append(rule)
    return spec
