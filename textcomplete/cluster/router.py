"""The Ray Serve request routers of the engine replicas: prefix affinity (ours) and Serve's default.

They run inside the front end's deployment handle, on Serve's own event loop thread. The decision is
the pure `prefix_index.choose`; a replica's load is Serve's cached queue length for it, or else what it
last reported through `record_routing_stats`. Both routers also hand those reports to the board behind
`/metrics`, so the default one (kept for comparison) is Serve's own plus that feed.
"""

from __future__ import annotations

from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from textcomplete.cluster.board import board_for
from textcomplete.cluster.prefix_index import PrefixIndex, choose
from textcomplete.cluster.protocol import ReplicaRequest


class _FeedsBoard:
    """Copies the replicas' routing stats to this process's board, and tells it which replicas are gone."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        board = board_for(self.app_name)
        for r in replicas:
            stats = r.routing_stats or {}
            if "engine" in stats:
                board.observe(r.replica_id.unique_id, stats["pid"], stats["engine"], stats.get("node"))
        board.retain(r.replica_id.unique_id for r in replicas)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        board_for(self.app_name).gone(replica_id.unique_id)


class PrefixAffinityRouter(_FeedsBoard, RequestRouter):
    def initialize_state(self, imbalance_threshold: int = 16, max_blocks: int = 1 << 18, **_: Any) -> None:
        """`imbalance_threshold`: how many requests longer than the shortest queue the prefix's replica's
        queue may be before the request goes to the least loaded of two random replicas instead."""
        self.imbalance_threshold = imbalance_threshold
        self.index = PrefixIndex(max_blocks)
        self.known: set[str] = set()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        queue_lens = {rid: self._queue_len(r) for rid, r in by_id.items()}
        tiers = choose(_block_hashes(pending_request), self.index, queue_lens, self.imbalance_threshold)
        return [[by_id[rid] for rid in tier] for tier in tiers if tier]

    def _queue_len(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        if cached is not None:
            return cached
        stats = replica.routing_stats or {}
        return int(stats.get("running", 0)) + int(stats.get("waiting", 0))

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.index.record(_block_hashes(pending_request), replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for gone in self.known - live:   # stopped or scaled away: their caches went with them
            self.index.forget(gone)
        self.known = live

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.index.forget(replica_id.unique_id)


class DefaultRouter(_FeedsBoard, PowerOfTwoChoicesRequestRouter):
    """Serve's default policy (two random replicas, the shorter queue wins), for comparison."""


ROUTERS = {"prefix": PrefixAffinityRouter, "default": DefaultRouter}


def _block_hashes(pending_request: PendingRequest | None) -> tuple[int, ...]:
    if pending_request is None:
        return ()
    for arg in (*pending_request.args, *pending_request.kwargs.values()):
        if isinstance(arg, ReplicaRequest):
            return arg.block_hashes
    return ()
