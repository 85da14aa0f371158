"""The engine benchmark runs end to end on a tiny model (figures are printed by the command, never asserted)."""

from __future__ import annotations

from tests.engine.test_batching import tiny_engine
from textcomplete.bench import engine_bench
from textcomplete.cli import main


def test_engine_bench_runs_on_a_tiny_model(tiny_model_dir):
    engine = tiny_engine(tiny_model_dir, max_num_batched_tokens=256)
    results = engine_bench.run(engine, [1, 4], decode_steps=3, prompt_len=40, repeats=1)
    assert [r.tokens for r in results] == [3, 12, 40]
    assert "decode, batch 4" in engine_bench.format_table(results)
    shared = engine_bench.measure_shared_prefix(engine, requests=4, prefix_len=48, suffix_len=4)
    assert shared.median_ttft_cached > 0 and shared.median_ttft_uncached > 0
    assert "with prefix caching" in shared.format()


def test_bench_engine_command(tiny_model_dir, capsys):
    code = main(["--log-level", "warning", "bench-engine", "--model", str(tiny_model_dir("gpt2")),
                 "--batch-sizes", "2", "--decode-steps", "2", "--prompt-len", "20", "--no-shared-prefix",
                 "--kv-cache-memory", "8MiB"])
    assert code == 0
    out = capsys.readouterr().out
    assert "decode, batch 2" in out and "prefill, 20-token prompt" in out
