"""Turning a model name into a ready PyTorch model: find its files (sources.py), build the module on the meta
device, load weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType
from torch import nn
from tqdm.auto import tqdm

from textcomplete.errors import ModelFileError
from textcomplete.models.gguf_file import GGUFFile
from textcomplete.models.registry import architecture_of, model_class
from textcomplete.models.sources import resolve_source
from textcomplete.models.spec import ModelSpec
from textcomplete.quant import format_of
from textcomplete.quant.linear import StoredEmbedding, StoredLinear
from textcomplete.models.mapping import map_weights
from textcomplete.quant.stored import StoredStack, StoredTensor
from textcomplete.tokenizer import Tokenizer

log = logging.getLogger(__name__)

@dataclass
class LoadedModel:
    name: str                 # what the user asked for, e.g. the default's short name
    path: Path                # the file or directory the weights came from
    architecture: str
    config: dict              # Hugging Face style configuration
    model: nn.Module
    spec: ModelSpec
    tokenizer: Tokenizer
    dtype: torch.dtype
    device: torch.device


def load_model(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               stored: bool = True) -> LoadedModel:
    """Load `name`; a file or directory that cannot be used gives a ModelFileError naming it and why.

    With `stored` (on a CPU), the checkpoint's matrices run from the file as stored (textcomplete.quant): a GGUF
    file's block formats, a safetensors file's bfloat16/float16; without it they are expanded to `dtype`.
    """
    path = resolve_source(name)
    device = torch.device(device)
    stored = stored and device.type == "cpu"
    try:
        gguf_path = path if path.is_file() else _single_gguf(path)
        if gguf_path is not None:
            gguf = GGUFFile(gguf_path)
            config, tokenizer = gguf.hf_config(), _gguf_tokenizer(gguf)
            architecture = architecture_of(config)
            tensors, total = gguf.tensors(stored=stored), gguf.num_tensors
        else:
            config = _read_config(path / "config.json")
            tokenizer = Tokenizer.from_hf_dir(path, config)
            architecture = architecture_of(config)
            keep = model_class(architecture).keeps_stored_checkpoint if stored else None
            tensors, total = _safetensors(path, keep)
        model = build_model(architecture, config, tensors, total, dtype, device)
    except ModelFileError:
        raise
    except (ValueError, KeyError, TypeError) as exc:   # a shape, name or setting the architecture cannot take
        raise ModelFileError(path, str(exc).strip("'\"")) from None
    log.info("loaded %s (%s, %s) from %s", name, architecture, str(dtype).removeprefix("torch."), path)
    return LoadedModel(name, path, architecture, config, model, model.spec, tokenizer, dtype, device)


def _gguf_tokenizer(gguf: GGUFFile) -> Tokenizer:
    try:
        return Tokenizer.from_gguf_metadata(gguf.metadata)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ModelFileError(gguf.path, f"its tokenizer cannot be built: {exc}") from None


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise ModelFileError(path.parent, "no config.json")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(path, f"not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelFileError(path, "not a JSON object")
    return config


def _single_gguf(directory: Path) -> Path | None:
    if (directory / "config.json").exists():
        return None
    found = sorted(directory.glob("*.gguf"))
    if len(found) == 1:
        return found[0]
    raise ModelFileError(directory, "no config.json" + (" and several .gguf files" if found else ""))


# safetensors dtypes kept as stored (the matching GGML types: textcomplete.quant.formats)
_STORED_SAFETENSORS = {"BF16": GGMLQuantizationType.BF16, "F16": GGMLQuantizationType.F16}


def _safetensors(directory: Path, keep: Callable[[str], bool] | None = None) -> \
        tuple[Iterator[tuple[str, torch.Tensor | StoredTensor]], int]:
    """The directory's tensors, one at a time. Matrices in bfloat16/float16 whose name `keep` accepts are
    `StoredTensor` views of the file's map (read in place, never copied); the rest are tensors."""
    from safetensors import safe_open
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelFileError(directory, "no *.safetensors weights")
    handles = []
    for f in files:
        try:   # the library checks the header against the file: lengths, offsets, shapes and dtypes
            handles.append((f, safe_open(str(f), framework="pt")))
        except Exception as exc:   # noqa: BLE001 - SafetensorError and OSError alike: the file is unusable
            raise ModelFileError(f, f"not a valid safetensors file ({exc})") from None
    total = sum(len(h.keys()) for _, h in handles)

    def tensors() -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
        for f, handle in handles:
            views = _safetensors_views(f) if keep is not None else {}
            for key in handle.keys():
                if key in views and keep(key):
                    yield key, views[key]
                    continue
                try:
                    tensor = handle.get_tensor(key)
                except Exception as exc:   # noqa: BLE001 - as above, for one tensor's data
                    raise ModelFileError(f, f"tensor {key!r} cannot be read ({exc})") from None
                yield key, tensor
    return tensors(), total


def _safetensors_views(path: Path) -> dict[str, StoredTensor]:
    """Each bfloat16/float16 matrix of a safetensors file as a view of the file's bytes. The layout: an 8-byte
    little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data (offsets
    relative to its start). safe_open has already checked the header against the file."""
    with path.open("rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    mapped = map_weights(path)
    views = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _STORED_SAFETENSORS or len(info["shape"]) != 2:
            continue
        begin, end = (8 + length + offset for offset in info["data_offsets"])
        rows, k = info["shape"]
        raw = torch.from_numpy(mapped[begin:end]).view(rows, -1)
        views[name] = StoredTensor.of(raw, format_of(_STORED_SAFETENSORS[info["dtype"]]), (rows, k))
    return views


def build_model(architecture: str, config: dict, tensors: Iterator[tuple[str, torch.Tensor | StoredTensor]],
                total: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Construct without allocating (meta device), then adopt each checkpoint tensor as a parameter.

    Stored matrices (GGUF blocks) replace their linear layer or embedding by one that runs the stored format;
    any other module that receives one gets its float values.
    """
    cls = model_class(architecture)
    with torch.device("meta"), _initializers_skipped():
        model = cls(config)
    expected = dict(model.named_parameters())
    state: dict[str, torch.Tensor | StoredTensor] = {}
    for raw_name, tensor in tqdm(tensors, total=total, desc="Loading weights", unit="tensor", leave=False):
        mapped = model.checkpoint_tensor(raw_name, tensor)
        if mapped is None:
            continue
        name, tensor = mapped
        if name not in expected:
            raise ValueError(f"checkpoint tensor {raw_name!r} does not belong to a {architecture}")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{raw_name}: shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
        stored = isinstance(tensor, (StoredTensor, StoredStack))
        state[name] = tensor if stored else tensor.to(device=device, dtype=dtype).contiguous()
    for name, source in model.tied_weights().items():
        if name not in state and source in state:
            state[name] = state[source]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors of a {architecture}, e.g. {missing[:3]}")
    _adopt_stored(model, state, dtype, device)
    model.load_state_dict(state, strict=True, assign=True)
    model.fuse()
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def _initializers_skipped() -> Iterator[None]:
    """torch.nn.init's initializers as no-ops while a model is constructed to be loaded: every parameter is then
    replaced by a checkpoint tensor (a strict load), so their values are never read. On the meta device,
    nn.Embedding's normal_ runs through PyTorch's reference decompositions, whose first use imports torch._dynamo
    with sympy: about 800 modules and 70 MiB of resident memory, for nothing."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, initializer in saved.items():
            setattr(nn.init, name, initializer)


def _adopt_stored(model: nn.Module, state: dict[str, torch.Tensor | StoredTensor], dtype: torch.dtype,
                  device: torch.device) -> None:
    """Swap each layer whose weight is stored for its stored-format counterpart; `state` keeps the rest."""
    for name in [n for n, t in state.items() if isinstance(t, (StoredTensor, StoredStack))]:
        path, _, leaf = name.rpartition(".")
        module = model.get_submodule(path)
        stored = state.pop(name)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        if device.type == "cpu" and hasattr(module, "adopt_stored"):   # a module that runs stored stacks itself
            module.adopt_stored(leaf, stored)
        elif leaf == "weight" and type(module) is nn.Linear and device.type == "cpu":
            setattr(parent, child, StoredLinear(stored, bias=module.bias is not None))
        elif leaf == "weight" and type(module) is nn.Embedding and device.type == "cpu":
            setattr(parent, child, StoredEmbedding(stored))
        else:   # a layer without a stored-format version (a router, a GPU run): its values
            state[name] = stored.dequantize().to(device=device, dtype=dtype)