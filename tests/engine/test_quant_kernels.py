"""Block-format matmul kernels against a float64 oracle: dequantize in PyTorch, then multiply in float64.

Every format, row counts on both sides of the direct/tiled switch, odd N and K, the vector and the portable
decoders (as built for this CPU and as built for AVX2), the PyTorch fallback, read-only mapped weights, and clear
errors on bad input.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch

from tests.unit.test_quant_formats import EXPECTED, by_name, random_blocks
from textcomplete.kernels import cpu_flags, quant_matmul, target_supported
from textcomplete.quant import DIRECT_ROWS, Format, dequantize, embedding, matmul, native_available

ROWS = [1, 2, 3, 16, 33]
NS = [7, 33, 65]


def built_for(target: str):
    if not target_supported(target):
        pytest.skip(f"this CPU does not run {target} code")
    module = quant_matmul(target)
    assert module is not None, f"the native block-format kernels did not build for {target}"
    return module


@pytest.fixture(scope="module")
def native():
    return built_for("native")


@pytest.fixture(scope="module")
def avx2():
    """The kernels built for AVX2 without AVX-512: the vector code of most desktops and laptops."""
    module = built_for("avx2")
    assert module.vectorized() and module.vector_lanes() == 8, "the AVX2 build has no AVX2 decoders"
    return module


@pytest.fixture(scope="module")
def avx512():
    """The kernels built for AVX-512 without AMX: the exact tiled products in the float32 micro-kernel."""
    module = built_for("avx512")
    assert module.vector_lanes() == 16 and not module.amx(), "the AVX-512 build without AMX uses AMX"
    return module


@pytest.fixture(scope="module", params=["native", "avx2", "avx512"])
def each_build(request):
    """The kernels as built for this CPU, then as built for AVX2 and for AVX-512 without AMX (where those are
    other builds: on an AVX2 machine the AVX2 build is the native one, on an AVX-512 machine without AMX so is
    the AVX-512 one)."""
    module = request.getfixturevalue(request.param)
    if request.param != "native" and module is request.getfixturevalue("native"):
        pytest.skip(f"on this CPU the {request.param} build is the native one, tested as such")
    return module


def odd_ks(fmt: Format) -> list[int]:
    """K values of an odd number of blocks (float formats: a multiple of 16 and one with a ragged tail)."""
    if fmt.block_size == 1:
        return [48, 101]
    return [fmt.block_size * 3] if fmt.block_size == 256 else [fmt.block_size * 3, fmt.block_size * 7]


class Oracle:
    """x @ W.T in float64 from the PyTorch decoder, and the float32 bound 1e-5 * (|x| @ |W|.T) per output
    (float32 rounding over K terms)."""

    def __init__(self, x: torch.Tensor, raw: torch.Tensor, fmt: Format, k: int) -> None:
        w = dequantize(raw, fmt, k).double()
        self.name = fmt.name
        self.exact = x.double() @ w.T
        self.bound = 1e-5 * (x.double().abs() @ w.abs().T) + 1e-30

    def check(self, y: torch.Tensor) -> None:
        assert y.dtype == torch.float32 and y.shape == self.exact.shape
        worst = ((y.double() - self.exact).abs() / self.bound).max().item()
        assert worst <= 1.0, f"{self.name}: error {worst:.3g} x the float32 bound"


def assert_matches_oracle(y: torch.Tensor, x: torch.Tensor, raw: torch.Tensor, fmt: Format, k: int) -> None:
    Oracle(x, raw, fmt, k).check(y)


def cases(fmt: Format, seed: int):
    for k in odd_ks(fmt):
        for n in NS:
            raw = torch.from_numpy(random_blocks(fmt, n, k, seed=seed + n + k))
            for m in ROWS:
                yield m, n, k, raw, torch.randn(m, k, generator=torch.Generator().manual_seed(m + n + k))


@pytest.mark.parametrize("name", EXPECTED)
def test_native_kernels_match_the_oracle(each_build, name):
    fmt = by_name(name)
    for m, n, k, raw, x in cases(fmt, seed=0):
        oracle = Oracle(x, raw, fmt, k)
        oracle.check(matmul(x, raw, fmt, k))
        for direct_rows in (0, 64):       # force the tiled and the direct path at every row count
            for portable in (False, True):
                oracle.check(each_build.matmul(x, raw, fmt.type_id, k, direct_rows, portable))


@pytest.mark.parametrize("name", ["F16", "Q4_0", "Q4_K", "Q6_K"])
def test_tiled_products_of_many_rows_match_the_oracle(each_build, name):
    """x with many rows (a long prompt's prefill chunk, and more): the tiled path then takes fewer weight rows
    a tile and shorter K-chunks, so that its transposed output and x stay in cache; rows past a multiple of
    the vector width are padding that must not reach y. On AVX2, 130 and 200 rows take the micro-kernel and the
    others BLAS tiles; 130 rows end in a vector of 2 real rows, which row_block multiplies over several
    K-chunks."""
    fmt = by_name(name)
    k = odd_ks(fmt)[0]
    raw = torch.from_numpy(random_blocks(fmt, 300, k, seed=5))
    for m in (130, 200, 520, 1100):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        oracle = Oracle(x, raw, fmt, k)
        for portable in (False, True):
            oracle.check(each_build.matmul(x, raw, fmt.type_id, k, 0, portable))


@pytest.mark.parametrize("name", EXPECTED)
def test_native_dequantize_matches_pytorch(each_build, name):
    fmt = by_name(name)
    for k in odd_ks(fmt):
        raw = torch.from_numpy(random_blocks(fmt, 19, k, seed=k))
        expected = dequantize(raw, fmt, k)
        for portable in (False, True):
            # The two may round a scale's product differently (a fused multiply-add): one float32 ulp.
            torch.testing.assert_close(each_build.dequantize(raw, fmt.type_id, k, portable), expected,
                                       rtol=2e-7, atol=1e-30)


@pytest.mark.parametrize("name", EXPECTED)
def test_the_pytorch_fallback_matches_the_oracle(name):
    fmt = by_name(name)
    for m, n, k, raw, x in cases(fmt, seed=1):
        if m in (1, 33):
            assert_matches_oracle(matmul(x, raw, fmt, k, native=False), x, raw, fmt, k)


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the 8-bit mode sees it: each block of 32 rounded to int8 steps of max|x| / 127 (half to even)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * scale) * (amax / 127)).reshape(x.shape)


INT8_FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def narrow_int8_formats(module) -> set[str]:
    """Formats whose narrow products (decode steps) multiply 8-bit x in registers too in this build (the K
    formats everywhere, every integer format on AVX2); the others stay exact there."""
    return {name for name in INT8_FORMATS if by_name(name).type_id in module.int8_narrow_type_ids()}


def test_every_vector_build_multiplies_the_k_formats_in_8_bits_in_decode_steps(each_build):
    expected = set(INT8_FORMATS) if each_build.vector_lanes() == 8 else {"Q4_K", "Q5_K", "Q6_K"}   # AVX2: all
    assert narrow_int8_formats(each_build) == expected


@pytest.mark.parametrize("name", INT8_FORMATS)
def test_8_bit_activations_are_exact_on_the_rounded_activations(each_build, name):
    """8-bit products compute x8 @ W.T exactly (x8: x rounded to 8 bits in blocks of 32): only the rounding
    of x differs from the float32 product. Wide products of every format with codes take them, narrow ones
    those of narrow_int8_formats; the rest stay on the exact float32 path."""
    fmt = by_name(name)
    assert each_build.int8_available(), "a build with AVX-512 VNNI or AVX2 has the 8-bit products"
    for m, n, k, raw, x in cases(fmt, seed=2):
        rounded = Oracle(int8_activations(x), raw, fmt, k)
        for direct_rows in (0, DIRECT_ROWS):
            y = each_build.matmul(x, raw, fmt.type_id, k, direct_rows, False, True)
            if m <= direct_rows and name not in narrow_int8_formats(each_build):
                assert_matches_oracle(y, x, raw, fmt, k)
                continue
            bound = rounded.bound + 1e-6 * rounded.exact.abs().max()
            worst = ((y.double() - rounded.exact).abs() / bound).max()
            assert worst <= 1.0, f"{name} m={m} n={n} k={k}: error {worst:.3g} x the bound"
            assert not torch.equal(y, matmul(x, raw, fmt, k))   # x8 is a coarse copy of x


# Byte offsets of each block's float16 scales.
HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
               "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("name", INT8_FORMATS)
def test_8_bit_products_do_not_saturate_at_the_extreme_codes(each_build, name):
    """AVX2's byte products sum pairs in 16 bits and add several such sums before widening: exact only while
    the codes stay within the bounds the kernels assume. Weights at their largest and smallest codes (every
    byte 0xFF or 0x00; Q8_0's q at 127 and -128), x at full scale (+-1: exact in 8 bits)."""
    fmt = by_name(name)
    k, n = 512, 16
    fills = (0x7F, 0x80) if name == "Q8_0" else (0xFF, 0x00)
    blocks = np.empty((n, k // fmt.block_size, fmt.block_bytes), np.uint8)
    for j in range(n):
        blocks[j] = fills[j % 2]
    for offset in HALF_FIELDS[name]:
        blocks[:, :, offset:offset + 2] = np.frombuffer(np.float16(1.0).tobytes(), np.uint8)
    raw = torch.from_numpy(blocks.reshape(n, -1))
    w = dequantize(raw, fmt, k).double()
    signs = torch.tensor([1.0, -1.0]).repeat(k // 2)
    for x in (torch.ones(5, k), -torch.ones(5, k), signs.expand(5, k).contiguous()):
        expected = x.double() @ w.T
        bound = 1e-5 * (x.double().abs() @ w.abs().T)
        for direct_rows in (0, DIRECT_ROWS):
            y = each_build.matmul(x, raw, fmt.type_id, k, direct_rows, False, True)
            assert ((y.double() - expected).abs() <= bound).all(), f"{name}: {(y.double() - expected).abs().max()}"


def test_narrow_8_bit_products_equal_the_wide_ones(each_build):
    """The in-register narrow kernels and the tiled wide ones compute the same rounded product."""
    for name in sorted(narrow_int8_formats(each_build)):
        fmt = by_name(name)
        k, n = 256 * 3, 37
        raw = torch.from_numpy(random_blocks(fmt, n, k, seed=5))
        for m in (1, 2, 3, 5, DIRECT_ROWS):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            narrow = each_build.matmul(x, raw, fmt.type_id, k, DIRECT_ROWS, False, True)
            wide = each_build.matmul(x, raw, fmt.type_id, k, 0, False, True)
            torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-5 * wide.abs().max().item())


def test_direct_products_of_long_rows_take_k_in_chunks(each_build):
    """When the rows of x outgrow the cache (M * K values past 256 KiB), the direct path walks K in chunks
    instead of whole weight rows; the cases above all fit. Exact and 8-bit, every format, against the same
    references."""
    k, n, m = 256 * 136, 19, 8   # 8 rows of 34816 values: 1088 KiB of float32 x, 272 KiB in 8 bits
    for name in EXPECTED:
        fmt = by_name(name)
        raw = torch.from_numpy(random_blocks(fmt, n, k, seed=11))
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
        Oracle(x, raw, fmt, k).check(each_build.matmul(x, raw, fmt.type_id, k, DIRECT_ROWS, False))
        if name in narrow_int8_formats(each_build):
            narrow = each_build.matmul(x, raw, fmt.type_id, k, DIRECT_ROWS, False, True)
            wide = each_build.matmul(x, raw, fmt.type_id, k, 0, False, True)
            torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-5 * wide.abs().max().item())


def test_a_product_of_several_matrices_in_one_pass_matches_each(each_build):
    """A fused projection's matrices (q, k, v of other formats, as a Q4_K_M file keeps them) run as one
    product, by the direct path in one pass and by the tiled one into each matrix's columns of one output:
    its columns are each matrix's product, exact and in 8 bits alike, on both paths and the portable one."""
    k = 512
    fmts = [by_name(name) for name in ("Q4_K", "Q6_K", "Q8_0", "F16")]
    raws = [torch.from_numpy(random_blocks(f, n, k, seed=n)) for f, n in zip(fmts, (37, 16, 21, 11))]
    for m, portable in ((1, False), (3, False), (DIRECT_ROWS, False), (DIRECT_ROWS + 1, False), (40, False),
                        (3, True), (40, True)):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        for int8 in (False, True):
            y = each_build.matmul_parts(x, raws, [f.type_id for f in fmts], k, DIRECT_ROWS, portable, int8)
            each = torch.cat([each_build.matmul(x, r, f.type_id, k, DIRECT_ROWS, portable, int8)
                              for f, r in zip(fmts, raws)], dim=1)
            assert torch.equal(y, each)
            if not int8:
                Oracle(x, raws[0], fmts[0], k).check(y[:, :37])
                Oracle(x, raws[1], fmts[1], k).check(y[:, 37:53])


def test_amx_tiles_take_the_exact_tiled_products_where_the_cpu_has_them(native):
    """On a CPU with AMX the native build multiplies the formats with groups of 32 codes on tiles (amx.h): x as
    three bfloat16 parts, each group's sums scaled per weight row (plus its offset, for the formats with a
    minimum). Row and column counts off the 16 x 16 tiles and K over several decoded chunks must all stay within
    float32 rounding of the oracle, as the float32 micro-kernel's products do."""
    if "amx_tile" not in cpu_flags() or "amx_bf16" not in cpu_flags():
        pytest.skip("this CPU has no AMX tiles")
    assert native.amx(), "the native build on a CPU with AMX does not use its tiles"
    micro_kernel = built_for("avx512")
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"):
        fmt = by_name(name)
        k = 256 * 3 if fmt.block_size == 256 else 32 * 19   # three chunks of K; a chunk and a part of one
        raw = torch.from_numpy(random_blocks(fmt, 45, k, seed=11))
        for m in (9, 16, 47):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
            oracle = Oracle(x, raw, fmt, k)
            oracle.check(native.matmul(x, raw, fmt.type_id, k, 0, False))
            oracle.check(micro_kernel.matmul(x, raw, fmt.type_id, k, 0, False))


def test_every_thread_count_gives_the_same_answer(native):
    """Exactly for the direct path (each output is one thread's sum); within the bound for the tiled one,
    whose matmul library may pick other kernels when it runs inside a parallel region."""
    fmt, k, n = by_name("Q4_K"), 256 * 5, 301
    raw = torch.from_numpy(random_blocks(fmt, n, k, seed=3))
    threads = torch.get_num_threads()
    try:
        for m in (1, DIRECT_ROWS, DIRECT_ROWS + 1, 40):
            x = torch.randn(m, k)
            torch.set_num_threads(1)
            one = matmul(x, raw, fmt, k)
            torch.set_num_threads(max(2, threads))
            several = matmul(x, raw, fmt, k)
            if m <= DIRECT_ROWS:
                torch.testing.assert_close(several, one, rtol=0, atol=0)
            for y in (one, several):
                assert_matches_oracle(y, x, raw, fmt, k)
    finally:
        torch.set_num_threads(threads)


def test_weights_in_a_read_only_map_with_padded_rows(native, tmp_path):
    """Rows may be views with a stride beyond their bytes, in a mapping that faults on any write."""
    fmt, k, n = by_name("Q6_K"), 256 * 3, 33
    rows = random_blocks(fmt, n, k, seed=5)
    padded = np.zeros((n, rows.shape[1] + 14), dtype=np.uint8)
    padded[:, :rows.shape[1]] = rows
    path = tmp_path / "weights.bin"
    path.write_bytes(padded.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        with pytest.warns(UserWarning, match="not writable"):
            whole = torch.frombuffer(mapped, dtype=torch.uint8)
        raw = whole.reshape(n, -1)[:, :rows.shape[1]]
        for m in (1, 3, 33):
            x = torch.randn(m, k)
            assert_matches_oracle(matmul(x, raw, fmt, k), x, torch.from_numpy(rows), fmt, k)
        ids = torch.tensor([5, 0, 32, 5])
        torch.testing.assert_close(embedding(ids, raw, fmt, k), dequantize(torch.from_numpy(rows), fmt, k)[ids],
                                   rtol=2e-7, atol=1e-30)
        del whole, raw


def test_empty_inputs():
    fmt = by_name("Q8_0")
    raw = torch.from_numpy(random_blocks(fmt, 5, 64, seed=0))
    assert matmul(torch.zeros(0, 64), raw, fmt, 64).shape == (0, 5)
    assert matmul(torch.zeros(2, 64), raw[:0], fmt, 64).shape == (2, 0)
    assert embedding(torch.zeros(0, dtype=torch.long), raw, fmt, 64).shape == (0, 64)


def test_bad_inputs_raise_clear_errors(each_build):
    fmt, k = by_name("Q4_0"), 64
    raw = torch.from_numpy(random_blocks(fmt, 8, k, seed=0))
    x = torch.randn(3, k)
    with pytest.raises(ValueError, match="contiguous"):
        matmul(torch.randn(k, 3).t(), raw, fmt, k)
    with pytest.raises(ValueError, match=r"float32 \[M, 64\]"):
        matmul(x.double(), raw, fmt, k)
    with pytest.raises(ValueError, match=r"float32 \[M, 64\]"):
        matmul(torch.randn(3, 96), raw, fmt, k)
    with pytest.raises(ValueError, match=r"uint8 \[N, 36\]"):
        matmul(x, raw[:, :20], fmt, k)
    with pytest.raises(ValueError, match="contiguous bytes"):
        matmul(x, torch.zeros(36, 8, dtype=torch.uint8).t(), fmt, k)
    with pytest.raises(ValueError, match="multiple of 32"):
        matmul(torch.randn(3, 40), raw, fmt, 40)
    # The native entry points check for themselves too: an error, never a crash.
    with pytest.raises(RuntimeError, match="takes 36 bytes"):
        each_build.matmul(x, raw[:, :20], fmt.type_id, k, 4, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        each_build.matmul(torch.randn(k, 3).t(), raw, fmt.type_id, k, 4, False)
    with pytest.raises(RuntimeError, match="no native kernel"):
        each_build.matmul(x, raw, 10, k, 4, False)
    with pytest.raises(RuntimeError, match="not a multiple"):
        each_build.dequantize(raw, fmt.type_id, 40, False)


def test_native_availability_is_reported():
    assert native_available() is (quant_matmul() is not None)
