"""`--model owner/repo:Q4_K_M` picks that GGUF file from a hub repository, offline against a local hub cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QType

from tests.tiny_gguf import write_llama_gguf

REPO = "acme/tiny-llama-GGUF"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tiny_model_dir, tmp_path_factory) -> Path:
    """A hub cache laid out as huggingface_hub writes it: blobs, a snapshot of symlinks, refs/main."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    files = {"tiny-llama.Q8_0.gguf": QType.Q8_0, "tiny-llama.F32.gguf": QType.F32,
             "tiny-llama-Q4_0-00001-of-00002.gguf": QType.Q4_0, "tiny-llama-Q4_0-00002-of-00002.gguf": QType.Q4_0}
    for i, (name, qtype) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        write_llama_gguf(tiny_model_dir("llama"), blob, qtype)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (snapshot / "README.md").write_text("tiny\n")
    return cache


def resolve(hub_cache: Path, model: str) -> subprocess.CompletedProcess:
    """Load `model` in a fresh process (huggingface_hub reads its settings at import) with the hub offline."""
    code = ("import json, sys; from textcomplete.models.loader import load_model\n"
            "try:\n    m = load_model(sys.argv[1])\nexcept FileNotFoundError as e:\n    print(json.dumps({'error': str(e)}))\n"
            "else:\n    print(json.dumps({'path': str(m.path), 'arch': m.architecture}))\n")
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    done = subprocess.run([sys.executable, "-c", code, model], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_quantization_tag_picks_its_file(hub_cache):
    for tag in ("Q8_0", "q8_0"):
        found = resolve(hub_cache, f"{REPO}:{tag}")
        assert Path(found["path"]).name == "tiny-llama.Q8_0.gguf", found
        assert found["arch"] == "LlamaForCausalLM"
    assert Path(resolve(hub_cache, f"{REPO}:F32")["path"]).name == "tiny-llama.F32.gguf"


def test_a_missing_quantization_lists_the_files(hub_cache):
    error = resolve(hub_cache, f"{REPO}:Q5_K_M")["error"]
    assert "Q5_K_M" in error and "tiny-llama.Q8_0.gguf" in error and "tiny-llama.F32.gguf" in error


def test_a_split_file_is_refused_with_advice(hub_cache):
    error = resolve(hub_cache, f"{REPO}:Q4_0")["error"]
    assert "split" in error and "gguf-split --merge" in error


def test_an_unknown_repository_is_a_clear_error(hub_cache):
    assert "neither a local path nor a reachable hub id" in resolve(hub_cache, "acme/nothing-here:Q8_0")["error"]
