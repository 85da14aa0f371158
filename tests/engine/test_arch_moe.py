"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): exact against transformers, HF and GGUF form.

Every tiny model has 8 experts of which each token uses 2, with large random weights: a wrong router (softmax,
top-k, renormalisation), a misplaced expert, a missing shared expert or a dense all-experts sum moves the
log-probabilities far beyond the harness's 1e-3. The GGUF files are laid out as llama.cpp's converter writes
them (stacked [E, out, in] expert tensors; Mixtral under "llama" with its q/k rows interleaved).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from safetensors.torch import load_file, save_file

from tests.arch_parity import check_parity, make_engine, random_ids
from tests.engine.test_batching import mixed_params, random_prompts, tokens_of
from tests.engine.test_native_decode import kernels  # noqa: F401 - fixture
from tests.tiny_gguf import llama_cpp_permute, write_gguf
from tests.tiny_models import save_tiny_model, tiny_config_kwargs
from textcomplete.engine.sampling_params import SamplingParams
from textcomplete.errors import ModelFileError
from textcomplete.models.moe import Gate, SparseMoeBlock
from textcomplete.models.registry import architecture_of, model_class
from textcomplete.quant.linear import StoredLinear

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False, num_experts_per_tok=2)
# The main models follow llama.cpp's fixed routing per GGUF architecture (qwen2moe and olmoe never renormalise
# the top-k weights, qwen3moe and Mixtral always do), so the same model serves HF and GGUF parity.
SETTINGS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=32, num_local_experts=8)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, num_experts=8)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, head_dim=32,
                                         num_experts=8, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_experts=8)),
}
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}


def moe_config(family: str, **overrides):
    import transformers as tf
    name, settings = SETTINGS[family]
    return getattr(tf, name)(**tiny_config_kwargs(**{**COMMON, **settings, **overrides}))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """family -> directory of its saved tiny model (per-expert tensors, as save_pretrained writes them)."""
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = save_tiny_model(moe_config(family), tmp_path_factory.mktemp(family))
        return built[family]
    return get


# --- checkpoint forms written by the test -------------------------------------------------------------------

_MIXTRAL_WEIGHTS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def common_name(name: str) -> str:
    """Mixtral's hub names (`block_sparse_moe`, w1/w2/w3) in the naming the other families use."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"\.experts\.(\d+)\.(w[123])\.", lambda m: f".experts.{m[1]}.{_MIXTRAL_WEIGHTS[m[2]]}.", name)


def split_experts(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(tensors that are no expert's, {(layer, projection): [E, out, in] stack})."""
    rest, pieces = {}, {}
    for name, tensor in state.items():
        name = common_name(name)
        if match := _EXPERT.fullmatch(name):
            pieces.setdefault((int(match[1]), match[3]), {})[int(match[2])] = tensor
        else:
            rest[name] = tensor
    stacks = {key: torch.stack([by_expert[e] for e in sorted(by_expert)]) for key, by_expert in pieces.items()}
    return rest, stacks


def write_stacked_form(hf_dir, out_dir):
    """hf_dir's checkpoint with the experts stacked as transformers 5 holds them (`mlp.experts.gate_up_proj`)."""
    rest, stacks = split_experts(load_file(str(hf_dir / "model.safetensors")))
    for layer in sorted({layer for layer, _ in stacks}):
        prefix = f"model.layers.{layer}.mlp.experts"
        rest[f"{prefix}.gate_up_proj"] = torch.cat((stacks[layer, "gate_proj"], stacks[layer, "up_proj"]), dim=1)
        rest[f"{prefix}.down_proj"] = stacks[layer, "down_proj"]
    shutil.copytree(hf_dir, out_dir)
    save_file({k: v.contiguous() for k, v in rest.items()}, str(out_dir / "model.safetensors"))
    return out_dir


_GGUF_PARTS = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
_GGUF_STACKS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def gguf_tensor_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{_GGUF_PARTS[part]}.{kind}"
    return f"{_GGUF_PARTS[base]}.{kind}"


def gguf_metadata(cfg: dict) -> dict:
    """The metadata llama.cpp's converter writes for these families."""
    meta = {"block_count": cfg["num_hidden_layers"], "context_length": cfg["max_position_embeddings"],
            "embedding_length": cfg["hidden_size"], "feed_forward_length": cfg["intermediate_size"],
            "attention.head_count": cfg["num_attention_heads"],
            "attention.head_count_kv": cfg["num_key_value_heads"],
            "attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
            "rope.freq_base": float(cfg["rope_parameters"]["rope_theta"]),
            "expert_count": cfg.get("num_experts") or cfg["num_local_experts"],
            "expert_used_count": cfg["num_experts_per_tok"]}
    if cfg.get("head_dim"):
        meta["attention.key_length"] = meta["attention.value_length"] = cfg["head_dim"]
    if cfg.get("moe_intermediate_size"):
        meta["expert_feed_forward_length"] = cfg["moe_intermediate_size"]
    if cfg.get("shared_expert_intermediate_size"):
        meta["expert_shared_feed_forward_length"] = cfg["shared_expert_intermediate_size"]
    return meta


def write_moe_gguf(hf_dir, path, family: str, qtype: QType = QType.F32, fuse_gate_up: bool = False) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[family]
    rest, stacks = split_experts(load_file(str(hf_dir / "model.safetensors")))
    tensors = {}
    for name, tensor in sorted(rest.items()):
        w = tensor.float().numpy()
        if arch == "llama" and "self_attn.q_proj" in name:      # only the Llama converter interleaves q/k
            w = llama_cpp_permute(w, cfg["num_attention_heads"])
        elif arch == "llama" and "self_attn.k_proj" in name:
            w = llama_cpp_permute(w, cfg["num_key_value_heads"])
        tensors[gguf_tensor_name(name)] = w
    for (layer, proj), stack in sorted(stacks.items()):
        tensors[f"blk.{layer}.{_GGUF_STACKS[proj]}.weight"] = stack.float().numpy()
    if fuse_gate_up:   # the converter's --fuse-gate-up-exps: gate rows before up rows
        for layer in sorted({layer for layer, _ in stacks}):
            gate, up = (tensors.pop(f"blk.{layer}.{p}.weight") for p in ("ffn_gate_exps", "ffn_up_exps"))
            tensors[f"blk.{layer}.ffn_gate_up_exps.weight"] = np.concatenate((gate, up), axis=1)
    write_gguf(path, arch, gguf_metadata(cfg), tensors, qtype)


# --- parity with transformers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_matches_transformers(moe_dir, family):
    check_parity(moe_dir(family), moe_dir(family))


@pytest.mark.parametrize("family, settings", [
    ("qwen2_moe", dict(norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=3)),   # dense layers 0, 2
    ("qwen3_moe", dict(norm_topk_prob=False, mlp_only_layers=[1], num_hidden_layers=3)),    # dense layer 1
    ("olmoe", dict(norm_topk_prob=True, clip_qkv=1.5)),
], ids=["qwen2_moe-renormalised-sparse-step", "qwen3_moe-mlp-only-layers", "olmoe-renormalised-clipped"])
def test_matches_transformers_with_the_other_settings(tmp_path, family, settings):
    directory = save_tiny_model(moe_config(family, **settings), tmp_path / family, seed=1)
    check_parity(directory, directory, prompt_len=48, decode_steps=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_matches_transformers(moe_dir, tmp_path, family):
    path = tmp_path / f"{family}.gguf"
    write_moe_gguf(moe_dir(family), path, family, fuse_gate_up=family == "qwen3_moe")
    loaded = make_engine(path).loaded
    assert loaded.architecture == json.loads((moe_dir(family) / "config.json").read_text())["architectures"][0]
    check_parity(path, moe_dir(family))


def test_stacked_checkpoints_load_like_per_expert_ones(moe_dir, tmp_path):
    """The stacked form transformers 5 holds in memory gives the very same numbers as the hub's per-expert form."""
    ids = random_ids(40, seed=3)
    params = SamplingParams(max_tokens=0, prompt_logprobs=0)
    for family in FAMILIES:
        stacked = write_stacked_form(moe_dir(family), tmp_path / family)
        assert any(k.endswith("experts.gate_up_proj") for k in load_file(str(stacked / "model.safetensors")))
        [a], [b] = make_engine(moe_dir(family)).generate([ids], params), make_engine(stacked).generate([ids], params)
        assert [e.logprob for o in a for e in o.prompt_logprobs] == [e.logprob for o in b for e in o.prompt_logprobs]


def test_a_missing_expert_is_reported(moe_dir, tmp_path):
    broken = shutil.copytree(moe_dir("qwen3_moe"), tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ModelFileError, match="layers.1.mlp.experts.gate_up_proj"):
        make_engine(broken)


@pytest.mark.parametrize("family, fuse", [("qwen2_moe", False), ("mixtral", False), ("qwen3_moe", True)])
def test_quantized_gguf_experts_stay_stored(moe_dir, tmp_path, family, fuse):
    """Every routed expert runs from the file's Q8_0 blocks (gate/up halves from two GGUF stacks, or the
    fused one), exactly as the same file expanded to float32 does."""
    path = tmp_path / "q8.gguf"
    write_moe_gguf(moe_dir(family), path, family, qtype=QType.Q8_0, fuse_gate_up=fuse)
    stored, expanded = make_engine(path), make_engine(path, stored_weights=False)
    for layer in stored.loaded.model.model.layers:
        block = layer.mlp
        if not isinstance(block, SparseMoeBlock):
            continue
        for expert in block.experts:
            layers = [expert.down_proj, *getattr(expert.gate_up_proj, "parts", [expert.gate_up_proj])]
            assert all(isinstance(m, StoredLinear) for m in layers), family
    ids = random_ids(30, 4)
    params = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2, prompt_logprobs=0, ignore_eos=True)
    [a], [b] = stored.generate([ids], params), expanded.generate([ids], params)
    assert tokens_of(a) == tokens_of(b)
    got = torch.tensor([e.logprob for o in a for e in (*o.prompt_logprobs, *o.logprobs) if e.logprob is not None])
    want = torch.tensor([e.logprob for o in b for e in (*o.prompt_logprobs, *o.logprobs) if e.logprob is not None])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=2e-5)


# --- routing ----------------------------------------------------------------------------------------------------

def dense_reference(block: SparseMoeBlock, x: torch.Tensor, normalize: bool, top_k: int) -> torch.Tensor:
    """The block's output computed plainly in float64, one token and one chosen expert at a time."""
    x = x.double()
    probs = torch.softmax(x @ block.gate.weight.double().T, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, chosen = torch.topk(probs[t], top_k)
        weights = weights / weights.sum() if normalize else weights
        for w, e in zip(weights, chosen.tolist()):
            gate, up = (x[t] @ block.experts[e].gate_up_proj.weight.double().T).chunk(2)
            out[t] += w * (block.experts[e].down_proj.weight.double() @ (F.silu(gate) * up))
    if block.has_shared:
        s = block.shared_expert
        gate, up = (x @ s.gate_up_proj.weight.double().T).chunk(2, dim=-1)
        out += torch.sigmoid(x @ block.shared_expert_gate.weight.double().T) * (
            (F.silu(gate) * up) @ s.down_proj.weight.double().T)
    return out


@pytest.mark.parametrize("family, normalize", [("mixtral", True), ("qwen2_moe", False)])
def test_only_each_tokens_top_k_experts_run(moe_dir, family, normalize):
    block = make_engine(moe_dir(family)).loaded.model.model.layers[0].mlp
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    _, chosen = block.gate.route(x)
    calls = []
    hooks = [expert.register_forward_hook(lambda m, args, out, e=e: calls.append((e, args[0].shape[0])))
             for e, expert in enumerate(block.experts)]
    out = block(x)
    for hook in hooks:
        hook.remove()
    picked = chosen.flatten().tolist()
    assert sorted(calls) == sorted((e, picked.count(e)) for e in set(picked))   # each once, on its tokens only
    torch.testing.assert_close(out.double(), dense_reference(block, x, normalize, top_k=2), atol=1e-5, rtol=1e-5)
    everyone = dense_reference(block, x, normalize=False, top_k=8)               # a dense softmax-weighted sum
    assert (out.double() - everyone).abs().max() > 1e-2
    unused = sorted(set(range(8)) - set(picked))
    with torch.no_grad():                                                        # an expert nobody chose
        block.experts[unused[0]].gate_up_proj.weight.mul_(7.0)
        block.experts[unused[0]].down_proj.weight.zero_()
    assert torch.equal(block(x), out)


def test_sparse_layers_are_where_transformers_puts_them():
    import transformers as tf
    for family, settings in [("qwen2_moe", dict(decoder_sparse_step=2, num_hidden_layers=4)),
                             ("qwen3_moe", dict(mlp_only_layers=[0, 3], num_hidden_layers=4)),
                             ("qwen3_moe", dict(decoder_sparse_step=3, mlp_only_layers=[5], num_hidden_layers=6))]:
        config = moe_config(family, **settings)
        theirs = tf.AutoModelForCausalLM.from_config(config)
        cfg = config.to_dict()
        with torch.device("meta"):
            ours = model_class(architecture_of(cfg))(cfg)
        sparse = [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.model.layers]
        assert sparse == [hasattr(layer.mlp, "experts") for layer in theirs.model.layers], (family, settings)
        assert True in sparse and False in sparse


def test_moe_models_take_the_pytorch_path(moe_dir, kernels):  # noqa: F811
    for family in FAMILIES:
        model = make_engine(moe_dir(family)).loaded.model
        model.use_native_decode(kernels)
        assert model.native_decode is None, family


def test_moe_batch_invariance(moe_dir):
    engine = make_engine(moe_dir("qwen2_moe"), 64)
    prompts = random_prompts(16, seed=1, high=70)
    params = [mixed_params(i) for i in range(16)]
    alone = [tokens_of(engine.generate([p], sp)[0]) for p, sp in zip(prompts, params)]
    assert [tokens_of(outs) for outs in engine.generate(prompts, params)] == alone
