"""Response objects, prompts, choices, echo, stop and usage (conformance R24-R33), through the official SDK."""

from __future__ import annotations

import pytest

from tests.e2e.helpers import MODEL, body, post


def test_r24_response_shape(http, validate):
    r = post(http, body())
    data = r.json()
    validate("response", data)
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert isinstance(data["created"], int) and isinstance(data["system_fingerprint"], str)
    for choice in data["choices"]:
        assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
        assert choice["logprobs"] is None


def tokenize(http, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_r25_usage_adds_up_and_counts_each_prompt_once(client, http):
    c = client.completions.create(model=MODEL, prompt=["One two", "Three four five"], n=3, max_tokens=4,
                                  temperature=0.8, seed=1, logit_bias={"2": -100})
    u = c.usage
    assert u.prompt_tokens == len(tokenize(http, "One two")) + len(tokenize(http, "Three four five"))
    assert u.completion_tokens == 2 * 3 * 4
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_r25_best_of_bills_every_candidate(http):
    data = post(http, body(best_of=3, n=1, max_tokens=5, temperature=1.0, seed=3, logit_bias={"2": -100})).json()
    assert len(data["choices"]) == 1
    assert data["usage"]["completion_tokens"] == 15


def test_r26_model_echoes_the_requested_id(client):
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=1).model == MODEL


def test_r27_finish_reasons(http):
    length = post(http, body(max_tokens=3, logit_bias={"2": -100})).json()["choices"][0]
    assert length["finish_reason"] == "length"
    eos = post(http, body(max_tokens=5, logit_bias={"2": 100})).json()["choices"][0]
    assert eos["finish_reason"] == "stop" and eos["text"] == ""
    zero = post(http, body(max_tokens=0)).json()["choices"][0]
    assert zero == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
    zero_echo = post(http, body(max_tokens=0, echo=True)).json()["choices"][0]
    assert zero_echo["text"] == "Once upon a time" and zero_echo["finish_reason"] == "length"


def test_r28_all_four_prompt_forms(http):
    ids = tokenize(http, "Once upon a time")
    forms = {"string": "Once upon a time", "strings": ["Once upon a time", "Once upon a time"],
             "ids": ids, "id lists": [ids, ids]}
    texts = {}
    for name, prompt in forms.items():
        data = post(http, body(prompt=prompt)).json()
        texts[name] = [c["text"] for c in data["choices"]]
    assert texts["string"] * 2 == texts["strings"] == texts["id lists"]
    assert texts["ids"] == texts["string"]


def test_r29_token_prompts_are_used_as_given(http):
    # " time" split in an unusual way: ids the tokenizer would never produce for this text.
    ids = [34, 34, 34, 216, 216]
    data = post(http, body(prompt=ids, echo=True, logprobs=0, max_tokens=0)).json()
    assert len(data["choices"][0]["logprobs"]["tokens"]) == len(ids)
    assert data["usage"]["prompt_tokens"] == len(ids)


def test_r30_choice_index_is_prompt_index_times_n_plus_j(http):
    data = post(http, body(prompt=["A", "B", "C"], n=2, temperature=0.7, seed=5, max_tokens=2)).json()
    assert [c["index"] for c in data["choices"]] == list(range(6))
    stream = post(http, body(prompt=["A", "B"], n=2, max_tokens=2, stream=True))
    assert stream.status_code == 200


def test_r31_echo_prefixes_the_prompt(http):
    plain = post(http, body()).json()["choices"][0]["text"]
    echoed = post(http, body(echo=True)).json()["choices"][0]["text"]
    assert echoed == "Once upon a time" + plain
    ids = tokenize(http, "Hello there")
    echoed_ids = post(http, body(prompt=ids, echo=True, max_tokens=0)).json()["choices"][0]["text"]
    assert echoed_ids == "Hello there"


def test_r32_stop_sequences_cut_the_text(http):
    free = post(http, body(max_tokens=24, logit_bias={"2": -100})).json()["choices"][0]["text"]
    assert len(free) > 6
    stop = free[3:6]
    data = post(http, body(max_tokens=24, logit_bias={"2": -100}, stop=[stop, "zzzz"])).json()["choices"][0]
    assert data["finish_reason"] == "stop"
    assert data["text"] == free[:free.index(stop)] and stop not in data["text"]


def test_r32_echoed_prompt_is_not_searched_for_stops(http):
    data = post(http, body(echo=True, stop=["upon"], max_tokens=4, logit_bias={"2": -100})).json()["choices"][0]
    assert data["text"].startswith("Once upon a time")


def test_r33_max_tokens_default_16_and_null_unlimited(http):
    default = post(http, {"model": MODEL, "prompt": "Count: 1, 2, 3,", "temperature": 0,
                          "logit_bias": {"2": -100}}).json()
    assert default["usage"]["completion_tokens"] == 16
    unlimited = post(http, {"model": MODEL, "prompt": [42] * 990, "max_tokens": None,
                            "logit_bias": {"2": -100}, "temperature": 0}).json()
    assert unlimited["choices"][0]["finish_reason"] == "length"
    assert unlimited["usage"]["total_tokens"] == 1024


@pytest.mark.parametrize("n", [1, 3])
def test_n_choices_each_have_one_finish_reason(client, n):
    c = client.completions.create(model=MODEL, prompt="Tell me", n=n, max_tokens=5, temperature=0.9, seed=11)
    assert sorted(ch.index for ch in c.choices) == list(range(n))
    assert all(ch.finish_reason in ("stop", "length") for ch in c.choices)


def test_best_of_returns_the_candidates_with_the_highest_mean_logprob(http):
    common = dict(temperature=1.0, max_tokens=6, logit_bias={"2": -100}, logprobs=0)
    candidates = post(http, body(n=4, seed=21, **common)).json()["choices"]
    means = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"]) for c in candidates]
    best = post(http, body(n=2, best_of=4, seed=21, **common)).json()["choices"]
    ranked = [candidates[i]["text"] for i in sorted(range(4), key=lambda i: -means[i])[:2]]
    assert [c["text"] for c in best] == ranked
