"""system_fingerprint: stable for one configuration, different when anything that shapes outputs changes."""

from __future__ import annotations

import shutil

from tests.tiny_models import make_tiny_model
from textcomplete.config import EngineConfig
from textcomplete.engine.engine import LLMEngine


def fingerprint(path, **settings) -> str:
    return LLMEngine(EngineConfig(**{"model": str(path), "kv_cache_memory": 4 << 20, **settings})).fingerprint


def test_fingerprint_rules(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    base = fingerprint(path)
    assert base.startswith("fp_") and len(base) == 15
    assert fingerprint(path) == base                                  # a restart: same configuration
    shutil.copytree(path, tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == base                     # weights identified by content
    assert fingerprint(path, kv_cache_memory=8 << 20) == base         # capacity alone changes no numbers
    changed = {
        "dtype": fingerprint(path, dtype="bfloat16"),
        "chunking": fingerprint(path, max_num_batched_tokens=128),
        "prefix caching": fingerprint(path, enable_prefix_caching=False),
        "block size": fingerprint(path, block_size=32),
        "seed": fingerprint(path, seed=1),
        "weights": fingerprint(make_tiny_model("llama", tmp_path / "other", seed=1)),
    }
    assert all(fp != base for fp in changed.values()), changed
    assert len(set(changed.values())) == len(changed)
