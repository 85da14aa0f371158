"""Shared fixtures: tiny random models per architecture and the real SmolLM2 engine (loaded once)."""

from __future__ import annotations

import pytest

from tests.tiny_models import make_tiny_model

ARCHS = ["llama", "qwen2", "qwen3", "gpt2"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function arch -> directory of a saved tiny random model, each built once per session."""
    built = {}

    def get(arch: str):
        if arch not in built:
            built[arch] = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]
    return get


@pytest.fixture(scope="session")
def smollm_engine():
    from textcomplete.config import EngineConfig
    from textcomplete.engine.engine import LLMEngine
    return LLMEngine(EngineConfig(kv_cache_memory=512 << 20))
