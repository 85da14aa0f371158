"""Side-by-side comparison with llama.cpp's own server (`llama-server`) on the same GGUF files, on one machine.

For each model x format, starts each server in turn with the same threads and the same KV-cache capacity in
tokens and records its load time and peak resident memory; then runs the same workloads against each, in
rounds in which the servers take turns (never two at once: they would share the cores), and keeps each
server's median round; `report` turns the runs into `docs/benchmarks.md`.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from textcomplete.bench.bench_models import BenchModel, ModelShape
from textcomplete.bench.loadgen import LoadGenerator, Summary
from textcomplete.bench.workloads import ServerResults, WorkloadConfig, format_results, run

COMPARE_WORKLOADS = ("single", "sweep", "prefill")
THREADS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_status_kib(text: str) -> dict[str, int]:
    """The kB fields of /proc/PID/status (VmRSS, VmHWM, ...) as KiB."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[key] = int(parts[0])
    return fields


def memory_kib(pid: int) -> dict[str, int]:
    try:
        return parse_status_kib(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return {}


class ServerProcess:
    """A server started as a subprocess, ready when `ready_path` answers 200, stopped by its process id."""

    def __init__(self, cmd: list[str], port: int, ready_path: str, log: Path, env: dict | None = None,
                 timeout: float = 1800) -> None:
        self.port, self.log_path = port, log
        self.log = log.open("w")
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        while time.monotonic() < started + timeout:
            if self.proc.poll() is not None:
                self.log.close()
                code = self.proc.returncode
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                raise RuntimeError(f"{Path(cmd[0]).name} stopped before it was ready ({how}); see {log}\n"
                                   f"{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    self.load_seconds = time.monotonic() - started
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become ready; see {log}")

    def peak_rss_kib(self) -> int:
        """The high-water mark of resident memory so far (VmHWM)."""
        return memory_kib(self.proc.pid).get("VmHWM", 0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@dataclass
class PeerRun:
    """One server on one model: its workload figures, load time and memory."""
    results: ServerResults
    load_seconds: float
    rss_loaded_kib: int      # VmHWM once healthy, before any request
    rss_peak_kib: int        # VmHWM after the workloads
    kv_tokens: int
    command: list[str]
    rounds: list[ServerResults] = field(default_factory=list)   # each round's figures; `results` is their median


@dataclass
class ModelRun:
    model: BenchModel
    runs: dict[str, PeerRun]     # server name -> its run
    file_bytes: int
    bytes_per_token: int


def kv_tokens(concurrency: int, config: WorkloadConfig, block_size: int = 16) -> int:
    """KV capacity both servers get: every slot can hold its longest request, rounded up to whole blocks."""
    longest = max(config.prompt_tokens + config.output_tokens, config.prefill_tokens + 1)
    per_slot = -(-longest // block_size) * block_size
    return concurrency * per_slot


def textcomplete_kv_memory(shape: ModelShape, tokens: int, itemsize: int = 4) -> int:
    """The --kv-cache-memory that gives textcomplete exactly `tokens` KV slots (its blocks x block size)."""
    return tokens * shape.kv_bytes_per_token(itemsize)


def serve_itemsize(extra: list[str]) -> int:
    """Bytes per KV element of textcomplete serve with these options (float32 on the CPU unless --kv-cache-dtype
    or --dtype says)."""
    def option(name: str) -> str | None:
        return extra[extra.index(name) + 1] if name in extra[:-1] else None
    dtype = option("--kv-cache-dtype") or "auto"
    if dtype == "auto":
        dtype = option("--dtype") or "float32"
    return 2 if dtype in ("bfloat16", "float16") else 4


def textcomplete_command(model: BenchModel, extra: list[str], tokens: int) -> list[str]:
    """textcomplete serve on `THREADS` threads with exactly `tokens` KV slots (port 0: filled in at start)."""
    memory = textcomplete_kv_memory(model.shape, tokens, serve_itemsize(extra))
    return [sys.executable, "-m", "textcomplete.cli", "--log-level", "info", "serve", "--model", str(model.path),
            "--served-model-name", model.label, "--port", "0", "--threads", str(THREADS),
            "--kv-cache-memory", str(memory), *extra]


def llama_server_command(binary: Path, model: BenchModel, port: int, concurrency: int, tokens: int) -> list[str]:
    """llama-server on `THREADS` threads, `concurrency` slots sharing one KV buffer of `tokens` tokens.

    --kv-unified lets any slot use the whole buffer, as textcomplete's paged blocks do; --cache-ram 0 turns off
    its host-memory prompt cache, which textcomplete has no counterpart of (its prefix cache lives in the KV).
    """
    return [str(binary), "-m", str(model.path), "-a", model.label, "-t", str(THREADS), "-tb", str(THREADS),
            "-np", str(concurrency), "-c", str(tokens), "--kv-unified", "--cache-ram", "0",
            "--host", "127.0.0.1", "--port", str(port)]


@dataclass
class RunningServer:
    """A server that is up: its process, how it was started, and its memory once healthy."""
    name: str
    process: ServerProcess
    command: list[str]
    rss_loaded_kib: int
    gen: LoadGenerator


def start_server(name: str, cmd: list[str], model: BenchModel, logs: Path) -> RunningServer:
    """Starts `cmd` on a free port, waits until /health answers, and sends one warm-up request."""
    port = _free_port()
    cmd = [str(port) if i and cmd[i - 1] == "--port" else part for i, part in enumerate(cmd)]
    log = logs / f"{name}-{model.label}.log".replace(' ', '-')
    print(f"starting {name} on {model.label}: {' '.join(cmd)}")
    server = ServerProcess(cmd, port, "/health", log)
    loaded = server.peak_rss_kib()
    print(f"{name}: healthy after {server.load_seconds:.1f} s, peak RSS {loaded / 1024:.0f} MiB")
    gen = LoadGenerator(f"http://127.0.0.1:{port}/v1", model.label)
    try:
        warm_up(gen)
    except BaseException:
        server.stop()
        raise
    return RunningServer(name, server, cmd, loaded, gen)


def turns(names: list[str], round_index: int) -> list[str]:
    """The order the servers take their turns in a round: rotated each round, so no server is always first
    (or always right after another one) when the machine's speed drifts."""
    k = round_index % len(names) if names else 0
    return names[k:] + names[:k]


def median_results(rounds: list[ServerResults]) -> ServerResults:
    """One server's figures over its rounds: for each workload (and each sweep level), the round whose
    throughput is the median (the lower of the middle two for an even count)."""
    def middle(summaries: list[Summary], key) -> Summary | None:
        ranked = sorted((s for s in summaries if s is not None), key=key)
        return ranked[(len(ranked) - 1) // 2] if ranked else None

    def output(s: Summary) -> float:
        return s.output_tokens_per_s

    def prompt(s: Summary) -> float:
        return s.prompt_tokens_per_s

    levels = sorted({s.concurrency for r in rounds for s in r.sweep})
    return ServerResults(
        rounds[0].name if rounds else "", single=middle([r.single for r in rounds], output),
        sweep=[middle([level(r, c) for r in rounds], output) for c in levels],
        scoring=middle([r.scoring for r in rounds], prompt),
        shared_prefix=middle([r.shared_prefix for r in rounds], output),
        prefill=middle([r.prefill for r in rounds], prompt))


def compare_servers(starts: list[tuple[str, list[str]]], model: BenchModel, config: WorkloadConfig, tokenizer,
                    logs: Path, tokens: int, rounds: int, skipped: list[str]) -> dict[str, PeerRun]:
    """Starts every server (one at a time, so each load is timed alone), then runs the workloads `rounds`
    times, the servers taking turns within each round. Only the server whose turn it is gets requests; the
    others sit idle, so a slow minute of a shared machine lands on all of them rather than on one.

    A server that cannot start is reported in `skipped` and left out; the rest are stopped at the end.
    """
    running: list[RunningServer] = []
    per_round: dict[str, list[ServerResults]] = {}
    try:
        for name, cmd in starts:
            try:
                running.append(start_server(name, cmd, model, logs))
            except RuntimeError as exc:   # a server that cannot load this model is reported, not fatal
                print(f"{name} on {model.label} failed: {str(exc)[-500:]}")
                skipped.append(f"{name} on {model.label}: {str(exc).splitlines()[0][:200]}")
        by_name = {s.name: s for s in running}
        for r in range(rounds):
            for name in turns(list(by_name), r):
                server = by_name[name]
                results = run(server.gen, tokenizer, config, name, workloads=COMPARE_WORKLOADS, seed=r)
                print(f"round {r + 1}/{rounds}, {name}:\n{format_results(results)}")
                per_round.setdefault(name, []).append(results)
        return {s.name: PeerRun(median_results(per_round[s.name]), s.process.load_seconds, s.rss_loaded_kib,
                                s.process.peak_rss_kib(), tokens, s.command, per_round[s.name])
                for s in running}
    finally:
        for server in running:
            server.process.stop()


def warm_up(gen: LoadGenerator) -> None:
    """One short request before the timed ones, so that first-use work (lazy kernel builds, allocations) is
    not charged to the single-stream figure; llama-server does the same at load (its warm-up run)."""
    httpx.post(gen.url, json=gen.body("Warm up", 8), headers=gen.headers, timeout=gen.timeout)


def weights_read_per_token(tensors: list[tuple[str, int, int]], tied: bool) -> int:
    """Bytes a decode step streams: every tensor, except that an untied embedding table is only indexed.

    `tensors` holds (name, bytes, rows); an indexed table costs one row of its bytes.
    """
    total = 0
    for name, nbytes, rows in tensors:
        total += nbytes // rows if name == "token_embd.weight" and not tied else nbytes
    return total


def file_figures(model: BenchModel) -> tuple[int, int]:
    """(tensor bytes in the file, weight bytes read per decode step)."""
    import gguf
    infos = gguf.GGUFReader(model.path).tensors
    tied = not any(t.name == "output.weight" for t in infos)
    tensors = [(t.name, int(t.n_bytes), max(1, int(t.n_elements) // model.shape.hidden)) for t in infos]
    return sum(n for _, n, _ in tensors), weights_read_per_token(tensors, tied)


def build_native_kernels() -> str:
    """Builds textcomplete's native modules in this process (or loads them from the cache) before any server
    starts, as llama-server is built before: the servers, started with this environment from the same sources,
    then load them from the same cache, so that a load time is a start's, not a first build's on this machine.
    Returns a line for the report saying so."""
    from textcomplete import kernels
    from textcomplete.kernels import library
    start = time.perf_counter()
    built = [name for name, module in (("the library of the native backend", library.load()),
                                       ("the PyTorch backend's decode", kernels.decode_layers()),
                                       ("block-format", kernels.quant_matmul()))
             if module is not None]
    seconds = time.perf_counter() - start
    if not built:
        return "- textcomplete's native kernels could not be built: its servers ran on the PyTorch fallback"
    return (f"- textcomplete's native kernels ({', '.join(built)}) were built, or loaded from their cache, before "
            f"the servers started ({seconds:.1f} s): the load times below exclude the once-per-machine build that a "
            "first start includes")


def read_into_page_cache(path: Path) -> float:
    """Drops `path` from the page cache (the pages no process maps) and reads it once from start to end, so
    that every server then maps the same warm cache, whichever started first and whatever read the file before.
    A sequential read is cached in large folios (ext4 and xfs on recent kernels), which a mapping then maps 2
    MiB at a time; pages faulted in through a plain mapping are cached small, and a decode step that streams
    weights through small pages is slower (textcomplete.models.mapping.map_weights). Returns the seconds taken."""
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        chunk = bytearray(8 << 20)
        while f.readinto(chunk):
            pass
    return time.perf_counter() - start


def measure_bandwidth(size_mib: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + written), best of a few runs."""
    import torch
    src = torch.ones(size_mib << 18, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def vector_extensions(flags: set[str] | frozenset[str]) -> str:
    """The vector instruction sets the kernels choose between, as /proc/cpuinfo's flags name them."""
    if {"avx512f", "avx512bw"} <= flags:
        amx = " and AMX tiles" if {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags else ""
        return "AVX-512" + (f" with VNNI{amx}" if "avx512_vnni" in flags else f" without VNNI{amx}")
    if {"avx2", "fma", "f16c"} <= flags:
        return "AVX2, no AVX-512"
    return "no AVX2"


def environment_lines(llama_version: str, commit: str) -> list[str]:
    import torch

    from textcomplete.kernels import cpu_flags
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu += f" ({vector_extensions(cpu_flags())})"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return [f"- CPU: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB memory; {platform.system()} {platform.release()}",
            f"- Python {platform.python_version()}, torch {torch.__version__}; textcomplete at {commit}",
            f"- llama-server built from the llama.cpp vendored in llama-cpp-python {llama_version} "
            f"(CMake Release, GGML_NATIVE=ON)",
            f"- every server on {THREADS} threads, loaded side by side and measured in turns; load average when "
            f"the report was written {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[2]:.1f} (15 min): anything "
            "else running on the two cores slows every server"]


def git_commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--short", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (out.stdout.strip() or "unknown") + (" with uncommitted changes" if dirty else "")


def ratio(ours: float, peer: float) -> float:
    return ours / peer if peer else float("nan")


def level(results: ServerResults, concurrency: int) -> Summary | None:
    return next((s for s in results.sweep if s.concurrency == concurrency), None)
