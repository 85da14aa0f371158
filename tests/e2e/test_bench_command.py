"""`textcomplete bench` drives a real server end to end (a fast smoke run; figures are never asserted)."""

from __future__ import annotations

import subprocess
import sys

from textcomplete.bench.loadgen import Summary, Timing, percentile


def test_bench_command_against_the_server(server):
    out = subprocess.run(
        [sys.executable, "-m", "textcomplete.cli", "bench", "--base-url", server.base + "/v1",
         "--concurrency", "1,2", "--prompt-tokens", "16", "--output-tokens", "4", "--scoring-requests", "1",
         "--shared-prefix-requests", "2"], capture_output=True, text=True, timeout=600, check=True)
    table = out.stdout
    for row in ("single stream", "concurrency", "shared prefix", "scoring (echo+logprobs)"):
        assert row in table
    assert all(line.split()[3] == "0" for line in table.splitlines()[1:] if line.startswith("concurrency"))


def test_summary_statistics():
    timings = [Timing(0.0, 0.5, 1.5, 11), Timing(0.0, 1.0, 3.0, 11), Timing(0.0, None, 1.0, 0, error="HTTP 500")]
    s = Summary.of("x", 2, timings, seconds=4.0)
    assert s.requests == 2 and s.errors == 1 and s.output_tokens == 22
    assert s.ttft_p50 == 0.75 and abs(s.itl_p50 - 0.15) < 1e-9
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
