"""The native prompt attention computes what PyTorch's attention over the gathered blocks computes.

It reads one request's keys and values in place in the paged cache (any block order, float32 or 16-bit),
causally from the chunk's first position, optionally within a sliding window; both paths work in float32,
so they agree to float rounding.
"""

from __future__ import annotations

import pytest
import torch

from textcomplete.kernels import decode_layers
from textcomplete.models.layers import AttentionMetadata, PagedAttention, PrefillSpan


@pytest.fixture(scope="module")
def kernels():
    built = decode_layers()
    assert built is not None, "the native kernels did not build (see the log for the compiler error)"
    return built


class _Counted:
    """The kernels module, counting prompt_attention calls: a test that compares the two paths must take both."""

    def __init__(self, module: object) -> None:
        self.module, self.calls = module, 0

    def prompt_attention(self, *args):
        self.calls += 1
        return self.module.prompt_attention(*args)


def _attention(heads: int, kv_heads: int, dim: int, window: int | None, dtype: torch.dtype, num_blocks: int,
               block_size: int = 16) -> PagedAttention:
    attn = PagedAttention(heads, kv_heads, dim, sliding_window=window)
    attn.kv_cache = torch.randn(num_blocks, block_size, 2, kv_heads, dim).to(dtype)
    return attn


def _span(t: int, num_keys: int, blocks: torch.Tensor) -> AttentionMetadata:
    start = num_keys - t
    mask = None
    if start:
        mask = torch.arange(num_keys)[None, :] <= torch.arange(start, num_keys)[:, None]
    return AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.long),
                             prefills=[PrefillSpan(0, t, blocks, num_keys, mask)])


def _prefill(attn: PagedAttention, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The prefill half of PagedAttention.forward, with no new keys to write (the cache holds them all)."""
    k = v = torch.empty(0, attn.num_kv_heads, attn.head_dim)
    meta.slot_mapping = torch.empty(0, dtype=torch.long)
    with torch.inference_mode():
        return attn.forward(q, k, v, meta)


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 4, 64), (6, 2, 32), (9, 3, 24), (8, 1, 80)])
@pytest.mark.parametrize("t, num_keys", [(1, 1), (3, 3), (70, 70), (33, 100), (130, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_prompt_attention_matches_pytorch(kernels, heads, kv_heads, dim, t, num_keys, dtype):
    torch.manual_seed(heads * 1000 + t * 10 + num_keys)
    attn = _attention(heads, kv_heads, dim, None, dtype, num_blocks=40)
    blocks = torch.randperm(40)[: -(-num_keys // 16)]   # the request's blocks, in no particular order
    q = torch.randn(t, heads, dim)
    expected = _prefill(attn, q, _span(t, num_keys, blocks))
    attn.native = counted = _Counted(kernels)
    got = _prefill(attn, q, _span(t, num_keys, blocks))
    assert counted.calls == 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t, num_keys", [(33, 100), (130, 257)])
def test_the_avx2_prompt_attention_matches_pytorch(t, num_keys):
    import textcomplete.kernels as native
    if not native.target_supported("avx2"):
        pytest.skip("this CPU does not run AVX2 code")
    avx2 = native.decode_layers("avx2")
    assert avx2 is not None and avx2.vector_lanes() == 8
    torch.manual_seed(t)
    attn = _attention(6, 2, 32, None, torch.float16, num_blocks=20)
    blocks = torch.randperm(20)[: -(-num_keys // 16)]
    q = torch.randn(t, 6, 32)
    expected = _prefill(attn, q, _span(t, num_keys, blocks))
    attn.native = avx2
    torch.testing.assert_close(_prefill(attn, q, _span(t, num_keys, blocks)), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 16, 40, 300])
@pytest.mark.parametrize("t, num_keys", [(70, 70), (33, 100), (130, 257)])
def test_native_prompt_attention_keeps_the_sliding_window(kernels, window, t, num_keys):
    torch.manual_seed(window + t)
    attn = _attention(6, 2, 32, window, torch.float16, num_blocks=20)
    blocks = torch.randperm(20)[: -(-num_keys // 16)]
    q = torch.randn(t, 6, 32)
    expected = _prefill(attn, q, _span(t, num_keys, blocks))
    attn.native = counted = _Counted(kernels)
    got = _prefill(attn, q, _span(t, num_keys, blocks))
    assert counted.calls == 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_native_prompt_attention_rejects_blocks_outside_the_cache(kernels):
    attn = _attention(4, 4, 16, None, torch.float32, num_blocks=4)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.prompt_attention(torch.randn(20, 4, 16), attn.kv_cache, torch.tensor([0, 7]), 20, 0, 0.25)
