"""Reading a GGUF file: its metadata as a Hugging Face style config, and its tensors under HF names.

Quantized tensors (Q4_0, Q4_1, Q4_K, Q6_K, Q8_0, ...) are dequantized with the `gguf` package, and
llama.cpp's reordering of Llama q/k rows is undone, so the architectures see ordinary checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from textcomplete.models.registry import GGUF_ARCHITECTURES

_LLAMA_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GPT2_NAMES = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
    "output": "lm_head", "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2", "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_PLAIN_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = GGUFReader(str(path))
        self.metadata = {name: _field_value(f) for name, f in self.reader.fields.items()}
        self.arch = self.metadata.get("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {self.arch!r}; "
                             f"supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")

    @property
    def num_tensors(self) -> int:
        return len(self.reader.tensors)

    def hf_config(self) -> dict:
        m, p = self.metadata, self.arch + "."
        vocab = m.get(p + "vocab_size") or len(m["tokenizer.ggml.tokens"])
        arch = GGUF_ARCHITECTURES[self.arch]
        if self.arch == "gpt2":
            return {"architectures": [arch], "n_embd": m[p + "embedding_length"], "n_head": m[p + "attention.head_count"],
                    "n_layer": m[p + "block_count"], "n_positions": m[p + "context_length"], "vocab_size": vocab,
                    "layer_norm_epsilon": m.get(p + "attention.layer_norm_epsilon", 1e-5),
                    "n_inner": m.get(p + "feed_forward_length"), "activation_function": "gelu_new"}
        hidden, heads = m[p + "embedding_length"], m[p + "attention.head_count"]
        cfg = {"architectures": [arch], "hidden_size": hidden, "num_attention_heads": heads,
               "num_key_value_heads": m.get(p + "attention.head_count_kv", heads),
               "head_dim": m.get(p + "attention.key_length", hidden // heads),
               "intermediate_size": m[p + "feed_forward_length"], "num_hidden_layers": m[p + "block_count"],
               "rms_norm_eps": m.get(p + "attention.layer_norm_rms_epsilon", 1e-6),
               "rope_theta": m.get(p + "rope.freq_base", 10000.0),
               "max_position_embeddings": m.get(p + "context_length", 2048), "vocab_size": vocab,
               "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
               "eos_token_id": m.get("tokenizer.ggml.eos_token_id")}
        if m.get(p + "rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": m[p + "rope.scaling.factor"]}
        return cfg

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor in HF layout), one at a time."""
        cfg = self.hf_config()
        for t in self.reader.tensors:
            name = self._hf_name(t.name)
            if name is None:
                raise ValueError(f"{self.path.name}: unexpected tensor {t.name!r} for {self.arch}")
            yield name, self._convert(name, _dequantized(t), cfg)

    def _hf_name(self, gguf_name: str) -> str | None:
        table = _GPT2_NAMES if self.arch == "gpt2" else _LLAMA_NAMES
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
        if match:
            layer, part, kind = match.groups()
            prefix = "transformer.h" if self.arch == "gpt2" else "model.layers"
            return f"{prefix}.{layer}.{table[part]}.{kind}" if part in table else None
        base, _, kind = gguf_name.rpartition(".")
        return f"{table[base]}.{kind}" if base in table else None

    def _convert(self, name: str, tensor: torch.Tensor, cfg: dict) -> torch.Tensor:
        if self.arch == "gpt2" and name.endswith(_GPT2_CONV1D):
            return tensor.t()   # back to HF's Conv1D layout [in, out]
        if self.arch in ("llama", "mistral"):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                return _unpermute(tensor, cfg["num_attention_heads"])
            if name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                return _unpermute(tensor, cfg["num_key_value_heads"])
        return tensor


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of each head's rotary halves in the q/k projection rows."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantized(t) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(t.shape))
    if t.tensor_type in _PLAIN_TYPES:
        array = np.array(t.data, dtype=np.float32)   # a copy: the file is mapped read-only
    else:
        array = dequantize(t.data, t.tensor_type)
    return torch.from_numpy(array.reshape(shape))


def _field_value(field) -> object:
    try:
        return field.contents()
    except Exception:   # noqa: BLE001 - an exotic field type; nothing here needs it
        return None
