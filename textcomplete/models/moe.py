"""The sparse mixture-of-experts block the MoE families share: router, top-k choice, routed experts, shared expert.

Only the experts a step's tokens chose run: tokens are grouped by expert and each chosen expert runs once on
its tokens. Checkpoints hold the experts one by one or stacked; both load into the stacked parameters.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from textcomplete.models import gguf_file
from textcomplete.models.llama import LlamaMLP, swiglu
from textcomplete.quant.linear import ConcatLinear, StoredLinear
from textcomplete.quant.stored import StoredStack, StoredTensor


class Gate(nn.Module):
    """x @ weight.T in the activations' dtype, from float weights (a router is small, and the experts it picks
    should not depend on how its weights are stored)."""

    def __init__(self, outputs: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(outputs, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class TopKRouter(Gate):
    """Softmax over the experts in float32, the `top_k` largest kept, renormalised to sum 1 if `normalize`."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, normalize: bool) -> None:
        super().__init__(num_experts, hidden)
        self.top_k, self.normalize = top_k, normalize

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] in x's dtype, expert ids [T, k] long, largest weight first)."""
        probs = torch.softmax(self(x), dim=-1, dtype=torch.float32)     # [T, num_experts]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts


class Expert(nn.Module):
    """One SwiGLU expert: float32 views of the stacks, or layers over the file's stored blocks."""

    def __init__(self, gate_up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = gate_up     # [2 * intermediate, hidden], gate rows first
        self.down_proj = down           # [hidden, intermediate]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class StackedExperts(nn.Module):
    """Every expert's weights in two stacks, named and laid out as transformers 5 stores them; a stack the file
    stores in a block format stays stored (`adopt_stored`)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.stored: dict[str, StoredTensor | StoredStack] = {}

    def adopt_stored(self, name: str, stack: StoredTensor | StoredStack) -> None:
        """Keep stack `name` (gate_up_proj or down_proj) as stored: it is no longer a parameter."""
        del self._parameters[name]
        self.stored[name] = stack

    def split(self) -> nn.ModuleList:
        """One `Expert` per stack entry: over views of the float stacks (no copy), or over the stored blocks."""
        gate_up = [self._expert_layer("gate_up_proj", e) for e in range(self._count())]
        down = [self._expert_layer("down_proj", e) for e in range(self._count())]
        return nn.ModuleList(Expert(gu, d) for gu, d in zip(gate_up, down))

    def _count(self) -> int:
        stack = self.stored.get("down_proj", self._parameters.get("down_proj"))
        return stack.shape[0]

    def _expert_layer(self, name: str, e: int) -> nn.Module:
        stack = self.stored.get(name)
        if stack is None:
            return _linear(self._parameters[name].detach()[e])
        parts = stack.experts[e] if isinstance(stack, StoredStack) else (stack[e],)
        layers = [StoredLinear(p) for p in parts]
        return layers[0] if len(layers) == 1 else ConcatLinear(layers)


class SparseMoeBlock(nn.Module):
    """Each token's top-k experts, weighted by the router; plus, if configured, a shared expert every token
    runs, scaled by a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, normalize: bool,
                 shared_intermediate: int = 0) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden, num_experts, top_k, normalize)
        self.experts: nn.Module = StackedExperts(num_experts, hidden, intermediate)
        self.num_experts, self.has_shared = num_experts, shared_intermediate > 0
        if self.has_shared:
            self.shared_expert = LlamaMLP(hidden, shared_intermediate, bias=False)
            self.shared_expert_gate = Gate(1, hidden)

    def fuse(self) -> None:
        """After loading: one module per expert over the loaded stacks; the shared expert's gate/up merged."""
        self.experts = self.experts.split()
        if self.has_shared:
            self.shared_expert.fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        out = self.routed(x)
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] -> the chosen experts' weighted sum [T, hidden]; each chosen expert runs once."""
        weights, chosen = self.gate.route(x)            # [T, k] each
        k = chosen.shape[1]
        flat = chosen.flatten()                         # [T * k]: token t's choices sit at t*k .. t*k + k-1
        # The (token, choice) slots grouped by expert, tokens ascending within each group.
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()   # one host sync per layer
        slot_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                slots = order[start:start + n]
                rows = slots // k                       # [n] distinct tokens: an expert is chosen once per token
                out.index_add_(0, rows, expert(x[rows]) * slot_weights[slots, None])
            start += n
        # Each token's contributions were added in ascending expert order (as transformers adds them), whatever
        # else the step holds: the batch never changes the order of a token's sum. (A matmul may still round a
        # row differently for another row count, as in the dense layers.)
        return out


def num_experts(cfg: dict) -> int:
    """The routed experts per layer: configs name them either way (transformers maps one name onto the other,
    and `save_pretrained` writes Qwen3-MoE's as `num_local_experts`, hub files as `num_experts`)."""
    return int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)


def is_sparse_layer(cfg: dict, index: int) -> bool:
    """Transformers' Qwen-MoE rule: layer `index` is sparse unless listed in `mlp_only_layers` or skipped by
    `decoder_sparse_step`."""
    return (index not in (cfg.get("mlp_only_layers") or []) and num_experts(cfg) > 0
            and (index + 1) % cfg.get("decoder_sparse_step", 1) == 0)


_PIECE = re.compile(r"(.+\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class ExpertStacker:
    """Turns a checkpoint's per-expert tensors (`...experts.{e}.gate_proj.weight`, the hub form) into the stacks.

    `take` holds each piece until its layer's stack is complete, then returns the stack under the parameter
    name; other tensors pass through. A checkpoint already in the stacked form (transformers 5) passes as is.
    """

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.pending: dict[str, dict[tuple[str, int], torch.Tensor]] = {}

    def take(self, mapped: tuple[str, torch.Tensor] | None) -> tuple[str, torch.Tensor] | None:
        match = _PIECE.fullmatch(mapped[0]) if mapped is not None else None
        if match is None:
            return mapped
        prefix, index, proj = match.group(1), int(match.group(2)), match.group(3)
        if index >= self.num_experts:
            raise ValueError(f"checkpoint tensor {mapped[0]!r} names expert {index}; the model has "
                             f"{self.num_experts}")
        target = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        pieces = self.pending.setdefault(target, {})
        pieces[proj, index] = mapped[1]
        if len(pieces) < self.num_experts * (1 if proj == "down_proj" else 2):
            return None
        del self.pending[target]
        return target, self._stack(target, pieces)

    def _stack(self, target: str, pieces: dict[tuple[str, int], torch.Tensor | StoredTensor]) -> \
            torch.Tensor | StoredStack:
        shapes = {tuple(t.shape) for t in pieces.values()}
        if len(shapes) != 1:
            raise ValueError(f"the expert tensors stacked into {target!r} differ in shape: {sorted(shapes)}")
        experts = range(self.num_experts)
        if all(isinstance(t, StoredTensor) for t in pieces.values()):
            # The file's blocks stay where they are: each expert's matrix is its pieces' rows in order.
            projs = ("down_proj",) if target.endswith("down_proj") else ("gate_proj", "up_proj")
            return StoredStack(tuple(tuple(pieces[p, e] for p in projs) for e in experts))
        pieces = {key: t.dequantize() if isinstance(t, StoredTensor) else t for key, t in pieces.items()}
        if target.endswith("down_proj"):
            return torch.stack([pieces["down_proj", e] for e in experts])          # [E, hidden, inter]
        gate = torch.stack([pieces["gate_proj", e] for e in experts])
        up = torch.stack([pieces["up_proj", e] for e in experts])
        return torch.cat((gate, up), dim=1)                                       # [E, 2 * inter, hidden]


# GGUF tensor-name parts of the MoE tensors kept whole -> Hugging Face parameter-name parts.
GGUF_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# llama.cpp's stacks of every expert ([E, out, in] in PyTorch order) -> the projections each holds, in order
# along the rows (the converter's optional fused form puts gate rows before up rows).
_GGUF_STACKS = {"ffn_gate_exps": ("gate_proj",), "ffn_up_exps": ("up_proj",), "ffn_down_exps": ("down_proj",),
                "ffn_gate_up_exps": ("gate_proj", "up_proj")}


def moe_tensors_from_gguf(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """GGUF expert stacks as per-expert HF tensors (the stacker restacks them), the shared expert's gate as
    [1, hidden]; None for every other tensor."""
    layer, part, kind = gguf_file.split_name(name)
    if layer is not None and part in _GGUF_STACKS and kind == "weight" and tensor.dim() == 3:
        projs = _GGUF_STACKS[part]
        return [(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", rows[e])
                for proj, rows in zip(projs, tensor.chunk(len(projs), dim=1)) for e in range(tensor.shape[0])]
    if layer is not None and part == "ffn_gate_inp_shexp":
        # [hidden] as llama.cpp declares it (older converters squeezed it), or [1, hidden] as newer ones write it
        return [(f"model.layers.{layer}.mlp.shared_expert_gate.{kind}", tensor.reshape(1, -1))]
    return None


def expert_counts(gguf: gguf_file.GGUFFile) -> dict:
    """The routing settings every MoE GGUF file carries."""
    return {"num_experts": gguf.size("expert_count"), "num_experts_per_tok": gguf.size("expert_used_count")}
