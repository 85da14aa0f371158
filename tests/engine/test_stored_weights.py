"""GGUF weights run from their stored blocks: exact against transformers, batch invariant, and about the file's
size in memory (read from /proc, so a regression to float32 copies fails)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file, save_file

from tests.arch_parity import check_parity, make_engine
from tests.engine.test_batching import mixed_params, random_prompts, tokens_of
from tests.engine.test_native_decode import native_calls  # noqa: F401 - a fixture
from tests.tiny_gguf import write_gguf, write_llama_gguf
from tests.tiny_models import make_tiny_model
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.quant.linear import StoredLinear


@pytest.fixture(scope="module")
def tiny_llama_256(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama256"), hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False)


def as_written(hf_dir: Path, gguf_path: Path, qtype: QType, directory: Path) -> Path:
    """Write hf_dir's model as a `qtype` GGUF, and a copy of the HF checkpoint holding exactly the values the
    GGUF decodes to (transformers' reference on the same weights)."""
    weights = write_llama_gguf(hf_dir, gguf_path, qtype)
    directory.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, directory / name)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("qtype", [QType.Q8_0, QType.Q4_1, QType.Q5_0, QType.Q4_K, QType.Q5_K, QType.Q6_K,
                                   QType.BF16], ids=lambda q: q.name)
def test_stored_formats_match_transformers_on_their_values(tiny_llama_256, tmp_path, qtype):
    path = tmp_path / "m.gguf"
    reference = as_written(tiny_llama_256, path, qtype, tmp_path / "reference")
    model = make_engine(path, backend="torch").loaded.model
    assert any(isinstance(m, StoredLinear) for m in model.modules())
    check_parity(path, reference, prompt_len=60, decode_steps=8)                   # the native backend
    check_parity(path, reference, prompt_len=60, decode_steps=8, backend="torch")


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q8_0, QType.BF16], ids=lambda q: q.name)
def test_native_decode_on_stored_weights_matches_pytorch_layers(tiny_llama_256, tmp_path, native_calls, qtype):
    """The fused decode layers read the stored formats with the same kernels as the PyTorch layers."""
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_llama_256, path, qtype)
    native, plain = make_engine(path, 64, backend="torch"), make_engine(path, 64, native_decode=False)
    assert native.loaded.model.native_decode is not None and plain.loaded.model.native_decode is None
    prompts = random_prompts(6, seed=5, low=1, high=70)
    params = [dataclasses.replace(mixed_params(i), logprobs=3) for i in range(6)]
    outs_n, outs_p = native.generate(prompts, params), plain.generate(prompts, params)
    assert native_calls and max(native_calls) > 1, "batched decode steps never reached the native layers"
    assert [tokens_of(o) for o in outs_n] == [tokens_of(o) for o in outs_p]
    for a, b in zip(outs_n, outs_p):
        got = torch.tensor([[e.logprob, *(lp for _, lp in e.top)] for o in a for e in o.logprobs])
        want = torch.tensor([[e.logprob, *(lp for _, lp in e.top)] for o in b for e in o.logprobs])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=2e-5)   # float32 rounding of logprobs near -16


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q5_1, QType.Q6_K], ids=lambda q: q.name)
def test_the_avx2_build_serves_what_the_native_build_serves(tiny_llama_256, tmp_path, native_calls, monkeypatch,
                                                             qtype):
    """A machine without AVX-512 runs the AVX2 decoders in every step (prefill through quant_matmul, decode
    through the fused layers): the same tokens and, to float32 rounding, the same log-probabilities."""
    import textcomplete.kernels as kernels
    if not kernels.target_supported("avx2"):
        pytest.skip("this CPU does not run AVX2 code")
    if kernels.quant_matmul("avx2") is kernels.quant_matmul():
        pytest.skip("on this CPU the AVX2 build is the native one, which every other test serves with")
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_llama_256, path, qtype)
    prompts = random_prompts(5, seed=3, low=1, high=70)
    params = [dataclasses.replace(mixed_params(i), logprobs=3, prompt_logprobs=2) for i in range(5)]
    avx2_decode, avx2_matmul = kernels.decode_layers("avx2"), kernels.quant_matmul("avx2")
    if kernels.quant_matmul().amx():
        # The native build's prefill products run on AMX tiles, which round otherwise (and closer to exact:
        # on this model's Q4_K prompt log-probabilities, 2.5e-4 from transformers in float64 at most, against
        # 8.3e-4 for the float32 micro-kernels); the AVX2 kernels are held to the float32 ones.
        without_amx = kernels.quant_matmul("avx512")
        monkeypatch.setattr(kernels, "quant_matmul", lambda: without_amx)
    want = make_engine(path, 64, backend="torch").generate(prompts, params)
    assert avx2_decode.vector_lanes() == 8 and avx2_matmul.vector_lanes() == 8
    monkeypatch.setattr(kernels, "decode_layers", lambda: avx2_decode)
    lookups = []
    monkeypatch.setattr(kernels, "quant_matmul", lambda: lookups.append(1) or avx2_matmul)
    engine = make_engine(path, 64, backend="torch")
    assert engine.loaded.model.native_decode.kernels is avx2_decode
    native_calls.clear()
    lookups.clear()
    got = engine.generate(prompts, params)
    assert lookups, "the prefill products never asked for the AVX2 kernels"
    assert native_calls and max(native_calls) > 1, "batched decode steps never reached the AVX2 layers"
    assert [tokens_of(o) for o in got] == [tokens_of(o) for o in want]
    for a, b in zip(got, want):
        for kind in ("logprobs", "prompt_logprobs"):
            x = torch.tensor([[e.logprob, *(lp for _, lp in e.top)] for o in a for e in getattr(o, kind)
                              if e.logprob is not None])
            y = torch.tensor([[e.logprob, *(lp for _, lp in e.top)] for o in b for e in getattr(o, kind)
                              if e.logprob is not None])
            torch.testing.assert_close(x, y, atol=1e-4, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_safetensors_matrices_run_in_their_stored_dtype(tiny_llama_256, tmp_path, dtype):
    """A bfloat16/float16 checkpoint's matrices are views of its file, exact against transformers on its values
    in float32; --no-stored-weights expands them to float32 instead."""
    checkpoint, reference = tmp_path / "checkpoint", tmp_path / "reference"
    for directory, kind in ((checkpoint, dtype), (reference, torch.float32)):
        shutil.copytree(tiny_llama_256, directory)
        state = load_file(str(directory / "model.safetensors"))
        save_file({k: v.to(dtype).to(kind).contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    model = make_engine(checkpoint).loaded.model
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, StoredLinear))]
    assert linears and all(isinstance(m, StoredLinear) for m in linears), "a matrix was copied to float32"
    assert {m.stored.fmt.name for m in linears} == {"BF16" if dtype == torch.bfloat16 else "F16"}
    check_parity(checkpoint, reference, prompt_len=60, decode_steps=8)
    expanded = make_engine(checkpoint, stored_weights=False).loaded.model
    assert not any(isinstance(m, StoredLinear) for m in expanded.modules())


def test_int8_activations_move_logprobs_a_little(tiny_llama_256, tmp_path):
    """--activations int8 rounds the activations to 8 bits (on Q4_K in the prompt's prefill and in the decode
    steps): the log-probabilities of the prompt and of the generated tokens move by that rounding, not more."""
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_llama_256, path, QType.Q4_K)
    exact, fast = make_engine(path, 64, backend="torch"), make_engine(path, 64, activations="int8", backend="torch")
    assert sum(getattr(m, "int8", False) for m in fast.loaded.model.modules()) == 2 * 7 + 1   # + lm_head
    assert exact.fingerprint != fast.fingerprint
    prompt = random_prompts(1, seed=9, low=60, high=60)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, prompt_logprobs=0, ignore_eos=True)
    [a], [b] = exact.generate([prompt], params), fast.generate([prompt], params)
    for kind in ("prompt_logprobs", "logprobs"):
        drift = torch.tensor([x.logprob - y.logprob for o, p in zip(a, b)
                              for x, y in zip(getattr(o, kind), getattr(p, kind)) if x.logprob is not None]).abs()
        assert 0 < drift.max() < 1.5 and drift.mean() < 0.3, (kind, drift.mean(), drift.max())   # a wrong scale: nats


def test_stored_weights_batch_invariance(tiny_llama_256, tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_llama_256, path, QType.Q4_K)
    engine = make_engine(path, 64)
    prompts = random_prompts(16, seed=3, high=70)
    params = [mixed_params(i) for i in range(16)]
    alone = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    assert [tokens_of(outs) for outs in engine.generate(prompts, params)] == alone


_MEASURE = """
import json, sys
from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.sampling_params import SamplingParams

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

# What any run costs before its model: torch's compute libraries and thread pools, the stored-format kernels.
import torch
from textcomplete.quant import native_available
native_available()
torch.mm(torch.randn(256, 1024), torch.randn(1024, 256))
import numpy as np, gguf
from textcomplete.quant import format_of, matmul
small = torch.from_numpy(gguf.quants.quantize(np.ones((512, 256), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0))
for rows in (1, 64):   # both kernel paths once: their thread pool and per-thread scratch
    matmul(torch.randn(rows, 256), small, format_of(int(gguf.GGMLQuantizationType.Q8_0)), 256)
before = status()
engine = LLMEngine(EngineConfig(model=sys.argv[1], kv_cache_memory=int(sys.argv[2]), max_num_batched_tokens=64,
                                stored_weights=True))
loaded = status()
engine.generate([list(range(2, 90))], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
heavy = [name for name in ("torch._dynamo", "sympy") if name in sys.modules]
print(json.dumps({"before": before, "loaded": loaded, "ran": status(), "heavy_modules": heavy}))
"""


def test_a_100_mb_gguf_costs_about_its_size_in_memory(tmp_path):
    hidden, ffn, layers = 1024, 4096, 12
    shapes = {"token_embd.weight": (384, hidden), "output_norm.weight": (hidden,), "output.weight": (384, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (256, hidden),
                       f"blk.{i}.attn_v.weight": (256, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    tensors = {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}   # payload is random
    for name in tensors:
        if name.endswith("norm.weight"):
            tensors[name] += 1.0
    path = tmp_path / "big.gguf"
    write_gguf(path, "llama", {"block_count": layers, "context_length": 512, "embedding_length": hidden,
                               "feed_forward_length": ffn, "attention.head_count": 16, "attention.head_count_kv": 4,
                               "attention.layer_norm_rms_epsilon": 1e-5, "rope.freq_base": 10000.0},
               tensors, qtype=QType.Q4_K)
    file_size, kv = os.path.getsize(path), 16 << 20
    assert file_size > 90e6
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(kv)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # File + KV + 15% (measured: 7 MB after loading, 123 MB after running, of a 138 MB budget); float32 copies
    # of this file would add about 700 MB.
    budget = (file_size + kv) * 1.15
    grew_loading = figures["loaded"]["VmHWM"] - figures["before"]["VmRSS"]
    grew_running = figures["ran"]["VmHWM"] - figures["before"]["VmRSS"]
    assert grew_loading <= budget, (grew_loading, file_size)
    assert grew_running <= budget, (grew_running, file_size)
    # Building the model on the meta device skips parameter initializers: nn.Embedding's normal_ there would
    # import torch._dynamo and sympy (about 70 MB resident) for values the checkpoint replaces.
    assert figures["heavy_modules"] == [], figures["heavy_modules"]


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_weights_are_mapped_as_the_file_holds_them_asking_for_huge_pages(tmp_path):
    from textcomplete.models.mapping import map_weights
    path = tmp_path / "weights.bin"
    payload = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    path.write_bytes(payload.tobytes())
    mapped = map_weights(path)
    assert np.array_equal(mapped, payload)
    flags = _vm_flags(mapped.ctypes.data)
    assert "hg" in flags, flags      # MADV_HUGEPAGE: a decode step streams the weights through 2 MiB pages
    weights = torch.from_numpy(mapped)  # writable (torch takes it without a copy) but copy-on-write:
    weights[:16] = 0                    # the file never changes
    assert path.read_bytes()[:16] == payload[:16].tobytes()


def test_wide_products_run_under_inference_mode_on_every_thread():
    """The engine's steps run under inference mode; the kernel's worker threads must write its output too."""
    import gguf
    import torch

    from textcomplete.quant import format_of, matmul, native_available
    assert native_available()
    fmt = format_of(int(QType.Q8_0))
    raw = torch.from_numpy(gguf.quants.quantize(np.random.default_rng(0).standard_normal((2048, 256)).astype(
        np.float32), QType.Q8_0))
    x = torch.randn(16, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = matmul(x, raw, fmt, 256)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, matmul(x, raw, fmt, 256, native=False), atol=1e-4, rtol=1e-5)
