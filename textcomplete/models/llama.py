"""The Llama architecture (Llama 2/3, Mistral, SmolLM), with switches its close relatives reuse.

Parameter names follow Hugging Face's `LlamaForCausalLM`, so checkpoints load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from textcomplete.models import gguf_file
from textcomplete.models.layers import AttentionMetadata, PagedAttention, RMSNorm, RotaryEmbedding
# rope_settings is read from here by the families built on this one
from textcomplete.models.llama_config import (context_length, llama_gguf_config, rope_settings,  # noqa: F401
                                              sliding_windows)
from textcomplete.models.spec import ModelSpec
from textcomplete import quant
from textcomplete.quant.linear import ConcatLinear, StoredLinear


# GGUF tensor-name parts (as llama.cpp's converter writes them) -> Hugging Face parameter-name parts.
GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, cfg: dict, biases: tuple[bool, bool], qk_norm: bool,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        qkv_bias, o_bias = biases
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        hidden = cfg["hidden_size"]
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
            self.k_norm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
        self.qk_norm = qk_norm
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, sliding_window=sliding_window)

    def fuse(self) -> None:
        """Replace the checkpoint's three projections by one matmul (fewer, larger kernel calls)."""
        self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        v = qkv[:, q_size + kv_size:].view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qkv[:, :q_size + kv_size].split([q_size, kv_size], dim=-1)
            q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
            k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
            qk = torch.cat((q, k), dim=1)
        else:
            qk = qkv[:, :q_size + kv_size].view(t, self.num_heads + self.num_kv_heads, self.head_dim)
        # Queries and keys rotate together: one set of rotary operators per layer.
        q, k = RotaryEmbedding.apply(qk, *cos_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, v, meta).reshape(t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def fuse(self) -> None:
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., gate | up], as a new contiguous tensor; the caller's gate_up is then
    its only reference, so it is freed before the down-projection runs. Written as silu(gate) * up, the two
    halves (views) stay alive through the down-projection beside the product and silu's temporary: on a 1.7B
    model's 512-token prefill chunk that is 32 MiB more alive at once, in every layer's MLP."""
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :half]).mul_(gate_up[..., half:])


def _concat_linears(linears: list[nn.Module]) -> nn.Module:
    """One linear layer computing the given ones side by side (outputs concatenated in order).

    Float layers merge into one matmul; layers over stored weights stay separate (see ConcatLinear).
    """
    if not all(type(m) is nn.Linear for m in linears):
        return ConcatLinear(linears)
    weight = torch.cat([m.weight for m in linears])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=linears[0].bias is not None,
                      device=weight.device, dtype=weight.dtype)
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
    return fused


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: dict, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: dict, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer: RMSNorm, rotary attention with grouped K/V heads, SwiGLU MLP."""

    qk_norm = False
    gguf_names = GGUF_NAMES
    gguf_permuted_qk = True    # llama.cpp's converter interleaves the rotary halves of q/k rows

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.spec = self.spec_from_config(cfg)
        windows = sliding_windows(cfg)
        self.model = LlamaModel(cfg, [self.make_layer(cfg, i, windows[i]) for i in range(self.spec.num_layers)])
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        theta, scaling = rope_settings(cfg)
        rotary_dim = int(self.spec.head_dim * cfg.get("partial_rotary_factor", 1.0))
        self.rotary = RotaryEmbedding(rotary_dim, self.spec.max_position_embeddings, theta, scaling)
        self.native_decode: NativeDecode | None = None

    @classmethod
    def spec_from_config(cls, cfg: dict) -> ModelSpec:
        heads = cfg["num_attention_heads"]
        return ModelSpec(
            num_layers=cfg["num_hidden_layers"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"], max_position_embeddings=context_length(cfg))

    def make_layer(self, cfg: dict, index: int, sliding_window: int | None) -> nn.Module:
        """Decoder layer `index`; families that differ only in the MLP override `make_mlp`."""
        attn = LlamaAttention(self.spec, cfg, self.biases(cfg), self.qk_norm, sliding_window)
        return LlamaDecoderLayer(cfg, attn, self.make_mlp(cfg, index))

    def make_mlp(self, cfg: dict, index: int) -> nn.Module:
        return LlamaMLP(cfg["hidden_size"], cfg["intermediate_size"], cfg.get("mlp_bias", False))

    def fuse(self) -> None:
        """After loading: merge q/k/v and gate/up projections into single matmuls."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    @staticmethod
    def biases(cfg: dict) -> tuple[bool, bool]:
        """(q/k/v projections have a bias, the output projection has one)."""
        bias = bool(cfg.get("attention_bias", False))
        return bias, bias

    def tied_weights(self) -> dict[str, str]:
        """Parameters a checkpoint may omit, and the parameter that then stands in for each."""
        return {"lm_head.weight": "model.embed_tokens.weight"}

    @staticmethod
    def checkpoint_tensor(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Map one checkpoint tensor to this module's naming and layout; None to skip it."""
        if name.endswith("rotary_emb.inv_freq"):
            return None            # recomputed, and some old checkpoints carry it
        return name, tensor

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        """The Hugging Face config of a GGUF file of this architecture."""
        return llama_gguf_config(gguf)

    @staticmethod
    def keeps_stored(gguf_name: str) -> bool:
        """Whether this GGUF matrix runs from its stored format (else it is decoded to float32 on loading)."""
        return True   # routed experts too: textcomplete.models.moe keeps their stacks stored

    @staticmethod
    def keeps_stored_checkpoint(name: str) -> bool:
        """Whether this Hugging Face checkpoint matrix runs as stored (bfloat16/float16), else it is converted."""
        return "experts" not in name   # routed experts are restacked on loading, as for GGUF

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        """One GGUF tensor as (HF name, tensor) pairs in HF layout; None if it does not belong here."""
        if name == "rope_freqs.weight":
            return []   # read into the config's rope scaling
        hf = gguf_file.hf_name(name, cls.gguf_names)
        if hf is None:
            return None
        if cls.gguf_permuted_qk and hf.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = gguf_file.unpermute_qk(tensor, cfg["num_attention_heads"])
        elif cls.gguf_permuted_qk and hf.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = gguf_file.unpermute_qk(tensor, cfg["num_key_value_heads"])
        return [(hf, tensor)]

    def set_context_length(self, length: int) -> None:
        """The engine serves contexts of up to `length` tokens (some rope scalings choose by it)."""
        self.rotary.set_context_length(length)

    def use_native_decode(self, kernels: object | None) -> None:
        """Run decode-only steps through the fused native layers of `kernels` (None: PyTorch operators only)."""
        dense = all(type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
                    and type(layer.mlp) is LlamaMLP and all(
                        NativeDecode.parts(m) is not None
                        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                  layer.mlp.down_proj))
                    for layer in self.model.layers)
        self.native_decode = None if kernels is None or not dense else NativeDecode(self, kernels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions, x.dtype)
        if self.native_decode is not None and not meta.prefills and x.dtype == torch.float32:
            return self.model.norm(self.native_decode(x, cos_sin, meta))
        for layer in self.model.layers:
            x = layer(x, cos_sin, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab]."""
        return self.lm_head(hidden).float()


class NativeDecode:
    """Every decoder layer of a decode-only step in one native call (textcomplete/kernels/decode.cpp).

    It computes what `LlamaDecoderLayer.forward` computes, with the same matmul kernels; only the small
    operators between the matmuls become loops, which removes thousands of operator calls per token.
    """

    def __init__(self, model: LlamaForCausalLM, kernels: object) -> None:
        self.kernels = kernels
        self.spec = model.spec
        self.rotary_dim = model.rotary.rotary_dim
        first = model.model.layers[0]
        self.eps = first.input_layernorm.eps
        self.qk_norm = model.qk_norm
        self.layers = model.model.layers
        packed = [self._pack(layer) for layer in self.layers]
        self.weights = [tensors for tensors, _ in packed]
        self.int8 = any(getattr(m, "int8", False) for m in model.modules() if isinstance(m, StoredLinear))
        self.layouts = [layout for _, layout in packed]
        self.windows = [layer.self_attn.attn.sliding_window or 0 for layer in self.layers]
        self.caches: list[torch.Tensor] | None = None

    @staticmethod
    def parts(linear: nn.Module) -> list[nn.Module] | None:
        """The matrices of a projection the native layers can run (float32 nn.Linear or stored weights in a
        format with a native kernel), one above the other; None if it has any other kind."""
        parts = list(linear.parts) if isinstance(linear, ConcatLinear) else [linear]
        runnable = all((type(p) is nn.Linear and p.weight.dtype == torch.float32)
                       or (type(p) is StoredLinear and quant.has_native_kernel(p.stored.fmt)) for p in parts)
        return parts if runnable else None

    def _pack(self, layer: LlamaDecoderLayer) -> tuple[list[torch.Tensor], list[int]]:
        """A layer's tensors and layout as decode.cpp reads them (see its layout contract)."""
        empty = torch.empty(0)
        attn = layer.self_attn
        tensors = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                   attn.q_norm.weight if self.qk_norm else empty, attn.k_norm.weight if self.qk_norm else empty]
        counts, types = [], []
        for linear in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            parts = self.parts(linear)
            counts.append(len(parts))
            for part in parts:
                bias = part.bias if part.bias is not None else empty
                if type(part) is StoredLinear:
                    order = part.stored.row_order if part.stored.row_order is not None else empty
                    tensors += [empty, part.stored.raw, order, bias]
                    types.append(part.stored.fmt.type_id)
                else:
                    tensors += [part.weight, empty, empty, bias]
                    types.append(-1)
        # The stored bytes are views of the file's map: passed as they are (contiguous rows), never copied.
        return [t.detach() if t.dtype == torch.uint8 else t.detach().contiguous() for t in tensors], counts + types

    def __call__(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        if self.caches is None:   # the runner assigns the caches after the model is built
            self.caches = [layer.self_attn.attn.kv_cache for layer in self.layers]
        n = x.shape[0]
        cos, sin = (t.reshape(n, -1).contiguous() for t in cos_sin)
        return self.kernels.decode_layers(
            x.contiguous(), self.weights, self.layouts, self.caches, self.windows, cos, sin, meta.slot_mapping,
            meta.decode_key_slots, meta.decode_key_lens, self.spec.num_heads,
            self.spec.num_kv_heads, self.spec.head_dim, self.rotary_dim, self.eps, self.qk_norm, quant.DIRECT_ROWS,
            self.int8)
