"""Prometheus metrics of graftd, served on `graftd --metrics ADDR:PORT` at /metrics.

- `sockgraft_grants_total{mode,op}`, `sockgraft_denials_total{mode,op}`,
  `sockgraft_local_total{mode,op}`: decisions, counted where they are audited;
- `sockgraft_notification_latency_seconds{mode}`: from a request arriving (an fd-service message,
  a seccomp notification) to its reply;
- `sockgraft_active_containers{mode}`: containers in the tables; `sockgraft_supervised_containers`:
  containers with a live seccomp listener;
- `sockgraft_pod_info{container,namespace,pod}` = 1: the Kubernetes pod (CRI names) of a container
  key, for containers made by graft-runtime or the graft CNI plugin under a CRI runtime.
"""
from __future__ import annotations

import glob
import ipaddress
import json
import os
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from sockgraft.host.audit import Audit
from sockgraft.core.endpoint import SpecError

# from 5 µs to 50 ms: a same-CPU round trip is ~10 µs, a cross-CPU wake-up 60-130 µs
LATENCY_BUCKETS = (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ("mode", "op")
        self.grants = Counter("sockgraft_grants", "Grafted operations granted", labels, registry=self.registry)
        self.denials = Counter("sockgraft_denials", "Operations denied", labels, registry=self.registry)
        self.local = Counter("sockgraft_local", "Operations left inside the container", labels, registry=self.registry)
        self.latency = Histogram(
            "sockgraft_notification_latency_seconds", "Request arrival to reply, per attach mode",
            ("mode",), buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.supervised = Gauge("sockgraft_supervised_containers", "Containers with a live seccomp listener", registry=self.registry)
        self._containers = None
        self.state_dir: str | None = None  # set by MetricsAudit: where the pods' records are
        self.registry.register(_ContainersCollector(self))
        self._server = None

    def decision(self, mode: str, op: str, verdict: str, count: int = 1) -> None:
        counter = {"grant": self.grants, "deny": self.denials, "local": self.local}.get(verdict)
        if counter is not None:
            counter.labels(mode or "unknown", op or "unknown").inc(count)

    def observe(self, mode: str, seconds: float) -> None:
        self.latency.labels(mode).observe(seconds)

    def count_containers(self, fn) -> None:
        """`fn()` -> {mode: count}, called at each scrape."""
        self._containers = fn

    # -- HTTP ------------------------------------------------------------------------------------
    def serve(self, spec: str) -> tuple[str, int]:
        from prometheus_client import start_http_server

        addr, port = parse_listen(spec)
        self._server, _thread = start_http_server(port, addr, registry=self.registry)
        host, port = self._server.server_address[:2]
        return host, port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _ContainersCollector:
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        g = GaugeMetricFamily("sockgraft_active_containers", "Containers in the tables", labels=["mode"])
        fn = self.metrics._containers
        if fn is not None:
            try:
                for mode, n in sorted(fn().items()):
                    g.add_metric([mode or "unknown"], n)
            except Exception:
                pass  # a busy database must not break the scrape
        yield g
        pods = GaugeMetricFamily("sockgraft_pod_info", "The CRI pod of a container key",
                                 labels=["container", "namespace", "pod"])
        for key, (ns, pod) in sorted(pod_names(self.metrics.state_dir).items()):
            pods.add_metric([key, ns, pod], 1)
        yield pods


def pod_names(state: str | None) -> dict[str, tuple[str, str]]:
    """Container key -> (namespace, pod), from graft-runtime's records (`oci/*.json`, the CRI
    annotations of config.json) and the graft CNI plugin's (`cni/*.json`, CNI_ARGS)."""
    out: dict[str, tuple[str, str]] = {}
    if not state:
        return out
    for path in glob.glob(os.path.join(state, "oci", "*.json")) + glob.glob(os.path.join(state, "cni", "*.json")):
        try:
            with open(path) as f:
                rec = json.load(f)
            names = rec.get("cri") or rec.get("pod") or {}
            pod = names.get("pod") or names.get("name")
            if rec.get("key") and pod:
                out[rec["key"]] = (names.get("namespace") or "", pod)
        except (OSError, ValueError, AttributeError):
            continue
    return out


class MetricsAudit(Audit):
    """The audit log, counting each decision in the metrics as it is written; safe to share
    between graftd's threads (fd service, seccomp supervisor, OCI agent)."""

    def __init__(self, directory: str | None, metrics: Metrics, echo: bool = False):
        super().__init__(directory, echo=echo)
        self.metrics = metrics
        metrics.state_dir = os.path.dirname(self.path)
        self._lock = threading.RLock()

    def record(self, event: str, count: int = 1, **fields) -> None:
        with self._lock:
            super().record(event, count, **fields)

    def flush(self, force: bool = False) -> None:
        with self._lock:
            super().flush(force)

    def decision(self, container: str, mode: str, op: str, decision, count: int = 1, **fields) -> None:
        self.metrics.decision(mode, op, decision.verdict, count)
        super().decision(container, mode, op, decision, count, **fields)


def parse_listen(spec: str) -> tuple[str, int]:
    """`ADDR:PORT` (IPv6 as `[ADDR]:PORT`) for --metrics."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise SpecError(f"bad --metrics {spec!r}: expected ADDR:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise SpecError(f"bad --metrics address {host!r}: expected an IP address") from None
    return host, int(port)
