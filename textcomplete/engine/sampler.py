"""The batched sampler: float32 logits plus per-request settings -> next tokens and their logprobs.

Reported log-probabilities are the model's own distribution (log-softmax of the raw logits), before
temperature, top_p, penalties and logit_bias; those shape only which token is chosen. Sampling draws
exponential noise per row ("argmax of p / E"), from the request's own generator when it has a seed,
so a seeded request's tokens do not depend on what else is in the batch. Plain numpy, so that the
serving process needs no tensor library.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from textcomplete.engine.outputs import TokenLogprob
from textcomplete.engine.request import Request

# Rows of the top_p filter first sort only this many most likely tokens; the full sort is the fallback
# for the rare row (a nearly flat one) whose top_p mass is not reached among them.
_TOP_P_CANDIDATES = 1024


@dataclass
class SampledTokens:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]   # None where the request asked for no logprobs


class Sampler:
    def __init__(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, requests: list[Request]) -> SampledTokens:
        """logits: [len(requests), vocab] float32, one row per request."""
        logits = np.asarray(logits, dtype=np.float32)
        wanted = [r.params.logprobs for r in requests]
        # Only rows that report logprobs need the normalised distribution.
        raw_logprobs = log_softmax(logits) if any(k is not None for k in wanted) else None
        scores = self._apply_biases(logits, requests)
        token_ids = np.argmax(scores, axis=-1)    # the first maximum on ties
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled_rows:
            token_ids[sampled_rows] = self._sample(scores[sampled_rows], [requests[i] for i in sampled_rows])
        ids = token_ids.tolist()
        if raw_logprobs is None:
            return SampledTokens(ids, [None] * len(ids))
        return SampledTokens(ids, token_logprobs(raw_logprobs, ids, wanted))

    @staticmethod
    def _apply_biases(logits: np.ndarray, requests: list[Request]) -> np.ndarray:
        rows = [i for i, r in enumerate(requests) if r.params.logit_bias or r.params.needs_penalties]
        if not rows:
            return logits
        scores = logits.copy()
        for i in rows:
            params = requests[i].params
            if params.logit_bias:
                ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64, count=len(params.logit_bias))
                if ids.min() < 0:   # numpy would count a negative id from the end of the row
                    raise IndexError(f"logit_bias token id {ids.min()} is negative")
                scores[i, ids] += np.fromiter(params.logit_bias.values(), dtype=np.float32, count=len(ids))
            outputs = requests[i].output_token_ids
            if params.needs_penalties and outputs:
                ids, counts = np.unique(np.asarray(outputs, dtype=np.int64), return_counts=True)
                scores[i, ids] -= params.frequency_penalty * counts + params.presence_penalty
        return scores

    def _sample(self, scores: np.ndarray, requests: list[Request]) -> np.ndarray:
        """scores: [n, vocab] for non-greedy requests -> [n] token ids."""
        temps = np.array([r.params.temperature for r in requests], dtype=np.float32)
        probs = _softmax(scores / temps[:, None])
        top_ps = np.array([r.params.top_p for r in requests])
        filtered = np.flatnonzero(top_ps < 1.0)
        if filtered.size:
            probs[filtered] = _top_p_filter(probs[filtered], top_ps[filtered])
        out = np.empty(len(requests), dtype=np.int64)
        # Row by row, in order, so unseeded rows draw the shared generator's stream as one block would.
        for i, r in enumerate(requests):
            generator = self.generator if r.generator is None else r.generator
            # float64 noise: float32 draws are exactly 0 about once in 2**23, which would hand a
            # vanishingly unlikely (or filtered-out: 0 / 0) token the win.
            noise = generator.standard_exponential(probs.shape[1])
            out[i] = np.argmax(probs[i] / noise)
        return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[n, vocab] float32 -> [n, vocab] float32 log-softmax, each value rounded once from float64.

    The row max is subtracted before exp and the exponentials are summed in float64, so the normaliser
    is good to about 1e-7; the subtraction runs in float64 too and rounds straight into the result.
    """
    row_max = logits.max(axis=-1, keepdims=True)
    total = np.exp(logits - row_max).sum(axis=-1, keepdims=True, dtype=np.float64)
    norm = row_max.astype(np.float64) + np.log(total)     # [n, 1] float64
    return np.subtract(logits, norm, out=np.empty_like(logits, dtype=np.float32), casting="same_kind")


def _softmax(scores: np.ndarray) -> np.ndarray:
    """[n, vocab] -> [n, vocab] float32 probabilities (a fresh array)."""
    probs = scores - scores.max(axis=-1, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=-1, keepdims=True, dtype=np.float64).astype(probs.dtype)
    return probs


def _top_p_filter(probs: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """Zero the tail of each row beyond the smallest set whose mass reaches top_p (the top token stays).

    probs: [n, vocab]; top_p: [n]. Sorting is descending and stable: tied tokens rank by id.
    """
    out = np.zeros_like(probs)
    for i, row in enumerate(probs):
        order = _sorted_prefix(row, top_p[i])
        sorted_probs = row[order]
        mass_before = np.cumsum(sorted_probs, dtype=np.float64) - sorted_probs
        keep = mass_before < top_p[i]
        out[i, order[keep]] = sorted_probs[keep]
    return out


def _sorted_prefix(row: np.ndarray, top_p: float) -> np.ndarray:
    """Token ids of a prefix of the row's stable descending order whose mass reaches top_p (else all)."""
    if row.size > _TOP_P_CANDIDATES:
        order = _top_ids(row, _TOP_P_CANDIDATES)
        # The cumulative sum over this prefix is the full sort's, term by term; when it reaches top_p
        # every later token is dropped anyway, so sorting them would change nothing.
        if row[order].sum(dtype=np.float64) >= top_p:
            return order
    return _stable_descending(row)


def _stable_descending(row: np.ndarray) -> np.ndarray:
    """np.argsort(-row, kind="stable") for a float32 row, as one int64 sort (about 8x faster at 49152).

    Each key holds the value in its high half, its bits made order-preserving as an integer and inverted
    for descending order, and the token id in its low half, so that equal values rank by id.
    """
    if row.dtype != np.float32:
        return np.argsort(-row, kind="stable")
    bits = (row + np.float32(0)).view(np.int32).astype(np.int64)    # + 0 folds -0.0 onto 0.0
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)             # float order == integer order
    return np.sort((~ordered << 32) | np.arange(row.size)) & 0xFFFFFFFF


def _top_ids(row: np.ndarray, k: int) -> np.ndarray:
    """The ids of a row's k largest values, descending, ties by id (as a stable full sort would give)."""
    if k >= row.size:
        return np.argsort(-row, kind="stable")[:k]
    kth = np.partition(row, row.size - k)[row.size - k]     # the k-th largest value
    candidates = np.flatnonzero(row >= kth)                 # every tie of it too, in id order
    return candidates[np.argsort(-row[candidates], kind="stable")[:k]]


def token_logprobs(logprobs: np.ndarray, chosen: list[int], top_k: list[int | None]) -> list[TokenLogprob | None]:
    """Per row: the chosen token's logprob and the row's top-k alternatives (None where k is None).

    logprobs: [n, vocab] float32 log-softmax. Alternatives are best first, tied ones by token id.
    """
    if all(k is None for k in top_k):
        return [None] * len(chosen)
    chosen_lp = logprobs[np.arange(len(chosen)), chosen].tolist()
    out: list[TokenLogprob | None] = []
    for i, k in enumerate(top_k):
        if k is None:
            out.append(None)
            continue
        ids = _top_ids(logprobs[i], k) if k else np.empty(0, dtype=np.int64)
        out.append(TokenLogprob(chosen[i], chosen_lp[i], tuple(zip(ids.tolist(), logprobs[i, ids].tolist()))))
    return out
