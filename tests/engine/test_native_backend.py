"""The native backend (no torch) serves what the PyTorch backend serves, on the same GGUF files.

Same tokens for greedy and seeded requests, logprobs (prompt and sampled, with alternatives) to float32 rounding,
batch invariance, every step kind (decode batches, chunked prompts, mixed steps), the settings that pick it, and a
process that serves through it never loading torch.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from tests.engine.test_batching import mixed_params, random_prompts, tokens_of
from tests.tiny_gguf import write_llama_gguf
from tests.tiny_models import make_tiny_model
from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.models.gguf_file import VOCABULARY_KEYS


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("native-llama"), hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False)


def engine(path, backend: str, **settings) -> LLMEngine:
    config = dict(model=str(path), kv_cache_memory=16 << 20, max_num_batched_tokens=64, backend=backend)
    return LLMEngine(EngineConfig(**{**config, **settings}))


def logprob_rows(outputs) -> np.ndarray:
    """Every sampled token's logprob and its alternatives', and every prompt logprob, one row each."""
    rows = [[e.logprob, *(lp for _, lp in e.top)] for o in outputs for e in o.logprobs]
    rows += [[e.logprob] + [lp for _, lp in e.top] for o in outputs for e in o.prompt_logprobs if e is not None]
    return np.array([r for r in rows], dtype=object)


def assert_same_outputs(native_outputs, torch_outputs, tolerance: float = 1e-4) -> None:
    assert [tokens_of(o) for o in native_outputs] == [tokens_of(o) for o in torch_outputs]
    for a, b in zip(native_outputs, torch_outputs):
        got, want = logprob_rows(a), logprob_rows(b)
        assert len(got) == len(want)
        for x, y in zip(got, want):
            np.testing.assert_allclose(np.array(x, dtype=float), np.array(y, dtype=float), atol=tolerance,
                                       rtol=tolerance)


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q8_0, QType.Q6_K, QType.F16], ids=lambda q: q.name)
def test_the_native_backend_serves_what_the_torch_backend_serves(tiny_hf, tmp_path, qtype):
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_hf, path, qtype)
    native, reference = engine(path, "auto"), engine(path, "torch")
    assert native.backend == "native" and native.loaded is None and reference.backend == "torch"
    prompts = random_prompts(7, seed=4, low=1, high=120)   # chunked prompts, decode batches, mixed steps
    params = [dataclasses.replace(mixed_params(i), logprobs=3, prompt_logprobs=2 if i % 2 else None)
              for i in range(7)]
    assert_same_outputs(native.generate(prompts, params), reference.generate(prompts, params))


def test_smollm2_natively_equals_its_pytorch_backend():
    """The real model, its Q4_1 file: prompt logprobs (what evaluations score) and greedy continuations."""
    native = LLMEngine(EngineConfig(kv_cache_memory=64 << 20))
    reference = LLMEngine(EngineConfig(kv_cache_memory=64 << 20, backend="torch"))
    assert native.backend == "native" and reference.backend == "torch"
    # The tokenizer holds its own vocabulary: the file's arrays of it are not kept as Python objects too.
    assert not set(VOCABULARY_KEYS) & set(native.runner.model.gguf.metadata)
    text = "The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the sea,"
    prompts = [native.tokenizer.encode(text), native.tokenizer.encode("def fibonacci(n):\n    ")]
    params = SamplingParams(max_tokens=16, temperature=0.0, logprobs=5, prompt_logprobs=1)
    assert_same_outputs(native.generate(prompts, params), reference.generate(prompts, params))


def test_batching_does_not_change_native_outputs(tiny_hf, tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_hf, path, QType.Q4_K)
    prompts = random_prompts(6, seed=6, low=3, high=90)
    params = [mixed_params(i) for i in range(6)]
    together = engine(path, "native").generate(prompts, params)
    alone = [engine(path, "native").generate([p], [q])[0] for p, q in zip(prompts, params)]
    assert [tokens_of(o) for o in together] == [tokens_of(o) for o in alone]


def test_the_settings_choose_the_backend(tiny_hf, tmp_path, tiny_model_dir):
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_hf, path, QType.Q8_0)
    assert engine(path, "auto").backend == "native"
    assert engine(path, "auto", native_decode=False).backend == "torch"
    assert engine(path, "auto", stored_weights=False).backend == "torch"
    assert engine(path, "auto", dtype="bfloat16").backend == "torch"
    assert engine(tiny_model_dir("llama"), "auto").backend == "torch"   # not a GGUF file
    with pytest.raises(ValueError, match="not a GGUF file"):
        engine(tiny_model_dir("llama"), "native")
    with pytest.raises(ValueError, match="native"):
        engine(path, "native", dtype="bfloat16")
    with pytest.raises(ValueError, match="backend must be"):
        EngineConfig(backend="tensorflow")


def test_a_process_serving_natively_never_loads_torch(tiny_hf, tmp_path):
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_hf, path, QType.Q4_K)
    code = textwrap.dedent(f"""
        import sys
        from textcomplete.config import EngineConfig
        from textcomplete.engine.engine import LLMEngine
        from textcomplete.engine.sampling_params import SamplingParams
        engine = LLMEngine(EngineConfig(model={str(path)!r}, kv_cache_memory=16 << 20))
        [outputs] = engine.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4, temperature=0.8, seed=1,
                                                                   logprobs=2))
        assert engine.backend == "native" and sum(len(o.new_token_ids) for o in outputs) == 4
        assert "torch" not in sys.modules, "torch was imported"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_native_int8_activations_move_logprobs_a_little(tiny_hf, tmp_path):
    """--activations int8 on the native backend: the logprobs move by 8-bit rounding of the activations, not
    more (a wrong scale would move them by nats); the fingerprint tells the two modes apart."""
    path = tmp_path / "m.gguf"
    write_llama_gguf(tiny_hf, path, QType.Q4_K)
    exact, fast = engine(path, "native"), engine(path, "native", activations="int8")
    assert exact.fingerprint != fast.fingerprint
    if not fast.runner.model.int8:
        pytest.skip("this CPU has no 8-bit products (AVX-512 VNNI or AVX2)")
    prompt = random_prompts(1, seed=9, low=60, high=60)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, prompt_logprobs=0, ignore_eos=True)
    [a], [b] = exact.generate([prompt], params), fast.generate([prompt], params)
    for kind in ("prompt_logprobs", "logprobs"):
        drift = np.abs([x.logprob - y.logprob for o, p in zip(a, b) for x, y in zip(getattr(o, kind), getattr(p, kind))
                        if x.logprob is not None])
        assert 0 < drift.max() < 1.5 and drift.mean() < 0.3, (kind, drift.mean(), drift.max())
