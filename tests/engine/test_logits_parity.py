"""Prompt log-probabilities from the engine match Hugging Face transformers on the same weights."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import ARCHS
from tests.tiny_models import VOCAB, reference_logprobs
from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.sampling_params import SamplingParams

TOLERANCE = 1e-3


def engine_prompt_logprobs(engine: LLMEngine, ids: list[int], k: int = 5) -> list:
    [outputs] = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=k))
    entries = [e for out in outputs for e in out.prompt_logprobs]
    assert len(entries) == len(ids) - 1
    return entries


def assert_matches_reference(entries, ref: torch.Tensor, ids: list[int]) -> None:
    for pos, entry in enumerate(entries, start=1):
        assert entry.token_id == ids[pos]
        expected = ref[pos - 1, ids[pos]].item()
        assert abs(entry.logprob - expected) < TOLERANCE, (pos, entry.logprob, expected)
        for token, logprob in entry.top:
            assert abs(logprob - ref[pos - 1, token].item()) < TOLERANCE
        assert entry.top[0][1] == pytest.approx(ref[pos - 1].max().item(), abs=TOLERANCE)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [512, 7], ids=["whole-prompt", "chunked-prefill"])
def test_tiny_model_prompt_logprobs_match_transformers(tiny_model_dir, arch, chunk):
    path = tiny_model_dir(arch)
    engine = LLMEngine(EngineConfig(model=str(path), max_num_batched_tokens=chunk, kv_cache_memory=8 << 20))
    ids = [random.Random(arch).randrange(2, VOCAB) for _ in range(60)]
    assert_matches_reference(engine_prompt_logprobs(engine, ids), reference_logprobs(path, ids), ids)


@pytest.mark.slow
def test_smollm2_gguf_prompt_logprobs_match_transformers(smollm_engine):
    import transformers as tf
    path = smollm_engine.model_path
    text = "The capital of France is Paris. It is known for the Eiffel Tower, 1889, and café culture.\n"
    ids = smollm_engine.tokenizer.encode(text * 3)
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert_matches_reference(engine_prompt_logprobs(smollm_engine, ids), ref, ids)


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_matches_transformers(smollm_engine):
    import transformers as tf
    path = smollm_engine.model_path
    reference = tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in ["Hello world", "  leading spaces\n\nand 12345 digits", "café ünïcödé 日本語 🙂",
                 "<|im_start|>user\nhi<|im_end|>", "x=1;y=22;z=333", "don't I'll we've"]:
        ours = smollm_engine.tokenizer.encode(text)
        assert ours == reference(text)["input_ids"], text
        assert smollm_engine.tokenizer.decode(ours) == text
