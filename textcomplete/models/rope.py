"""Rotary-embedding frequencies under every rope scaling, and the cos/sin they give, in numpy without torch.

A server that never imports torch computes its cos/sin here; `layers.RotaryEmbedding` wraps the same object for
the PyTorch models, so the frequency math exists once.
"""

from __future__ import annotations

import math

import numpy as np

ROPE_SCALINGS = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


def rope_kind(scaling: dict | None) -> str:
    """The scaling's name under either key old and new configs use for it."""
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _required(scaling: dict, key: str) -> object:
    if scaling.get(key) is None:
        raise ValueError(f"rope scaling {rope_kind(scaling)!r} needs {key!r}")
    return scaling[key]


def _powers(rotary_dim: int, base: float) -> np.ndarray:
    """base ** (2i / rotary_dim) for i < rotary_dim / 2: each pair's wavelength over 2 pi, float32 [rotary_dim / 2]."""
    exponents = np.arange(0, rotary_dim, 2).astype(np.float32) / np.float32(rotary_dim)
    # float32 operands as in transformers, the power taken in float64 and rounded: the correctly rounded float32
    # power. numpy's float32 power is off by up to 0.94 ulp (torch's, which transformers uses, by up to 0.57).
    return (np.float64(np.float32(base)) ** exponents.astype(np.float64)).astype(np.float32)


def _default_rope(rope: RopeFrequencies, length: int) -> tuple[np.ndarray, float]:
    return np.float32(1.0) / _powers(rope.rotary_dim, rope.base), 1.0


def _linear_rope(rope: RopeFrequencies, length: int) -> tuple[np.ndarray, float]:
    return _default_rope(rope, length)[0] / np.float32(_required(rope.scaling, "factor")), 1.0


def _llama3_rope(rope: RopeFrequencies, length: int) -> tuple[np.ndarray, float]:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    inv_freq, scaling = _default_rope(rope, length)[0], rope.scaling
    factor, old_len = _required(scaling, "factor"), _required(scaling, "original_max_position_embeddings")
    factor = np.float32(factor)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    # scalar / array as torch (so transformers) evaluates it: the scalar times the array's reciprocal
    wavelen = (1 / inv_freq) * np.float32(2 * math.pi)
    scaled = np.where(wavelen > np.float32(old_len / low), inv_freq / factor, inv_freq)
    smooth = ((1 / wavelen) * np.float32(old_len) - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= np.float32(old_len / high)) & (wavelen <= np.float32(old_len / low))
    return np.where(medium, smoothed, scaled), 1.0


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_attention_factor(scaling: dict, factor: float) -> float:
    """The cos/sin multiplier: given, or YaRN's 0.1 ln(factor) + 1 (DeepSeek's ratio of two when both mscales)."""
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
    return _yarn_mscale(factor)


def _yarn_pair(turns: float, dim: int, base: float, old_len: int) -> float:
    """The (fractional) pair index whose angle makes `turns` full turns over `old_len` positions."""
    return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(base))


def _yarn_ramp(rope: RopeFrequencies, old_len: int) -> np.ndarray:
    """float32 [rotary_dim / 2]: 0 for pairs turning more than beta_fast times within `old_len` (kept), 1 for those
    turning fewer than beta_slow times (interpolated), linear between."""
    dim, base, scaling = rope.rotary_dim, rope.base, rope.scaling
    low = _yarn_pair(scaling.get("beta_fast") or 32, dim, base, old_len)
    high = _yarn_pair(scaling.get("beta_slow") or 1, dim, base, old_len)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # a one-point ramp would divide by zero
    ramp = (np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(ramp, np.float32(0), np.float32(1))


def _yarn_rope(rope: RopeFrequencies, length: int) -> tuple[np.ndarray, float]:
    """YaRN, static as in transformers: fast pairs extrapolate, slow pairs interpolate by `factor`."""
    scaling = rope.scaling
    old_len = _required(scaling, "original_max_position_embeddings")
    factor = scaling.get("factor") or rope.max_positions / old_len
    powers = _powers(rope.rotary_dim, rope.base)
    extrapolated, interpolated = np.float32(1.0) / powers, np.float32(1.0) / (np.float32(factor) * powers)
    keep = 1 - _yarn_ramp(rope, old_len)   # the share of each pair's unscaled frequency
    return interpolated * (1 - keep) + extrapolated * keep, _yarn_attention_factor(scaling, factor)


def _longrope_rope(rope: RopeFrequencies, length: int) -> tuple[np.ndarray, float]:
    """Phi-3's LongRoPE: each pair's wavelength stretched by its own factor, long or short by the context.

    transformers picks the long factors for a sequence longer than `original_max_position_embeddings` and
    the short ones otherwise; cached keys cannot be re-rotated, so the served context length decides once
    (as llama.cpp does). The attention factor is the same for both sets.
    """
    scaling = rope.scaling
    old_len = _required(scaling, "original_max_position_embeddings")
    which = "long_factor" if length > old_len else "short_factor"
    factors = np.asarray(_required(scaling, which), dtype=np.float32)
    if factors.shape != (rope.rotary_dim // 2,):
        raise ValueError(f"longrope {which} has {factors.size} values; the rotary dimension "
                         f"{rope.rotary_dim} needs {rope.rotary_dim // 2}")
    factor = scaling.get("factor") or rope.max_positions / old_len
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    return np.float32(1.0) / (factors * _powers(rope.rotary_dim, rope.base)), attention


def _dynamic_rope(rope: RopeFrequencies, length: int) -> tuple[np.ndarray, float]:
    """Dynamic NTK: beyond `max_position_embeddings` the base grows with the length.

    transformers recomputes the base from each forward pass's length; we compute it once from the served
    context length, which equals transformers exactly while the context stays within the original length.
    """
    dim, old_len = rope.rotary_dim, rope.max_positions
    factor, length = _required(rope.scaling, "factor"), max(length, old_len)
    base = rope.base * ((factor * length / old_len) - (factor - 1)) ** (dim / (dim - 2))
    return np.float32(1.0) / _powers(dim, base), 1.0


_FREQUENCIES = {"default": _default_rope, "linear": _linear_rope, "llama3": _llama3_rope, "yarn": _yarn_rope,
                "longrope": _longrope_rope, "dynamic": _dynamic_rope}


class RopeFrequencies:
    """The frequencies of a rotate-half ("neox") rotary embedding over the first `rotary_dim` dims of each head.

    `scaling` is a Hugging Face rope-scaling dict (`rope_type` or `type`: one of ROPE_SCALINGS), optionally with
    GGUF's `frequency_factors`. Its frequencies and attention factor (which multiplies cos and sin) are those of
    transformers' `ROPE_INIT_FUNCTIONS`; longrope and dynamic, which transformers switches by the current sequence
    length, are fixed here by the served context length (`set_context_length`; until then, `max_positions`).
    """

    def __init__(self, rotary_dim: int, max_positions: int, base: float, scaling: dict | None) -> None:
        kind = rope_kind(scaling)
        if kind not in _FREQUENCIES:
            raise ValueError(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")
        self.rotary_dim, self.max_positions, self.base = rotary_dim, max_positions, float(base)
        self.kind, self.scaling = kind, dict(scaling or {})
        self.set_context_length(max_positions)

    def set_context_length(self, length: int) -> None:
        """Fix the frequencies for contexts of up to `length` tokens (only longrope and dynamic depend on it)."""
        inv_freq, attention = _FREQUENCIES[self.kind](self, length)   # float32 [rotary_dim / 2]
        if self.scaling.get("frequency_factors") is not None:
            # llama.cpp's form of a scaling (GGUF `rope_freqs`): each pair's wavelength times its own factor
            factors = np.asarray(self.scaling["frequency_factors"], dtype=np.float32)
            if factors.shape != inv_freq.shape:
                raise ValueError(f"{factors.size} rope frequency factors for a rotary dimension of "
                                 f"{self.rotary_dim} (it needs {self.rotary_dim // 2})")
            inv_freq = inv_freq / factors
        self.inv_freq, self.attention_scaling = inv_freq.astype(np.float32, copy=False), float(attention)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cos, signed sin) of `positions` [n], each float32 [n, rotary_dim]; the sin's first half is negated
        (rotate_half(x) * sin == swap_halves(x) * signed_sin), both times the attention factor.

        The angles are float32, as in transformers; cos and sin (times the factor) are taken in float64 and rounded
        once, because float32 cos and sin differ between libraries (numpy's by up to 1.5 ulp from the exact value,
        torch's by up to 0.6). `RotaryEmbedding.cos_sin` does the same in torch: the two are equal.
        """
        freqs = np.asarray(positions).astype(np.float32)[:, None] * self.inv_freq[None, :]   # [n, rotary_dim / 2]
        angles = freqs.astype(np.float64)
        cos, sin = np.cos(angles), np.sin(angles)
        if self.attention_scaling != 1.0:   # YaRN's and LongRoPE's factor, on cos and sin as transformers does
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos, sin = cos.astype(np.float32), sin.astype(np.float32)
        return np.concatenate((cos, cos), axis=-1), np.concatenate((-sin, sin), axis=-1)
