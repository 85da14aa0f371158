"""The batched sampler: float32 logits plus per-request settings -> next tokens and their logprobs.

Reported log-probabilities are the model's own distribution (log-softmax of the raw logits), before
temperature, top_p, penalties and logit_bias; those shape only which token is chosen. Sampling draws
exponential noise per row ("argmax of p / E"), from the request's own generator when it has a seed,
so a seeded request's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textcomplete.engine.outputs import TokenLogprob
from textcomplete.engine.request import Request


@dataclass
class SampledTokens:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]   # None where the request asked for no logprobs


class Sampler:
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """logits: [len(requests), vocab] float32, one row per request."""
        wanted = [r.params.logprobs for r in requests]
        # Only rows that report logprobs need the normalised distribution.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in wanted) else None
        scores = self._apply_biases(logits, requests)
        token_ids = torch.argmax(scores, dim=-1)
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled_rows:
            token_ids[sampled_rows] = self._sample(scores[sampled_rows], [requests[i] for i in sampled_rows])
        ids = token_ids.tolist()
        if raw_logprobs is None:
            return SampledTokens(ids, [None] * len(ids))
        return SampledTokens(ids, token_logprobs(raw_logprobs, ids, wanted))

    @staticmethod
    def _apply_biases(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.logit_bias or r.params.needs_penalties]
        if not rows:
            return logits
        scores = logits.clone()
        for i in rows:
            params = requests[i].params
            if params.logit_bias:
                ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long)
                scores[i].index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=scores.dtype))
            outputs = requests[i].output_token_ids
            if params.needs_penalties and outputs:
                counts = torch.bincount(torch.tensor(outputs), minlength=scores.shape[1]).to(scores.dtype)
                scores[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        return scores

    def _sample(self, scores: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """scores: [n, vocab] for non-greedy requests -> [n] token ids."""
        temps = torch.tensor([r.params.temperature for r in requests], dtype=scores.dtype)
        probs = torch.softmax(scores / temps[:, None], dim=-1)
        top_ps = [r.params.top_p for r in requests]
        if any(p < 1.0 for p in top_ps):
            probs = _top_p_filter(probs, torch.tensor(top_ps, dtype=probs.dtype))
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        return torch.argmax(probs / noise, dim=-1)


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail of each row beyond the smallest set whose mass reaches top_p (the top token stays)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before >= top_p[:, None]] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def token_logprobs(logprobs: torch.Tensor, chosen: list[int], top_k: list[int | None]) -> list[TokenLogprob | None]:
    """Per row: the chosen token's logprob and the row's top-k alternatives (None where k is None).

    logprobs: [n, vocab] float32 log-softmax.
    """
    wanted = [k for k in top_k if k is not None]
    if not wanted:
        return [None] * len(chosen)
    k_max = max(wanted)
    chosen_lp = logprobs.gather(1, torch.tensor(chosen)[:, None]).squeeze(1).tolist()
    top_vals, top_ids = (logprobs.topk(k_max, dim=-1) if k_max else (None, None))
    top_vals = top_vals.tolist() if k_max else None
    top_ids = top_ids.tolist() if k_max else None
    out: list[TokenLogprob | None] = []
    for i, k in enumerate(top_k):
        if k is None:
            out.append(None)
            continue
        top = tuple(zip(top_ids[i][:k], top_vals[i][:k])) if k else ()
        out.append(TokenLogprob(chosen[i], chosen_lp[i], top))
    return out
