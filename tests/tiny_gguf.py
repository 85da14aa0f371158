"""Writing a tiny Hugging Face Llama checkpoint as a GGUF file, the way llama.cpp's converter lays it out.

Used to test the GGUF loader on every supported tensor type; the tokenizer is a byte-level BPE vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file

from tests.tiny_models import EOS_ID, VOCAB

_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{_NAMES[part]}.{kind}"
    return f"{_NAMES[base]}.{kind}"


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant_blocks(rows: int, cols: int, qtype: QType, seed: int) -> np.ndarray:
    """Valid Q4_K / Q5_K / Q6_K bytes (the gguf package cannot quantize these): random payload, sane scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    # d such that the weights stay small (random 6-bit or 8-bit sub-block scales multiply it): logits of a
    # few units, where float32 rounding stays far below the tests' 1e-3
    d = {QType.Q4_K: 0.01, QType.Q5_K: 0.002, QType.Q6_K: 0.002}[qtype]
    scale = np.frombuffer(np.float16(d).tobytes(), dtype=np.uint8)
    if qtype in (QType.Q4_K, QType.Q5_K):      # d, dmin (f16) lead the block
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = scale
    else:                        # Q6_K: d (f16) ends the block, after 16 int8 sub-block scales
        blocks[:, -2:] = scale
        blocks[:, -18:-2] = rng.integers(1, 9, size=(blocks.shape[0], 16), dtype=np.uint8)
    return blocks.reshape(rows, cols // block_size * type_size)


def write_llama_gguf(hf_dir: Path, path: Path, qtype: QType, with_tokenizer: bool = True) -> dict[str, torch.Tensor]:
    """Write hf_dir's tiny Llama as GGUF with 2-D weights in `qtype`; returns the HF-layout weights written."""
    import json
    cfg = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    if with_tokenizer:
        _add_tokenizer(writer)
    expected: dict[str, torch.Tensor] = {}
    for i, (name, tensor) in enumerate(sorted(state.items())):
        w = tensor.float().numpy()
        heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
        for part, h in heads.items():
            if f"self_attn.{part}" in name:
                w = llama_cpp_permute(w, h)
        t = qtype if w.ndim == 2 else QType.F32
        data = _encode(w, t, seed=i)
        writer.add_tensor(gguf_name(name), data, raw_dtype=t)
        decoded = w if t == QType.F32 else gguf.quants.dequantize(data, t).reshape(w.shape)
        for part, h in heads.items():
            if f"self_attn.{part}" in name:
                decoded = _unpermute(decoded, h)
        expected[name] = torch.from_numpy(np.ascontiguousarray(decoded, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, t: QType, seed: int) -> np.ndarray:
    if t == QType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if t in (QType.Q4_K, QType.Q5_K, QType.Q6_K):
        return random_k_quant_blocks(w.shape[0], w.shape[1], t, seed)
    return gguf.quants.quantize(w, t)


def write_gguf(path: Path, arch: str, metadata: dict[str, object], tensors: dict[str, np.ndarray],
               qtype: QType = QType.F32) -> None:
    """A GGUF file of architecture `arch`: `metadata` keys without the "<arch>." prefix, tensors under their GGUF
    names in PyTorch's dimension order (2-D and larger ones stored as `qtype`), and the tiny tokenizer."""
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, value in metadata.items():
        full = key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        elif isinstance(value, str):
            writer.add_string(full, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(full, list(value))
        else:
            raise TypeError(f"{key}: {type(value).__name__}")
    _add_tokenizer(writer)
    for i, (name, w) in enumerate(tensors.items()):
        t = qtype if w.ndim >= 2 else QType.F32
        writer.add_tensor(name, _encode(np.ascontiguousarray(w, dtype=np.float32), t, seed=i), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer: gguf.GGUFWriter) -> None:
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())
    tokens = ["<s>", "</s>"] + alphabet + [f"Ġw{i}" for i in range(VOCAB - 2 - len(alphabet))]
    types = [3, 3] + [1] * (VOCAB - 2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(EOS_ID)
