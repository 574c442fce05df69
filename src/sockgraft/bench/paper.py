"""The original evaluation's numbers, printed beside ours (from /work/shared/PAPER-RESULTS.md:
Nakamura, Sekiya, Tazaki, "Grafting Sockets for Fast Container Networking", ANCS '18; two hosts,
Linux 4.4, 40 GbE; "NAT" = docker0 bridge + NAT; "same host" = their single-machine runs)."""
from __future__ import annotations

SOURCE = ("Nakamura, Sekiya, Tazaki, \"Grafting Sockets for Fast Container Networking\", ANCS '18: two hosts, "
          "Linux 4.4, i7-3770K, 40 GbE, ~20 runs per point; NAT = docker0 bridge + NAT.")

_HTTP_C1 = {"64B": "9297 vs 8818 (+5%)", "1KiB": "+16%", "4KiB": "+17%", "64KiB": "+46%",
            "256KiB": "2265 vs 1387 (+63%)", "1MiB": "+47%"}
_HTTP_C50 = {"64B": "+11%", "1KiB": "+10%", "4KiB": "+18%", "16KiB": "+24%", "64KiB": "25548 vs 18122 (+41%)",
             "256KiB": "+21%", "1MiB": "+9%"}
_ZMQ_C2H = {64: "1.0–1.1×", 256: "1.0–1.1×", 1024: "2.06M vs 1.26M msg/s (1.64×)", 128 * 1024: "32.6k vs 16.8k (1.94×)",
            256 * 1024: "1.93×", 1024 * 1024: "1.66×"}
_ZMQ_LAT = {64: "−12%", 256 * 1024: "−30%", 512 * 1024: "+9%"}


def note(workload: str, direction: str, params: dict, metric: str) -> str:
    """The paper's figure for this row, as GRAFT vs NAT (and Host where published), or ''."""
    p = params
    if workload == "iperf3" and metric == "throughput":
        if p.get("proto") == "tcp" and p.get("streams") == 1:
            return {"c2h": "Host 35.97 / GRAFT 35.93 / NAT 18.00 Gbit/s (send); same host GRAFT 72.8 vs bridge 62.7",
                    "h2c": "Host 35.73 / GRAFT 36.75 / NAT 17.49 Gbit/s (recv); same host GRAFT 73.0 vs bridge 67.5",
                    "c2c": "same host GRAFT 72.9 vs bridge 56.0 Gbit/s"}.get(direction, "")
        if p.get("proto") == "tcp":
            return "GRAFT ~37.5 Gbit/s from 4 flows; NAT send 37.4 at 8 flows"
        if p.get("proto") == "udp" and direction == "c2c":
            return {64: "GRAFT 0.293 vs bridge 0.162 Gbit/s"}.get(p.get("len"), "1500 B: GRAFT 6.37 vs bridge 3.63 Gbit/s")
    if workload == "sockperf" and metric == "latency-avg":
        if p.get("proto") == "tcp":
            return "Host 6.61 / GRAFT 6.84 / NAT 8.82 µs; same host GRAFT 4.05 vs bridge 4.58"
        return "Host 6.33 / GRAFT 6.51 / NAT 8.12 µs; same host GRAFT 3.53 vs bridge 4.04"
    if workload == "http" and metric in ("requests", "transactions"):
        table = _HTTP_C1 if p.get("c") == 1 else _HTTP_C50
        found = table.get(p.get("size"))
        return f"GRAFT vs NAT {found} (siege, c={p.get('c')})" if found else ""
    if workload == "zmq" and p.get("pattern") == "push-pull" and metric == "throughput":
        if direction == "h2c":
            return "GRAFT/NAT 0.86–1.33×"
        found = _ZMQ_C2H.get(p.get("size"))
        return f"GRAFT/NAT {found}" if found else ""
    if workload == "zmq" and p.get("pattern") == "req-rep":
        found = _ZMQ_LAT.get(p.get("size"))
        return f"median latency GRAFT vs NAT {found}" if found else ""
    return ""
