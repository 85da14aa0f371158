"""Gemma, Gemma 2 and Gemma 3: exact against transformers in HF and GGUF form, in every attention path.

The tiny models' head size (32) is not hidden / heads (16). Gemma 2's soft-caps (5 on scores, 3 on logits) are
small enough to bite; Gemma 2 and 3 mix sliding layers (window 24, which ends inside a 16-token KV block) with
global ones, and Gemma 3's sliding layers rotate on a base far from the global layers' linearly scaled one.
Prompts run four windows long. The GGUF files are written as llama.cpp's converter writes them (norms + 1).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.arch_parity import check_parity, make_engine, random_ids
from tests.engine.test_batching import mixed_params, random_prompts, tokens_of
from tests.tiny_gguf import write_gguf
from tests.tiny_models import save_tiny_model, tiny_config_kwargs
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.models.gguf_file import GGUFFile

WINDOW = 24
PROMPT = 4 * WINDOW
S, F = "sliding_attention", "full_attention"
GEMMA3_LAYERS = [S, S, F, S]
GEMMA3_ROPE = {S: {"rope_type": "default", "rope_theta": 10000.0},
               F: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0}}

# HF parameter-name parts -> GGUF ones, per llama.cpp's tensor_mapping.py (Gemma 1 has Llama's two norms).
_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}
_NAMES_GEMMA = {**_NAMES, "post_attention_layernorm": "ffn_norm"}
_NAMES_SANDWICH = {**_NAMES, "post_attention_layernorm": "post_attention_norm",
                   "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gemma_config(generation: str, **overrides):
    import transformers as tf
    settings = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, max_position_embeddings=512)
    if generation == "gemma":
        settings.update(num_hidden_layers=2)
    elif generation == "gemma2":   # layer_types from the default period: sliding, global, sliding
        settings.update(num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=32,
                        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    else:
        settings.update(num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=32,
                        layer_types=GEMMA3_LAYERS, rope_parameters=json.loads(json.dumps(GEMMA3_ROPE)))
    settings.update(overrides)
    cls = {"gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3": tf.Gemma3TextConfig}[generation]
    return cls(**tiny_config_kwargs(**settings))


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory):
    """generation -> directory of its tiny model, each built once."""
    built = {}

    def get(generation: str):
        if generation not in built:
            built[generation] = save_tiny_model(gemma_config(generation), tmp_path_factory.mktemp(generation))
        return built[generation]
    return get


def write_gemma_gguf(hf_dir, path, arch: str) -> None:
    """hf_dir's weights and settings as llama.cpp's converter writes them: q/k rows in order, 1 added to every
    norm weight, no lm_head (tied). The sliding pattern goes in as per-layer flags, which llama.cpp reads."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    metadata = {"block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
                "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
                "attention.head_count": cfg["num_attention_heads"],
                "attention.head_count_kv": cfg["num_key_value_heads"],
                "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
                "attention.key_length": cfg["head_dim"], "attention.value_length": cfg["head_dim"]}
    if arch == "gemma2":
        metadata.update({"attn_logit_softcapping": float(cfg["attn_logit_softcapping"]),
                         "final_logit_softcapping": float(cfg["final_logit_softcapping"]),
                         "attention.sliding_window": cfg["sliding_window"]})
    if arch == "gemma3":
        full = cfg["rope_parameters"][F]
        metadata.update({"rope.freq_base": float(full["rope_theta"]),
                         "attention.sliding_window": cfg["sliding_window"], "rope.scaling.type": full["rope_type"],
                         "rope.scaling.factor": float(full["factor"]),
                         "attention.sliding_window_pattern": [kind == S for kind in cfg["layer_types"]]})
    table = _NAMES_GEMMA if arch == "gemma" else _NAMES_SANDWICH
    tensors = {}
    for name, tensor in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        if name == "lm_head.weight":
            continue
        w = tensor.float().numpy()
        if name.endswith("norm.weight"):
            w = w + 1.0
        tensors[_gguf_name(name, table)] = np.ascontiguousarray(w)
    write_gguf(path, arch, metadata, tensors)


def _gguf_name(hf_name: str, table: dict[str, str]) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{table[part]}.{kind}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm"}[base] + f".{kind}"


@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_gemma_matches_transformers(gemma_dirs, generation):
    check_parity(gemma_dirs(generation), gemma_dirs(generation), prompt_len=PROMPT)


@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_gemma_gguf_matches_transformers(gemma_dirs, generation, tmp_path):
    path = tmp_path / f"{generation}.gguf"
    write_gemma_gguf(gemma_dirs(generation), path, generation)
    engine = make_engine(path)
    assert engine.loaded.architecture == {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                                          "gemma3": "Gemma3ForCausalLM"}[generation]
    assert engine.loaded.model.native_decode is None     # Gemma never takes the Llama-only native layers
    check_parity(path, gemma_dirs(generation), prompt_len=PROMPT)


def test_the_attention_scale_follows_query_pre_attn_scalar(tmp_path):
    """Scores scale by query_pre_attn_scalar ** -0.5, here hidden / heads rather than the head size."""
    model = save_tiny_model(gemma_config("gemma2", query_pre_attn_scalar=16), tmp_path / "scaled")
    check_parity(model, model, prompt_len=PROMPT, decode_steps=4)


def _prompt_logprobs(model_dir, ids: list[int]) -> list[float]:
    [outputs] = make_engine(model_dir).generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))
    return [e.logprob for o in outputs for e in o.prompt_logprobs]


@pytest.mark.parametrize("generation, change", [
    ("gemma2", dict(attn_logit_softcapping=None)),
    ("gemma2", dict(final_logit_softcapping=None)),
    ("gemma2", dict(sliding_window=None)),
    ("gemma3", dict(sliding_window=None)),
    ("gemma3", dict(layer_types=[S] * 4)),
    ("gemma3", dict(rope_parameters={S: GEMMA3_ROPE[F], F: GEMMA3_ROPE[F]})),   # the local base matters
    ("gemma3", dict(rope_parameters={S: GEMMA3_ROPE[S], F: {"rope_type": "default", "rope_theta": 1e6}})),
])
def test_each_setting_changes_results(gemma_dirs, tmp_path, generation, change):
    """The same weights without one setting score a long prompt differently: the parity tests can fail."""
    changed = save_tiny_model(gemma_config(generation, **json.loads(json.dumps(change))), tmp_path / "changed")
    ids = random_ids(PROMPT, seed=5)
    first, second = _prompt_logprobs(gemma_dirs(generation), ids), _prompt_logprobs(changed, ids)
    assert max(abs(x - y) for x, y in zip(first, second)) > 1e-2


def test_gguf_settings_llama_cpp_assumes(tmp_path):
    """Keys the converter leaves out take llama.cpp's values: Gemma 2's caps and period, Gemma 3's local base
    and period, and the 27B models' attention scale (from hidden / heads, as no key gives it)."""
    common = {"embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 4,
              "attention.head_count_kv": 2, "attention.key_length": 32, "attention.value_length": 32,
              "attention.layer_norm_rms_epsilon": 1e-6, "context_length": 512}
    write_gguf(tmp_path / "g2.gguf", "gemma2", {**common, "block_count": 4}, {})
    write_gguf(tmp_path / "g3.gguf", "gemma3", {**common, "block_count": 7, "attention.sliding_window": 8}, {})
    write_gguf(tmp_path / "g3-27b.gguf", "gemma3", {**common, "block_count": 62}, {})
    g2, g3, big = (GGUFFile(tmp_path / f).hf_config() for f in ("g2.gguf", "g3.gguf", "g3-27b.gguf"))
    assert (g2["attn_logit_softcapping"], g2["final_logit_softcapping"], g2["sliding_window"]) == (50.0, 30.0, 4096)
    assert g2["layer_types"] == [S, F, S, F] and g2["query_pre_attn_scalar"] == 32
    assert g3["layer_types"] == [S] * 5 + [F, S]
    assert g3["rope_parameters"][S]["rope_theta"] == 10000.0 and g3["final_logit_softcapping"] is None
    assert big["layer_types"] == [F] * 62 and big["query_pre_attn_scalar"] == 16


def test_gemma3_batch_invariance(gemma_dirs):
    engine = make_engine(gemma_dirs("gemma3"), 64)
    prompts = random_prompts(16, seed=1, high=3 * WINDOW)
    params = [mixed_params(i) for i in range(16)]
    alone = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    assert [tokens_of(outs) for outs in engine.generate(prompts, params)] == alone


@pytest.mark.parametrize("generation", ["gemma", "gemma2", "gemma3"])
def test_bfloat16_stays_close_to_float32(gemma_dirs, generation):
    """bfloat16 runs every path (norms in float32, the soft-capped attention) near the float32 numbers."""
    ids = random_ids(PROMPT, seed=3)
    exact = _prompt_logprobs(gemma_dirs(generation), ids)
    engine = make_engine(gemma_dirs(generation), dtype="bfloat16")
    [outputs] = engine.generate([ids], SamplingParams(max_tokens=4, prompt_logprobs=0, temperature=0.0,
                                                      ignore_eos=True))
    rough = [e.logprob for o in outputs for e in o.prompt_logprobs]
    assert len(tokens_of(outputs)) == 4
    assert max(abs(x - y) for x, y in zip(exact, rough)) < 0.25


def test_multimodal_gemma3_checkpoint_serves_its_language_model(tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint: its text_config read, its language model's tensors renamed,
    its vision tower's skipped."""
    import transformers as tf
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    text = gemma_config("gemma3").to_dict()
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=383,
                             boi_token_index=381, eoi_token_index=382, **tiny_config_kwargs())
    model = save_tiny_model(config, tmp_path / "multimodal")
    assert make_engine(model).loaded.architecture == "Gemma3ForConditionalGeneration"
    check_parity(model, model, prompt_len=PROMPT, decode_steps=4)
