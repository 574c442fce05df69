"""nat: docker0-like. A bridge, one veth per container netns, MASQUERADE for container egress, and a
DNAT port publish (like `docker run -p`) for host->container; the containers' default route goes
via the bridge. Needs ip_forward=1 while it exists, and raises nf_conntrack_max (both shared with
other runs: see sysctl)."""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shlex

from sockgraft.bench.debris import tag
from sockgraft.bench.sysctl import conntrack_update, forward_update
from sockgraft.bench.system import TopologyError, alarm, locked, sh
from sockgraft.bench.topologies.base import Listener, Topology, pdeathsig
from sockgraft.host import netns as sg_netns

SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")


class Nat(Topology):
    """docker0-like, with veth MTU `mtu` (1500 like docker0; 65520 to compare with loopback's)."""

    kind = "nat"

    def __init__(self, state_dir: str | None = None, mtu: int = 1500, name: str | None = None):
        super().__init__(state_dir)
        self.mtu = mtu
        self.name = name or ("nat" if mtu == 1500 else f"nat-mtu{mtu}")
        self.suffix = "n" if mtu == 1500 else "m"
        self.quick = mtu == 1500  # the MTU variant: not in --quick
        self.tag = tag() + self.suffix
        self.bridge = f"{self.tag}br"
        self.table = self.tag
        self.netns = {"c1": f"{self.tag}-c1", "c2": f"{self.tag}-c2"}
        self.subnet: ipaddress.IPv4Network | None = None
        self.addr: dict[str, str] = {}
        self._undo: list = []
        self._published: dict[tuple[int, str], int] = {}

    def describe(self) -> str:
        return (f"bridge {self.bridge} {self.subnet}, veth MTU {self.mtu}, nft table ip {self.table}: "
                "masquerade for container egress, DNAT publish host:HP -> container:P")

    def _pick_subnet(self) -> ipaddress.IPv4Network:
        used = []
        for r in json.loads(sh("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]"):
            dst = r.get("dst")
            if dst and dst != "default":
                with contextlib.suppress(ValueError):
                    used.append(ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False))
        for a in json.loads(sh("ip", "-j", "-4", "addr").stdout or "[]"):
            for info in a.get("addr_info", []):
                used.append(ipaddress.ip_network(f"{info['local']}/{info['prefixlen']}", strict=False))
        subnets = list(SUBNET_POOL.subnets(new_prefix=24))
        start = os.getpid() % len(subnets)
        for i in range(len(subnets)):
            net = subnets[(start + i) % len(subnets)]
            if not any(net.overlaps(u) for u in used):
                return net
        raise TopologyError(f"no free /24 in {SUBNET_POOL}")

    def setup(self) -> None:
        forward_update(add=os.getpid())
        self._undo.append(lambda: forward_update(remove=os.getpid()))
        with locked(), alarm(30, "building the nat topology (netlink)"):
            self.subnet = net = self._pick_subnet()
            hosts = list(net.hosts())
            self.addr = {"host": str(hosts[0]), "c1": str(hosts[1]), "c2": str(hosts[2])}
            for ns in self.netns.values():
                sg_netns.create(ns)
                self._undo.append(lambda ns=ns: sg_netns.remove(ns))
            self._links()
            for side, ns in self.netns.items():
                self._inside(side, ns)
        ruleset = f"""
table ip {self.table} {{
    chain pre {{ type nat hook prerouting priority dstnat; policy accept; }}
    chain out {{ type nat hook output priority -100; policy accept; }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {self.subnet} oifname != "{self.bridge}" counter masquerade
    }}
}}
"""
        sh("nft", "-f", "-", input=ruleset)
        self._undo.append(lambda: sh("nft", "delete", "table", "ip", self.table, check=False))
        conntrack_update(add=os.getpid())  # the table turned conntrack on: room for the churn cells
        self._undo.append(lambda: conntrack_update(remove=os.getpid()))
        for side in ("c1", "c2"):
            self._check_dev(side, self.addr["host"])
        self._check_dev("host", self.addr["c1"])

    def _links(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.link("add", ifname=self.bridge, kind="bridge")
            self._undo.append(lambda: sh("ip", "link", "del", self.bridge, check=False))
            br = ipr.link_lookup(ifname=self.bridge)[0]
            ipr.link("set", index=br, mtu=self.mtu)
            ipr.addr("add", index=br, address=self.addr["host"], prefixlen=24)
            ipr.link("set", index=br, state="up")
            for side, ns in self.netns.items():
                host_if, cont_if = f"{self.tag}{side}", f"{self.tag}{side}x"
                ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": cont_if})
                self._undo.append(lambda n=host_if: sh("ip", "link", "del", n, check=False))
                h = ipr.link_lookup(ifname=host_if)[0]
                c = ipr.link_lookup(ifname=cont_if)[0]
                ipr.link("set", index=h, mtu=self.mtu, master=br)
                ipr.link("set", index=c, mtu=self.mtu)
                ipr.link("set", index=c, net_ns_fd=ns)
                ipr.link("set", index=h, state="up")

    def _inside(self, side: str, ns: str) -> None:
        from pyroute2 import NetNS

        with NetNS(ns) as nsr:
            c = nsr.link_lookup(ifname=f"{self.tag}{side}x")[0]
            nsr.link("set", index=c, ifname="eth0")
            nsr.addr("add", index=c, address=self.addr[side], prefixlen=24)
            nsr.link("set", index=c, state="up")
            nsr.route("add", dst="default", gateway=self.addr["host"])

    def teardown(self) -> None:
        super().teardown()
        errors = []
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as e:  # keep going
                errors.append(str(e))
        if errors:
            raise TopologyError("teardown: " + "; ".join(errors))

    def listen(self, side: str, port: int) -> Listener:
        return Listener(side, self.addr["host"] if side == "host" else "0.0.0.0", port)

    def publish(self, listener: Listener, proto: str) -> int:
        """A host port DNATed to the container's listener (like `docker run -p HP:P`)."""
        key = (listener.port, listener.side)
        if key not in self._published:
            from sockgraft.bench.ports import free_port

            hp = free_port()
            cip = self.addr[listener.side]
            rule = (f"ip daddr {self.addr['host']} meta l4proto {{ tcp, udp }} th dport {hp} counter "
                    f"dnat to {cip}:{listener.port}")
            for chain in ("pre", "out"):
                sh("nft", "add", "rule", "ip", self.table, chain, *shlex.split(rule))
            self._published[key] = hp
        return self._published[key]

    def target(self, client_side: str, listener: Listener, proto: str = "tcp") -> tuple[str, int]:
        if listener.side == "host":
            return self.addr["host"], listener.port
        if client_side == "host":
            return self.addr["host"], self.publish(listener, proto)
        return self.addr[listener.side], listener.port

    def _check_dev(self, side: str, addr: str) -> None:
        cmd = ["ip", "-j", "route", "get", addr]
        if side != "host":
            cmd[1:1] = ["-n", self.netns[side]]
        routes = json.loads(sh(*cmd).stdout)
        dev = routes[0].get("dev") if routes else None
        rtype = routes[0].get("type", "unicast") if routes else None
        if side == "host":
            ok = dev == self.bridge or (rtype == "local" and addr in self.addr.values())
        else:
            ok = dev == "eth0" or (rtype == "local" and addr == self.addr[side])
        if not ok:
            raise TopologyError(f"{addr} from {side} routes via {dev or rtype}, not via {self.bridge}: refusing")

    def check_route(self, client_side: str, addr: str) -> None:
        if addr not in self.addr.values():
            raise TopologyError(f"refusing destination {addr}: not an address of {self.name}")
        self._check_dev(client_side, addr)

    def preexec(self, side: str):
        if side == "host":
            return pdeathsig
        path = sg_netns.netns_path(self.netns[side])

        def enter() -> None:
            pdeathsig()
            sg_netns.enter(path)

        return enter

    def link_bytes(self) -> int:
        """Bytes the host ends of our veths carried (both directions)."""
        total = 0
        for side in ("c1", "c2"):
            with open(f"/sys/class/net/{self.tag}{side}/statistics/rx_bytes") as f:
                total += int(f.read())
            with open(f"/sys/class/net/{self.tag}{side}/statistics/tx_bytes") as f:
                total += int(f.read())
        return total

    def dnat_packets(self) -> int:
        out = json.loads(sh("nft", "-j", "list", "chain", "ip", self.table, "out").stdout)
        n = 0
        for item in out["nftables"]:
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    n += expr["counter"]["packets"]
        return n
