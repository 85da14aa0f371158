"""Writing the comparison: docs/benchmarks.md with both servers' figures, ratios, targets, roofline and plots."""

from __future__ import annotations

from pathlib import Path

from textcomplete.bench.compare import Roofline, level, ratio
from textcomplete.bench.workloads import ServerResults, WorkloadConfig

TARGETS = [
    # (what, how ours/peer is judged, threshold, text)
    ("c16_throughput", "min", 3.0, "Aggregate output tokens/s at concurrency 16: at least 3x"),
    ("scoring", "min", 5.0, "Scoring prompt tokens/s: at least 5x"),
    ("c16_ttft", "max", 1 / 3, "p50 time to first token at concurrency 16: at most 1/3 of the peer's"),
    ("single", "min", 1.0, "Single-stream output tokens/s: at least 1.0x"),
]


def target_ratios(ours: ServerResults, peer: ServerResults) -> dict[str, float]:
    o16, p16 = level(ours, 16), level(peer, 16)
    return {
        "c16_throughput": ratio(o16.output_tokens_per_s, p16.output_tokens_per_s) if o16 and p16 else float("nan"),
        "scoring": ratio(ours.scoring.prompt_tokens_per_s, peer.scoring.prompt_tokens_per_s)
        if ours.scoring and peer.scoring else float("nan"),
        "c16_ttft": ratio(o16.ttft_p50, p16.ttft_p50) if o16 and p16 else float("nan"),
        "single": ratio(ours.single.output_tokens_per_s, peer.single.output_tokens_per_s)
        if ours.single and peer.single else float("nan"),
    }


def _row(label: str, ours: float, peer: float, unit: str, digits: int = 1) -> str:
    return f"| {label} | {ours:.{digits}f} {unit} | {peer:.{digits}f} {unit} | {ratio(ours, peer):.2f}x |"


def figures_table(ours: ServerResults, peer: ServerResults) -> list[str]:
    lines = ["| workload | textcomplete | llama-cpp-python | ratio (textcomplete / peer) |", "|---|---|---|---|"]
    if ours.single and peer.single:
        lines.append(_row("single stream, output tokens/s", ours.single.output_tokens_per_s,
                          peer.single.output_tokens_per_s, "tok/s"))
        lines.append(_row("single stream, p50 inter-token latency", ours.single.itl_p50 * 1000,
                          peer.single.itl_p50 * 1000, "ms"))
    for o in ours.sweep:
        p = level(peer, o.concurrency)
        if p is None:
            continue
        c = o.concurrency
        lines.append(_row(f"concurrency {c}, output tokens/s", o.output_tokens_per_s, p.output_tokens_per_s, "tok/s"))
        lines.append(_row(f"concurrency {c}, requests/s", o.requests_per_s, p.requests_per_s, "req/s", 3))
        lines.append(_row(f"concurrency {c}, TTFT p50", o.ttft_p50, p.ttft_p50, "s", 3))
        lines.append(_row(f"concurrency {c}, TTFT p99", o.ttft_p99, p.ttft_p99, "s", 3))
        lines.append(_row(f"concurrency {c}, ITL p50", o.itl_p50 * 1000, p.itl_p50 * 1000, "ms"))
        lines.append(_row(f"concurrency {c}, ITL p99", o.itl_p99 * 1000, p.itl_p99 * 1000, "ms"))
    if ours.scoring and peer.scoring:
        lines.append(_row("scoring, prompt tokens scored/s", ours.scoring.prompt_tokens_per_s,
                          peer.scoring.prompt_tokens_per_s, "tok/s"))
    if ours.shared_prefix and peer.shared_prefix:
        lines.append(_row("shared prefix, TTFT p50", ours.shared_prefix.ttft_p50, peer.shared_prefix.ttft_p50, "s", 3))
    return lines


def targets_table(ratios: dict[str, float]) -> list[str]:
    lines = ["| target | measured ratio | met |", "|---|---|---|"]
    for key, kind, threshold, text in TARGETS:
        value = ratios[key]
        met = value >= threshold if kind == "min" else value <= threshold
        lines.append(f"| {text} | {value:.2f}x | {'yes' if met else '**no**'} |")
    return lines


def plot(ours: ServerResults, peer: ServerResults, docs: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    made = []
    for name, key, ylabel, log in [("bench-throughput.png", "output_tokens_per_s", "output tokens/s", False),
                                   ("bench-ttft.png", "ttft_p50", "p50 time to first token (s)", True)]:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        for results, style in ((ours, "o-"), (peer, "s--")):
            xs = [s.concurrency for s in results.sweep]
            ax.plot(xs, [getattr(s, key) for s in results.sweep], style, label=results.name)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xticks([s.concurrency for s in ours.sweep], [str(s.concurrency) for s in ours.sweep])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        ax.set_title(f"SmolLM2-135M-Instruct, {ylabel} vs concurrency")
        fig.tight_layout()
        fig.savefig(docs / name)
        plt.close(fig)
        made.append(name)
    return made


def write(docs: Path, ours: ServerResults, peer: ServerResults, roof: Roofline, env: list[str], command: str,
          config: WorkloadConfig, notes: list[str]) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    images = plot(ours, peer, docs)
    ratios = target_ratios(ours, peer)
    lines = ["# Benchmarks: textcomplete against llama-cpp-python", "",
             "Generated by the comparison command; both servers ran one after the other on this machine, "
             "on the same GGUF file (SmolLM2-135M-Instruct, Q4_1).", "", "## Environment", "", *env, "",
             "## Command", "", "```bash", command, "```", "",
             f"Workloads: streamed requests with {config.prompt_tokens}-token prompts and {config.output_tokens} "
             f"output tokens (end-of-text biased away with `logit_bias`) at concurrency "
             f"{', '.join(map(str, config.concurrency))}; scoring, lm-eval style (`echo`, `logprobs: 1`, "
             f"`max_tokens: 1`) on {config.scoring_prompt_tokens}-token prompts, {config.scoring_prompts_per_request} "
             f"prompts per request for textcomplete, one prompt per request for llama-cpp-python (its server takes one "
             f"prompt per request; 4 such requests); "
             f"{config.shared_prefix_requests} requests sharing a {config.shared_prefix_tokens}-token prefix.", "",
             "## Targets", "", *targets_table(ratios), "", "## Figures", "", *figures_table(ours, peer), "",
             *[f"![{name}]({name})" for name in images], "", "## Roofline", "",
             f"- Measured memory bandwidth (copy, read + write): {roof.bandwidth_gbs:.1f} GB/s",
             f"- Weights read per decode step: {roof.fp32_bytes_per_step / 1e6:.0f} MB in float32, "
             f"{roof.gguf_bytes_per_step / 1e6:.0f} MB as stored in the GGUF file",
             f"- Decode ceiling at batch 1 if a step only streamed the weights: "
             f"{roof.ceiling(roof.fp32_bytes_per_step):.0f} steps/s in float32, "
             f"{roof.ceiling(roof.gguf_bytes_per_step):.0f} steps/s at the file's precision", ""]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    path = docs / "benchmarks.md"
    path.write_text("\n".join(lines))
    return path
