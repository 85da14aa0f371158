"""In-process engine throughput: decode tokens/s at several batch sizes and prefill tokens/s.

Runs the engine directly (no HTTP), so the figures are the engine's own ceiling on this machine.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class BenchResult:
    name: str
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def _prompt(engine: LLMEngine, length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    vocab = engine.spec.vocab_size
    specials = set(engine.eos_token_ids)
    return [t for t in (rng.randrange(vocab) for _ in range(length * 2)) if t not in specials][:length]


def measure_prefill(engine: LLMEngine, prompt_len: int, repeats: int) -> BenchResult:
    """Time the step that computes a whole `prompt_len`-token prompt (one chunk), median of repeats."""
    times = []
    for i in tqdm(range(repeats), desc=f"prefill {prompt_len}", leave=False):
        engine.add_request(f"prefill-{i}", _prompt(engine, prompt_len, i), SamplingParams(max_tokens=1))
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        times.append(time.perf_counter() - start)
    return BenchResult(f"prefill, {prompt_len}-token prompt", prompt_len, statistics.median(times))


def measure_decode(engine: LLMEngine, batch: int, steps: int, prompt_len: int = 32) -> BenchResult:
    """Time `steps` decode steps of `batch` requests, after their prompts are in the cache."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"decode-{batch}-{i}", _prompt(engine, prompt_len, 1000 + i), params)
    while any(r.num_output_tokens == 0 for r in engine.requests.values()):
        engine.step()   # prefill, and the first token of each
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=f"decode batch {batch}", leave=False):
        engine.step()
    seconds = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return BenchResult(f"decode, batch {batch}", batch * steps, seconds)


@dataclass(frozen=True)
class SharedPrefixResult:
    requests: int
    prefix_len: int
    median_ttft_cached: float
    median_ttft_uncached: float

    def format(self) -> str:
        ratio = self.median_ttft_uncached / self.median_ttft_cached
        return (f"shared prefix, {self.requests} requests x {self.prefix_len}-token prefix: median time to first "
                f"token {self.median_ttft_cached:.3f}s with prefix caching, {self.median_ttft_uncached:.3f}s "
                f"without ({ratio:.1f}x lower)")


def measure_ttft(engine: LLMEngine, prompts: list[list[int]]) -> float:
    """Submit all prompts at once; the median time until each request's first token."""
    params = SamplingParams(max_tokens=1, temperature=0.0)
    start = time.perf_counter()
    ids = [f"ttft-{start}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    first: dict[str, float] = {}
    with tqdm(total=len(prompts), desc="time to first token", leave=False) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.new_token_ids and out.request_id not in first:
                    first[out.request_id] = time.perf_counter() - start
                    bar.update()
    return statistics.median(first.values())


def measure_shared_prefix(engine: LLMEngine, requests: int = 32, prefix_len: int = 512,
                          suffix_len: int = 16) -> SharedPrefixResult:
    """32 requests sharing a 512-token prefix with different endings, with and without prefix caching."""
    prefix = _prompt(engine, prefix_len, 7)
    prompts = [prefix + _prompt(engine, suffix_len, 5000 + i) for i in range(requests)]
    cached = measure_ttft(engine, prompts)
    # A second engine on the same weights; it takes over the model's KV cache tensors, so it runs last.
    uncached_engine = LLMEngine(engine.config.replace(enable_prefix_caching=False), loaded=engine.loaded)
    uncached = measure_ttft(uncached_engine, prompts)
    return SharedPrefixResult(requests, prefix_len, cached, uncached)


def run(engine: LLMEngine, batch_sizes: list[int], decode_steps: int, prompt_len: int,
        repeats: int = 3) -> list[BenchResult]:
    measure_decode(engine, 1, 4)   # warm-up: first-call allocations and kernel choices
    results = [measure_decode(engine, b, decode_steps) for b in batch_sizes]
    results.append(measure_prefill(engine, prompt_len, repeats))
    return results


def format_table(results: list[BenchResult]) -> str:
    lines = [f"{'workload':<32} {'tokens':>8} {'seconds':>9} {'tokens/s':>10}"]
    lines += [f"{r.name:<32} {r.tokens:>8} {r.seconds:>9.3f} {r.tokens_per_second:>10.1f}" for r in results]
    return "\n".join(lines)
