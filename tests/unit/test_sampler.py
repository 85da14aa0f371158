"""The batched sampler: greedy, seeds, top_p, penalties, logit_bias and logprob bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch

from textcomplete.config import parse_size
from textcomplete.engine.request import Request
from textcomplete.engine.sampler import Sampler, _top_p_filter
from textcomplete.engine.sampling_params import SamplingParams


def req(i: int = 0, outputs=(), **kw) -> Request:
    r = Request(f"r{i}", [1, 2, 3], SamplingParams(**kw), arrival=i)
    r.token_ids.extend(outputs)
    return r


def test_greedy_takes_the_argmax_and_reports_it_as_top():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0]])
    out = Sampler(0)(logits, [req(temperature=0.0, logprobs=2)])
    assert out.token_ids == [1]
    lp = out.logprobs[0]
    assert lp.logprob == lp.top[0][1] and lp.top[0][0] == 1 and len(lp.top) == 2
    assert lp.logprob == pytest.approx(3.0 - math.log(sum(math.exp(x) for x in [0, 3, 1, -1])), abs=1e-6)


def test_seeded_rows_do_not_depend_on_batch_neighbours():
    logits = torch.randn(1, 500)
    alone = [Sampler(1)(logits, [req(seed=42)]).token_ids[0] for _ in range(1)]
    s = Sampler(2)
    r = req(seed=42)
    together = s(torch.cat([torch.randn(3, 500), logits]), [req(1), req(2), req(3), r]).token_ids[3]
    assert together == alone[0]


def test_seed_reproduces_a_sequence_of_draws():
    logits = torch.zeros(1, 1000)
    draws = []
    for _ in range(2):
        r, s = req(seed=7), Sampler(0)
        draws.append([s(logits, [r]).token_ids[0] for _ in range(10)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_logit_bias_and_penalties_steer_the_choice_but_not_the_reported_logprobs():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    biased = Sampler(0)(logits, [req(temperature=0.0, logit_bias={2: 100.0}, logprobs=0)])
    assert biased.token_ids == [2]
    assert biased.logprobs[0].logprob == pytest.approx(torch.log_softmax(logits, -1)[0, 2].item())
    penalised = Sampler(0)(logits, [req(temperature=0.0, outputs=[0, 0], frequency_penalty=0.1)])
    assert penalised.token_ids == [1]
    presence = Sampler(0)(logits, [req(temperature=0.0, outputs=[0], presence_penalty=0.2)])
    assert presence.token_ids == [1]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = _top_p_filter(probs.clone(), torch.tensor([0.7]))
    assert kept[0].tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    tiny = _top_p_filter(probs.clone(), torch.tensor([0.01]))
    assert tiny[0].tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])
    s = Sampler(0)
    picks = {s(torch.log(probs), [req(top_p=0.7)]).token_ids[0] for _ in range(200)}
    assert picks == {0, 1}


def test_temperature_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    s = Sampler(3)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[s(torch.log(probs)[None], [req()]).token_ids[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_no_logprobs_when_not_asked():
    out = Sampler(0)(torch.randn(2, 10), [req(0), req(1, logprobs=0)])
    assert out.logprobs[0] is None and out.logprobs[1].top == ()


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
