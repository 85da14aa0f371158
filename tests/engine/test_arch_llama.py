"""The Llama layout's variants: Mistral's sliding window, and the rope scalings as GGUF files carry them.

Mistral's tiny model has a window (24 tokens) that ends inside a KV block (16 tokens), and its prompts are
several windows long, so a path that ignores the window or misplaces its edge gives different
log-probabilities; it is checked in every attention path, in HF and GGUF form.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.arch_parity import check_parity, make_engine, random_ids
from tests.engine.test_batching import mixed_params, random_prompts, tokens_of
from tests.engine.test_native_decode import kernels, native_calls  # noqa: F401 - fixtures
from tests.tiny_gguf import gguf_name, llama_cpp_permute, write_gguf
from tests.tiny_models import save_tiny_model, tiny_config_kwargs
from textcomplete.engine.sampling_params import SamplingParams

WINDOW = 24


def mistral_config(**overrides):
    import transformers as tf
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, sliding_window=WINDOW,
                    tie_word_embeddings=False)
    settings.update(overrides)
    return tf.MistralConfig(**tiny_config_kwargs(**settings))


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return save_tiny_model(mistral_config(), tmp_path_factory.mktemp("tiny-mistral"))


def write_llama_style_gguf(hf_dir, path, arch: str, extra: dict | None = None,
                           extra_tensors: dict | None = None) -> None:
    """hf_dir's Llama-layout weights as llama.cpp's converter writes them (q/k rows interleaved)."""
    import json
    cfg = json.loads((hf_dir / "config.json").read_text())
    metadata = {"block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
                "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
                "attention.head_count": cfg["num_attention_heads"],
                "attention.head_count_kv": cfg["num_key_value_heads"],
                "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
                "rope.freq_base": float(cfg["rope_parameters"]["rope_theta"]), **(extra or {})}
    tensors = {}
    for name, tensor in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        w = tensor.float().numpy()
        if "self_attn.q_proj" in name:
            w = llama_cpp_permute(w, cfg["num_attention_heads"])
        elif "self_attn.k_proj" in name:
            w = llama_cpp_permute(w, cfg["num_key_value_heads"])
        tensors[gguf_name(name)] = np.ascontiguousarray(w)
    write_gguf(path, arch, metadata, {**tensors, **(extra_tensors or {})})


def test_mistral_matches_transformers_beyond_the_window(mistral_dir):
    check_parity(mistral_dir, mistral_dir, prompt_len=4 * WINDOW)


def test_mistral_gguf_matches_transformers_beyond_the_window(mistral_dir, tmp_path):
    path = tmp_path / "mistral.gguf"
    write_llama_style_gguf(mistral_dir, path, "llama", {"attention.sliding_window": WINDOW})
    assert make_engine(path, backend="torch").loaded.config["sliding_window"] == WINDOW
    check_parity(path, mistral_dir, prompt_len=4 * WINDOW)


def test_the_window_changes_results(mistral_dir, tmp_path):
    """The same weights without a window score a long prompt differently: the tests above can fail."""
    unwindowed = save_tiny_model(mistral_config(sliding_window=None), tmp_path / "full")
    ids = random_ids(4 * WINDOW, seed=5)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    [a] = make_engine(mistral_dir).generate([ids], params)
    [b] = make_engine(unwindowed).generate([ids], params)
    first = [e.logprob for o in a for e in o.prompt_logprobs]
    second = [e.logprob for o in b for e in o.prompt_logprobs]
    assert first[:WINDOW - 1] == pytest.approx(second[:WINDOW - 1], abs=1e-5)
    assert max(abs(x - y) for x, y in zip(first, second)) > 1e-2


def test_native_decode_honours_the_window(mistral_dir, kernels, native_calls):  # noqa: F811
    prompts = random_prompts(9, seed=11, low=1, high=3 * WINDOW)
    params = [dataclasses.replace(mixed_params(i), logprobs=3) for i in range(9)]
    native = make_engine(mistral_dir, 64, enable_prefix_caching=False)
    plain = make_engine(mistral_dir, 64, enable_prefix_caching=False, native_decode=False)
    assert native.loaded.model.native_decode is not None
    assert native.loaded.model.native_decode.windows == [WINDOW, WINDOW]
    out_n, out_p = native.generate(prompts, params), plain.generate(prompts, params)
    assert native_calls and max(native_calls) > 1
    assert [tokens_of(o) for o in out_n] == [tokens_of(o) for o in out_p]
    got = torch.tensor([lp.logprob for outs in out_n for o in outs for lp in o.logprobs])
    want = torch.tensor([lp.logprob for outs in out_p for o in outs for lp in o.logprobs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_mistral_batch_invariance(mistral_dir):
    engine = make_engine(mistral_dir, 64)
    prompts = random_prompts(16, seed=1, high=3 * WINDOW)
    params = [mixed_params(i) for i in range(16)]
    alone = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    assert [tokens_of(outs) for outs in engine.generate(prompts, params)] == alone


def test_llama3_scaled_gguf_reads_its_rope_frequency_factors(tmp_path):
    """Llama 3.1/3.2 files carry their rope scaling as a `rope_freqs` tensor (one factor per rotary pair)."""
    import math

    import transformers as tf
    theta, old_len = 10000.0, 64
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": old_len, "rope_theta": theta}
    config = tf.LlamaConfig(**tiny_config_kwargs(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rope_parameters=scaling, tie_word_embeddings=False))
    hf_dir = save_tiny_model(config, tmp_path / "llama31")
    factors = []   # as llama.cpp's converter computes them from the config
    for freq in (1.0 / (theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))).tolist():
        wavelen = 2 * math.pi / freq
        smooth = (old_len / wavelen - 1.0) / (4.0 - 1.0)
        factors.append(1.0 if wavelen < old_len / 4.0 else 8.0 if wavelen > old_len
                       else 1 / ((1 - smooth) / 8.0 + smooth))
    assert len(set(factors)) > 2   # some pairs kept, some scaled, some blended
    path = tmp_path / "llama31.gguf"
    write_llama_style_gguf(hf_dir, path, "llama",
                           extra_tensors={"rope_freqs.weight": np.array(factors, dtype=np.float32)})
    check_parity(path, hf_dir, prompt_len=80)


def test_yarn_gguf_keys_give_the_hf_scaling(tmp_path):
    """Qwen2.5-style YaRN, written with the converter's rope.scaling.* keys, reads back as the HF scaling."""
    import transformers as tf
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
               "beta_fast": 16.0, "beta_slow": 2.0, "rope_theta": 10000.0}
    config = tf.LlamaConfig(**tiny_config_kwargs(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, rope_parameters=scaling, tie_word_embeddings=False))
    hf_dir = save_tiny_model(config, tmp_path / "yarn")
    path = tmp_path / "yarn.gguf"
    write_llama_style_gguf(hf_dir, path, "llama", {
        "rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32,
        "rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_beta_slow": 2.0})
    assert make_engine(path).max_model_len == 128
    check_parity(path, hf_dir, prompt_len=80)
