"""The GGUF loader: every supported tensor type decodes to the weights written, in Hugging Face layout."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QType

from tests.tiny_gguf import write_llama_gguf
from tests.tiny_models import make_tiny_model
from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.models.loader import load_model
from textcomplete.quant.linear import ConcatLinear, StoredEmbedding, StoredLinear


@pytest.fixture(scope="module")
def tiny_llama_256(tmp_path_factory):
    # Rows of 256 values: the block size of the K-quants.
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama256"), hidden_size=256, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False)


def fused(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as the loaded model holds them: q/k/v and gate/up merged."""
    out = dict(weights)
    merges = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"]}
    layers = {name.split(".")[2] for name in weights if name.startswith("model.layers.")}
    for layer in layers:
        for target, parts in merges.items():
            names = [f"model.layers.{layer}.{p}.weight" for p in parts]
            out[f"model.layers.{layer}.{target}.weight"] = torch.cat([out.pop(n) for n in names])
    return out


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight as the values the model computes with, whether a layer holds floats or stored blocks."""
    values = {}
    for name, module in model.named_modules():
        if isinstance(module, ConcatLinear):
            values[f"{name}.weight"] = torch.cat([p.stored.dequantize() for p in module.parts])
        elif isinstance(module, (StoredLinear, StoredEmbedding)) and ".parts." not in name:
            values[f"{name}.weight"] = module.stored.dequantize()
    for name, param in model.named_parameters():
        if not name.startswith(tuple(n.rsplit(".", 1)[0] + "." for n in values)):
            values[name] = param
    return values


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16, QType.Q8_0, QType.Q4_0, QType.Q4_1,
                                   QType.Q5_0, QType.Q5_1, QType.Q4_K, QType.Q5_K, QType.Q6_K],
                         ids=lambda q: q.name)
def test_gguf_tensor_types_load_as_written(tiny_llama_256, tmp_path, qtype):
    expected = fused(write_llama_gguf(tiny_llama_256, tmp_path / "m.gguf", qtype))
    model = load_model(str(tmp_path / "m.gguf"), stored=True).model
    stored = [m for m in model.modules() if isinstance(m, (StoredLinear, StoredEmbedding))]
    if qtype == QType.F32:
        assert not stored
    else:   # every matrix runs from its stored blocks: no float copy of it exists
        assert len(stored) == 2 + 7 * 2 and {m.stored.fmt.name for m in stored} == {qtype.name}
        assert all(p.dim() == 1 for p in model.parameters())
    values = effective_weights(model)
    assert set(values) == set(expected)
    for name, want in expected.items():
        torch.testing.assert_close(values[name], want, rtol=0, atol=0, msg=name)


def test_gguf_f32_gives_the_same_logprobs_as_the_hf_checkpoint(tiny_llama_256, tmp_path):
    write_llama_gguf(tiny_llama_256, tmp_path / "m.gguf", QType.F32)
    ids = list(range(5, 60))
    results = []
    for source in (tiny_llama_256, tmp_path / "m.gguf"):
        engine = LLMEngine(EngineConfig(model=str(source), kv_cache_memory=8 << 20))
        [outs] = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))
        results.append([e.logprob for o in outs for e in o.prompt_logprobs])
    # The checkpoint runs on the PyTorch backend (float32 matmuls), the GGUF file on the native one (the F32
    # format's kernels): the same values, summed in another order, so float32 rounding apart
    assert results[0] == pytest.approx(results[1], abs=1e-5, rel=5e-6)


def test_gguf_tokenizer_from_metadata(tiny_llama_256, tmp_path):
    write_llama_gguf(tiny_llama_256, tmp_path / "m.gguf", QType.F32)
    tok = load_model(str(tmp_path / "m.gguf")).tokenizer
    assert tok.eos_token_ids == (1,) and tok.bos_token_id == 0
    ids = tok.encode("hi </s>")
    assert ids[-1] == 1 and tok.decode(ids) == "hi </s>"
