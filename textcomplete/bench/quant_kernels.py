"""Speed of the block-format matmul kernels against torch's float32 F.linear, per format, on one shape.

Prints GB/s of weights read for a decode step (M = 1), both with the matrix in cache ("hot") and rotating
over copies larger than the last-level cache ("cold", the memory-bound figure), and GFLOP/s for M = 128, 512.
Run as `python -m textcomplete.bench.quant_kernels [--n 2048 --k 8192 --threads 2 --formats Q4_K,Q8_0]`;
`--int8` times the products with 8-bit activations (where the CPU and format have them) instead.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from textcomplete.quant import FORMATS, Format, matmul, native_available, row_bytes

# Byte offsets of each block's float16 scales: set to a sane value so random bytes make valid blocks.
_HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,)}
_COLD_BYTES = 1 << 30


def random_weights(fmt: Format, n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Valid uint8 [n, row_bytes] weights of `fmt`: random codes, scales of 0.01 (float formats: randn)."""
    g = torch.Generator().manual_seed(seed)
    if fmt.block_size == 1:
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[fmt.name]
        return torch.randn(n, k, generator=g).to(dtype).view(torch.uint8)
    blocks = torch.randint(0, 256, (n * k // fmt.block_size, fmt.block_bytes), generator=g, dtype=torch.uint8)
    scale = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)
    for offset in _HALF_FIELDS[fmt.name]:
        blocks[:, offset:offset + 2] = scale
    return blocks.reshape(n, row_bytes(fmt, k))


def seconds(fn, copies: int, repeat: int) -> float:
    """Best wall time of fn(i) over `repeat` calls, i cycling through `copies` inputs (after a warm-up): the
    least disturbed run, since other work on the machine only ever adds time."""
    for i in range(min(copies, 3)):
        fn(i)
    times = []
    for i in range(repeat):
        start = time.perf_counter()
        fn(i % copies)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, weights: list[torch.Tensor], product, n: int, k: int, repeat: int) -> str:
    """One table row: M=1 hot and cold GB/s, M=128 and M=512 GFLOP/s."""
    nbytes = weights[0].numel() * weights[0].element_size()
    x1 = torch.randn(1, k)
    hot = nbytes / seconds(lambda i: product(x1, weights[0]), 1, repeat * 4) / 1e9
    cold = nbytes / seconds(lambda i: product(x1, weights[i]), len(weights), max(repeat * 4, len(weights))) / 1e9
    cells = [f"{name:6s}", f"{nbytes / 1e6:8.1f}", f"{hot:8.1f}", f"{cold:8.1f}"]
    for m in (128, 512):
        x = torch.randn(m, k)
        cells.append(f"{2 * m * n * k / seconds(lambda i: product(x, weights[0]), 1, repeat) / 1e9:9.1f}")
    return " ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="weight rows (output features)")
    parser.add_argument("--k", type=int, default=8192, help="weight columns (input features)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--formats", default=",".join(f.name for f in FORMATS.values()))
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per figure (the best is shown)")
    parser.add_argument("--portable", action="store_true", help="time the PyTorch fallback instead")
    parser.add_argument("--int8", action="store_true", help="quantize activations to 8 bits (--activations int8)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = native_available() and not args.portable
    kind = ("native kernels" if native else "PyTorch path") + (", 8-bit activations" if args.int8 else "")
    print(f"[{args.n}, {args.k}] weights, {args.threads} threads, {kind}")
    print("format   MB      M=1 GB/s hot/cold  M=128 GFLOP/s  M=512 GFLOP/s")
    dense = torch.randn(args.n, args.k)
    copies = [dense] + [dense.clone() for _ in range(max(0, _COLD_BYTES // dense.nbytes))]
    print(measure("torch", copies, lambda x, w: F.linear(x, w), args.n, args.k, args.repeat))
    del copies
    by_name = {f.name: f for f in FORMATS.values()}
    unknown = [name for name in args.formats.split(",") if name not in by_name]
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {','.join(by_name)}")
    for name in args.formats.split(","):
        fmt = by_name[name]
        raw = random_weights(fmt, args.n, args.k)
        weights = [raw] + [raw.clone() for _ in range(_COLD_BYTES // raw.numel())]
        product = lambda x, w, fmt=fmt: matmul(x, w, fmt, args.k, native=native, int8=args.int8)   # noqa: E731
        print(measure(fmt.name, weights, product, args.n, args.k, args.repeat))


if __name__ == "__main__":
    main()
