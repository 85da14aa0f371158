"""The Phi-3 family and the length-dependent rope scalings, against transformers, in HF and GGUF form.

The tiny Phi-3 has Phi-4-mini's shape in miniature: fused q/k/v and gate/up, 3/4 of each head rotated,
LongRoPE with an original length of 64 in a 256-token model. Served at 256 tokens it uses the long factors
(as transformers does beyond 64 tokens), served at 64 the short ones (as transformers does within 64).
A second one has a sliding window and tied embeddings, like Phi-3-mini-4k's window. Tiny Llamas carry the
YaRN and dynamic NTK scalings.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.arch_parity import check_parity, make_engine, random_ids
from tests.engine.test_batching import mixed_params, random_prompts, tokens_of
from tests.engine.test_native_decode import kernels, native_calls  # noqa: F401 - fixtures
from tests.tiny_gguf import write_gguf
from tests.tiny_models import save_tiny_model, tiny_config_kwargs
from textcomplete.engine.sampling_params import SamplingParams

ORIGINAL, MAX_POSITIONS, WINDOW = 64, 256, 24
ROTARY_PAIRS = 6   # head_dim 16, partial_rotary_factor 0.75: 12 rotated dims
LONG = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]
SHORT = [1.0, 1.05, 1.1, 1.2, 1.3, 1.45]
_GGUF_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
               "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def phi3_config(**overrides):
    import transformers as tf
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, partial_rotary_factor=0.75, max_position_embeddings=MAX_POSITIONS,
                    original_max_position_embeddings=ORIGINAL, pad_token_id=None, tie_word_embeddings=False,
                    rope_scaling={"type": "longrope", "long_factor": LONG, "short_factor": SHORT})
    settings.update(overrides)
    return tf.Phi3Config(**tiny_config_kwargs(**settings))


def llama_config(rope: dict):
    import transformers as tf
    return tf.LlamaConfig(**tiny_config_kwargs(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, rope_scaling=rope))


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    return save_tiny_model(phi3_config(), tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="module")
def windowed_dir(tmp_path_factory):
    config = phi3_config(rope_scaling=None, partial_rotary_factor=0.5, sliding_window=WINDOW,
                         tie_word_embeddings=True)
    return save_tiny_model(config, tmp_path_factory.mktemp("tiny-phi3-window"))


def write_phi3_gguf(hf_dir, path) -> None:
    """hf_dir's Phi-3 as llama.cpp's converter writes it: fused tensors as they are, rope factors as tensors."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    rope = cfg["rope_parameters"]
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    original = cfg["original_max_position_embeddings"]
    metadata = {"block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
                "rope.scaling.original_context_length": original, "embedding_length": hidden,
                "feed_forward_length": cfg["intermediate_size"], "attention.head_count": heads,
                "attention.head_count_kv": cfg["num_key_value_heads"],
                "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
                "rope.dimension_count": int(rope["partial_rotary_factor"] * hidden) // heads,
                "rope.freq_base": float(rope["rope_theta"]), "attention.sliding_window": cfg["sliding_window"] or 0}
    tensors = {}
    for name, tensor in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            _, _, layer, part = base.split(".", 3)
            tensors[f"blk.{layer}.{_GGUF_NAMES[part]}.{kind}"] = tensor.float().numpy()
        else:
            tensors[f"{_GGUF_NAMES[base]}.{kind}"] = tensor.float().numpy()
    if rope.get("long_factor"):
        scale = cfg["max_position_embeddings"] / original
        metadata["rope.scaling.attn_factor"] = math.sqrt(1 + math.log(scale) / math.log(original))
        tensors["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        tensors["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    write_gguf(path, "phi3", metadata, tensors)


def test_phi3_long_factors_match_transformers(phi3_dir):
    """Served at 256 tokens: long factors, as transformers uses for these 90-token prompts."""
    rotary = make_engine(phi3_dir).loaded.model.rotary
    assert rotary.rotary_dim == 2 * ROTARY_PAIRS and rotary.attention_scaling == pytest.approx(math.sqrt(4 / 3))
    torch.testing.assert_close(rotary.inv_freq, 1 / (torch.tensor(LONG) * 10000 ** (torch.arange(6) / 6)))
    check_parity(phi3_dir, phi3_dir, prompt_len=90)


def test_phi3_short_factors_match_transformers(phi3_dir):
    """Served at 64 tokens: short factors; every scored sequence stays within 64 tokens, as transformers's do."""
    check_parity(phi3_dir, phi3_dir, prompt_len=40, decode_steps=8, max_model_len=ORIGINAL)


def test_the_served_context_chooses_the_factors(phi3_dir):
    """The same prompt scores differently served at 64 and at 256 tokens: the parity tests above can fail."""
    ids = random_ids(40, seed=3)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    [short] = make_engine(phi3_dir, max_model_len=ORIGINAL).generate([ids], params)
    [long] = make_engine(phi3_dir).generate([ids], params)
    first = [e.logprob for o in short for e in o.prompt_logprobs]
    second = [e.logprob for o in long for e in o.prompt_logprobs]
    assert max(abs(x - y) for x, y in zip(first, second)) > 1e-2


def test_phi3_gguf_matches_transformers(phi3_dir, tmp_path):
    path = tmp_path / "phi3.gguf"
    write_phi3_gguf(phi3_dir, path)
    config = make_engine(path).loaded.config
    assert config["rope_scaling"]["long_factor"] == pytest.approx(LONG)
    assert config["rope_scaling"]["short_factor"] == pytest.approx(SHORT)
    assert config["partial_rotary_factor"] == 0.75 and "sliding_window" not in config
    check_parity(path, phi3_dir, prompt_len=90)
    check_parity(path, phi3_dir, prompt_len=40, decode_steps=8, max_model_len=ORIGINAL)


def test_phi3_window_and_tied_embeddings_match_transformers(windowed_dir, tmp_path):
    engine = make_engine(windowed_dir)
    assert [layer.self_attn.attn.sliding_window for layer in engine.loaded.model.model.layers] == [WINDOW] * 2
    assert engine.loaded.model.rotary.rotary_dim == 8
    check_parity(windowed_dir, windowed_dir, prompt_len=4 * WINDOW)
    path = tmp_path / "phi3-window.gguf"
    write_phi3_gguf(windowed_dir, path)
    assert make_engine(path).loaded.config["sliding_window"] == WINDOW
    check_parity(path, windowed_dir, prompt_len=4 * WINDOW)


def test_phi3_native_decode_matches_pytorch_layers(phi3_dir, kernels, native_calls):  # noqa: F811
    prompts = random_prompts(9, seed=11, low=1, high=90)
    params = [dataclasses.replace(mixed_params(i), logprobs=3) for i in range(9)]
    native = make_engine(phi3_dir, 64, enable_prefix_caching=False)
    plain = make_engine(phi3_dir, 64, enable_prefix_caching=False, native_decode=False)
    assert native.loaded.model.native_decode is not None
    assert native.loaded.model.native_decode.rotary_dim == 2 * ROTARY_PAIRS
    out_n, out_p = native.generate(prompts, params), plain.generate(prompts, params)
    assert native_calls and max(native_calls) > 1
    assert [tokens_of(o) for o in out_n] == [tokens_of(o) for o in out_p]
    got = torch.tensor([lp.logprob for outs in out_n for o in outs for lp in o.logprobs])
    want = torch.tensor([lp.logprob for outs in out_p for o in outs for lp in o.logprobs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_phi3_batch_invariance(phi3_dir):
    engine = make_engine(phi3_dir, 64)
    prompts = random_prompts(16, seed=1, high=90)
    params = [mixed_params(i) for i in range(16)]
    alone = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    assert [tokens_of(outs) for outs in engine.generate(prompts, params)] == alone


def test_llama_yarn_matches_transformers(tmp_path):
    config = llama_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL})
    directory = save_tiny_model(config, tmp_path / "yarn")
    assert make_engine(directory).loaded.model.rotary.attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    check_parity(directory, directory, prompt_len=90)


def test_llama_dynamic_ntk_matches_transformers(tmp_path):
    """Within the original length dynamic NTK is plain rope, end to end; a longer served context gets
    transformers' dynamic frequencies at that length."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = llama_config({"rope_type": "dynamic", "factor": 2.0})
    directory = save_tiny_model(config, tmp_path / "dynamic")
    check_parity(directory, directory, prompt_len=90)
    rotary = make_engine(directory).loaded.model.rotary
    for length in (MAX_POSITIONS, 3 * MAX_POSITIONS + 5):
        rotary.set_context_length(length)
        inv_freq, attention = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=length)
        torch.testing.assert_close(rotary.inv_freq, inv_freq, rtol=1e-6, atol=0)
        assert attention == rotary.attention_scaling == 1.0
    assert not torch.allclose(rotary.inv_freq, 1 / 10000 ** (torch.arange(8) / 8))
