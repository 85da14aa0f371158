"""What the front end knows about each replica: its process, its latest load and what it served.

Fed from two sides in the front end's process: every output a replica streams back carries its load
(fresh while it works), and the request router hands over the load replicas report through
`record_routing_stats` (fresh while they idle). `/metrics` renders it per replica and summed.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from textcomplete.engine.outputs import EngineStats


@dataclass
class ReplicaState:
    pid: int = 0
    node: str = ""
    stats: EngineStats = dataclasses.field(default_factory=EngineStats)
    alive: bool = True
    requests: int = 0              # engine requests this replica produced output for
    cached_tokens: int = 0         # prompt tokens those requests took from its prefix cache


class ReplicaBoard:
    """Thread-safe: the router runs on Serve's own event loop thread, the API on uvicorn's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replicas: dict[str, ReplicaState] = {}

    def _state(self, replica: str) -> ReplicaState:
        state = self._replicas.get(replica)
        if state is None:
            state = self._replicas[replica] = ReplicaState()
        return state

    def observe(self, replica: str, pid: int, stats: EngineStats, node: str | None = None) -> None:
        """A replica's load as of now (from an output, or from its routing stats)."""
        with self._lock:
            state = self._state(replica)
            state.pid, state.stats, state.alive = pid, stats, True
            if node is not None:
                state.node = node

    def served(self, replica: str, cached_tokens: int) -> None:
        """An engine request got its first output from `replica`."""
        with self._lock:
            state = self._state(replica)
            state.requests += 1
            state.cached_tokens += cached_tokens

    def retain(self, live: Iterable[str]) -> None:
        """Mark every replica not in `live` as gone: its load no longer counts (its counters stay)."""
        live = set(live)
        with self._lock:
            for replica, state in self._replicas.items():
                if replica not in live:
                    state.alive = False

    def gone(self, replica: str) -> None:
        with self._lock:
            if replica in self._replicas:
                self._replicas[replica].alive = False

    def snapshot(self) -> dict[str, ReplicaState]:
        with self._lock:
            return {r: dataclasses.replace(s) for r, s in self._replicas.items()}

    def total(self) -> EngineStats:
        """The live replicas' loads and counters, summed."""
        live = [s.stats for s in self.snapshot().values() if s.alive]
        return EngineStats(**{f.name: sum(getattr(s, f.name) for s in live) for f in dataclasses.fields(EngineStats)})


_GAUGES = {   # EngineStats field -> (metric suffix, help)
    "running": ("requests_running", "Engine requests being computed on the replica."),
    "waiting": ("requests_waiting", "Engine requests waiting on the replica."),
    "kv_blocks_total": ("kv_blocks_total", "The replica's KV cache blocks."),
    "kv_blocks_used": ("kv_blocks_used", "The replica's KV cache blocks held by requests."),
    "kv_blocks_free": ("kv_blocks_free", "The replica's KV cache blocks free to allocate."),
    "kv_blocks_cached": ("kv_blocks_cached", "The replica's KV cache blocks its prefix cache can serve."),
}
_COUNTERS = {
    "prefix_cache_queried_tokens": ("prefix_cache_queried_tokens", "Prompt tokens the replica looked up."),
    "prefix_cache_hit_tokens": ("prefix_cache_hit_tokens", "Prompt tokens the replica served from its cache."),
    "preemptions": ("preemptions", "Requests the replica preempted."),
}


class BoardCollector(Collector):
    """Per-replica series, labelled `replica`, beside the summed ones the single-engine server has."""

    def __init__(self, board: ReplicaBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[Metric]:
        replicas = self.board.snapshot()
        live = {r: s for r, s in replicas.items() if s.alive}
        info = GaugeMetricFamily("textcomplete_replica_info", "1 for each live engine replica, with its process.",
                                 labels=["replica", "pid", "node"])
        for replica, s in live.items():
            info.add_metric([replica, str(s.pid), s.node], 1)
        yield info
        yield GaugeMetricFamily("textcomplete_replicas", "Live engine replicas.", value=len(live))
        for field, (suffix, doc) in _GAUGES.items():
            family = GaugeMetricFamily(f"textcomplete_replica_{suffix}", doc, labels=["replica"])
            for replica, s in live.items():
                family.add_metric([replica], getattr(s.stats, field))
            yield family
        for field, (suffix, doc) in _COUNTERS.items():
            family = CounterMetricFamily(f"textcomplete_replica_{suffix}", doc, labels=["replica"])
            for replica, s in live.items():
                family.add_metric([replica], getattr(s.stats, field))
            yield family
        served = CounterMetricFamily("textcomplete_replica_requests", "Engine requests each replica served "
                                     "(counted at their first output), gone replicas included.", labels=["replica"])
        cached = CounterMetricFamily("textcomplete_replica_cached_prompt_tokens", "Prompt tokens of those requests "
                                     "served from the replica's prefix cache.", labels=["replica"])
        for replica, s in replicas.items():
            served.add_metric([replica], s.requests)
            cached.add_metric([replica], s.cached_tokens)
        yield served
        yield cached


_BOARDS: dict[str, ReplicaBoard] = {}
_BOARDS_LOCK = threading.Lock()


def board_for(app_name: str) -> ReplicaBoard:
    """The board of one Serve application in this process: the router (which Serve builds) finds it here."""
    with _BOARDS_LOCK:
        return _BOARDS.setdefault(app_name, ReplicaBoard())
