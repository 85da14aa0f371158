"""Continuous batching must not change results: batch invariance, preemption, abort and block accounting."""

from __future__ import annotations

import random

import pytest

from tests.tiny_models import VOCAB
from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.engine import kv_bytes_per_block
from textcomplete.engine.sampling_params import SamplingParams


def tokens_of(outputs) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def random_prompts(n: int, seed: int, low: int = 3, high: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randint(low, high))] for _ in range(n)]


def tiny_engine(tiny_model_dir, arch="llama", **overrides) -> LLMEngine:
    settings = dict(model=str(tiny_model_dir(arch)), kv_cache_memory=16 << 20, max_num_batched_tokens=64)
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def mixed_params(i: int) -> SamplingParams:
    """Greedy, seeded sampling, and seeded sampling with top_p and penalties, in turn."""
    kinds = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
             SamplingParams(max_tokens=24, temperature=0.9, seed=100 + i, ignore_eos=True),
             SamplingParams(max_tokens=24, temperature=1.3, top_p=0.8, seed=7 * i, presence_penalty=0.5,
                            frequency_penalty=0.3, logit_bias={5: 3.0}, ignore_eos=True)]
    return kinds[i % 3]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_outputs_identical_alone_and_among_15_concurrent(tiny_model_dir, arch):
    engine = tiny_engine(tiny_model_dir, arch)
    prompts = random_prompts(16, seed=1)
    params = [mixed_params(i) for i in range(16)]
    alone = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    together = [tokens_of(outs) for outs in engine.generate(prompts, params)]
    assert together == alone
    assert all(len(t) == 24 for t in alone)


def test_requests_joining_mid_flight_change_nothing(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    prompts = random_prompts(8, seed=2)
    params = [mixed_params(i) for i in range(8)]
    alone = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    collected = {f"r{i}": [] for i in range(8)}
    engine.add_request("r0", prompts[0], params[0])
    for step in range(10_000):
        if step % 3 == 0 and step // 3 < 8:   # a new request arrives every third step
            i = step // 3
            if i:
                engine.add_request(f"r{i}", prompts[i], params[i])
        for out in engine.step():
            collected[out.request_id].append(out)
        if not engine.has_unfinished_requests() and step > 24:
            break
    assert [tokens_of(collected[f"r{i}"]) for i in range(8)] == alone


def test_smollm2_greedy_and_seeded_batch_invariance(smollm_engine):
    tok = smollm_engine.tokenizer
    texts = [("Write a story about a dragon. " * (i % 5 + 1)) + f"Chapter {i}:" for i in range(16)]
    prompts = [tok.encode(t) for t in texts]
    params = [SamplingParams(max_tokens=16, temperature=0.0 if i % 2 else 0.8, seed=None if i % 2 else i)
              for i in range(16)]
    alone = [tokens_of(smollm_engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    together = [tokens_of(outs) for outs in smollm_engine.generate(prompts, params)]
    assert together == alone


def test_64_requests_complete_under_a_cache_for_8(tiny_model_dir):
    probe = tiny_engine(tiny_model_dir)
    bytes_per_block = kv_bytes_per_block(probe.spec, 16, probe.loaded.dtype.itemsize)
    prompts = random_prompts(64, seed=3, low=20, high=40)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    # Each request grows to at most 80 tokens = 5 blocks; the cache holds 8 such requests.
    engine = tiny_engine(tiny_model_dir, kv_cache_memory=8 * 5 * bytes_per_block, max_num_batched_tokens=256)
    assert engine.allocator.num_blocks == 40
    together = [tokens_of(outs) for outs in engine.generate(prompts, params)]
    assert engine.scheduler.num_preemptions > 0
    alone = [tokens_of(probe.generate([p], params)[0]) for p in prompts]
    assert together == alone
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_aborting_half_of_32_running_requests_returns_their_blocks(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir, max_num_batched_tokens=4096)
    prompts = random_prompts(32, seed=4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 32
    held = {f"r{i}": len(engine.requests[f"r{i}"].block_table) for i in range(32)}
    used_before = engine.allocator.num_used_blocks
    for i in range(0, 32, 2):
        out = engine.abort_request(f"r{i}")
        assert out.finished and out.finish_reason == "abort"
    freed = sum(held[f"r{i}"] for i in range(0, 32, 2))
    assert engine.allocator.num_used_blocks == used_before - freed
    assert len(engine.scheduler.running) == 16
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert all(c == 0 for c in engine.allocator.ref_counts)


def test_abort_of_a_waiting_request_and_of_an_unknown_id(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4))
    assert engine.abort_request("a").finish_reason == "abort"
    assert engine.abort_request("a") is None
    assert not engine.has_unfinished_requests()


def test_stop_reasons_and_max_tokens_zero(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    prompt = random_prompts(1, seed=5)[0]
    [greedy] = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    tokens = tokens_of(greedy)
    assert greedy[-1].finish_reason == "length" and len(tokens) == 10
    [stopped] = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0,
                                                         stop_token_ids=(tokens[3],), ignore_eos=True))
    assert tokens_of(stopped) == tokens[:tokens.index(tokens[3]) + 1]
    assert stopped[-1].finish_reason == "stop"
    [zero] = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert tokens_of(zero) == [] and zero[-1].finish_reason == "length"
    assert len([e for o in zero for e in o.prompt_logprobs]) == len(prompt) - 1


def test_requests_that_can_never_run_are_refused(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir, kv_cache_memory=1 << 20)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("a", [VOCAB + 5], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("b", [3] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="logit_bias"):
        engine.add_request("c", [3], SamplingParams(logit_bias={-1: 1.0}))
    assert not engine.has_unfinished_requests()


def test_generated_logprobs_are_the_models_distribution(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir)
    prompt = random_prompts(1, seed=6)[0]
    [outs] = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True))
    entries = [e for o in outs for e in o.logprobs]
    assert [e.token_id for e in entries] == tokens_of(outs)
    for e in entries:   # greedy: the chosen token is the top one, with the very same float
        assert len(e.top) == 3 and e.top[0] == (e.token_id, e.logprob)
    # Scoring the generated continuation as a prompt gives the same log-probabilities.
    [scored] = engine.generate([prompt + tokens_of(outs)], SamplingParams(max_tokens=0, prompt_logprobs=0))
    prompt_entries = [e for o in scored for e in o.prompt_logprobs][len(prompt) - 1:]
    for gen, score in zip(entries, prompt_entries):
        assert gen.token_id == score.token_id
        assert abs(gen.logprob - score.logprob) < 1e-4


def test_bfloat16_runs_a_biased_model(tiny_model_dir):
    """Weights, biases and activations share the model's dtype, in narrow and wide steps alike."""
    engine = tiny_engine(tiny_model_dir, "qwen2", dtype="bfloat16")
    long_prompt = random_prompts(1, seed=4, low=60, high=60)[0]
    outputs = engine.generate([[5, 6, 7], long_prompt], SamplingParams(max_tokens=6, temperature=0.0,
                                                                       ignore_eos=True))
    assert [len(tokens_of(o)) for o in outputs] == [6, 6]
