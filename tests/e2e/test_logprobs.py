"""The logprobs object: tokens, token_logprobs, top_logprobs and text_offset (conformance R34-R39, §13)."""

from __future__ import annotations

import math

import pytest

from tests.e2e.helpers import body, post


def lp(http, **fields) -> dict:
    data = post(http, body(**fields)).json()
    return data, data["choices"][0]["logprobs"]


def test_r34_four_equal_length_arrays_or_null(http, validate):
    data, logprobs = lp(http, logprobs=3)
    validate("response", data)
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len({len(v) for v in logprobs.values()}) == 1
    assert lp(http)[1] is None


def test_r35_generated_tokens_listed_with_the_end_of_text(http):
    info = http.get("/tokenizer_info").json()
    data, logprobs = lp(http, logprobs=1, max_tokens=5, logit_bias={str(info["eos_token_id"]): 100})
    assert logprobs["tokens"] == [info["eos_token"]] and data["choices"][0]["text"] == ""
    assert data["usage"]["completion_tokens"] == 1


def test_r35_lm_eval_loglikelihood_shape_gives_prompt_plus_one(http):
    ids = http.post("/tokenize", json={"prompt": "The quick brown fox jumps"}).json()["tokens"]
    data = post(http, {"model": body()["model"], "prompt": [ids, ids[:3]], "temperature": 0, "max_tokens": 1,
                       "logprobs": 1, "seed": 1234, "echo": True}).json()
    for choice, prompt in zip(sorted(data["choices"], key=lambda c: c["index"]), [ids, ids[:3]]):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(prompt) + 1
        for i in range(1, len(prompt) + 1):
            assert logprobs["top_logprobs"][i] is not None
            assert logprobs["token_logprobs"][i] <= 0


def test_r36_echo_first_entry_is_null(http):
    _, logprobs = lp(http, echo=True, logprobs=1, max_tokens=0)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in logprobs["token_logprobs"][1:])
    assert len(logprobs["tokens"]) == post(http, body(max_tokens=0)).json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize("k", [0, 1, 5])
def test_r37_top_logprobs_hold_k_plus_the_chosen(http, k):
    _, logprobs = lp(http, logprobs=k, temperature=1.0, seed=9, max_tokens=8, echo=True)
    for i, (token, top) in enumerate(zip(logprobs["tokens"], logprobs["top_logprobs"])):
        if i == 0:
            continue
        assert token in top and top[token] == logprobs["token_logprobs"][i]
        assert max(k, 1) <= len(top) <= k + 1
        assert all(v <= 0 for v in top.values())


def test_r38_text_offsets_start_at_the_prompt_length_without_echo(http):
    data, logprobs = lp(http, logprobs=0, max_tokens=6, logit_bias={"2": -100})
    text = data["choices"][0]["text"]
    prompt = "Once upon a time"
    assert logprobs["text_offset"][0] == len(prompt)
    whole = prompt + text
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        assert whole[offset:offset + len(token)] == token


def test_r38_text_offsets_start_at_zero_with_echo(http):
    data, logprobs = lp(http, logprobs=0, max_tokens=6, echo=True, logit_bias={"2": -100})
    text = data["choices"][0]["text"]
    assert logprobs["text_offset"][0] == 0
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        assert text[offset:offset + len(token)] == token


def test_r39_greedy_chosen_logprob_equals_the_top_value_exactly(http):
    _, logprobs = lp(http, logprobs=5, temperature=0, max_tokens=8)
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert chosen == max(top.values())


def test_echo_logprobs_match_a_scoring_of_the_generated_text(http):
    """The generated tokens' logprobs equal the prompt logprobs of the same ids scored with echo."""
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    gen = post(http, body(prompt=ids, logprobs=0, max_tokens=6, logit_bias={"2": -100})).json()
    gen_lp = gen["choices"][0]["logprobs"]
    gen_ids = [http.post("/tokenize", json={"prompt": t, "add_special_tokens": False}).json()["tokens"]
               for t in gen_lp["tokens"]]
    if any(len(t) != 1 for t in gen_ids):
        pytest.skip("a generated token does not round-trip through text")
    scored = post(http, body(prompt=ids + [t[0] for t in gen_ids], echo=True, logprobs=0, max_tokens=0)).json()
    tail = scored["choices"][0]["logprobs"]["token_logprobs"][len(ids):]
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(gen_lp["token_logprobs"], tail))
