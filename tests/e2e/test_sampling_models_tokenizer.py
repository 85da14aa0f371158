"""Seeds, greedy determinism and sampling controls (R48-R50); the models endpoints (R55-R56); §13 tokenizer."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.helpers import MODEL, assert_error, body, post


def test_r48_same_seed_same_text_and_fingerprint(client):
    runs = [client.completions.create(model=MODEL, prompt="Tell me a story", max_tokens=12, temperature=1.0,
                                      seed=1234, n=2) for _ in range(2)]
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[1].choices]
    assert runs[0].system_fingerprint == runs[1].system_fingerprint
    other = client.completions.create(model=MODEL, prompt="Tell me a story", max_tokens=12, temperature=1.0,
                                      seed=99)
    assert runs[0].choices[0].text != other.choices[0].text


def test_r49_temperature_zero_is_deterministic(http):
    texts = {post(http, body(max_tokens=12)).json()["choices"][0]["text"] for _ in range(3)}
    assert len(texts) == 1


def test_r50_logit_bias_and_penalties_apply(http):
    forced = post(http, body(max_tokens=4, logit_bias={"28": 100})).json()["choices"][0]["text"]
    assert forced == "," * 4
    plain = post(http, body(prompt="1 1 1 1 1 1 1 1", max_tokens=12, logit_bias={"2": -100})).json()
    penalised = post(http, body(prompt="1 1 1 1 1 1 1 1", max_tokens=12, logit_bias={"2": -100},
                                frequency_penalty=2.0, presence_penalty=2.0)).json()
    assert plain["choices"][0]["text"] != penalised["choices"][0]["text"]
    assert post(http, body(user="someone")).status_code == 200


def test_r55_list_models(http, client, validate):
    data = http.get("/v1/models").json()
    validate("models", data)
    assert [m["id"] for m in data["data"]] == [MODEL]
    assert data["data"][0]["supports_suffix"] is False   # SmolLM2 has no fill-in-the-middle tokens
    assert [m.id for m in client.models.list()] == [MODEL]


def test_r56_retrieve_model_and_404(http, client, validate):
    validate("model", http.get(f"/v1/models/{MODEL}").json())
    assert client.models.retrieve(MODEL).id == MODEL
    assert_error(http.get("/v1/models/nope"), 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_lm_eval_tokenizer_endpoints(http):
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>"   # SmolLM2-Instruct's end of turn, id 2
    tokens = http.post("/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()["tokens"]
    assert tokens and http.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "test"
    eos = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [info["eos_token_id"]]
    assert_error(http.post("/tokenize", json={"prompt": 5}), 400)
    assert_error(http.post("/detokenize", json={"tokens": [-1]}), 400)


def test_r57_delete_model_never_deletes_a_served_model(http, client, validate):
    r = http.delete(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json() == {"id": MODEL, "object": "model", "deleted": False}
    from tests.e2e.helpers import schema_validator
    schema_validator("DeleteModelResponse").validate(r.json())
    assert client.models.delete(MODEL).deleted is False
    assert_error(http.delete("/v1/models/nope"), 404, code="model_not_found")
    assert http.get(f"/v1/models/{MODEL}").status_code == 200


def test_r47s_strict_sdk_accepts_non_stream_responses(server):
    """Strict validation breaks on real stream chunks (finish_reason null) and on echo's leading null logprob
    (a spec bug, §14.2), so a plain non-stream response with logprobs is what strict clients can read."""
    strict = openai.OpenAI(base_url=server.base + "/v1", api_key="k", max_retries=0,
                           _strict_response_validation=True)
    c = strict.completions.create(model=MODEL, prompt="Hi", max_tokens=3, logprobs=1)
    assert c.choices[0].finish_reason in ("stop", "length")
    assert strict.models.retrieve(MODEL).id == MODEL
