"""Every rope scaling against transformers' own: frequencies, attention factor, and the cos/sin its rotary
module produces, for real-model-like configs built through our model classes (config dict -> rotary).

Length-dependent kinds are checked where our one-time choice must equal transformers' per-length one:
longrope's short factors within the original length and long ones beyond it, dynamic NTK at a grown length.
The torch-free `RopeFrequencies` must give the torch module's cos/sin bit for bit, and import no torch.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from textcomplete.models.layers import RotaryEmbedding
from textcomplete.models.llama import LlamaForCausalLM, rope_settings
from textcomplete.models.phi3 import Phi3ForCausalLM
from textcomplete.models.rope import RopeFrequencies

ROOT = Path(__file__).resolve().parents[2]


def llama_config(rope, max_positions: int = 8192, head_dim: int = 128, theta: float = 500000.0):
    return tf.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=head_dim, intermediate_size=64, num_hidden_layers=1, vocab_size=32,
                          max_position_embeddings=max_positions, rope_theta=theta, rope_scaling=rope)


def phi3_config(partial: float, head_dim: int = 96, original: int = 4096, max_positions: int = 131072):
    rotary_pairs = int(head_dim * partial) // 2
    rng = random.Random(rotary_pairs)
    long = [1.0 + 40 * rng.random() for _ in range(rotary_pairs)]
    short = [1.0 + 0.5 * rng.random() for _ in range(rotary_pairs)]
    return tf.Phi3Config(hidden_size=head_dim * 4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, num_hidden_layers=1, vocab_size=32, partial_rotary_factor=partial,
                         max_position_embeddings=max_positions, original_max_position_embeddings=original,
                         rope_scaling={"type": "longrope", "long_factor": long, "short_factor": short})


def our_rotary(config, context: int | None = None) -> RotaryEmbedding:
    """The rotary of our model class for `config`, serving contexts of `context` tokens."""
    cls = Phi3ForCausalLM if config.model_type == "phi3" else LlamaForCausalLM
    with torch.device("meta"):
        rotary = cls(config.to_dict()).rotary
    if context is not None:
        rotary.set_context_length(context)
    return rotary


def reference_module(config) -> type:
    if config.model_type == "phi3":
        return tf.models.phi3.modeling_phi3.Phi3RotaryEmbedding
    return tf.models.llama.modeling_llama.LlamaRotaryEmbedding


def reference_cos_sin(config, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' rotary module over positions 0..length-1 (it chooses by that length): [length, rot] each."""
    module = reference_module(config)(config)
    positions = torch.arange(length)[None, :]
    cos, sin = module(torch.zeros(1, length, 8), positions)
    return cos[0], sin[0]


def assert_matches(config, context: int, reference_len: int | None = None) -> RotaryEmbedding:
    """Ours at `context` equals transformers' init function at that length and its module's cos/sin."""
    kind = config.rope_parameters["rope_type"]
    rotary = our_rotary(config, context)
    init = ROPE_INIT_FUNCTIONS.get(kind, reference_module(config).compute_default_rope_parameters)
    inv_freq, attention = init(config, device="cpu", seq_len=context)
    torch.testing.assert_close(rotary.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(attention, rel=1e-7)

    length = reference_len or context
    cos_ref, sin_ref = reference_cos_sin(config, length)
    cos, signed_sin = (t[:, 0] for t in rotary.cos_sin(torch.arange(length), torch.float32))
    half = rotary.rotary_dim // 2
    drift = frequency_drift(rotary, inv_freq, length)
    assert_within(cos, cos_ref, 2e-6 + drift)
    assert_within(torch.cat((-signed_sin[:, :half], signed_sin[:, half:]), -1), sin_ref, 2e-6 + drift)
    return rotary


def frequency_drift(rotary: RotaryEmbedding, reference: torch.Tensor, length: int) -> torch.Tensor:
    """[length, rotary_dim]: how far cos and sin may move where our frequency differs from the reference's.

    Our powers base ** (2i / dim) are correctly rounded; torch's float32 pow, which transformers uses, is up to
    0.57 ulp off, so a pair's frequency may differ by an ulp (bounded by the rtol above). Its float32 angle at
    position p then differs by p times that plus a rounding step of the angle; other pairs' angles are equal.
    """
    positions = torch.arange(length)[:, None]
    angles = positions.float() * rotary.inv_freq
    step = torch.nextafter(angles, torch.tensor(float("inf"))) - angles
    moved = rotary.inv_freq != reference
    drift = (positions * (rotary.inv_freq - reference).abs() + step) * moved * rotary.attention_scaling
    return torch.cat((drift, drift), dim=-1).double()


def assert_within(got: torch.Tensor, want: torch.Tensor, tolerance: torch.Tensor) -> None:
    excess = (got.double() - want.double()).abs() - tolerance
    assert excess.max() <= 0, f"{(excess > 0).sum()} of {excess.numel()} values beyond the tolerance, by up to " \
                              f"{excess.max():.3g}, first at {tuple(int(i) for i in (excess > 0).nonzero()[0])}"


def test_default_and_linear():
    assert_matches(llama_config(None), 8192)
    assert_matches(llama_config({"rope_type": "linear", "factor": 4.0}), 8192)


def test_llama3():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    assert_matches(llama_config(rope, max_positions=131072), 131072, reference_len=20000)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},   # Qwen2.5 / Qwen3 style
    {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
     "original_max_position_embeddings": 4096},                                       # gpt-oss style
    {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16,
     "original_max_position_embeddings": 4096},                                       # DeepSeek style
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.25, "original_max_position_embeddings": 8192},
])
def test_yarn(rope):
    rotary = assert_matches(llama_config(rope, max_positions=32768, theta=1000000.0), 32768, reference_len=5000)
    assert rotary.attention_scaling != 1.0   # its mscale reaches cos and sin


def test_yarn_without_an_original_length_takes_max_position_embeddings():
    config = llama_config({"rope_type": "yarn", "factor": 4.0}, max_positions=4096)
    rotary = assert_matches(config, 4096)
    assert rotary.scaling["original_max_position_embeddings"] == 4096


@pytest.mark.parametrize("partial,head_dim", [(1.0, 96), (0.75, 128)])   # Phi-3.5-mini, Phi-4-mini
def test_longrope_short_factors_within_the_original_length(partial, head_dim):
    config = phi3_config(partial, head_dim)
    rotary = assert_matches(config, 4096)     # transformers too uses the short factors up to 4096 tokens
    assert rotary.rotary_dim == int(head_dim * partial)
    assert rotary.attention_scaling == pytest.approx(1.19023, abs=1e-5)   # sqrt(1 + ln 32 / ln 4096)


@pytest.mark.parametrize("partial,head_dim", [(1.0, 96), (0.75, 128)])
def test_longrope_long_factors_beyond_the_original_length(partial, head_dim):
    config = phi3_config(partial, head_dim)
    long = assert_matches(config, 131072, reference_len=4097)   # 4097 positions: transformers' long set
    short = our_rotary(config, 4096)
    assert not torch.allclose(long.inv_freq, short.inv_freq)     # the choice is real
    assert our_rotary(config, 4097).inv_freq.equal(long.inv_freq)


def test_longrope_factor_list_must_fit_the_rotary_dim():
    config = phi3_config(1.0).to_dict()
    config["rope_parameters"]["long_factor"] = config["rope_parameters"]["long_factor"][:-1]
    with pytest.raises(ValueError, match="long_factor has 47 values; the rotary dimension 96 needs 48"):
        with torch.device("meta"):
            Phi3ForCausalLM(config)


def test_dynamic_ntk_within_and_beyond_the_original_length():
    config = llama_config({"rope_type": "dynamic", "factor": 2.0}, max_positions=2048, theta=10000.0)
    within = assert_matches(config, 2048)
    assert within.inv_freq.equal(our_rotary(llama_config(None, 2048, theta=10000.0)).inv_freq)
    grown = assert_matches(config, 5000)      # transformers' dynamic base at 5000 tokens
    assert (grown.inv_freq[1:] < within.inv_freq[1:]).all()


def test_old_and_new_config_forms_agree():
    base = dict(hidden_size=256, num_attention_heads=2, head_dim=128, max_position_embeddings=2048, rope_theta=1e4)
    old = RotaryEmbedding(128, 2048, *rope_settings({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}}))
    new = RotaryEmbedding(128, 2048, *rope_settings(
        {**base, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}))
    for rotary in (old, new):
        rotary.set_context_length(4096)
    assert old.kind == new.kind == "dynamic" and old.inv_freq.equal(new.inv_freq)
    assert rope_settings({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}})[1] is None


def test_unknown_kind_names_the_supported_ones():
    with pytest.raises(ValueError, match=r"'mrope' is not supported \(supported: default, linear, llama3, yarn, "
                                         r"longrope, dynamic\)"):
        RotaryEmbedding(64, 2048, 10000.0, {"rope_type": "mrope"})


def test_yarn_stretches_the_served_context_and_gguf_keeps_it(tmp_path):
    """Qwen2.5's YaRN (factor 4 over 32768) serves 131072 tokens, from its HF config and from its GGUF keys."""
    from textcomplete.models.llama import LlamaForCausalLM
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1, "vocab_size": 10,
           "max_position_embeddings": 32768, "rope_theta": 1e6,
           "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}
    assert LlamaForCausalLM.spec_from_config(cfg).max_position_embeddings == 131072
    assert LlamaForCausalLM.spec_from_config({**cfg, "rope_scaling": None}).max_position_embeddings == 32768


def _pairs_of(count: int, low: float, high: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [low + (high - low) * rng.random() for _ in range(count)]


EVERY_KIND = {   # rotary dim 96 (48 pairs), base 1e6, max_position_embeddings 32768; as real configs write them
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn-deepseek": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096},
    "longrope": {"type": "longrope", "long_factor": _pairs_of(48, 1.0, 41.0, 0),
                 "short_factor": _pairs_of(48, 1.0, 1.5, 1), "original_max_position_embeddings": 4096},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "gguf-frequency-factors": {"rope_type": "default", "frequency_factors": _pairs_of(48, 1.0, 8.0, 2)},
}


@pytest.mark.parametrize("kind", EVERY_KIND)
@pytest.mark.parametrize("context", [4096, 65536])   # longrope's short and long factors, dynamic's grown base
def test_numpy_cos_sin_equals_the_torch_module(kind, context):
    """The serving path without torch rotates exactly as the torch models: same frequencies, same cos/sin bits."""
    rotary = RotaryEmbedding(96, 32768, 1e6, EVERY_KIND[kind])
    frequencies = RopeFrequencies(96, 32768, 1e6, EVERY_KIND[kind])
    rotary.set_context_length(context)
    frequencies.set_context_length(context)
    assert frequencies.inv_freq.dtype == np.float32 and frequencies.inv_freq.shape == (48,)
    np.testing.assert_array_equal(rotary.inv_freq.numpy(), frequencies.inv_freq)
    assert type(frequencies.attention_scaling) is float and frequencies.attention_scaling == rotary.attention_scaling

    positions = np.concatenate((np.arange(4100), np.arange(4100, context, 13)))
    want_cos, want_sin = (t[:, 0].numpy() for t in rotary.cos_sin(torch.from_numpy(positions), torch.float32))
    cos, signed_sin = frequencies.cos_sin(positions)
    assert cos.dtype == signed_sin.dtype == np.float32 and cos.shape == signed_sin.shape == (len(positions), 96)
    np.testing.assert_array_equal(cos, want_cos)
    np.testing.assert_array_equal(signed_sin, want_sin)


def test_the_numpy_frequencies_import_no_torch():
    code = "import sys, textcomplete.models.rope; assert 'torch' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
