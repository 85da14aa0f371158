"""Gemma, Gemma 2 and Gemma 3 (text): the Llama layout with a scaled embedding, (1 + w) norms and a GeGLU MLP.

Gemma 2 wraps attention and MLP in norms on both sides, soft-caps attention scores and final logits and
alternates sliding-window layers with global ones; Gemma 3 drops the soft-caps, normalises each head's queries
and keys, and gives sliding and global layers rotary bases of their own. Parameter names follow Hugging Face's
`Gemma*ForCausalLM`; GGUF files are read as llama.cpp's converter writes them (norm weights stored as 1 + w).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from textcomplete.models import gguf_file
from textcomplete.models.layers import AttentionMetadata, PagedAttention, RotaryEmbedding
from textcomplete.models.llama import GGUF_NAMES, LlamaAttention, LlamaForCausalLM, LlamaMLP, rope_settings
from textcomplete.models.spec import ModelSpec

SLIDING, FULL = "sliding_attention", "full_attention"

_TANH_GELU = partial(F.gelu, approximate="tanh")
ACTIVATIONS = {"gelu_pytorch_tanh": _TANH_GELU, "gelu_new": _TANH_GELU, "gelu": F.gelu}

# Gemma 2 and 3 name their four per-layer norms differently from Llama's two (llama.cpp's tensor_mapping.py).
GGUF_NAMES_SANDWICH = {**GGUF_NAMES, "post_attention_norm": "post_attention_layernorm",
                       "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}

# transformers' config defaults, which checkpoints rely on (a multimodal Gemma 3's text_config lists only a few).
_COMMON = {"rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": True, "head_dim": 256}
GEMMA_DEFAULTS = {**_COMMON, "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576,
                  "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 16,
                  "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 8192}
GEMMA2_DEFAULTS = {**_COMMON, "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
                   "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
                   "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                   "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
                   "attn_logit_softcapping": 50.0}
GEMMA3_DEFAULTS = {**GEMMA2_DEFAULTS, "vocab_size": 262208, "max_position_embeddings": 131072,
                   "final_logit_softcapping": None, "attn_logit_softcapping": None}


@dataclass(frozen=True)
class GemmaOptions:
    """What distinguishes the Gemma generations, read from one (defaults-filled) config."""

    layer_types: tuple[str, ...]                       # SLIDING or FULL, one per layer
    sliding_window: int | None
    scale: float                                       # attention scores are q.k * scale
    attn_softcap: float | None
    final_softcap: float | None
    ropes: dict[str, tuple[float, dict | None]]        # layer type -> (rotary base, scaling)
    activation: str


class GemmaRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from 1, computed in float32 whatever the model's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.factor: torch.Tensor | None = None     # 1 + weight in float32, once the weights are final

    def fuse(self) -> None:
        """After loading: keep the float32 factor, so that each call is one operator."""
        self.factor = 1.0 + self.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factor = self.factor if self.factor is not None else 1.0 + self.weight.float()
        return F.rms_norm(x.float(), (x.shape[-1],), factor, self.eps).to(x.dtype)


class GemmaAttention(LlamaAttention):
    """Llama's attention with Gemma's score scale, optional soft-cap and optional per-head q/k norms."""

    def __init__(self, spec: ModelSpec, cfg: dict, opts: GemmaOptions, layer_type: str, qk_norm: bool) -> None:
        bias = bool(cfg.get("attention_bias"))
        window = opts.sliding_window if layer_type == SLIDING else None
        super().__init__(spec, cfg, (bias, bias), qk_norm=False, sliding_window=window)
        if qk_norm:   # applied to [num_tokens, heads, head_dim] by LlamaAttention.forward, before the rotary
            self.q_norm = GemmaRMSNorm(self.head_dim, cfg["rms_norm_eps"])
            self.k_norm = GemmaRMSNorm(self.head_dim, cfg["rms_norm_eps"])
        self.qk_norm = qk_norm
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, sliding_window=window,
                                   scale=opts.scale, softcap=opts.attn_softcap)


class GemmaMLP(LlamaMLP):
    """GeGLU: down(act(gate(x)) * up(x)), the activation a GELU (tanh approximation in every Gemma release)."""

    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__(hidden, intermediate, bias=False)
        if activation not in ACTIVATIONS:
            raise ValueError(f"Gemma activation {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class GemmaDecoderLayer(nn.Module):
    """Gemma 1: pre-norm residual blocks, as Llama's."""

    def __init__(self, cfg: dict, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Gemma2DecoderLayer(nn.Module):
    """Gemma 2 and 3: each block's output is normalised too before it joins the residual stream."""

    def __init__(self, cfg: dict, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = mlp
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos_sin, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, cfg: dict, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(layers)
        self.norm = GemmaRMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class GemmaForCausalLM(nn.Module):
    """Gemma 1; the later generations override `options` and the layer they build."""

    defaults = GEMMA_DEFAULTS
    gguf_names = GGUF_NAMES
    layer_class: type[nn.Module] = GemmaDecoderLayer
    qk_norm = False

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        cfg = self.settings(cfg)
        self.spec = self.spec_from_config(cfg)
        self.opts = self.options(cfg)
        layers = [self.layer_class(cfg, GemmaAttention(self.spec, cfg, self.opts, kind, self.qk_norm),
                                   GemmaMLP(cfg["hidden_size"], cfg["intermediate_size"], self.opts.activation))
                  for kind in self.opts.layer_types]
        self.model = GemmaModel(cfg, layers)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.rotaries = self.make_rotaries()
        # transformers keeps the normalizer as a float32 tensor and casts it to the hidden dtype.
        self.embed_scale = torch.tensor(cfg["hidden_size"] ** 0.5, dtype=torch.float32, device="cpu")
        self.native_decode = None

    def make_rotaries(self) -> dict[str, RotaryEmbedding]:
        """Layer type -> its rotary embedding; types with the same base and scaling share one."""
        shared: dict[str, RotaryEmbedding] = {}
        rotaries = {}
        for kind, (base, scaling) in self.opts.ropes.items():
            key = repr((base, scaling))
            if key not in shared:
                shared[key] = RotaryEmbedding(self.spec.head_dim, self.spec.max_position_embeddings, base, scaling)
            rotaries[kind] = shared[key]
        return rotaries

    @classmethod
    def settings(cls, cfg: dict) -> dict:
        """`cfg` with transformers' defaults for this generation filled in."""
        cfg = {**cls.defaults, **cfg}
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("bidirectional (embedding) Gemma models are not supported")
        return cfg

    @classmethod
    def spec_from_config(cls, cfg: dict) -> ModelSpec:
        return LlamaForCausalLM.spec_from_config(cls.settings(cfg))

    @classmethod
    def options(cls, cfg: dict) -> GemmaOptions:
        rope = rope_settings(cfg)
        # transformers 5 reads `hidden_act` and takes the legacy "gelu" of the first releases as the tanh GELU.
        activation = "gelu_pytorch_tanh" if cfg["hidden_act"] == "gelu" else cfg["hidden_act"]
        return GemmaOptions(layer_types=(FULL,) * cfg["num_hidden_layers"], sliding_window=None,
                            scale=cls.spec_from_config(cfg).head_dim ** -0.5, attn_softcap=None,
                            final_softcap=None, ropes={FULL: rope}, activation=activation)

    def fuse(self) -> None:
        """After loading: merge q/k/v and gate/up projections into single matmuls."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        for norm in (m for m in self.modules() if isinstance(m, GemmaRMSNorm)):
            norm.fuse()

    @staticmethod
    def keeps_stored(gguf_name: str) -> bool:
        return True   # every matrix runs from its stored format (only the 1-D norms change on loading)

    @staticmethod
    def keeps_stored_checkpoint(name: str) -> bool:
        return True

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"}

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        return LlamaForCausalLM.checkpoint_tensor(name, tensor)

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        return gguf_base_config(gguf)

    @classmethod
    def tensors_from_gguf(cls, name: str, tensor: torch.Tensor,
                          cfg: dict) -> list[tuple[str, torch.Tensor]] | None:
        """Gemma's rotary is the rotate-half kind, so llama.cpp leaves q/k rows in order; only norms change."""
        hf = gguf_file.hf_name(name, cls.gguf_names)
        if hf is None:
            return None
        if hf.endswith("norm.weight"):   # the converter stores 1 + w, the factor llama.cpp multiplies by
            tensor = tensor - 1.0
        return [(hf, tensor)]

    def set_context_length(self, length: int) -> None:
        for rotary in {id(r): r for r in self.rotaries.values()}.values():
            rotary.set_context_length(length)

    def use_native_decode(self, kernels: object | None) -> None:
        """The native decode layers compute Llama's layer only: Gemma always runs its PyTorch layers."""
        self.native_decode = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        x = self.model.embed_tokens(input_ids)
        x = x * self.embed_scale.to(device=x.device, dtype=x.dtype)
        operators = self.rotary_operators(positions, x.dtype)
        for layer, kind in zip(self.model.layers, self.opts.layer_types):
            x = layer(x, operators[kind], meta)
        return self.model.norm(x)

    def rotary_operators(self, positions: torch.Tensor,
                         dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer type -> (cos, signed sin), each [num_tokens, 1, head_dim], computed once per distinct rotary."""
        computed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for rotary in self.rotaries.values():
            if id(rotary) not in computed:
                computed[id(rotary)] = rotary.cos_sin(positions, dtype)
        return {kind: computed[id(rotary)] for kind, rotary in self.rotaries.items()}

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> float32 logits [n, vocab], soft-capped where the model says so."""
        logits = self.lm_head(hidden).float()
        cap = self.opts.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma2ForCausalLM(GemmaForCausalLM):
    defaults = GEMMA2_DEFAULTS
    gguf_names = GGUF_NAMES_SANDWICH
    layer_class = Gemma2DecoderLayer
    default_pattern = 2        # every second layer is global
    pattern_in_config = False  # Gemma 3's older configs give the period as sliding_window_pattern
    gguf_27b_layers = 46       # llama.cpp's block count of the 27B model, whose attention scale differs

    @classmethod
    def options(cls, cfg: dict) -> GemmaOptions:
        rope = rope_settings(cfg)
        return GemmaOptions(layer_types=cls.layer_types(cfg), sliding_window=cfg.get("sliding_window"),
                            scale=float(cfg["query_pre_attn_scalar"]) ** -0.5,
                            attn_softcap=cfg.get("attn_logit_softcapping"),
                            final_softcap=cfg.get("final_logit_softcapping"),
                            ropes={SLIDING: rope, FULL: rope}, activation=cfg["hidden_activation"])

    @classmethod
    def layer_types(cls, cfg: dict) -> tuple[str, ...]:
        """`layer_types` when the config lists them, else every `pattern`-th layer global (transformers' rule)."""
        n = cfg["num_hidden_layers"]
        pattern = (cfg.get("sliding_window_pattern") if cls.pattern_in_config else None) or cls.default_pattern
        kinds = tuple(cfg.get("layer_types") or (SLIDING if (i + 1) % pattern else FULL for i in range(n)))
        if len(kinds) != n or not set(kinds) <= {SLIDING, FULL}:
            raise ValueError(f"layer_types must name {SLIDING!r} or {FULL!r} for each of the {n} layers")
        return kinds

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        cfg = gguf_base_config(gguf)
        base = cfg["rope_theta"]
        if gguf.get("rope.freq_base_swa", base) != base:
            raise gguf.fail("a Gemma 2 with a sliding-layer rotary base of its own has no Hugging Face form")
        cfg["sliding_window"] = gguf.size("attention.sliding_window", 4096)   # llama.cpp's default
        cfg["layer_types"] = gguf_layer_types(gguf, cfg["num_hidden_layers"], cls.default_pattern)
        cfg["attn_logit_softcapping"] = gguf_softcap(gguf, "attn_logit_softcapping", 50.0)
        cfg["final_logit_softcapping"] = gguf_softcap(gguf, "final_logit_softcapping", 30.0)
        cfg["query_pre_attn_scalar"] = gguf_query_scalar(cfg, cls.gguf_27b_layers)
        return cfg


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Text-only Gemma 3; a multimodal checkpoint's language model loads too (its vision tower is skipped)."""

    defaults = GEMMA3_DEFAULTS
    qk_norm = True
    default_pattern = 6        # five sliding layers, then a global one
    pattern_in_config = True
    gguf_27b_layers = 62

    @classmethod
    def settings(cls, cfg: dict) -> dict:
        return super().settings(cfg.get("text_config") or cfg)

    @classmethod
    def options(cls, cfg: dict) -> GemmaOptions:
        # transformers' Gemma 3 attention ignores attn_logit_softcapping (llama.cpp's too): no cap here either.
        return GemmaOptions(layer_types=cls.layer_types(cfg), sliding_window=cfg.get("sliding_window"),
                            scale=float(cfg["query_pre_attn_scalar"]) ** -0.5, attn_softcap=None,
                            final_softcap=cfg.get("final_logit_softcapping"), ropes=gemma3_ropes(cfg),
                            activation=cfg["hidden_activation"])

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Multimodal checkpoints: the language model's tensors under our names, the vision tower's skipped."""
        for prefix, ours in (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head.")):
            if name.startswith(prefix):
                name = ours + name[len(prefix):]
        if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                            "model.multi_modal_projector.")):
            return None
        return super().checkpoint_tensor(name, tensor)

    @classmethod
    def config_from_gguf(cls, gguf: gguf_file.GGUFFile) -> dict:
        cfg = gguf_base_config(gguf)
        n = cfg["num_hidden_layers"]
        if cfg.get("sliding_window"):
            cfg["layer_types"] = gguf_layer_types(gguf, n, cls.default_pattern)
        else:   # llama.cpp: no window, no sliding layers (every layer global, on the global base)
            cfg["layer_types"] = [FULL] * n
        scaling = cfg.pop("rope_scaling", None) or {}   # linear, if any: on the global layers only
        full = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta"), **scaling}
        # llama.cpp's local base is fixed at 10000 unless the file names one (its converter never does).
        local = {"rope_type": "default", "rope_theta": float(gguf.get("rope.freq_base_swa", 10000.0))}
        cfg["rope_parameters"] = {SLIDING: local, FULL: full}
        cfg["final_logit_softcapping"] = gguf_softcap(gguf, "final_logit_softcapping", None)
        cfg["attn_logit_softcapping"] = None
        cfg["query_pre_attn_scalar"] = gguf_query_scalar(cfg, cls.gguf_27b_layers)
        return cfg


def gemma3_ropes(cfg: dict) -> dict[str, tuple[float, dict | None]]:
    """(base, scaling) of sliding and of global layers, from transformers 5's nested `rope_parameters`
    or the older `rope_local_base_freq` (sliding) and `rope_theta` with `rope_scaling` (global)."""
    params = cfg.get("rope_parameters") or {}
    full = {**(params.get(FULL) or {}), **(cfg.get("rope_scaling") or {})}
    full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local = dict(params.get(SLIDING) or {})
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
    return {kind: (float(p["rope_theta"]), p if p.get("rope_type", p.get("type", "default")) != "default" else None)
            for kind, p in ((SLIDING, local), (FULL, full))}


def gguf_base_config(gguf: gguf_file.GGUFFile) -> dict:
    """The keys every Gemma generation's GGUF form shares (the converter writes the head size explicitly)."""
    cfg = gguf_file.llama_style_config(gguf)
    cfg["attention_bias"] = gguf.has_tensor("blk.0.attn_q.bias")
    cfg["tie_word_embeddings"] = not gguf.has_tensor("output.weight")
    # llama.cpp's GELU is the tanh approximation, as every Gemma release uses.
    cfg["hidden_act"] = cfg["hidden_activation"] = "gelu_pytorch_tanh"
    return cfg


def gguf_layer_types(gguf: gguf_file.GGUFFile, n: int, default_pattern: int) -> list[str]:
    """llama.cpp's `attention.sliding_window_pattern`: a flag per layer, or a period whose last layer is global."""
    pattern = gguf.get("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise gguf.fail(f"attention.sliding_window_pattern has {len(pattern)} flags for {n} layers")
        return [SLIDING if flag else FULL for flag in pattern]
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise gguf.fail(f"attention.sliding_window_pattern = {pattern!r} is not a layer period")
    return [SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL for i in range(n)]


def gguf_softcap(gguf: gguf_file.GGUFFile, key: str, default: float | None) -> float | None:
    value = gguf.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise gguf.fail(f"metadata {gguf.arch}.{key} = {value!r} is not a soft-cap")
    return float(value) if value else None


def gguf_query_scalar(cfg: dict, layers_of_27b: int) -> int:
    """llama.cpp scales scores by 1/sqrt(head size), except for the 27B model's 1/sqrt(hidden / heads)."""
    if cfg["num_hidden_layers"] == layers_of_27b:
        return cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["head_dim"]
