"""Pure parts of the peer comparison: KV sizing, the build cache marker, model choice, memory and the report.

Nothing here builds or runs llama.cpp.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from textcomplete.bench import bench_models, compare, llama_cpp_build, report
from textcomplete.bench.loadgen import Summary
from textcomplete.bench.workloads import ServerResults, WorkloadConfig

SHAPE_17B = bench_models.SHAPES["smollm2-1.7b"]


def test_kv_tokens_give_every_slot_its_longest_request_in_whole_blocks():
    config = WorkloadConfig(prompt_tokens=128, output_tokens=128, prefill_tokens=512)
    assert compare.kv_tokens(16, config) == 16 * 528          # 513 tokens rounded up to 33 blocks of 16
    assert compare.kv_tokens(4, WorkloadConfig(prompt_tokens=600, output_tokens=100)) == 4 * 704


def test_textcomplete_kv_memory_is_exactly_the_token_count_in_blocks():
    tokens = compare.kv_tokens(16, WorkloadConfig())
    memory = compare.textcomplete_kv_memory(SHAPE_17B, tokens)
    per_block = 2 * 24 * 16 * 32 * 64 * 4                     # the engine's kv_bytes_per_block, float32
    assert memory // per_block * 16 == tokens
    assert compare.serve_itemsize(["--dtype", "bfloat16"]) == 2 and compare.serve_itemsize([]) == 4


def test_llama_server_gets_the_same_capacity_shared_by_its_slots(tmp_path):
    model = bench_models.BenchModel("m Q4_1", tmp_path / "m.gguf", SHAPE_17B, "Q4_1", False)
    cmd = compare.llama_server_command(tmp_path / "llama-server", model, 8080, 16, 8448)
    assert cmd[cmd.index("-np") + 1] == "16" and cmd[cmd.index("-c") + 1] == "8448"
    assert cmd[cmd.index("-t") + 1] == str(compare.THREADS) and "--kv-unified" in cmd


def test_build_marker_is_reused_only_for_the_same_version_and_flags(tmp_path):
    assert llama_cpp_build.cached_binaries(tmp_path) is None
    (tmp_path / "bin").mkdir()
    for name in ("llama-server", "llama-quantize"):
        (tmp_path / "bin" / name).write_text("")
    marker = tmp_path / llama_cpp_build.MARKER
    marker.write_text(json.dumps(llama_cpp_build.marker_content(llama_cpp_build.VERSION,
                                                                llama_cpp_build.CMAKE_FLAGS)))
    assert llama_cpp_build.cached_binaries(tmp_path).server == tmp_path / "bin" / "llama-server"
    assert llama_cpp_build.cached_binaries(tmp_path, flags=("-DGGML_NATIVE=OFF",)) is None
    assert llama_cpp_build.cached_binaries(tmp_path, version="0.0.1") is None
    marker.write_text("not json")
    assert llama_cpp_build.cached_binaries(tmp_path) is None


def test_model_choice_parses_and_refuses_unknown_formats():
    assert bench_models.parse_models("smollm2-135m, smollm2-1.7b:Q8_0,llama3-8b") == [
        ("smollm2-135m", "Q4_1"), ("smollm2-1.7b", "Q8_0"), ("llama3-8b", "Q4_K_M")]
    for bad in ("smollm2-135m:Q8_0", "smollm2-1.7b:Q3_K", "gpt5"):
        with pytest.raises(ValueError):
            bench_models.parse_models(bad)


def test_shapes_have_the_real_parameter_counts():
    assert round(SHAPE_17B.parameters() / 1e9, 2) == 1.71
    assert round(bench_models.SHAPES["llama3-8b"].parameters() / 1e9, 2) == 8.03
    assert bench_models.padded_tokens(["a", "b"], 4) == ["a", "b", "<pad_2>", "<pad_3>"]


def test_weights_read_per_token_index_an_untied_embedding():
    tensors = [("token_embd.weight", 1000, 100), ("blk.0.attn_q.weight", 50, 5), ("output.weight", 1000, 100)]
    assert compare.weights_read_per_token(tensors, tied=False) == 10 + 50 + 1000
    assert compare.weights_read_per_token(tensors[:2], tied=True) == 1050


def test_proc_status_parsing():
    text = "Name:\tpython\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t4\n"
    assert compare.parse_status_kib(text) == {"VmHWM": 204800, "VmRSS": 102400}


def _run(single: float, c16: float, rss_mib: int) -> compare.PeerRun:
    def summary(name, conc, tok_s):
        return Summary(name, conc, 4, 0, 1.0, int(tok_s), 0, 0.5, 0.6, 0.02, 0.03)
    results = ServerResults("x", single=summary("single stream", 1, single), sweep=[summary("c", 16, c16)])
    return compare.PeerRun(results, 2.0, rss_mib * 1024 // 2, rss_mib * 1024, 8448, [])


def test_report_tables_show_ratios_and_targets():
    figures = {report.OURS: report.Figures.of(_run(120, 400, 230)),
               report.OURS_INT8: report.Figures.of(_run(110, 600, 240)),
               report.PEER: report.Figures.of(_run(100, 500, 200))}
    table = "\n".join(report.figures_table(figures))
    assert "| single stream, output tokens/s | 120.0 tok/s | 110.0 tok/s | 100.0 tok/s | 1.20x | 1.10x |" in table
    assert "| prefill, prompt tokens/s | — | — | — | —x | —x |" in table
    ratios = {t.text: v for t, v in report.target_ratios(figures).items()}
    assert math.isclose(ratios["peak RSS after the run ≤ 1.15x"], 1.15)
    assert math.isclose(ratios["exact: single stream ≥ 1.0x"], 1.2)
    assert math.isclose(ratios["int8: concurrency 16 aggregate ≥ 1.0x"], 1.2)
    rows = "\n".join(report.targets_table([("m Q4_1", report.target_ratios(figures))]))
    assert "1.15x met" in rows and "1.20x met" in rows and "—x **missed**" in rows   # no prefill ran
    del figures[report.OURS_INT8]
    assert all(math.isnan(v) for t, v in report.target_ratios(figures).items() if t.server == report.OURS_INT8)
    assert "| textcomplete / llama-server |" in report.figures_table(figures)[0] + " |"


def test_report_keeps_the_hand_written_tail(tmp_path):
    path = tmp_path / "benchmarks.md"
    assert report.kept_tail(path) == []
    path.write_text(f"# old\n\n{report.KEEP_MARKER}\n\n## History\n\nkept text\n")
    assert report.kept_tail(path)[-1] == "## History\n\nkept text"


def test_the_report_names_the_vector_instructions_the_kernels_chose_from():
    assert compare.vector_extensions({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni"}) == \
        "AVX-512 with VNNI"
    assert compare.vector_extensions({"avx2", "fma", "f16c", "avx512f", "avx512bw"}) == "AVX-512 without VNNI"
    assert (compare.vector_extensions({"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"})
            == "AVX-512 with VNNI and AMX tiles")
    assert compare.vector_extensions({"avx2", "fma", "f16c"}) == "AVX2, no AVX-512"
    assert compare.vector_extensions({"sse4_2"}) == "no AVX2"
    assert any("(" in line and "AVX" in line for line in compare.environment_lines("0.3.36", "abc1234")) \
        or not Path("/proc/cpuinfo").exists()


def test_the_report_goes_where_it_is_asked_to(tmp_path):
    path = tmp_path / "one-run" / "report.md"
    assert report.write(path, [], 20.0, ["- env"], "textcomplete bench --compare", WorkloadConfig(), [], []) == path
    assert path.read_text().startswith("# Benchmarks") and not (tmp_path / "one-run" / "benchmarks.md").exists()


def _summary(conc: int, tok_s: float, prompt_tok_s: float = 0.0) -> Summary:
    return Summary("s", conc, 4, 0, 1.0, int(tok_s), int(prompt_tok_s), 0.5, 0.6, 0.02, 0.03)


def test_servers_take_turns_in_an_order_rotated_each_round():
    names = ["textcomplete", "textcomplete int8", "llama-server"]
    orders = [compare.turns(names, r) for r in range(3)]
    assert orders[0] == names and sorted(orders[1]) == sorted(names)
    assert [o[0] for o in orders] == names                      # each server goes first once in three rounds
    assert compare.turns([], 2) == []


def test_each_workload_takes_its_median_round():
    rounds = [ServerResults("x", single=_summary(1, s), sweep=[_summary(16, c)], prefill=_summary(1, 0, p))
              for s, c, p in ((50, 300, 900), (40, 500, 700), (45, 100, 800))]
    middle = compare.median_results(rounds)
    assert middle.single.output_tokens_per_s == 45          # each workload independently: not one round's set
    assert middle.sweep[0].output_tokens_per_s == 300
    assert middle.prefill.prompt_tokens_per_s == 800
    assert compare.median_results(rounds[:2]).single.output_tokens_per_s == 40   # even count: the lower middle
    assert compare.median_results([ServerResults("x")]).single is None


def test_the_report_lists_every_round_and_its_ratio(tmp_path):
    def peer(singles):
        rounds = [ServerResults("x", single=_summary(1, s), prefill=_summary(1, 0, 600)) for s in singles]
        return compare.PeerRun(compare.median_results(rounds), 1.0, 1024, 2048, 8448, [], rounds)
    model = bench_models.BenchModel("m Q4_1", tmp_path / "m.gguf", SHAPE_17B, "Q4_1", False)
    run = compare.ModelRun(model, {report.OURS: peer([90, 110, 100]), report.PEER: peer([100, 100, 125])}, 1, 1)
    lines = "\n".join(report.round_lines(run))
    assert "textcomplete 90.0, 110.0, 100.0" in lines and "0.90x, 1.10x, 0.80x" in lines
    assert report.Figures.of(run.runs[report.OURS]).single_tok_s == 100
    one = compare.ModelRun(model, {report.OURS: peer([90]), report.PEER: peer([100])}, 1, 1)
    assert report.round_lines(one) == []


def test_kernels_are_built_before_any_server_is_timed_and_the_report_says_which(monkeypatch):
    from textcomplete import kernels
    from textcomplete.kernels import library
    calls = []
    monkeypatch.setattr(library, "load", lambda: calls.append("library") or object())
    monkeypatch.setattr(kernels, "decode_layers", lambda: calls.append("decode") or object())
    monkeypatch.setattr(kernels, "quant_matmul", lambda: calls.append("quant_matmul") or object())
    line = compare.build_native_kernels()
    assert calls == ["library", "decode", "quant_matmul"]
    assert "native backend" in line and "block-format" in line and "exclude the once-per-machine build" in line
    for name, module in (("decode_layers", kernels), ("quant_matmul", kernels), ("load", library)):
        monkeypatch.setattr(module, name, lambda: None)
    assert "PyTorch fallback" in compare.build_native_kernels()


def test_a_model_file_is_read_whole_into_the_page_cache(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(range(256)) * ((9 << 20) // 256 + 1))   # more than one read's chunk
    seconds = compare.read_into_page_cache(path)
    assert 0 <= seconds < 600
    assert path.read_bytes()[:256] == bytes(range(256))   # only read, never written
