"""The parity checks every architecture passes: the engine against Hugging Face transformers on the same weights.

`check_parity` scores one random prompt (longer than any sliding window the model has) and compares
the engine's log-probabilities with transformers' at every position, in float32:
- the whole prompt in one step, and prefilled in chunks of 7 tokens;
- decode steps: a greedy continuation, each generated token's log-probability at its position;
- prefix-cache hits: a second prompt sharing the first one's blocks, continued from the cache.
`model_path` may be a GGUF file written from `reference_dir`'s weights: the same numbers are expected.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tests.tiny_models import VOCAB, reference_logprobs
from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.sampling_params import SamplingParams

TOLERANCE = 1e-3


def make_engine(model_path: Path, chunk: int = 512, **settings) -> LLMEngine:
    config = dict(model=str(model_path), kv_cache_memory=16 << 20, max_num_batched_tokens=chunk)
    config.update(settings)
    return LLMEngine(EngineConfig(**config))


def random_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, VOCAB) for _ in range(n)]


def prompt_logprobs(engine: LLMEngine, ids: list[int]) -> tuple[list, int]:
    """(entries for positions 1.., cached tokens) of one scoring request."""
    [outputs] = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=5))
    entries = [e for out in outputs for e in out.prompt_logprobs]
    assert len(entries) == len(ids) - 1
    return entries, outputs[-1].num_cached_tokens


def assert_close(entries, ref: torch.Tensor, ids: list[int], what: str) -> None:
    for pos, entry in enumerate(entries, start=1):
        assert entry.token_id == ids[pos]
        expected = ref[pos - 1, ids[pos]].item()
        assert abs(entry.logprob - expected) < TOLERANCE, (what, pos, entry.logprob, expected)
        for token, logprob in entry.top:
            assert abs(logprob - ref[pos - 1, token].item()) < TOLERANCE, (what, pos, token)


def check_parity(model_path: Path, reference_dir: Path, prompt_len: int = 80, seed: int = 0,
                 decode_steps: int = 16, **settings) -> None:
    ids = random_ids(prompt_len, seed)
    ref = reference_logprobs(reference_dir, ids)
    for chunk in (512, 7):
        entries, _ = prompt_logprobs(make_engine(model_path, chunk, **settings), ids)
        assert_close(entries, ref, ids, f"prompt, chunk {chunk}")

    engine = make_engine(model_path, **settings)
    outputs = greedy_continuation(engine, ids, decode_steps)
    assert outputs[-1].num_cached_tokens == 0
    assert_continuation_close(outputs, ids, reference_dir, "decode")

    # That request left its prompt's full blocks in the prefix cache: a prompt sharing them continues from
    # there (the tail is prefilled against cached keys, then decoded).
    second = ids[:prompt_len - 3] + random_ids(9, seed + 1)
    outputs = greedy_continuation(engine, second, decode_steps)
    assert outputs[-1].num_cached_tokens > 0
    assert_continuation_close(outputs, second, reference_dir, "prefix-cache hit")


def greedy_continuation(engine: LLMEngine, ids: list[int], steps: int) -> list:
    [outputs] = engine.generate([ids], SamplingParams(max_tokens=steps, temperature=0.0, logprobs=1,
                                                      ignore_eos=True))
    return outputs


def assert_continuation_close(outputs, ids: list[int], reference_dir: Path, what: str) -> None:
    """Each generated token's log-probability equals transformers' at its position, and is its greedy pick."""
    generated = [t for out in outputs for t in out.new_token_ids]
    logprobs = [lp for out in outputs for lp in out.logprobs]
    ref = reference_logprobs(reference_dir, ids + generated)
    for j, (token, lp) in enumerate(zip(generated, logprobs)):
        row = ref[len(ids) + j - 1]
        assert abs(lp.logprob - row[token].item()) < TOLERANCE, (what, j, lp.logprob, row[token].item())
        assert row[token].item() >= row.max().item() - TOLERANCE, (what, "not the greedy token", j)
