"""One engine replica as a Ray Serve deployment: an `AsyncEngine` whose outputs stream back to the front end.

Each replica reports its load through `record_routing_stats` (read by the router and by `/metrics`) and
its health through `check_health`; a request the front end stops reading is cancelled here, which
aborts it in the engine and frees its KV blocks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator

from ray import serve

from textcomplete.cluster.protocol import ReplicaDescription, ReplicaOutput, ReplicaRequest
from textcomplete.config import EngineConfig
from textcomplete.engine.async_engine import AsyncEngine
from textcomplete.engine.engine import freeze_loaded_objects

log = logging.getLogger(__name__)


class EngineReplica:
    def __init__(self, config: EngineConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.engine = AsyncEngine(config=config)
        freeze_loaded_objects()   # the replica's process serves this engine for its whole life
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.pid = os.getpid()
        self.node = _node_id()
        log.info("replica %s (pid %d) serving %s", self.replica, self.pid, config.model)

    def describe(self) -> ReplicaDescription:
        e = self.engine
        return ReplicaDescription(self.replica, self.pid, self.node, e.tokenizer, e.fingerprint, e.max_model_len,
                                  e.vocab_size, e.max_num_seqs, e.block_size, e.engine.allocator.num_blocks)

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[ReplicaOutput]:
        """The request's outputs as the engine produces them. Raises ValueError if the engine refuses it."""
        outputs = self.engine.generate(request.request_id, list(request.prompt_token_ids), request.params)
        try:
            async for out in outputs:
                yield ReplicaOutput(self.replica, self.pid, out, self.engine.stats())
        finally:
            await outputs.aclose()   # cancelled or ended early: aborts the engine request

    def record_routing_stats(self) -> dict:
        s = self.engine.stats()
        return {"engine": s, "pid": self.pid, "node": self.node, "running": s.running, "waiting": s.waiting,
                "kv_blocks_free": s.kv_blocks_free, "kv_blocks_total": s.kv_blocks_total}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _node_id() -> str:
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:   # noqa: BLE001 - a label only
        return ""
