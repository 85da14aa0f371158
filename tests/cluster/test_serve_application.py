"""The Ray Serve application (`textcomplete.cluster.app:build`, what a KubeRay RayService deploys): the same
front end as Serve's HTTP ingress over an engine replica, checked on a few endpoints, then shut down without a trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import process_tree
from tests.e2e.conftest import free_port

SCRIPT = r'''
import json, sys, httpx, ray
from ray import serve
from textcomplete.cluster.app import build
port, key = int(sys.argv[1]), "sk-application-key-123456"
ray.init(address="local", include_dashboard=False, object_store_memory=150 << 20, configure_logging=False,
         log_to_driver=False)
try:
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"serve_args": f"--replicas 1 --threads 1 --kv-cache-memory 128MiB --max-model-len 1024 "
                                   f"--api-key {key}"}), name="textcomplete", route_prefix="/")
    base, auth = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {key}"}
    req = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    plain = httpx.post(base + "/v1/completions", json=req, headers=auth, timeout=120)
    stream = httpx.post(base + "/v1/completions", json={**req, "stream": True}, headers=auth, timeout=120)
    open_ = httpx.post(base + "/v1/completions", json=req, timeout=120)
    models = httpx.get(base + "/v1/models", headers=auth, timeout=60)
    print(json.dumps({"plain": plain.json(), "stream": stream.text, "stream_type": stream.headers["content-type"],
                      "no_key": [open_.status_code, open_.json()], "models": models.json(),
                      "health": httpx.get(base + "/health").status_code}), flush=True)
    sys.stdin.readline()   # the test reads this process's tree, then lets it shut down
finally:
    serve.shutdown()
    ray.shutdown()
'''


def test_the_serve_application_serves_the_contract_behind_serves_proxy():
    pytest.importorskip("ray.serve")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(free_port())], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()   # blocks until the application answered (or the script failed)
        tree = process_tree(proc.pid)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert line, "the application did not answer (its output is above)"
    result = json.loads(line)
    assert result["health"] == 200 and result["models"]["data"][0]["id"] == "SmolLM2-135M-Instruct"
    assert result["plain"]["choices"][0]["finish_reason"] == "length"
    assert result["stream_type"].startswith("text/event-stream") and result["stream"].endswith("data: [DONE]\n\n")
    events = [json.loads(e[6:]) for e in result["stream"].split("\n\n") if e.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in events) == result["plain"]["choices"][0]["text"]
    assert result["no_key"][0] == 401 and set(result["no_key"][1]["error"]) == {"message", "type", "param", "code"}
    assert len(tree) > 3   # Ray's processes, the proxy, the front end and the replicas ran below the script
    deadline = time.monotonic() + 60
    while alive := [p for p in tree if _running(p)]:
        if time.monotonic() > deadline:
            for pid in alive:   # only ours, by process id
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"processes left after the application stopped: {alive}")
        time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
