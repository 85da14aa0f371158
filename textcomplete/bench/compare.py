"""Side-by-side comparison with llama-cpp-python's server on the same GGUF file, in one run on one machine.

Starts each server in turn (never both at once: they would share the two cores), runs the same workloads
against each, measures the machine's memory bandwidth for the roofline, and writes `docs/benchmarks.md`
with a table of both servers' figures, their ratios and PNG plots.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import torch

from textcomplete.bench.loadgen import LoadGenerator, Summary
from textcomplete.bench.workloads import ServerResults, WorkloadConfig, run
from textcomplete.models.gguf_file import GGUFFile
from textcomplete.models.loader import default_model_path
from textcomplete.tokenizer import Tokenizer

MODEL_ID = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess, ready when `ready_path` answers, stopped by its process id."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, log: Path, env: dict | None = None) -> None:
        self.port = port
        self.log_path = log
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited early: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become ready; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@dataclass(frozen=True)
class Roofline:
    bandwidth_gbs: float
    fp32_bytes_per_step: int
    gguf_bytes_per_step: int

    def ceiling(self, bytes_per_step: int) -> float:
        """Decode steps per second if every step only streamed the weights once."""
        return self.bandwidth_gbs * 1e9 / bytes_per_step


def measure_bandwidth(size_mib: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + written), best of a few runs."""
    src = torch.ones(size_mib << 18, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def roofline(gguf_path: Path) -> Roofline:
    gguf = GGUFFile(gguf_path)
    elements = sum(t.n_elements for t in gguf.tensor_infos)
    stored = sum(t.n_bytes for t in gguf.tensor_infos)
    return Roofline(measure_bandwidth(), elements * 4, stored)


def run_ours(model: Path, config: WorkloadConfig, tokenizer: Tokenizer, logs: Path,
             extra: list[str]) -> ServerResults:
    port = _free_port()
    cmd = [sys.executable, "-m", "textcomplete.cli", "--log-level", "warning", "serve", "--model", str(model),
           "--served-model-name", MODEL_ID, "--port", str(port), *extra]
    server = ServerProcess(cmd, port, "/health", logs / "textcomplete.log")
    try:
        gen = LoadGenerator(f"http://127.0.0.1:{port}/v1", MODEL_ID)
        return run(gen, tokenizer, config, "textcomplete")
    finally:
        server.stop()


def run_peer(peer_python: str, model: Path, config: WorkloadConfig, tokenizer: Tokenizer,
             logs: Path) -> ServerResults:
    """llama-cpp-python's server, 2 threads; a second instance with all logits kept serves the scoring."""
    results = _run_peer_once(peer_python, model, config, tokenizer, logs, ("single", "sweep", "shared_prefix"),
                             [])
    scoring = _run_peer_once(peer_python, model, config, tokenizer, logs, ("scoring",), ["--logits_all", "true"])
    results.scoring = scoring.scoring
    return results


def _run_peer_once(peer_python, model, config, tokenizer, logs, workloads, extra) -> ServerResults:
    port = _free_port()
    cmd = [peer_python, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_ID,
           "--n_threads", "2", "--n_threads_batch", "2", "--n_ctx", "2048", "--port", str(port),
           "--interrupt_requests", "false", *extra]   # queue concurrent requests rather than cut them off
    server = ServerProcess(cmd, port, "/v1/models", logs / f"llama-cpp-python{'-'.join(workloads)}.log")
    try:
        gen = LoadGenerator(f"http://127.0.0.1:{port}/v1", MODEL_ID)
        # Its server takes one prompt per request and scores slowly: 4 single-prompt requests suffice.
        return run(gen, tokenizer, replace(config, scoring_prompts_per_request=1, scoring_requests=4),
                   "llama-cpp-python", workloads=workloads)
    finally:
        server.stop()


def peer_version(peer_python: str) -> str:
    out = subprocess.run([peer_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def default_gguf() -> Path:
    return default_model_path()


def environment_lines(peer_python: str) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return [f"- CPU: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB memory; {platform.system()} {platform.release()}",
            f"- Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)",
            f"- llama-cpp-python {peer_version(peer_python)} (2 threads)"]


def ratio(ours: float, peer: float) -> float:
    return ours / peer if peer else float("nan")


def level(results: ServerResults, concurrency: int) -> Summary | None:
    return next((s for s in results.sweep if s.concurrency == concurrency), None)
