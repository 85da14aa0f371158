"""End-to-end fixtures: a real `textcomplete serve` subprocess on 127.0.0.1, and the contract's JSON Schema."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import httpx
import pytest

from textcomplete.bench.compare import ServerProcess

SPEC_DIR = Path(__file__).resolve().parents[3] / "shared" / "spec"
SCHEMA_PATH = Path(os.environ.get("TEXTCOMPLETE_SCHEMA", SPEC_DIR / "openai-completions-schema.json"))
MODEL = "SmolLM2-135M-Instruct"
CONTEXT = 1024   # a short context keeps the context-limit tests fast on a CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(ServerProcess):
    """A `textcomplete serve` process on a free port; stopped by its process id."""

    def __init__(self, *extra: str, env: dict | None = None, log_level: str = "warning") -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "textcomplete.cli", "--log-level", log_level, "serve", "--port",
               str(port), "--kv-cache-memory", "512MiB", "--max-model-len", str(CONTEXT), "--enable-fault-injection",
               *extra]
        super().__init__(cmd, port, "/health", Path(f"/tmp/textcomplete-e2e-{port}.log"),
                         env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    """The official SDK, with every JSON response it receives validated against the contract's schema."""
    import openai

    from tests.e2e.helpers import validate_response
    http_client = httpx.Client(timeout=120, event_hooks={"response": [validate_response]})
    return openai.OpenAI(base_url=server.base + "/v1", api_key="sk-test", max_retries=0, http_client=http_client)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def schema():
    if not SCHEMA_PATH.exists():
        pytest.fail(f"the contract's schema is not at {SCHEMA_PATH}: set TEXTCOMPLETE_SCHEMA to its path")
    return json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="session")
def validate(schema):
    """validate(kind, obj): kind is 'response', 'chunk', 'error', 'model' or 'models'."""
    from jsonschema import Draft202012Validator
    names = {"response": "CreateCompletionResponseStrict", "chunk": "CreateCompletionStreamChunk",
             "error": "ErrorResponse", "model": "Model", "models": "ListModelsResponse"}
    validators = {k: Draft202012Validator(schema["$defs"][v]) for k, v in names.items()}

    def check(kind: str, obj) -> None:
        validators[kind].validate(obj)
    return check
