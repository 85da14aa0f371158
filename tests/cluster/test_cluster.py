"""The contract on two engine replicas behind one endpoint (Ray Serve, local instance): a representative part
of the e2e suite through the official SDK, prefix-affinity routing read from the per-replica metrics, a
replica killed mid-stream, and a shutdown that drains and leaves no Ray process behind.

The tests run in file order on one cluster: the imported contract tests first, the kill and the shutdown last.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import time

import httpx
import openai
import pytest

from tests.cluster.conftest import KEY, process_tree
from tests.e2e.helpers import MODEL, assert_error, body, post, scrape, sse_events, validate_response, wait_until_idle
# The contract, as the single-engine server is held to it (these take the `http` / `client` fixtures, here
# the cluster's): plain, streamed with usage, n, echo + logprobs, errors, models, tokenizer endpoints.
from tests.e2e.test_completions import (test_best_of_returns_the_candidates_with_the_highest_mean_logprob,  # noqa: F401
                                        test_n_choices_each_have_one_finish_reason, test_r24_response_shape,
                                        test_r25_usage_adds_up_and_counts_each_prompt_once,
                                        test_r28_all_four_prompt_forms, test_r31_echo_prefixes_the_prompt)
from tests.e2e.test_logprobs import (test_r34_four_equal_length_arrays_or_null,  # noqa: F401
                                     test_r36_echo_first_entry_is_null,
                                     test_r38_text_offsets_start_at_zero_with_echo)
from tests.e2e.test_prefix_cache_and_fingerprint import (test_cache_hits_do_not_change_results,  # noqa: F401
                                                         test_cached_tokens_exact_for_a_shared_prefix,
                                                         test_fingerprint_is_constant_and_in_streams)
from tests.e2e.test_sampling_models_tokenizer import (test_lm_eval_tokenizer_endpoints,  # noqa: F401
                                                      test_r48_same_seed_same_text_and_fingerprint,
                                                      test_r55_list_models)
from tests.e2e.test_streaming import (test_r40s_framing_ends_with_done,  # noqa: F401
                                      test_r42s_chunks_share_id_created_model_and_finish_once,
                                      test_r43s_usage_chunk_last,
                                      test_r45s_validation_errors_on_a_stream_are_plain_json,
                                      test_stream_equals_non_stream_for_greedy)
from tests.e2e.test_transport_and_auth import (test_r5_request_id_on_every_response,  # noqa: F401
                                               test_r51_unknown_url_is_a_404_envelope,
                                               test_r54_rate_limit_headers_on_every_response)
from tests.e2e.test_validation import (test_r12_unknown_model_is_404,  # noqa: F401
                                       test_r13_token_ids_outside_the_vocabulary,
                                       test_r23_context_overflow_exact_message)

NO_END = {"logit_bias": {"0": -100, "2": -100}}   # no end-of-text: every request runs to max_tokens


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.1)
    return result


def served_by(base: str) -> dict[str, float]:
    """Engine requests each replica has served so far, from the per-replica metrics."""
    prefix = "textcomplete_replica_requests_total{replica="
    return {k[len(prefix):-1]: v for k, v in scrape(base).items() if k.startswith(prefix)}


def replica_pids(base: str) -> dict[str, int]:
    pids = {}
    for key in scrape(base):
        if key.startswith("textcomplete_replica_info{"):
            labels = dict(part.split("=", 1) for part in key[len("textcomplete_replica_info{"):-1].split(","))
            pids[labels["replica"]] = int(labels["pid"])
    return pids


def test_the_endpoint_runs_two_replicas(server):
    def two() -> dict[str, int] | None:
        pids = replica_pids(server.base)
        return pids if len(pids) == 2 else None
    pids = wait_for(two, what="two replicas")
    assert len(set(pids.values())) == 2 and server.proc.pid not in pids.values()
    assert scrape(server.base)["textcomplete_replicas"] == 2


def test_api_keys_are_required_and_checked(server, client):
    r = httpx.post(server.base + "/v1/completions", json=body(), timeout=60)
    assert_error(r, 401, param=None, code=None)
    wrong = httpx.post(server.base + "/v1/completions", json=body(), timeout=60,
                       headers={"authorization": "Bearer sk-wrong-key-0123456789"})
    assert assert_error(wrong, 401, code="invalid_api_key")["message"].startswith("Incorrect API key provided: sk-wr")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base + "/v1", api_key="sk-wrong-key-0123456789", max_retries=0).models.list()
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=1).choices
    assert httpx.get(server.base + "/health").status_code == 200
    assert httpx.get(server.base + "/metrics").status_code == 200


def test_the_sdk_streams_with_usage(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].choices == []
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text


def test_shared_prefixes_land_on_the_replica_that_served_the_first(server, http):
    """8 prompts sharing a 256-token prefix, interleaved with 8 unrelated ones: every repeat goes where the
    first went and is served 256 tokens from that replica's cache."""
    rng = random.Random(515)
    prefix = [rng.randrange(100, 40000) for _ in range(256)]
    shared = [prefix + [rng.randrange(100, 40000) for _ in range(8)] for _ in range(8)]
    others = [[rng.randrange(100, 40000) for _ in range(264)] for _ in range(8)]
    landed, cached = [], []
    for prompt in (p for pair in zip(shared, others) for p in pair):
        before = served_by(server.base)
        r = post(http, body(prompt=prompt, max_tokens=2))
        assert r.status_code == 200, r.text
        after = served_by(server.base)
        [replica] = [k for k in after if after[k] - before.get(k, 0) == 1]
        landed.append(replica)
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    shared_landed, shared_cached = landed[0::2], cached[0::2]
    assert shared_landed == [shared_landed[0]] * 8, landed
    assert shared_cached == [0] + [256] * 7
    assert cached[1::2] == [0] * 8   # unrelated prompts share nothing


def test_a_client_leaving_a_stream_aborts_it_on_its_replica(server, http):
    before = wait_until_idle(server.base, timeout=60)
    with http.stream("POST", "/v1/completions", json=body(stream=True, max_tokens=900, **NO_END)) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 4:
                break
    after = wait_until_idle(server.base, timeout=120)
    assert after["textcomplete_kv_blocks_used"] == 0 and after["textcomplete_requests_running"] == 0
    # Run to its end, the request would have left some 56 full blocks of generated tokens in the cache.
    assert after["textcomplete_kv_blocks_cached"] - before["textcomplete_kv_blocks_cached"] < 20


def test_the_prefix_groups_bench_workload_measures_the_cache(server):
    from textcomplete.bench import prefix_groups
    from textcomplete.cli import _bench_tokenizer
    config = prefix_groups.PrefixGroupsConfig(groups=2, requests_per_group=3, prefix_tokens=64, concurrency=2)
    result = prefix_groups.run(server.base + "/v1", MODEL, KEY, _bench_tokenizer(MODEL), config)
    assert result.requests == 6 and result.errors == 0 and result.ttft_p50 > 0
    # each prefix is computed at least once; at most every repeat is served its 64 tokens from the cache
    assert 0 < result.cached_tokens <= 2 * 2 * 64 and result.server_hit_rate is not None


def _stream(base: str, payload: dict) -> dict:
    with httpx.Client(base_url=base, timeout=300, headers={"authorization": f"Bearer {KEY}"}) as c:
        r = c.post("/v1/completions", json=payload)
    validate_response(r)
    if payload.get("stream") and r.status_code == 200:
        events = sse_events(r)
        assert events[-1] == "[DONE]"
        parsed = [json.loads(e) for e in events[:-1]]
        errors = [e["error"] for e in parsed if "error" in e]
        finished = [c for e in parsed if "choices" in e for c in e["choices"] if c["finish_reason"]]
        return {"ok": not errors and len(finished) == 1, "error": errors[0] if errors else None}
    if r.status_code == 200:
        return {"ok": r.json()["choices"][0]["finish_reason"] == "length", "error": None}
    return {"ok": False, "error": r.json()["error"], "status": r.status_code}


def test_a_replica_killed_mid_stream(server, http):
    """Requests under way on it end with an error (in-band for streams, an envelope otherwise), none hangs,
    and the survivor serves what comes next."""
    pids = replica_pids(server.base)
    assert len(pids) == 2
    before = served_by(server.base)
    payloads = [body(prompt=f"Story number {i}: once upon a time", max_tokens=200, stream=i % 4 != 3, **NO_END)
                for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(payloads)) as pool:
        futures = [pool.submit(_stream, server.base, p) for p in payloads]

        def started() -> dict[str, float] | None:
            now = served_by(server.base)
            delta = {k: v - before.get(k, 0) for k, v in now.items() if k in pids}
            return delta if sum(delta.values()) == len(payloads) else None
        delta = wait_for(started, what="every request under way")
        victim = max(delta, key=delta.get)
        os.kill(pids[victim], signal.SIGKILL)
        done, not_done = concurrent.futures.wait(futures, timeout=600)
        assert not not_done, "a request hung after its replica died"
    results = [f.result() for f in futures]
    failed = [r for r in results if not r["ok"]]
    assert len(failed) >= 1 and len(failed) <= delta[victim], results
    for r in failed:
        assert r["error"]["code"] == "replica_unavailable" and r["error"]["type"] == "server_error"
        assert r.get("status", 503) == 503
    for i in range(4):   # new requests succeed (on the survivor, or on the replica Serve starts in its place)
        r = post(http, body(prompt=f"After the failure {i}", max_tokens=4))
        assert r.status_code == 200, r.text
    survivor = next(k for k in pids if k != victim)
    assert served_by(server.base)[survivor] >= before.get(survivor, 0) + delta[survivor]


def test_sigterm_drains_then_stops_every_replica_and_ray(server):
    """A stream under way at SIGTERM still finishes; then the replicas and the local Ray instance stop and
    no process the server started is left."""
    tree = process_tree(server.proc.pid)
    assert len(tree) > 3   # Ray's own processes and the replicas run below the server
    with httpx.Client(base_url=server.base, timeout=120, headers={"authorization": f"Bearer {KEY}"}) as c:
        with c.stream("POST", "/v1/completions", json=body(stream=True, max_tokens=40, **NO_END)) as r:
            lines = r.iter_lines()
            next(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
    events = [line[len("data: "):] for line in rest if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(timeout=120) == 0

    def leftovers() -> set[int]:
        return {p for p in tree if os.path.exists(f"/proc/{p}") and _state(p) != "Z"}
    try:
        wait_for(lambda: not leftovers(), timeout=60, what="every Ray process gone")
    finally:
        for pid in leftovers():   # only ours, by process id
            os.kill(pid, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
