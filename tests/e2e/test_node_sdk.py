"""Smoke test with the official OpenAI Node SDK against the running server (npm install on first use)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.helpers import MODEL

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_sdk():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    if not (NODE_DIR / "node_modules" / "openai").exists():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True,
                       timeout=300)
    return NODE_DIR / "smoke.mjs"


def test_node_sdk_completion_stream_models_and_errors(server, node_sdk):
    out = subprocess.run(["node", str(node_sdk), server.base + "/v1", MODEL], capture_output=True, text=True,
                         timeout=120, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["text"] and seen["streamed"] == seen["text"]
    assert seen["usage"]["total_tokens"] == seen["usage"]["prompt_tokens"] + seen["usage"]["completion_tokens"]
    assert seen["models"] == [MODEL]
    assert seen["error"]["name"] == "BadRequestError" and seen["error"]["status"] == 400
    assert seen["error"]["param"] == "temperature"
