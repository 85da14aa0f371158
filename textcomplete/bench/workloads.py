"""The benchmark workloads, run against one server: single stream, a concurrency sweep, scoring, shared prefix.

Output length is forced by biasing every end-of-text token away (`logit_bias`, which every peer accepts),
and prompts are cut to an exact token count with the model's own tokenizer.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from textcomplete.bench.loadgen import LoadGenerator, Summary
from textcomplete.tokenizer import Tokenizer

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact river garden music letter window morning city story "
          "question answer market paper table water money light night family friend history science").split()


@dataclass(frozen=True)
class WorkloadConfig:
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    prompt_tokens: int = 128
    output_tokens: int = 128
    single_stream_requests: int = 3
    min_requests_per_level: int = 4
    scoring_prompt_tokens: int = 512
    scoring_prompts_per_request: int = 8
    scoring_requests: int = 4
    shared_prefix_requests: int = 32
    shared_prefix_tokens: int = 512
    shared_suffix_tokens: int = 16
    prefill_tokens: int = 512
    prefill_requests: int = 3


@dataclass
class ServerResults:
    name: str
    single: Summary | None = None
    sweep: list[Summary] = field(default_factory=list)
    scoring: Summary | None = None
    shared_prefix: Summary | None = None
    prefill: Summary | None = None


class PromptMaker:
    """Prompts of an exact token count: random words, encoded, cut, decoded, checked."""

    def __init__(self, tokenizer: Tokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def text(self, tokens: int) -> str:
        words = " ".join(self.rng.choice(_WORDS) for _ in range(tokens * 2))
        ids = self.tokenizer.encode(words, add_special_tokens=False)[:tokens]
        text = self.tokenizer.decode(ids)
        while len(self.tokenizer.encode(text, add_special_tokens=False)) > tokens:
            text = text.rsplit(" ", 1)[0]
        return text


def eos_bias(tokenizer: Tokenizer) -> dict[str, int]:
    return {str(t): -100 for t in tokenizer.eos_token_ids}


ALL_WORKLOADS = ("single", "sweep", "scoring", "shared_prefix", "prefill")


async def run_all(gen: LoadGenerator, tokenizer: Tokenizer, config: WorkloadConfig, name: str,
                  workloads: tuple[str, ...] = ALL_WORKLOADS, seed: int = 0) -> ServerResults:
    """Every chosen workload in turn; `seed` picks the prompts (a new seed: prompts no cache has seen)."""
    prompts = PromptMaker(tokenizer, seed)
    bias = eos_bias(tokenizer)
    out = ServerResults(name)

    def gen_bodies(count: int) -> list[dict]:
        return [gen.body(prompts.text(config.prompt_tokens), config.output_tokens, logit_bias=bias)
                for _ in range(count)]

    if "single" in workloads:
        out.single = await gen.run_level("single stream", gen_bodies(config.single_stream_requests), 1,
                                         config.output_tokens)
    if "sweep" in workloads:
        for c in config.concurrency:
            bodies = gen_bodies(max(c, config.min_requests_per_level))
            out.sweep.append(await gen.run_level("concurrency", bodies, c, config.output_tokens))
    if "scoring" in workloads:
        out.scoring = await _scoring(gen, prompts, config)
    if "shared_prefix" in workloads:
        prefix = prompts.text(config.shared_prefix_tokens)
        bodies = [gen.body(prefix + " " + prompts.text(config.shared_suffix_tokens), 1, logit_bias=bias)
                  for _ in range(config.shared_prefix_requests)]
        out.shared_prefix = await gen.run_level("shared prefix", bodies, config.shared_prefix_requests, 1)
    if "prefill" in workloads:
        out.prefill = await _prefill(gen, prompts, config)
    return out


async def _prefill(gen: LoadGenerator, prompts: PromptMaker, config: WorkloadConfig) -> Summary:
    """Distinct long prompts, one at a time, one output token each: prompt tokens processed per second."""
    bodies = [gen.body(prompts.text(config.prefill_tokens), 1) for _ in range(config.prefill_requests)]
    return await gen.run_level("prefill", bodies, 1, stream=False, prompt_tokens=config.prefill_tokens)


async def _scoring(gen: LoadGenerator, prompts: PromptMaker, config: WorkloadConfig) -> Summary:
    """lm-eval style: echo + logprobs 1 + max_tokens 1; prompt tokens scored per second."""
    per = config.scoring_prompts_per_request
    texts = [prompts.text(config.scoring_prompt_tokens) for _ in range(config.scoring_requests * per)]
    bodies = [gen.body(texts[i:i + per] if per > 1 else texts[i], 1, echo=True, logprobs=1)
              for i in range(0, len(texts), per)]
    return await gen.run_level("scoring", bodies, 1, stream=False,
                               prompt_tokens=per * config.scoring_prompt_tokens)


def run(gen: LoadGenerator, tokenizer: Tokenizer, config: WorkloadConfig, name: str, **kw) -> ServerResults:
    return asyncio.run(run_all(gen, tokenizer, config, name, **kw))


def format_results(results: ServerResults) -> str:
    lines = [f"{'workload':<22} {'conc':>4} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'req/s':>7} "
             f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"]
    rows = [s for s in [results.single, *results.sweep, results.shared_prefix] if s is not None]
    for s in rows:
        lines.append(f"{s.name:<22} {s.concurrency:>4} {s.requests:>5} {s.errors:>4} {s.output_tokens_per_s:>10.1f} "
                     f"{s.requests_per_s:>7.2f} {s.ttft_p50:>9.3f} {s.ttft_p99:>9.3f} {s.itl_p50 * 1000:>6.1f}ms "
                     f"{s.itl_p99 * 1000:>6.1f}ms")
    if results.scoring is not None:
        s = results.scoring
        lines.append(f"{'scoring (echo+logprobs)':<22} {1:>4} {s.requests:>5} {s.errors:>4} "
                     f"{s.prompt_tokens_per_s:>10.1f} prompt tokens/s scored")
    if results.prefill is not None:
        s = results.prefill
        lines.append(f"{'prefill':<22} {1:>4} {s.requests:>5} {s.errors:>4} "
                     f"{s.prompt_tokens_per_s:>10.1f} prompt tokens/s")
    return "\n".join(lines)
