"""The system fingerprint: a short stable id of everything that determines the engine's outputs.

Same weights, precision, versions and numerics settings give the same id across restarts; changing any
of them gives another. Weights are identified by content (size and sampled bytes), not by path.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from textcomplete import __version__
from textcomplete.config import EngineConfig

_SAMPLE = 1 << 20   # bytes read from each end of a weight file


def weights_identity(path: Path) -> str:
    """Content digest of the weight files (a .gguf file, or a directory's safetensors and config)."""
    files = [path] if path.is_file() else sorted(
        [*path.glob("*.safetensors"), *path.glob("config.json"), *path.glob("tokenizer.json")])
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with f.open("rb") as handle:
            digest.update(handle.read(_SAMPLE))
            if size > _SAMPLE:
                handle.seek(max(_SAMPLE, size - _SAMPLE))
                digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()


def system_fingerprint(weights: Path, dtype: str, kv_dtype: str, device: str, runtime: str,
                       config: EngineConfig) -> str:
    """`runtime`: what computes (the native library, or torch and its version)."""
    parts = [__version__, runtime, weights_identity(weights), dtype, f"kv={kv_dtype}", device,
             f"stored_weights={config.stored_weights}", f"activations={config.activations}",
             f"block={config.block_size}", f"chunk={config.max_num_batched_tokens}",
             f"prefix_cache={config.enable_prefix_caching}", f"seed={config.seed}"]
    return "fp_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
