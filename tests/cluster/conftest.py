"""Cluster fixtures: `textcomplete serve --replicas 2` on a local Ray instance (one module's worth of tests)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server, schema, validate  # noqa: F401 - the contract's fixtures, reused

KEY = "sk-cluster-test-key-0123456789"


def process_tree(pid: int) -> set[int]:
    """`pid` and every process descended from it (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(children.get(p, []))
    return tree


@pytest.fixture(scope="module")
def server():
    """Two replicas of the default model, one CPU and one thread each, on a local Ray instance that the
    server starts (no dashboard, a small object store) and stops."""
    pytest.importorskip("ray.serve", reason="the cluster tests need the ray extra: pip install textcomplete[ray]")
    s = Server("--replicas", "2", "--threads", "1", "--api-key", KEY, log_level="info")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, timeout=120, headers={"authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    import openai

    from tests.e2e.helpers import validate_response
    http_client = httpx.Client(timeout=120, event_hooks={"response": [validate_response]})
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, http_client=http_client)
