"""Request validation: every bad request is a 400 envelope naming the field, never a 5xx (R10-R23, R52, R53)."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import CONTEXT
from tests.e2e.helpers import MODEL, assert_error, body, post


@pytest.mark.parametrize("field,value", [
    ("temperature", 2.5), ("temperature", -0.1), ("top_p", 1.5), ("top_p", -1), ("presence_penalty", 2.1),
    ("frequency_penalty", -3), ("n", 0), ("n", 129), ("best_of", 21), ("logprobs", 6), ("logprobs", -1),
    ("max_tokens", -1), ("temperature", "hot"), ("n", 1.0), ("max_tokens", False), ("echo", "yes"),
    ("logit_bias", {"5": 101}), ("logit_bias", {"x": 1}), ("logit_bias", []), ("seed", 1.5),
    ("stream", 1), ("user", 5), ("suffix", 3), ("stop", 5), ("stop", [1, 2]),
])
def test_r10_r13_out_of_range_and_wrong_types_are_400_naming_the_field(http, validate, field, value):
    r = post(http, body(**{field: value}))
    err = assert_error(r, 400, param=field)
    assert err["type"] == "invalid_request_error"
    validate("error", r.json())


@pytest.mark.parametrize("prompt", [5, [1.5, 2], [[1], "a"], [], [[]], [True], {"a": 1}])
def test_r13_bad_prompt_types_are_400(http, prompt):
    assert_error(post(http, body(prompt=prompt)), 400, param="prompt")


def test_r11_missing_model(http):
    payload = body()
    del payload["model"]
    err = assert_error(post(http, payload), 400, param=None)
    assert err["message"] == "you must provide a model parameter"


def test_r12_unknown_model_is_404(http, client, validate):
    r = post(http, body(model="gpt-nonexistent"))
    err = assert_error(r, 404, code="model_not_found")
    assert err["message"] == "The model `gpt-nonexistent` does not exist or you do not have access to it."
    validate("error", r.json())
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-nonexistent", prompt="x")


def test_r14_best_of_below_n(http):
    assert_error(post(http, body(n=3, best_of=2)), 400, param="best_of")
    assert post(http, body(n=2, best_of=2, max_tokens=2)).status_code == 200


def test_r15_best_of_above_n_cannot_stream(http):
    err = assert_error(post(http, body(n=1, best_of=2, stream=True)), 400, param="best_of")
    assert "streamed" in err["message"]


def test_r16_more_than_4_stops(http):
    assert_error(post(http, body(stop=["a", "b", "c", "d", "e"])), 400, param="stop",
                 code="array_above_max_length")


@pytest.mark.parametrize("stop", [[], None, "x", ["x"]])
def test_r17_empty_null_and_string_stop_are_accepted(http, stop):
    assert post(http, body(stop=stop)).status_code == 200


def test_r18_stream_options_without_stream(http):
    for stream in (False, None):
        payload = body(stream_options={"include_usage": True})
        if stream is not None:
            payload["stream"] = stream
        err = assert_error(post(http, payload), 400, param="stream_options")
        assert err["message"] == "The 'stream_options' parameter is only allowed when 'stream' is enabled."


@pytest.mark.parametrize("raw", [b"{", b"not json", b"", b"\xff\xfe", b'{"model": "x",}'])
def test_r19_unparseable_body(http, raw, validate):
    r = post(http, raw)
    err = assert_error(r, 400)
    assert err["message"].startswith("We could not parse the JSON body of your request.")
    validate("error", r.json())


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b"5", b"null"])
def test_r19_body_that_is_not_an_object(http, payload):
    assert_error(post(http, payload), 400)


def test_r20_unknown_parameters_are_ignored(http, client):
    assert post(http, body(top_k=5, do_sample=False, foo={"bar": 1})).status_code == 200
    c = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"top_k": 3})
    assert c.choices


def test_r21_null_prompt_means_end_of_text(http):
    r = post(http, body(prompt=None, max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1


def test_r22_suffix_is_a_clear_400(http):
    err = assert_error(post(http, body(suffix="return x")), 400, param="suffix", code="unsupported_parameter")
    assert "insert" in err["message"]


def test_r23_context_overflow_exact_message(http):
    context = http.get("/tokenizer_info").json()["model_max_length"]
    assert context == CONTEXT
    err = assert_error(post(http, body(prompt=[42] * (context - 10), max_tokens=500)), 400)
    assert err["message"] == (f"This model's maximum context length is {context} tokens, however you requested "
                              f"{context + 490} tokens ({context - 10} in your prompt; 500 for the completion). "
                              "Please reduce your prompt; or completion length.")
    # p + m == C is allowed.
    r = post(http, body(prompt=[42] * (context - 2), max_tokens=2))
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] <= context
    # A prompt alone beyond the context, with max_tokens null (counted as 0), is refused too.
    err = assert_error(post(http, body(prompt=[42] * (context + 1), max_tokens=None)), 400)
    assert f"({context + 1} in your prompt; 0 for the completion)" in err["message"]


def test_r13_token_ids_outside_the_vocabulary(http):
    assert_error(post(http, body(prompt=[1, 2, 10**9])), 400, param="prompt")
    assert_error(post(http, body(prompt=[-1])), 400, param="prompt")
    assert_error(post(http, body(logit_bias={"99999999": 5})), 400, param="logit_bias")


def test_r52_sdk_raises_typed_errors_and_r53_does_not_retry(server):
    c = openai.OpenAI(base_url=server.base + "/v1", api_key="k", max_retries=2)
    with pytest.raises(openai.BadRequestError) as info:
        c.completions.create(model=MODEL, prompt="x", temperature=5)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    assert info.value.response.headers.get("x-request-id")


@pytest.mark.parametrize("raw", [b'{"model": "%s", "temperature": NaN}', b'{"model": "%s", "top_p": -Infinity}',
                                 b'{"model": "%s", "prompt": "\\ud83d"}', b'{"model": "%s", "x": ' + b"[" * 50000])
def test_non_json_numbers_lone_surrogates_and_deep_nesting_are_400(http, raw):
    r = post(http, raw.replace(b"%s", MODEL.encode()))
    assert_error(r, 400)
