"""The cluster's parts without a cluster: the shared block hash, the prefix index and the routing decision,
the options, the front end's engine over a fake handle, and the message when Ray is not installed."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import pytest

from textcomplete.cluster.prefix_index import PrefixIndex, choose
from textcomplete.engine.block_manager import BlockAllocator, prefix_block_hashes, reusable_prefix_hashes
from textcomplete.engine.request import Request
from textcomplete.engine.sampling_params import SamplingParams


def test_the_router_keys_blocks_exactly_as_the_prefix_cache_does():
    rng = random.Random(3)
    prompt = [rng.randrange(50000) for _ in range(70)]
    allocator = BlockAllocator(16, 16)
    request = Request("r", prompt, SamplingParams(), 0)
    assert allocator.allocate(request, len(prompt))
    request.num_computed_tokens = len(prompt)
    allocator.cache_full_blocks(request)
    assert request.block_hashes == prefix_block_hashes(prompt, 16)          # 4 full blocks of 70 tokens
    assert reusable_prefix_hashes(prompt, 16) == request.block_hashes        # what a later request may reuse
    assert reusable_prefix_hashes(prompt[:64], 16) == request.block_hashes[:3]   # the last token is computed


def test_block_hashes_are_the_same_in_every_process():
    """The router (front end) and the cache (replica) are different processes: no per-process hash seed."""
    code = ("from textcomplete.engine.block_manager import prefix_block_hashes as h; "
            "print(h(list(range(1000, 1064)), 16))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert runs == {f"{prefix_block_hashes(list(range(1000, 1064)), 16)}\n"}


def test_longest_prefix_wins_and_unknown_prefixes_get_two_random_replicas():
    index = PrefixIndex()
    index.record([1, 2, 3], "a")
    index.record([1, 2], "b")
    queues = {"a": 0, "b": 0, "c": 0}
    assert index.longest_match([1, 2, 3, 4], queues) == ({"a"}, 3)
    assert choose([1, 2, 3, 4], index, queues, 8) == [["a"], ["b", "c"]]
    assert choose([1, 2, 9], index, queues, 8) == [["a", "b"], ["c"]]
    tiers = choose([7, 8], index, queues, 8, random.Random(0))
    assert len(tiers) == 1 and len(tiers[0]) == 2 and set(tiers[0]) <= set(queues)


def test_a_much_longer_queue_falls_back_to_the_least_loaded_of_two():
    index = PrefixIndex()
    index.record([1, 2], "a")
    assert choose([1, 2], index, {"a": 8, "b": 0}, 8) == [["a"], ["b"]]   # 8 more is not yet "much longer"
    fallback = choose([1, 2], index, {"a": 9, "b": 0}, 8)
    assert len(fallback) == 1 and sorted(fallback[0]) == ["a", "b"]
    tiers = choose([1, 2], index, {"a": 10, "b": 1, "c": 0}, 8, random.Random(1))
    assert len(tiers) == 1 and len(tiers[0]) == 2


def test_the_index_forgets_replicas_and_bounds_itself():
    index = PrefixIndex(max_blocks=4)
    index.record([1, 2, 3], "a")
    index.record([4, 5], "b")
    assert len(index) == 4 and index.longest_match([1], {"a"}) == (set(), 0)   # least recent dropped
    index.forget("b")
    assert index.longest_match([4, 5], {"a", "b"}) == (set(), 0) and len(index) == 2


def test_without_ray_replicas_fail_naming_the_extra():
    """A Python that cannot import ray: `serve --replicas 2` exits 2 with the install command, before loading."""
    blocker = ("import sys, importlib.abc\n"
               "class NoRay(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name == 'ray' or name.startswith('ray.'):\n"
               "            raise ImportError(f'No module named {name!r}')\n"
               "sys.meta_path.insert(0, NoRay())\n"
               "from textcomplete.cli import main\n"
               "sys.exit(main(['serve', '--replicas', '2', '--port', '1']))\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "pip install textcomplete[ray]" in done.stderr and "Traceback" not in done.stderr


def test_options_are_checked():
    from textcomplete.cluster.options import ClusterOptions
    assert ClusterOptions(replicas=2).bounds == (2, 2)
    assert ClusterOptions(replicas=2, max_replicas=4).bounds == (1, 4)
    with pytest.raises(ValueError, match="min-replicas"):
        ClusterOptions(replicas=5, max_replicas=4)
    with pytest.raises(ValueError, match="router"):
        ClusterOptions(router="round-robin")


def test_deployment_is_sized_for_continuous_batching_and_autoscales_on_queue_length():
    pytest.importorskip("ray.serve")
    from textcomplete.cluster.launch import deployment_options
    from textcomplete.cluster.options import ClusterOptions
    from textcomplete.config import EngineConfig
    fixed = deployment_options(EngineConfig(max_num_seqs=32), ClusterOptions(replicas=2, max_queued_requests=100))
    assert fixed["num_replicas"] == 2 and fixed["max_ongoing_requests"] == 132
    assert fixed["ray_actor_options"] == {"num_cpus": 1}
    assert fixed["request_router_config"].request_router_class.endswith("PrefixAffinityRouter")
    scaled = deployment_options(EngineConfig(max_num_seqs=32, threads=2),
                                ClusterOptions(replicas=2, min_replicas=1, max_replicas=3, router="default"))
    auto = scaled["autoscaling_config"]
    assert (auto["min_replicas"], auto["initial_replicas"], auto["max_replicas"]) == (1, 2, 3)
    assert auto["target_ongoing_requests"] == 32 and scaled["ray_actor_options"] == {"num_cpus": 2}
    assert scaled["request_router_config"].request_router_class.endswith("DefaultRouter")


# ----- the front end's engine over a fake deployment handle -------------------------------------------------

class _FakeStream:
    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.sleep(0)
        if self.cancelled or not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if item == "wait":
            await asyncio.Event().wait()   # until cancelled
        return item

    def cancel(self):
        self.cancelled = True


class _FakeHandle:
    """Each call streams the next script; records the calls."""

    def __init__(self, *scripts):
        self.scripts, self.calls, self.streams = list(scripts), [], []
        self.generate = self

    def options(self, **_):
        return self

    def remote(self, request):
        self.calls.append(request)
        self.streams.append(_FakeStream(self.scripts.pop(0)))
        return self.streams[-1]


def _engine(handle):
    pytest.importorskip("ray")
    from textcomplete.cluster.board import ReplicaBoard
    from textcomplete.cluster.engine import ClusterEngine
    from textcomplete.cluster.protocol import ReplicaDescription
    d = ReplicaDescription("r0", 1, "n", None, "fp", 1024, 100, 8, 16, 64)
    return ClusterEngine(handle, d, ReplicaBoard(), 2, lambda: None)


def _out(token: int, finished: bool = False, replica: str = "r1"):
    from textcomplete.cluster.protocol import ReplicaOutput
    from textcomplete.engine.outputs import EngineStats, RequestOutput
    return ReplicaOutput(replica, 7, RequestOutput("x", (token,), finished=finished,
                                                   finish_reason="length" if finished else None), EngineStats())


async def _collect(engine, prompt=(1, 2, 3)):
    return [o.new_token_ids[0] async for o in engine.generate("x", list(prompt), SamplingParams())]


def test_a_request_whose_replica_died_before_it_started_is_sent_again():
    from ray.exceptions import ActorDiedError
    handle = _FakeHandle([ActorDiedError()], [_out(5), _out(6, True, "r2")])
    engine = _engine(handle)
    assert asyncio.run(_collect(engine, list(range(40)))) == [5, 6]
    assert len(handle.calls) == 2 and handle.calls[0].block_hashes == tuple(reusable_prefix_hashes(range(40), 16))
    assert engine.board.snapshot()["r1"].requests == 1 and engine.stats().kv_blocks_total == 64


def test_a_request_whose_replica_died_after_it_started_ends_with_the_replica_error():
    from ray.exceptions import ActorDiedError

    from textcomplete.api.errors import APIError
    engine = _engine(_FakeHandle([_out(5), ActorDiedError()]))
    with pytest.raises(APIError) as info:
        asyncio.run(_collect(engine))
    assert info.value.status == 503 and info.value.code == "replica_unavailable"


def test_a_refusal_on_the_replica_is_a_value_error():
    from ray.exceptions import RayTaskError
    refused = RayTaskError("generate", "traceback", ValueError("too long")).as_instanceof_cause()
    with pytest.raises(ValueError, match="too long"):
        asyncio.run(_collect(_engine(_FakeHandle([refused]))))


def test_fail_all_ends_requests_with_the_given_error_and_cancels_their_calls():
    handle = _FakeHandle([_out(5), "wait"])
    engine = _engine(handle)

    async def scenario():
        task = asyncio.ensure_future(_collect(engine))
        while not engine.board.snapshot().get("r1"):
            await asyncio.sleep(0)
        engine.fail_all(lambda: RuntimeError("shutting down"))
        with pytest.raises(RuntimeError, match="shutting down"):
            await task
    asyncio.run(scenario())
    assert handle.streams[0].cancelled


def test_leaving_a_request_early_cancels_its_call_on_the_replica():
    handle = _FakeHandle([_out(5), "wait"])
    engine = _engine(handle)

    async def scenario():
        stream = engine.generate("x", [1, 2], SamplingParams())
        assert (await stream.__anext__()).new_token_ids == (5,)
        await stream.aclose()
        await asyncio.sleep(0.01)
    asyncio.run(scenario())
    assert handle.streams[0].cancelled


def test_the_board_sums_live_replicas_and_labels_each():
    from prometheus_client import CollectorRegistry, generate_latest

    from textcomplete.cluster.board import BoardCollector, ReplicaBoard
    from textcomplete.engine.outputs import EngineStats
    board = ReplicaBoard()
    board.observe("a", 11, EngineStats(running=2, kv_blocks_total=10, prefix_cache_hit_tokens=32), "node-1")
    board.observe("b", 12, EngineStats(running=1, kv_blocks_total=10))
    board.served("a", 32)
    assert board.total().running == 3 and board.total().kv_blocks_total == 20
    board.retain(["a"])   # b stopped: its load no longer counts, what it served still does
    assert board.total().running == 2
    registry = CollectorRegistry()
    registry.register(BoardCollector(board))
    text = generate_latest(registry).decode()
    assert 'textcomplete_replica_info{node="node-1",pid="11",replica="a"} 1.0' in text
    assert 'textcomplete_replica_requests_total{replica="a"} 1.0' in text and 'replica="b"' in text
    assert 'textcomplete_replica_requests_running{replica="b"}' not in text


def test_abort_cancels_the_call_and_ends_the_request_as_aborted():
    handle = _FakeHandle([_out(5), "wait"])
    engine = _engine(handle)

    async def scenario():
        outputs = []
        async for out in engine.generate("x", [1, 2], SamplingParams()):
            outputs.append(out)
            if len(outputs) == 1:
                engine.abort("x")
        return outputs
    outputs = asyncio.run(scenario())
    assert [o.finish_reason for o in outputs] == [None, "abort"] and outputs[-1].finished
    assert handle.streams[0].cancelled
