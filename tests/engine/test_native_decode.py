"""The fused native decode layers compute what the PyTorch layers compute.

Activations are float32 on both paths, so outputs and logprobs agree to float rounding (float32 weights
here; weights in their stored GGUF formats in tests/engine/test_stored_weights.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.engine.test_batching import mixed_params, random_prompts, tiny_engine, tokens_of
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.kernels import decode_layers
from textcomplete.models import llama


@pytest.fixture(scope="module")
def kernels():
    built = decode_layers()
    assert built is not None, "the native decode kernels did not build (see the log for the compiler error)"
    return built


@pytest.fixture
def native_calls(monkeypatch):
    """Counts decode steps that went through the native layers."""
    calls = []
    original = llama.NativeDecode.__call__

    def counted(self, x, cos_sin, meta):
        calls.append(x.shape[0])
        return original(self, x, cos_sin, meta)
    monkeypatch.setattr(llama.NativeDecode, "__call__", counted)
    return calls


def _run(engine, prompts, params):
    outputs = engine.generate(prompts, params)
    return [tokens_of(outs) for outs in outputs], [[lp for o in outs for lp in o.logprobs] for outs in outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_float32_native_decode_matches_pytorch_layers(tiny_model_dir, kernels, native_calls, arch):
    prompts = random_prompts(9, seed=11, low=1, high=70)   # uneven lengths: padded key rows in the batch
    params = [mixed_params(i) for i in range(9)]
    params = [dataclasses.replace(p, logprobs=3) for p in params]
    native = tiny_engine(tiny_model_dir, arch, enable_prefix_caching=False)
    plain = tiny_engine(tiny_model_dir, arch, enable_prefix_caching=False, native_decode=False)
    assert native.loaded.model.native_decode is not None and plain.loaded.model.native_decode is None
    tokens_n, logprobs_n = _run(native, prompts, params)
    calls_before = len(native_calls)
    tokens_p, logprobs_p = _run(plain, prompts, params)
    assert len(native_calls) == calls_before, "the engine without native decode used it"
    assert calls_before > 0 and max(native_calls) > 1, "batched decode steps never reached the native layers"
    assert tokens_n == tokens_p
    for a, b in zip(logprobs_n, logprobs_p):   # the sampled token's logprob and the top 3
        assert [[t for t, _ in x.top] for x in a] == [[t for t, _ in y.top] for y in b]
        got = torch.tensor([[x.logprob, *(lp for _, lp in x.top)] for x in a])
        want = torch.tensor([[y.logprob, *(lp for _, lp in y.top)] for y in b])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kv_cache_dtype,kv_heads", [("float32", 2), ("float16", 2), ("float16", 4), ("bfloat16", 4)])
def test_long_prompts_decode_natively_as_pytorch_does(tiny_model_dir, tmp_path, kernels, native_calls,
                                                      kv_cache_dtype, kv_heads):
    """Keys in several of the native attention's chunks and tiles, the last ones partly filled. With two query
    heads a KV head, a 16-bit cache is read through a float32 tile; with one, and a float32 cache, as stored.
    The prompts' attention differs too (the native prompt attention against PyTorch's, equally close to float64:
    tests/engine/test_prompt_attention.py). With a float32 cache the paths then agree within 6e-6; a 16-bit
    cache rounds their K/V, and where the two float32 values straddle a rounding boundary the stored ones differ
    by a 16-bit step, which later layers carry: up to 1.6e-4 apart over these prompts and 20 greedy tokens."""
    directory = tiny_model_dir("llama")
    if kv_heads != 2:
        from tests.tiny_models import make_tiny_model
        directory = make_tiny_model("llama", tmp_path / "mha", hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
                                    rms_norm_eps=1e-5, tie_word_embeddings=False)
    prompts = random_prompts(3, seed=5, low=150, high=340)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
    engines = [tiny_engine(lambda _: directory, enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype,
                           native_decode=native) for native in (True, False)]
    (tokens_n, logprobs_n), (tokens_p, logprobs_p) = (_run(e, prompts, params) for e in engines)
    assert native_calls and max(native_calls) == 3
    assert tokens_n == tokens_p
    for a, b in zip(logprobs_n, logprobs_p):
        got = torch.tensor([[x.logprob, *(lp for _, lp in x.top)] for x in a])
        want = torch.tensor([[y.logprob, *(lp for _, lp in y.top)] for y in b])
        torch.testing.assert_close(got, want, atol=1e-4 if kv_cache_dtype == "float32" else 5e-4, rtol=0)


def test_a_batch_of_one_token_prompts_decodes_natively(tiny_model_dir, kernels, native_calls):
    """Their first decode step reads one key each: the narrowest key table the runner builds."""
    native = tiny_engine(tiny_model_dir, enable_prefix_caching=False)
    plain = tiny_engine(tiny_model_dir, enable_prefix_caching=False, native_decode=False)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    prompts = [[7], [8], [9], [10]]
    assert _run(native, prompts, params)[0] == _run(plain, prompts, params)[0]
    assert 4 in native_calls


def test_an_engine_can_turn_native_decode_off(tiny_model_dir, native_calls):
    engine = tiny_engine(tiny_model_dir, native_decode=False)
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0))
    assert engine.loaded.model.native_decode is None and native_calls == []


def test_odd_shapes_decode_natively(tmp_path, kernels, native_calls):
    """Widths that are multiples of no vector length: hidden 40, five heads sharing one KV head of dim 8,
    an FFN of 72; ragged prompts from 1 to 37 tokens."""
    from tests.tiny_models import make_tiny_model
    directory = make_tiny_model("llama", tmp_path / "odd", hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                                num_attention_heads=5, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-5,
                                tie_word_embeddings=False)
    prompts = [[5], *random_prompts(6, seed=5, low=2, high=37)]
    params = [dataclasses.replace(mixed_params(i), max_tokens=9, logprobs=2) for i in range(len(prompts))]
    native = tiny_engine(lambda _: directory, enable_prefix_caching=False)
    plain = tiny_engine(lambda _: directory, enable_prefix_caching=False, native_decode=False)
    tokens_n, logprobs_n = _run(native, prompts, params)
    assert native_calls and max(native_calls) == len(prompts)
    tokens_p, logprobs_p = _run(plain, prompts, params)
    assert tokens_n == tokens_p
    for a, b in zip(logprobs_n, logprobs_p):
        torch.testing.assert_close(torch.tensor([x.logprob for x in a]), torch.tensor([y.logprob for y in b]),
                                   atol=1e-4, rtol=0)


def test_decoding_into_the_last_kv_block(tiny_model_dir, kernels, monkeypatch):
    """A cache filled to its last block: the largest slot indices reach the native layers (and are in range)."""
    highest = []
    original = llama.NativeDecode.__call__

    def watched(self, x, cos_sin, meta):
        highest.append(int(meta.decode_key_slots.max()))
        return original(self, x, cos_sin, meta)
    monkeypatch.setattr(llama.NativeDecode, "__call__", watched)
    blocks = 12
    per_block = 2 * 2 * 16 * 2 * 16 * 4    # K and V x layers x block size x kv heads x head dim x float32
    settings = dict(kv_cache_memory=blocks * per_block, enable_prefix_caching=False)
    native = tiny_engine(tiny_model_dir, **settings)
    plain = tiny_engine(tiny_model_dir, native_decode=False, **settings)
    assert native.allocator.num_blocks == blocks
    prompts = random_prompts(4, seed=9, low=20, high=30)   # with 16 new tokens each: 3 blocks each, all 12
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert _run(native, prompts, params)[0] == _run(plain, prompts, params)[0]
    assert max(highest) >= (blocks - 1) * 16, "the last block was never read"
