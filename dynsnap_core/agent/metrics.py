"""The agent's Prometheus metrics: durations per phase, bytes, failures by stage, snapshots stored, jobs by state."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = ["Metrics"]

BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class _Live:
    """Gauges read at scrape time (snapshots stored, jobs by state), so they never drift."""

    def __init__(self, snapshots: Callable[[], dict], jobs: Callable[[], dict]):
        self._snapshots, self._jobs = snapshots, jobs

    def collect(self):
        g = GaugeMetricFamily("dynsnap_snapshots_stored", "Complete snapshots by location", labels=["location"])
        for loc, n in self._snapshots().items():
            g.add_metric([loc], n)
        yield g
        j = GaugeMetricFamily("dynsnap_jobs", "Agent jobs by state", labels=["state"])
        for state, n in self._jobs().items():
            j.add_metric([state], n)
        yield j


class Metrics:
    """One registry per agent (no process-global state, so tests can run several agents)."""

    def __init__(self, snapshots: Callable[[], dict], jobs: Callable[[], dict]):
        self.registry = CollectorRegistry()
        self.phase_seconds = Histogram("dynsnap_phase_seconds", "Duration of each phase of a job",
                                       ["operation", "phase"], buckets=BUCKETS, registry=self.registry)
        self.bytes = Counter("dynsnap_bytes", "Bytes written, read or transferred", ["operation"],
                             registry=self.registry)
        self.failures = Counter("dynsnap_failures", "Failed jobs by operation and stage", ["operation", "stage"],
                                registry=self.registry)
        self.jobs = Counter("dynsnap_jobs_finished", "Finished jobs", ["operation", "state"], registry=self.registry)
        self.registry.register(_Live(snapshots, jobs))

    def record_timings(self, operation: str, timings: dict) -> None:
        for phase, seconds in (timings or {}).items():
            if isinstance(seconds, (int, float)):
                self.phase_seconds.labels(operation, phase).observe(float(seconds))
