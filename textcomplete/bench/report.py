"""Writing the comparison: docs/benchmarks.md with each model's figures for both servers, ratios, targets,
the memory-bandwidth roofline and plots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from textcomplete.bench.compare import ModelRun, PeerRun, level, ratio
from textcomplete.bench.workloads import WorkloadConfig

OURS, OURS_INT8, PEER = "textcomplete", "textcomplete int8", "llama-server"
SERVERS = (OURS, OURS_INT8, PEER)   # the exact default mode, --activations int8, the peer
KEEP_MARKER = "<!-- The generated report ends here; what follows is kept when the report is regenerated. -->"


@dataclass(frozen=True)
class Target:
    key: str           # a Figures field
    server: str        # whose figure is compared with the peer's
    kind: str          # "max": ours / peer must be at most `threshold`; "min": at least
    threshold: float
    text: str


TARGETS = (Target("rss_peak_mib", OURS, "max", 1.15, "peak RSS after the run ≤ 1.15x"),
           Target("single_tok_s", OURS, "min", 1.0, "exact: single stream ≥ 1.0x"),
           Target("single_tok_s", OURS_INT8, "min", 1.0, "int8: single stream ≥ 1.0x"),
           Target("c16_tok_s", OURS_INT8, "min", 1.0, "int8: concurrency 16 aggregate ≥ 1.0x"),
           Target("prefill_tok_s", OURS_INT8, "min", 1.0, "int8: prefill ≥ 1.0x"))


@dataclass(frozen=True)
class Figures:
    """The headline figures of one server on one model; NaN where a workload did not run."""
    rss_loaded_mib: float
    rss_peak_mib: float
    load_seconds: float
    single_tok_s: float
    c16_tok_s: float
    c16_ttft_s: float
    c16_itl_ms: float
    prefill_tok_s: float

    @classmethod
    def of(cls, run: PeerRun, concurrency: int = 16) -> "Figures":
        r, nan = run.results, float("nan")
        c = level(r, concurrency)
        return cls(run.rss_loaded_kib / 1024, run.rss_peak_kib / 1024, run.load_seconds,
                   r.single.output_tokens_per_s if r.single else nan,
                   c.output_tokens_per_s if c else nan, c.ttft_p50 if c else nan,
                   c.itl_p50 * 1000 if c else nan,
                   r.prefill.prompt_tokens_per_s if r.prefill else nan)


ROWS = (  # (label, field, unit, digits)
    ("peak RSS after load", "rss_loaded_mib", "MiB", 0),
    ("peak RSS after the run", "rss_peak_mib", "MiB", 0),
    ("load time (start to healthy)", "load_seconds", "s", 1),
    ("single stream, output tokens/s", "single_tok_s", "tok/s", 1),
    ("concurrency 16, aggregate output tokens/s", "c16_tok_s", "tok/s", 1),
    ("concurrency 16, TTFT p50", "c16_ttft_s", "s", 3),
    ("concurrency 16, ITL p50", "c16_itl_ms", "ms", 1),
    ("prefill, prompt tokens/s", "prefill_tok_s", "tok/s", 1),
)


def _num(value: float, digits: int, unit: str = "") -> str:
    return "—" if math.isnan(value) else f"{value:.{digits}f}{' ' + unit if unit else ''}"


def figures_table(figures: dict[str, Figures], concurrency: int = 16) -> list[str]:
    """One column per server that ran, then each of ours as a ratio to the peer's."""
    servers = [s for s in SERVERS if s in figures]
    ours = [s for s in servers if s != PEER and PEER in figures]
    lines = ["| figure | " + " | ".join(servers) + "".join(f" | {s} / {PEER}" for s in ours) + " |",
             "|---|" + "---|" * (len(servers) + len(ours))]
    for label, field, unit, digits in ROWS:
        label = label.replace("concurrency 16", f"concurrency {concurrency}")
        values = [_num(getattr(figures[s], field), digits, unit) for s in servers]
        ratios = [f"{_num(ratio(getattr(figures[s], field), getattr(figures[PEER], field)), 2)}x" for s in ours]
        lines.append(f"| {label} | " + " | ".join(values + ratios) + " |")
    return lines


def target_ratios(figures: dict[str, Figures]) -> dict[Target, float]:
    """Each target's ratio (NaN where its server or the peer did not run)."""
    nan = float("nan")
    return {t: ratio(getattr(figures[t.server], t.key), getattr(figures[PEER], t.key))
            if t.server in figures and PEER in figures else nan for t in TARGETS}


def met(target: Target, value: float) -> bool:
    if math.isnan(value):
        return False
    return value <= target.threshold if target.kind == "max" else value >= target.threshold


def targets_table(rows: list[tuple[str, dict[Target, float]]], concurrency: int = 16) -> list[str]:
    """One row per model x format, one column per target: the ratio and whether it is met."""
    texts = [t.text.replace("concurrency 16", f"concurrency {concurrency}") for t in TARGETS]
    lines = ["| model | " + " | ".join(texts) + " |", "|---|" + "---|" * len(TARGETS)]
    for label, ratios in rows:
        cells = [f"{_num(ratios[t], 2)}x {'met' if met(t, ratios[t]) else '**missed**'}" for t in TARGETS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def roofline_lines(run: ModelRun, bandwidth_gbs: float, single: dict[str, float]) -> list[str]:
    """Weights streamed per decode step against the machine's bandwidth, and how close each server came."""
    ceiling = bandwidth_gbs * 1e9 / run.bytes_per_token
    reached = ", ".join(f"{name} {_num(v, 1)} tok/s ({_num(100 * v / ceiling, 0)}% of it)"
                        for name, v in single.items())
    return [f"- {run.model.label}: {run.file_bytes / 1e6:,.0f} MB of tensors in the file, "
            f"{run.bytes_per_token / 1e6:,.0f} MB read per decode step; batch-1 ceiling at {bandwidth_gbs:.1f} GB/s: "
            f"{ceiling:.1f} tok/s; single stream reached: {reached}"]


def plot(runs: list[ModelRun], docs: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for name, key, ylabel in (("bench-throughput.png", "output_tokens_per_s", "aggregate output tokens/s"),
                              ("bench-ttft.png", "ttft_p50", "p50 time to first token (s)")):
        fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), dpi=110, squeeze=False)
        for ax, model_run in zip(axes[0], runs):
            for server, style in ((OURS, "o-"), (OURS_INT8, "^-"), (PEER, "s--")):
                if server not in model_run.runs:
                    continue
                sweep = model_run.runs[server].results.sweep if server in model_run.runs else []
                ax.plot([s.concurrency for s in sweep], [getattr(s, key) for s in sweep], style, label=server)
            ax.set_xscale("log", base=2)
            levels = sorted({s.concurrency for run in model_run.runs.values() for s in run.results.sweep})
            ax.set_xticks(levels, [str(c) for c in levels])
            if key == "ttft_p50":
                ax.set_yscale("log")
            ax.set_xlabel("concurrent streams")
            ax.set_ylabel(ylabel)
            ax.set_title(model_run.model.label)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(docs / name)
        plt.close(fig)
        made.append(name)
    made.append(_plot_memory(runs, docs, plt))
    return made


def _plot_memory(runs: list[ModelRun], docs: Path, plt) -> str:
    name = "bench-memory.png"
    fig, ax = plt.subplots(figsize=(max(5, 2.5 * len(runs)), 3.8), dpi=110)
    width = 0.27
    for i, (server, color) in enumerate(((OURS, "tab:blue"), (OURS_INT8, "tab:green"), (PEER, "tab:orange"))):
        values = [r.runs[server].rss_peak_kib / 1024 if server in r.runs else 0 for r in runs]
        ax.bar([x + (i - 1) * width for x in range(len(runs))], values, width, label=server, color=color)
    ax.set_xticks(range(len(runs)), [r.model.label for r in runs])
    ax.set_ylabel("peak RSS after the run (MiB)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / name)
    plt.close(fig)
    return name


def round_lines(run: ModelRun) -> list[str]:
    """Each round's single-stream and prefill figures, and ours / the peer's within the round: how far the
    machine moved while the report ran."""
    servers = [s for s in SERVERS if s in run.runs and run.runs[s].rounds]
    count = min((len(run.runs[s].rounds) for s in servers), default=0)
    if count < 2:
        return []
    lines = []
    for label, pick in (("single stream (output tok/s)", lambda r: r.single.output_tokens_per_s if r.single else
                         float("nan")),
                        ("prefill (prompt tok/s)", lambda r: r.prefill.prompt_tokens_per_s if r.prefill else
                         float("nan"))):
        values = {s: [pick(r) for r in run.runs[s].rounds[:count]] for s in servers}
        parts = [f"{s} {', '.join(_num(v, 1) for v in values[s])}" for s in servers]
        if PEER in values:
            parts += [f"{s} / {PEER} {', '.join(_num(ratio(a, b), 2) + 'x' for a, b in zip(values[s], values[PEER]))}"
                      for s in servers if s != PEER]
        lines.append(f"- {label}, rounds 1-{count}: " + "; ".join(parts))
    return lines


def kept_tail(path: Path) -> list[str]:
    """The hand-written part after the marker of an earlier report, so regenerating does not erase it."""
    try:
        text = path.read_text()
    except OSError:
        return []
    return [KEEP_MARKER, "", text.split(KEEP_MARKER, 1)[1].strip("\n")] if KEEP_MARKER in text else []


def workload_text(config: WorkloadConfig) -> str:
    return (f"Workloads, the same for both servers: streamed requests with {config.prompt_tokens}-token prompts "
            f"and {config.output_tokens} output tokens (end-of-text biased away with `logit_bias`, so every "
            f"request runs to full length), {config.single_stream_requests} one after the other for the single "
            f"stream, then at concurrency {', '.join(map(str, config.concurrency))}; prefill: "
            f"{config.prefill_requests} distinct {config.prefill_tokens}-token prompts, one at a time, "
            f"`max_tokens: 1`, not streamed.")


def write(path: Path, runs: list[ModelRun], bandwidth_gbs: float, env: list[str], command: str,
          config: WorkloadConfig, notes: list[str], skipped: list[str]) -> Path:
    """The report at `path` (its plots beside it, as bench-*.png: one report a directory)."""
    docs = path.parent
    docs.mkdir(parents=True, exist_ok=True)
    tail = kept_tail(path)
    images = plot(runs, docs) if runs else []
    top = max(config.concurrency)
    figures = {r.model.label: {s: Figures.of(p, 16 if level(p.results, 16) else top) for s, p in r.runs.items()}
               for r in runs}
    complete = [r for r in runs if OURS in r.runs and PEER in r.runs]
    rounds = max((len(p.rounds) for r in runs for p in r.runs.values()), default=1) or 1
    lines = [f"# Benchmarks: textcomplete against llama.cpp's server", "",
             "Generated by the comparison command. For each model and format the servers were loaded side by "
             "side on this machine, from the same GGUF file, with the same threads and the same KV-cache "
             f"capacity in tokens, and took turns: in each of {rounds} round{'s' if rounds != 1 else ''} every "
             "server ran the workloads alone while the others sat idle, in an order rotated from round to "
             "round, and each figure below is the server's median round (the rounds are listed under each "
             "model's table). The servers: textcomplete in its exact default mode (float32 activations), textcomplete "
             "with `--activations int8` (8-bit activations: in every step on Q4_K, Q5_K and Q6_K weights, in steps of "
             "more than 8 rows on the other formats, in every step on every integer format with AVX2) and "
             "llama-server.", "",
             "## What ran", "",
             *[f"- {r.model.label}: `{r.model.path.name}`"
               f"{' (random weights at the real shape)' if r.model.random_weights else ' (the shipped file)'}, "
               f"KV cache {next(iter(r.runs.values())).kv_tokens} tokens in both servers" for r in runs],
             *[f"- not run: {s}" for s in skipped], "", "## Environment", "", *env, "",
             "## Command", "", "```bash", command, "```", "", workload_text(config), "",
             "## Targets", "", "Ratios textcomplete / llama-server; the exact mode's figures for the int8 "
             "targets are in each model's table.", "",
             *targets_table([(r.model.label, target_ratios(figures[r.model.label])) for r in complete],
                            16 if 16 in config.concurrency else top), ""]
    for r in complete:
        lines += [f"## {r.model.label}", "", *figures_table(figures[r.model.label],
                                                              16 if level(r.runs[OURS].results, 16) else top),
                  "", *round_lines(r), ""]
    lines += [*[f"![{name}]({name})" for name in images], "", "## Roofline", "",
              f"Measured memory bandwidth (copy, read + write): {bandwidth_gbs:.1f} GB/s. A decode step at batch 1 "
              "has to stream every weight it multiplies by once, so bandwidth / bytes per step bounds "
              "single-stream tokens/s.", "",
              *[line for r in runs for line in roofline_lines(
                  r, bandwidth_gbs, {s: figures[r.model.label][s].single_tok_s for s in r.runs})], ""]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    path.write_text("\n".join(lines + tail) + "\n")
    return path
