"""The three ways in: the official SDK over HTTP, `textcomplete.Client` in-process, and the
`textcomplete completions create` command line give identical choices and identical error messages."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import openai
import pytest

import textcomplete
from tests.e2e.conftest import CONTEXT
from tests.e2e.helpers import MODEL

REQUEST = dict(model=MODEL, prompt=["Once upon a time", "The capital of France is"], max_tokens=8, temperature=0,
               n=2, logprobs=2, echo=True, stop=["\n\n"])


@pytest.fixture(scope="module")
def local():
    client = textcomplete.Client(model=MODEL, kv_cache_memory=256 << 20, max_model_len=CONTEXT)
    yield client
    client.close()


def cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textcomplete.cli", *args, "--base-url", server.base + "/v1"],
                          capture_output=True, text=True, timeout=300)


def cli_args(request: dict) -> list[str]:
    args = ["completions", "create", "--model", request["model"]]
    for p in request["prompt"]:
        args += ["--prompt", p]
    args += ["--max-tokens", str(request["max_tokens"]), "--temperature", str(request["temperature"]),
             "--n", str(request["n"]), "--logprobs", str(request["logprobs"])]
    args += ["--echo"] if request.get("echo") else []
    for s in request.get("stop", []):
        args += ["--stop", s]
    return args


def test_same_choices_through_sdk_client_and_cli(client, local, server):
    over_http = client.completions.create(**REQUEST).model_dump()["choices"]
    in_process = local.completions.create(**REQUEST).to_dict()["choices"]
    out = cli(server, *cli_args(REQUEST))
    assert out.returncode == 0, out.stderr
    from_cli = json.loads(out.stdout)["choices"]
    # Texts, tokens, offsets and finish reasons are identical; the logprob floats may differ in the last
    # digits, because how the 4 candidates happen to share batches can differ from one process to another.
    for a, b, c in zip(over_http, in_process, from_cli):
        for key in ("text", "index", "finish_reason"):
            assert a[key] == b[key] == c[key]
        for key in ("tokens", "text_offset"):
            assert a["logprobs"][key] == b["logprobs"][key] == c["logprobs"][key]
        for x, y, z in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"],
                           c["logprobs"]["token_logprobs"]):
            assert (x is y is z is None) or (abs(x - y) < 1e-4 and abs(x - z) < 1e-4)
    assert len(over_http) == len(in_process) == len(from_cli) == 4


def test_identical_choices_for_a_greedy_request(client, local, server):
    """Without logprobs nothing depends on batching: the three choice lists are equal to the letter."""
    request = dict(model=MODEL, prompt=["Once upon a time"], max_tokens=12, temperature=0, stop=["\n\n"])
    over_http = client.completions.create(**request).model_dump()["choices"]
    in_process = local.completions.create(**request).to_dict()["choices"]
    out = cli(server, "completions", "create", "--model", MODEL, "--prompt", "Once upon a time", "--max-tokens",
              "12", "--temperature", "0", "--stop", "\n\n")
    assert out.returncode == 0, out.stderr
    assert over_http == in_process == json.loads(out.stdout)["choices"]


def test_same_error_message_everywhere(client, local, server):
    bad = dict(model=MODEL, prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError) as sdk_error:
        client.completions.create(**bad)
    with pytest.raises(textcomplete.BadRequestError) as local_error:
        local.completions.create(**bad)
    out = cli(server, "completions", "create", "--model", MODEL, "--prompt", "x", "--temperature", "5")
    message = sdk_error.value.body["message"]
    assert local_error.value.message == message and local_error.value.param == "temperature"
    assert out.returncode != 0 and message in out.stderr
    with pytest.raises(textcomplete.NotFoundError):
        local.completions.create(model="nope", prompt="x")


def test_client_stream_models_and_async_client(local):
    text = "".join(c.choices[0].text for c in local.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == local.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                            temperature=0).choices[0].text
    assert [m.id for m in local.models.list()] == [MODEL]

    async def use_async():
        client = textcomplete.AsyncClient(model=MODEL, kv_cache_memory=128 << 20, max_model_len=CONTEXT)
        try:
            whole = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                                    temperature=0)
            chunks = [c async for c in await client.completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)]
            return whole.choices[0].text, "".join(c.choices[0].text for c in chunks if c.choices)
        finally:
            client.close()
    whole, streamed = asyncio.run(use_async())
    assert whole == streamed == text


def test_cli_help_lists_every_request_field():
    out = subprocess.run([sys.executable, "-m", "textcomplete.cli", "completions", "create", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--prompt", "--max-tokens", "--temperature", "--top-p", "--n", "--best-of", "--echo",
                 "--logprobs", "--stop", "--presence-penalty", "--frequency-penalty", "--logit-bias", "--seed",
                 "--suffix", "--stream", "--user", "--base-url", "--api-key"):
        assert flag in out, flag


def test_cli_stream_and_models_list(server):
    out = cli(server, "completions", "create", "--model", MODEL, "--prompt", "Once upon a time", "--max-tokens", "6",
              "--temperature", "0", "--stream")
    assert out.returncode == 0 and out.stdout.strip()
    listed = cli(server, "models", "list")
    assert json.loads(listed.stdout)["data"][0]["id"] == MODEL
