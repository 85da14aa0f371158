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
    vocab = engine.loaded.spec.vocab_size
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
