"""The kernels as a plain shared library (textcomplete.kernels.library): the same products as the torch extension,
bit for bit, in a process that never loads torch.

Every format, both paths (direct and tiled), exact and 8-bit activations, the vector and portable decoders, as built
for this CPU and for AVX2; the float64 oracle of test_quant_kernels; thread settings; clear errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.engine.test_quant_kernels import ROWS, Oracle, odd_ks
from tests.unit.test_quant_formats import EXPECTED, by_name, random_blocks
from textcomplete.kernels import library, quant_matmul, target_supported
from textcomplete.kernels.library import Matrix, NativeError, Stored
from textcomplete.quant import DIRECT_ROWS


def library_for(target: str):
    if not target_supported(target):
        pytest.skip(f"this CPU does not run {target} code")
    lib = library.load(target)
    assert lib is not None, f"the native library did not build for {target}"
    return lib


def built_for(target: str):
    """(library, torch extension) built for `target`."""
    lib, ext = library_for(target), quant_matmul(target)
    assert ext is not None, f"the torch extension did not build for {target}"
    return lib, ext


@pytest.fixture(scope="module", params=["native", "avx2"])
def builds(request):
    """(library, torch extension) as built for this CPU, then for AVX2."""
    return built_for(request.param)


@pytest.mark.parametrize("name", EXPECTED)
def test_every_product_equals_the_torch_extensions_bit_for_bit(builds, name):
    lib, ext = builds
    fmt = by_name(name)
    int8 = lib.int8_available() and fmt.block_size >= 32 and fmt.name not in ("F32", "F16", "BF16")
    for k in odd_ks(fmt):
        for n in (7, 65):
            raw = random_blocks(fmt, n, k, seed=n + k)
            part = Stored.of(raw, fmt.type_id)
            for m in [*ROWS, 300]:
                x = np.random.default_rng(m + k).standard_normal((m, k), dtype=np.float32)
                for direct_rows in (0, 64):
                    for portable, quantized in ((False, False), (True, False), (False, int8)):
                        got = lib.matmul(x, [part], direct_rows, portable, quantized)
                        want = ext.matmul(torch.from_numpy(x), torch.from_numpy(raw), fmt.type_id, k, direct_rows,
                                          portable, quantized).numpy()
                        np.testing.assert_array_equal(got, want, err_msg=f"{name} m={m} n={n} k={k}")
                Oracle(torch.from_numpy(x), torch.from_numpy(raw), fmt, k).check(
                    torch.from_numpy(lib.matmul(x, [part], 4)))


def test_several_matrices_are_written_side_by_side(builds):
    lib, _ = builds
    k = 256 * 2
    raws = [(random_blocks(by_name(name), n, k, seed=n), by_name(name)) for name, n in (("Q4_K", 40), ("Q6_K", 24))]
    parts = [Stored.of(raw, fmt.type_id) for raw, fmt in raws]
    for m in (1, 5, 40):
        x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
        for direct_rows in (0, 64):
            both = lib.matmul(x, parts, direct_rows)
            np.testing.assert_array_equal(both, np.concatenate([lib.matmul(x, [p], direct_rows) for p in parts], 1))


@pytest.mark.parametrize("name", EXPECTED)
def test_dequantize_equals_the_torch_extensions(builds, name):
    lib, ext = builds
    fmt = by_name(name)
    k = odd_ks(fmt)[0]
    raw = random_blocks(fmt, 9, k, seed=1)
    for portable in (False, True):
        np.testing.assert_array_equal(lib.dequantize(Stored.of(raw, fmt.type_id), k, portable),
                                      ext.dequantize(torch.from_numpy(raw), fmt.type_id, k, portable).numpy())


def test_rows_may_be_strided_views(builds):
    lib, _ = builds
    fmt, k = by_name("Q8_0"), 96
    raw = random_blocks(fmt, 10, k, seed=2)
    padded = np.zeros((10, raw.shape[1] + 6), dtype=np.uint8)
    padded[:, :raw.shape[1]] = raw
    x = np.random.default_rng(0).standard_normal((3, k), dtype=np.float32)
    np.testing.assert_array_equal(lib.matmul(x, [Stored.of(padded[:, :raw.shape[1]], fmt.type_id)], 4),
                                  lib.matmul(x, [Stored.of(raw, fmt.type_id)], 4))


def test_the_thread_setting_changes_nothing_but_the_threads():
    lib = library_for("native")
    fmt, k = by_name("Q4_K"), 256 * 3
    raw = Stored.of(random_blocks(fmt, 301, k, seed=3), fmt.type_id)
    x = np.random.default_rng(1).standard_normal((40, k), dtype=np.float32)
    before = lib.num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            lib.set_num_threads(threads)
            assert lib.num_threads() == threads
            results.append([lib.matmul(x[:1], [raw], 4), lib.matmul(x, [raw], 4)])
        for one in results[1:]:
            for got, want in zip(one, results[0]):
                np.testing.assert_array_equal(got, want)
    finally:
        lib.set_num_threads(before)


def test_the_default_is_a_thread_per_cpu_the_process_may_use():
    lib = library_for("native")
    before = lib.num_threads()
    try:
        lib.set_num_threads(0)
        assert lib.num_threads() == len(os.sched_getaffinity(0))
    finally:
        lib.set_num_threads(before)


def test_callers_on_several_threads_share_the_pool_and_get_their_own_results():
    """One caller's products use the pool's threads; another thread's products run meanwhile on that thread
    alone (ctypes lets go of the GIL during a call). Every result equals its one-thread product."""
    lib = library_for("native")
    fmt, k = by_name("Q4_0"), 32 * 24
    raws = [Stored.of(random_blocks(fmt, 97 + i, k, seed=i), fmt.type_id) for i in range(3)]
    xs = [np.random.default_rng(i).standard_normal((5 + 7 * i, k), dtype=np.float32) for i in range(3)]
    before = lib.num_threads()
    try:
        lib.set_num_threads(1)
        want = [lib.matmul(x, [raw], 4) for x, raw in zip(xs, raws)]
        lib.set_num_threads(3)
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda i: [lib.matmul(xs[i], [raws[i]], 4) for _ in range(40)], range(3)))
    finally:
        lib.set_num_threads(before)
    for results, expected in zip(got, want):
        for result in results:
            np.testing.assert_array_equal(result, expected)


def test_a_forked_child_runs_its_products_on_threads_of_its_own():
    """The pool's helpers do not survive fork(); a child starts its own, and its products equal its parent's."""
    library_for("native")   # built (and cached) here, so that the child only loads it
    code = textwrap.dedent("""
        import os
        import numpy as np
        from tests.unit.test_quant_formats import by_name, random_blocks
        from textcomplete.kernels import library
        from textcomplete.kernels.library import Stored
        lib = library.load()
        lib.set_num_threads(2)
        fmt = by_name("Q4_K")
        raw = Stored.of(random_blocks(fmt, 301, 768, seed=3), fmt.type_id)
        x = np.random.default_rng(1).standard_normal((40, 768), dtype=np.float32)
        want = lib.matmul(x, [raw], 4)   # starts the parent's helper
        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            same = all(np.array_equal(lib.matmul(x, [raw], 4), want) for _ in range(20))
            os.write(write, f"{len(os.listdir('/proc/self/task'))} {same}".encode())
            os._exit(0)
        os.close(write)
        print(os.read(read, 100).decode())
        assert os.waitpid(child, 0)[1] == 0
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    threads, same = done.stdout.split()
    assert same == "True"
    assert int(threads) >= 2, "the child ran its products on one thread"


def test_bad_arguments_are_errors_not_crashes(builds):
    lib, _ = builds
    fmt, k = by_name("Q4_0"), 64
    raw = random_blocks(fmt, 8, k, seed=0)
    x = np.ones((3, k), dtype=np.float32)
    with pytest.raises(NativeError, match="takes 36 bytes"):
        lib.matmul(x, [Stored.of(raw[:, :20], fmt.type_id)], 4)
    with pytest.raises(NativeError, match="no native kernel"):
        lib.matmul(x, [Stored.of(raw, 10)], 4)
    with pytest.raises(NativeError, match="not a multiple"):
        lib.dequantize(Stored.of(raw, fmt.type_id), 40)
    with pytest.raises(NativeError, match="no matrices"):
        lib.matmul(x, [], 4)
    with pytest.raises(ValueError, match="uint8"):
        Stored.of(raw.astype(np.int8), fmt.type_id)
    with pytest.raises(ValueError, match="float32"):
        lib.matmul(x.astype(np.float64), [Stored.of(raw, fmt.type_id)], 4)
    assert lib.has_type(fmt.type_id) and not lib.has_type(10)


def test_a_process_using_the_library_never_loads_torch():
    library_for("native")   # built (and cached) here, so that the child only loads it
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from textcomplete.kernels import library
        from textcomplete.kernels.library import Stored
        lib = library.load()
        raw = np.zeros((4, 34), dtype=np.uint8)   # Q8_0: 32 codes and a float16 scale a block
        y = lib.matmul(np.ones((2, 32), dtype=np.float32), [Stored.of(raw, 8)], 4)
        assert y.shape == (2, 4) and not y.any()
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# --- The Llama-family layer stack (llama_step.h) against the PyTorch layers, step by step -------------------------

def library_layers(lib, model, cache_dtype: str):
    """The torch model's decoder layers (float32 or stored weights, as loaded) in a library layer stack with
    caches of its own, the same size as the engine's."""
    from textcomplete.kernels.library import LlamaShape
    from textcomplete.models.llama import NativeDecode

    spec, attn0 = model.spec, model.model.layers[0].self_attn.attn
    blocks, block_size = attn0.kv_cache.shape[:2]
    shape = LlamaShape(hidden=model.model.norm.weight.numel(), heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                       head_dim=spec.head_dim, rotary_dim=model.rotary.rotary_dim,
                       eps=model.model.layers[0].input_layernorm.eps, block_size=block_size,
                       num_slots=blocks * block_size, cache_dtype=cache_dtype, direct_rows=DIRECT_ROWS)
    stack = lib.llama_layers(shape)
    packer = NativeDecode.__new__(NativeDecode)
    packer.qk_norm = model.qk_norm
    for layer in model.model.layers:
        tensors, layout = packer._pack(layer)
        counts, types = layout[:4], layout[4:]
        arrays = [t.numpy() if t.numel() else None for t in tensors]
        projections, part = [], 0
        for count in counts:
            matrices = []
            for _ in range(count):
                weight, raw, order, bias = arrays[4 + 4 * part: 8 + 4 * part]
                if raw is None:   # float32 weight [out, in]: the F32 format, GGML type 0
                    raw, type_id = weight.view(np.uint8).reshape(weight.shape[0], -1), 0
                else:
                    type_id = types[part]
                matrices.append(Matrix(Stored.of(raw, type_id), order, bias))
                part += 1
            projections.append(matrices)
        stack.add_layer(arrays[0], arrays[1], arrays[2], arrays[3], stack.new_cache(),
                        layer.self_attn.attn.sliding_window or 0, projections)
    return stack


def recorded_steps(engine, prompts, params):
    """Run the engine (PyTorch layers) and record each step's model inputs and hidden states."""
    model = engine.loaded.model
    steps = []
    original = type(model).forward

    def recording(self, input_ids, positions, meta):
        out = original(self, input_ids, positions, meta)
        steps.append((input_ids.clone(), positions.clone(), meta, out.clone()))
        return out
    type(model).forward = recording
    try:
        engine.generate(prompts, params)
    finally:
        type(model).forward = original
    return steps


def replay(stack, lib, model, steps):
    """Each recorded step through the library stack; yields (library hidden states, PyTorch's)."""
    from textcomplete.kernels.library import PromptChunk

    for input_ids, positions, meta, want in steps:
        with torch.inference_mode():
            x = model.model.embed_tokens(input_ids).numpy()
            cos, sin = (t.reshape(len(input_ids), -1).numpy() for t in model.rotary.cos_sin(positions, torch.float32))
        decodes = meta.num_decode_tokens
        key_slots = meta.decode_key_slots.numpy() if decodes else np.zeros((0, 1), dtype=np.int64)
        key_lens = meta.decode_key_lens.numpy() if decodes else np.zeros(0, dtype=np.int64)
        chunks = [PromptChunk(s.q_end - s.q_start, s.block_table.numpy(), s.num_keys) for s in meta.prefills]
        hidden = stack.step(x, cos, sin, meta.slot_mapping.numpy(), key_slots, key_lens, chunks)
        yield lib.rms_norm(hidden, model.model.norm.weight.detach().numpy(), model.model.norm.eps), want.numpy()


@pytest.mark.parametrize("arch, cache_dtype", [("llama", "float32"), ("qwen2", "float16"), ("qwen3", "bfloat16")])
def test_the_layer_stack_computes_every_step_kind_as_the_pytorch_layers(tiny_model_dir, arch, cache_dtype):
    """Decode rows, prompt chunks and steps mixing both (chunked prefill), float32 weights with q/k/v biases and
    q/k norms, each KV cache type: the library's hidden states equal PyTorch's to float32 rounding."""
    from tests.engine.test_batching import random_prompts, tiny_engine

    engine = tiny_engine(tiny_model_dir, arch, enable_prefix_caching=False, native_decode=False,
                         kv_cache_dtype=cache_dtype)
    prompts = random_prompts(7, seed=3, low=1, high=90)   # chunks of up to 64 tokens: mixed steps
    # 16-bit caches round a K/V value to neighbouring 16-bit values where the two sides' float32 values differ in
    # the last bit: a step of 2^-11 relative in float16, 2^-8 in bfloat16 (builds of other optimization levels,
    # such as the sanitizers', round the float32 values differently again)
    tolerance = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}[cache_dtype]
    steps = layer_stack_parity(engine, prompts, cache_dtype, tolerance)
    assert any(m.prefills and m.num_decode_tokens for _, _, m, _ in steps), "no step mixed decodes and prompts"
    assert any(p.num_keys > p.q_end - p.q_start for _, _, m, _ in steps for p in m.prefills), \
        "no prompt chunk continued an earlier one"


def layer_stack_parity(engine, prompts, cache_dtype: str = "float32", tolerance: float = 1e-4) -> list:
    """Each step of `engine` (PyTorch layers) replayed on the library's layer stack: equal hidden states.
    Returns the steps."""
    from tests.engine.test_batching import mixed_params

    lib = library_for("native")
    steps = recorded_steps(engine, prompts, [mixed_params(i) for i in range(len(prompts))])
    stack = library_layers(lib, engine.loaded.model, cache_dtype)
    for got, want in replay(stack, lib, engine.loaded.model, steps):
        np.testing.assert_allclose(got, want, atol=tolerance, rtol=tolerance)
    return steps


def small_engine(model: Path, **overrides):
    from textcomplete.config import EngineConfig
    from textcomplete.engine.engine import LLMEngine

    settings = dict(model=str(model), kv_cache_memory=16 << 20, max_num_batched_tokens=64, native_decode=False,
                    enable_prefix_caching=False)
    return LLMEngine(EngineConfig(**{**settings, **overrides}))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q6_K"])
def test_the_layer_stack_runs_stored_weights_as_the_pytorch_layers(tmp_path, qtype):
    """GGUF weights as the file stores them, llama.cpp's q/k row order undone by row orders."""
    from gguf import GGMLQuantizationType as QType

    from tests.engine.test_batching import random_prompts
    from tests.tiny_gguf import write_llama_gguf
    from tests.tiny_models import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    write_llama_gguf(hf, tmp_path / "m.gguf", QType[qtype])
    engine = small_engine(tmp_path / "m.gguf")
    assert any(m.stored.row_order is not None for m in engine.loaded.model.modules() if hasattr(m, "stored"))
    layer_stack_parity(engine, random_prompts(5, seed=8, low=20, high=110))


def test_the_layer_stack_keeps_to_sliding_windows(tmp_path):
    """Decode rows and prompt chunks past the window see only its last keys, as the PyTorch layers do."""
    from tests.engine.test_batching import random_prompts
    from tests.tiny_models import make_tiny_model

    hf = make_tiny_model("llama", tmp_path / "hf", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=24)
    engine = small_engine(hf)
    assert engine.loaded.model.model.layers[0].self_attn.attn.sliding_window == 24
    layer_stack_parity(engine, random_prompts(5, seed=9, low=20, high=110))


def test_the_layer_stack_refuses_what_does_not_fit(tiny_model_dir):
    from tests.engine.test_batching import tiny_engine
    from textcomplete.kernels.library import LlamaShape, PromptChunk

    lib = library_for("native")
    engine = tiny_engine(tiny_model_dir, "llama", native_decode=False)
    stack = library_layers(lib, engine.loaded.model, "float32")
    s = stack.shape
    x = np.zeros((2, s.hidden), dtype=np.float32)
    cos = np.ones((2, s.rotary_dim), dtype=np.float32)
    one_block = PromptChunk(2, np.array([0]), 2)
    with pytest.raises(NativeError, match="outside the"):
        stack.step(x, cos, cos, np.array([0, s.num_slots]), np.zeros((0, 1)), np.zeros(0), [one_block])
    with pytest.raises(NativeError, match="outside the cache's"):
        stack.step(x, cos, cos, np.array([0, 1]), np.zeros((0, 1)), np.zeros(0),
                   [PromptChunk(2, np.array([s.num_slots // s.block_size]), 2)])
    with pytest.raises(NativeError, match="key_lens"):
        stack.step(x[:1], cos[:1], cos[:1], np.array([0]), np.array([[0, 1]]), np.array([3]), [])
    with pytest.raises(ValueError, match="not the step's"):
        stack.step(x, cos, cos, np.array([0, 1]), np.zeros((0, 1)), np.zeros(0), [PromptChunk(1, np.array([0]), 1)])
    with pytest.raises(NativeError, match="bad shape"):
        lib.llama_layers(LlamaShape(64, 4, 3, 16, 16, 1e-5, 16, 64, "float32", 4))
    with pytest.raises(NativeError, match="projections"):
        stack.add_layer(np.ones(s.hidden), np.ones(s.hidden), None, None, stack.new_cache(), 0,
                        [[Matrix(Stored.of(np.zeros((3, 4 * s.hidden), dtype=np.uint8), 0))]] * 4)

