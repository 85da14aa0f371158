"""The batched sampler: greedy, seeds, top_p, penalties, logit_bias and logprob bookkeeping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from textcomplete.config import parse_size
from textcomplete.engine.request import Request
from textcomplete.engine.sampler import Sampler, _stable_descending, _top_p_filter, log_softmax, token_logprobs
from textcomplete.engine.sampling_params import SamplingParams


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def req(i: int = 0, outputs=(), **kw) -> Request:
    r = Request(f"r{i}", [1, 2, 3], SamplingParams(**kw), arrival=i)
    r.token_ids.extend(outputs)
    return r


def test_greedy_takes_the_argmax_and_reports_it_as_top():
    logits = np.array([[0.0, 3.0, 1.0, -1.0]], dtype=np.float32)
    out = Sampler(0)(logits, [req(temperature=0.0, logprobs=2)])
    assert out.token_ids == [1]
    lp = out.logprobs[0]
    assert lp.logprob == lp.top[0][1] and lp.top[0][0] == 1 and len(lp.top) == 2
    assert lp.logprob == pytest.approx(3.0 - math.log(sum(math.exp(x) for x in [0, 3, 1, -1])), abs=1e-6)


def test_seeded_rows_do_not_depend_on_batch_neighbours():
    logits = randn(1, 500)
    alone = [Sampler(1)(logits, [req(seed=42)]).token_ids[0] for _ in range(1)]
    s = Sampler(2)
    r = req(seed=42)
    together = s(np.concatenate([randn(3, 500, seed=1), logits]), [req(1), req(2), req(3), r]).token_ids[3]
    assert together == alone[0]


def test_seed_reproduces_a_sequence_of_draws():
    logits = np.zeros((1, 1000), dtype=np.float32)
    draws = []
    for _ in range(2):
        r, s = req(seed=7), Sampler(0)
        draws.append([s(logits, [r]).token_ids[0] for _ in range(10)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_logit_bias_and_penalties_steer_the_choice_but_not_the_reported_logprobs():
    logits = np.array([[2.0, 1.9, 0.0]], dtype=np.float32)
    biased = Sampler(0)(logits, [req(temperature=0.0, logit_bias={2: 100.0}, logprobs=0)])
    assert biased.token_ids == [2]
    assert biased.logprobs[0].logprob == pytest.approx(-2.0 - math.log(1 + math.exp(-0.1) + math.exp(-2.0)))
    penalised = Sampler(0)(logits, [req(temperature=0.0, outputs=[0, 0], frequency_penalty=0.1)])
    assert penalised.token_ids == [1]
    presence = Sampler(0)(logits, [req(temperature=0.0, outputs=[0], presence_penalty=0.2)])
    assert presence.token_ids == [1]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32)
    kept = _top_p_filter(probs.copy(), np.array([0.7]))
    assert kept[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    tiny = _top_p_filter(probs.copy(), np.array([0.01]))
    assert tiny[0].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    s = Sampler(0)
    picks = {s(np.log(probs), [req(top_p=0.7)]).token_ids[0] for _ in range(200)}
    assert picks == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1], dtype=np.float32)
    s = Sampler(3)
    counts = np.zeros(3)
    for _ in range(3000):
        counts[s(np.log(probs)[None], [req()]).token_ids[0]] += 1
    assert np.allclose(counts / 3000, probs, atol=0.03)


def test_no_logprobs_when_not_asked():
    out = Sampler(0)(randn(2, 10), [req(0), req(1, logprobs=0)])
    assert out.logprobs[0] is None and out.logprobs[1].top == ()



def test_seeded_rows_draw_the_same_sequence_in_any_batch():
    logits = randn(1, 2000, seed=5) * 3
    alone_req, alone = req(seed=-9, top_p=0.9), Sampler(0)
    expected = [alone(logits, [alone_req]).token_ids[0] for _ in range(20)]
    batched_req, batched = req(seed=-9, top_p=0.9), Sampler(1)
    got = []
    for step in range(20):
        at = step % 4                               # the seeded row moves through the batch
        requests = [req(1), req(2, temperature=0.0), req(3, seed=step, top_p=0.5)]
        requests.insert(at, batched_req)
        rows = np.insert(randn(3, 2000, seed=step + 10), at, logits[0], axis=0)
        got.append(batched(rows, requests).token_ids[at])
    assert got == expected and len(set(expected)) > 1


def test_negative_and_positive_seeds_are_distinct_generators():
    logits = np.zeros((1, 1000), dtype=np.float32)
    draws = {seed: [Sampler(0)(logits, [r]).token_ids[0] for r in [req(seed=seed)] for _ in range(8)]
             for seed in (-1, 0, 1, -(1 << 63), (1 << 63) - 1)}
    assert len({tuple(d) for d in draws.values()}) == len(draws)


def reference_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The plain definition: a full stable descending sort, keep while the mass before is below top_p."""
    order = np.argsort(-probs, kind="stable")
    mass_before = np.cumsum(probs[order], dtype=np.float64) - probs[order]
    out = np.zeros_like(probs)
    out[order[mass_before < top_p]] = probs[order[mass_before < top_p]]
    return out


@pytest.mark.parametrize("spread", [0.0, 0.01, 1.0, 4.0])   # flat rows take the full sort, peaked ones the prefix
@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999])
def test_top_p_on_wide_rows_matches_the_plain_definition(spread, top_p):
    scores = randn(3, 5000, seed=7) * spread
    scores[:, 100:140] = scores[:, 100:101]        # a run of ties, cut somewhere when the row is flat
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    kept = _top_p_filter(probs, np.full(3, top_p))
    for row, out in zip(probs, kept):
        np.testing.assert_array_equal(out, reference_top_p(row, top_p))
        assert out[np.argmax(row)] == row.max()    # the top token always stays


def test_top_p_ties_at_the_cut_keep_the_lower_ids():
    kept = _top_p_filter(np.full((1, 8), 0.125, dtype=np.float32), np.array([0.3]))
    assert kept[0].tolist() == [0.125] * 3 + [0.0] * 5


def test_log_softmax_matches_a_float64_reference():
    logits = randn(4, 49152, seed=3) * 4 + np.array([[0.0], [1000.0], [-1000.0], [60.0]], dtype=np.float32)
    x = logits.astype(np.float64)
    top = x.max(-1, keepdims=True)
    ref = x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))
    lp = log_softmax(logits)
    assert lp.dtype == np.float32
    # Correctly rounded float32, give or take the normaliser's error.
    assert np.all(np.abs(lp - ref) <= 1e-7 + np.abs(ref) * 2.0 ** -24)
    chosen = [0, 17, 49151, int(np.argmin(logits[3]))]
    for i, entry in enumerate(token_logprobs(lp, chosen, [20, 5, 0, 20])):
        assert isinstance(entry.logprob, float) and abs(entry.logprob - ref[i, chosen[i]]) < 1e-6
        assert [t for t, _ in entry.top] == np.argsort(-ref[i], kind="stable")[:len(entry.top)].tolist()
        assert all(abs(v - ref[i, t]) < 1e-6 for t, v in entry.top)


def test_top_logprobs_are_descending_with_ties_by_token_id():
    lp = log_softmax(np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]], dtype=np.float32))
    entry = token_logprobs(lp, [5], [5])[0]
    assert [t for t, _ in entry.top] == [1, 2, 4, 5, 0]
    assert token_logprobs(lp, [5], [None]) == [None]
    assert [t for t, _ in token_logprobs(lp, [0], [20])[0].top] == [1, 2, 4, 5, 0, 3]


def test_a_negative_logit_bias_id_fails_instead_of_wrapping():
    with pytest.raises(IndexError):
        Sampler(0)(randn(1, 10), [req(logit_bias={-1: 5.0})])


@pytest.mark.parametrize("text,expected", [("2GiB", 2 << 30), ("512M", 512 << 20), ("1024", 1024),
                                           ("1.5GB", 3 << 29)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError):
        parse_size("lots")


def test_sampling_params_validate():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=-1)


def test_the_fast_stable_sort_is_argsort_stable():
    row = np.concatenate([randn(3000, seed=4), [0.0, -0.0, 1.5, 1.5, -np.inf, np.inf, 0.0]]).astype(np.float32)
    row = np.concatenate([row, row[::-1]])                     # every value tied at least once
    np.testing.assert_array_equal(_stable_descending(row), np.argsort(-row, kind="stable"))
