"""Graft endpoints: a name bound, per container, to a host address.

Pure code: parsing, validation and the two printed forms (``ip graft`` line and JSON).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

NAME_MAX = 15
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
TYPES = ("ipv4", "ipv6", "unix")
DYNAMIC = None  # port value of a `dynamic` endpoint
_NAME = re.compile(r"[!-~]+")  # printable ASCII, no whitespace


class SpecError(ValueError):
    """Bad user input: the message is one line meant for the user."""


def check_name(name: str) -> str:
    if not 1 <= len(name) <= NAME_MAX:
        raise SpecError(f"endpoint name {name!r} must be 1 to {NAME_MAX} characters")
    if not _NAME.fullmatch(name):
        raise SpecError(f"endpoint name {name!r} must be printable ASCII without whitespace")
    return name


def parse_port(text: str, *, allow_dynamic: bool = True) -> int | None:
    if allow_dynamic and text == "dynamic":
        return DYNAMIC
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise SpecError(f"bad port {text!r}: expected 0-65535" + (" or 'dynamic'" if allow_dynamic else ""))
    return int(text)


@functools.lru_cache(maxsize=4096)  # the fd service parses the same few addresses over and over
def parse_ip(text: str, version: int | None = None) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise SpecError(f"bad address {text!r}") from None
    if version is not None and ip.version != version:
        raise SpecError(f"bad address {text!r}: not an IPv{version} address")
    if ip.version == 6 and ip.scope_id:
        raise SpecError(f"bad address {text!r}: scoped IPv6 addresses are not supported")
    return ip


def check_unix_path(path: str) -> str:
    raw = path.encode("utf-8", "surrogateescape")
    if not raw or b"\0" in raw:
        raise SpecError("bad unix path: empty or contains NUL")
    if len(raw) > UNIX_PATH_MAX:
        raise SpecError(f"unix path too long: {len(raw)} bytes (at most {UNIX_PATH_MAX})")
    if not (path.startswith("/") or path.startswith("@")):
        raise SpecError(f"bad unix path {path!r}: must be absolute (or @abstract)")
    return path


@dataclass(frozen=True)
class Endpoint:
    name: str
    type: str  # ipv4 | ipv6 | unix
    addr: str | None = None
    port: int | None = DYNAMIC
    path: str | None = None

    @property
    def family(self) -> int:
        return {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6, "unix": socket.AF_UNIX}[self.type]

    @property
    def dynamic(self) -> bool:
        return self.type != "unix" and self.port in (DYNAMIC, 0)

    def sockaddr(self) -> tuple | str:
        """The host address to bind: (addr, port) with port 0 for dynamic, or a unix path."""
        if self.type == "unix":
            return "\0" + self.path[1:] if self.path.startswith("@") else self.path
        return (self.addr, self.port or 0)

    def line(self) -> str:
        """The `ip graft show` form."""
        if self.type == "unix":
            return f"{self.name} type unix path {self.path}"
        port = "dynamic" if self.port is DYNAMIC else str(self.port)
        return f"{self.name} type {self.type} addr {self.addr} port {port}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "addr": self.addr,
            "port": None if self.type == "unix" else ("dynamic" if self.port is DYNAMIC else self.port),
            "path": self.path,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Endpoint":
        port = d.get("port")
        return cls(d["name"], d["type"], d.get("addr"), None if port in (None, "dynamic") else int(port), d.get("path"))


def parse_endpoint(words: list[str] | str) -> Endpoint:
    """Parse `NAME type ipv4|ipv6 addr A port P|dynamic` or `NAME type unix path P`."""
    if isinstance(words, str):
        words = words.split()
    if not words:
        raise SpecError("missing endpoint name")
    name, rest = check_name(words[0]), words[1:]
    if len(rest) % 2:
        raise SpecError(f"endpoint {name}: '{rest[-1]}' needs a value")
    fields: dict[str, str] = {}
    for key, value in zip(rest[::2], rest[1::2]):
        if key not in ("type", "addr", "port", "path"):
            raise SpecError(f"endpoint {name}: unknown keyword {key!r} (expected type, addr, port, path)")
        if key in fields:
            raise SpecError(f"endpoint {name}: {key} given twice")
        fields[key] = value
    kind = fields.get("type")
    if kind not in TYPES:
        raise SpecError(f"endpoint {name}: type must be one of {', '.join(TYPES)}" + (f", not {kind!r}" if kind else ""))
    if kind == "unix":
        if set(fields) != {"type", "path"}:
            raise SpecError(f"endpoint {name}: type unix takes exactly: path PATH")
        return Endpoint(name, "unix", path=check_unix_path(fields["path"]))
    if set(fields) != {"type", "addr", "port"}:
        raise SpecError(f"endpoint {name}: type {kind} takes exactly: addr ADDR port PORT|dynamic")
    ip = parse_ip(fields["addr"], 4 if kind == "ipv4" else 6)
    return Endpoint(name, kind, addr=ip.compressed, port=parse_port(fields["port"]))


def conflicts(a: Endpoint, b: Endpoint) -> bool:
    """Whether two fixed endpoints claim the same host address and port (or unix path)."""
    if a.type != b.type:
        # dual-stack wildcards are not checked across families: the kernel refuses the second bind
        return False
    if a.type == "unix":
        return a.path == b.path
    if a.dynamic or b.dynamic or a.port != b.port:
        return False
    wild = ("0.0.0.0", "::")
    return a.addr == b.addr or a.addr in wild or b.addr in wild
