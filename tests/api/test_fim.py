"""Insertion with `suffix` on tiny random models whose tokenizers carry each family's FIM tokens.

Runs the API layer in-process (no HTTP) over a real engine, recording the token ids the engine receives.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
from tokenizers import Tokenizer, processors

from tests.tiny_models import VOCAB, make_tiny_model
from textcomplete.api.errors import APIError
from textcomplete.api.protocol import parse_completion_request
from textcomplete.api.serving import CompletionService
from textcomplete.config import EngineConfig
from textcomplete.engine.async_engine import AsyncEngine
from textcomplete.engine.engine import LLMEngine

MODEL = "tiny-fim"
# family -> (FIM tokens, stop tokens, whether the tokenizer starts sequences with <s>)
FAMILIES = {
    "qwen": (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"], ["<|endoftext|>", "<|fim_pad|>"], False),
    "starcoder": (["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], ["<|endoftext|>"], False),
    "codellama": (["▁<PRE>", "▁<SUF>", "▁<MID>"], ["▁<EOT>"], True),
    "deepseek": (["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"], ["<|EOT|>"], True),
    "codestral": (["[PREFIX]", "[SUFFIX]"], [], True),
}
FIRST_SPECIAL = VOCAB - 8


def fim_model(base, directory, family: str):
    """A copy of the tiny Llama whose tokenizer maps the family's tokens onto the top ids of the vocabulary."""
    shutil.copytree(base, directory)
    fim, stops, bos = FAMILIES[family]
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    specials = fim + stops
    for i, token in enumerate(specials):
        del vocab[f"w{FIRST_SPECIAL + i}"]
        vocab[token] = FIRST_SPECIAL + i
    tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens(specials)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    return directory, {t: FIRST_SPECIAL + i for i, t in enumerate(specials)}


class RecordingEngine(AsyncEngine):
    """The real async engine, also recording the prompt ids of every request it is given."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__(engine)
        self.prompts: list[list[int]] = []

    async def generate(self, request_id, prompt_token_ids, params):
        self.prompts.append(list(prompt_token_ids))
        async for out in super().generate(request_id, prompt_token_ids, params):
            yield out


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("fim-base") / "m")


@pytest.fixture(params=list(FAMILIES))
def service(request, base_model, tmp_path):
    path, ids = fim_model(base_model, tmp_path / "m", request.param)
    engine = RecordingEngine(LLMEngine(EngineConfig(model=str(path), kv_cache_memory=8 << 20)))
    yield request.param, ids, CompletionService(engine, [MODEL])
    engine.shutdown()


def complete(service, **fields):
    return asyncio.run(service.complete(parse_completion_request({"model": MODEL, **fields})))


def stream(service, **fields):
    async def collect():
        chunks = await service.stream(parse_completion_request({"model": MODEL, "stream": True, **fields}))
        return [c async for c in chunks]
    return asyncio.run(collect())


def test_the_engine_receives_the_family_prompt(service):
    family, ids, svc = service
    fim, stops, bos = FAMILIES[family]
    data = complete(svc, prompt="w10 w11 w12", suffix="w20 w21", max_tokens=3, temperature=0)
    prefix, suffix = [10, 11, 12], [20, 21]
    lead = [0] if bos else []
    if family == "codestral":
        expected = lead + [ids["[SUFFIX]"]] + suffix + [ids["[PREFIX]"]] + prefix
    else:
        expected = lead + [ids[fim[0]]] + prefix + [ids[fim[1]]] + suffix + [ids[fim[2]]]
    assert svc.engine.prompts == [expected]
    assert data["usage"]["prompt_tokens"] == len(expected)
    assert svc.supports_suffix


def test_generation_stops_at_the_family_end_token(service):
    family, ids, svc = service
    _, stops, _ = FAMILIES[family]
    if not stops:
        pytest.skip("this family ends the middle with the end-of-sequence token")
    stop_id = ids[stops[0]]
    data = complete(svc, prompt="w10", suffix="w20", max_tokens=8, logit_bias={str(stop_id): 100}, logprobs=0)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == ""
    assert choice["logprobs"]["tokens"] == [stops[0]]


def test_echo_stream_stop_and_n_work_with_suffix(service):
    _, _, svc = service
    common = dict(prompt="w10 w11", suffix="w30", max_tokens=6, temperature=0, logit_bias={"1": -100})
    plain = complete(svc, **common)["choices"][0]["text"]
    echoed = complete(svc, echo=True, logprobs=1, **common)["choices"][0]
    assert echoed["text"] == "w10 w11" + plain
    assert echoed["logprobs"]["tokens"][:2] == ["w10", "w11"]
    chunks = stream(svc, **common)
    assert "".join(c["text"] for ch in chunks for c in ch["choices"]) == plain
    n = complete(svc, n=2, **{**common, "temperature": 1.0, "seed": 3})
    assert [c["index"] for c in n["choices"]] == [0, 1]
    best = complete(svc, n=1, best_of=3, **{**common, "temperature": 1.0, "seed": 3})
    assert len(best["choices"]) == 1 and best["usage"]["completion_tokens"] == 18
    if len(plain.split()) > 2:
        word = plain.split()[2]
        stopped = complete(svc, stop=[word], **common)["choices"][0]
        assert stopped["finish_reason"] == "stop" and stopped["text"] == plain[:plain.index(word)]


def test_a_model_without_fim_tokens_refuses_suffix(base_model):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=str(base_model), kv_cache_memory=8 << 20)))
    try:
        svc = CompletionService(engine, [MODEL])
        assert not svc.supports_suffix
        with pytest.raises(APIError) as info:
            complete(svc, prompt="w10", suffix="w20")
        assert info.value.status == 400 and info.value.param == "suffix" and "cannot insert" in info.value.message
    finally:
        engine.shutdown()
