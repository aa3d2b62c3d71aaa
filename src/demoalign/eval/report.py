"""report.md and the plots of `demoalign eval`."""

from __future__ import annotations

from pathlib import Path

from ..config import EvalConfig
from ..runio import atomic_write_text
from .metrics import DEFINITIONS


def _cell(m: dict) -> str:
    return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"


def _paired_lines(results: dict, metrics: list[str], config: EvalConfig) -> list[str]:
    """The table of (model − baseline) over the same items, with paired bootstrap intervals."""
    others = [e for e in results["models"] if e.get("vs_baseline")]
    shown = [m for m in metrics if any(m in e["vs_baseline"] for e in others)]
    if not shown:
        return []
    lines = [
        f"## Paired differences to `{results['baseline']}`",
        "",
        f"Mean of (model − baseline) over the same items [{config.confidence:.0%} paired "
        "bootstrap interval: items resampled jointly]. An interval that excludes 0 is a "
        "difference at that level.",
        "",
        "| model | " + " | ".join(shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for e in others:
        cells = [_cell(e["vs_baseline"][m]) if m in e["vs_baseline"] else "" for m in shown]
        lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(out: Path, results: dict, config: EvalConfig) -> None:
    metrics = [m for m in DEFINITIONS if m in results["definitions"]]
    metrics += [m for m in results["definitions"] if m not in DEFINITIONS]
    plots = plot_metrics(out, results, metrics)
    level = f"{config.confidence:.0%}"
    lines = [
        "# demoalign eval",
        "",
        f"Value [{level} bootstrap interval, {config.bootstrap_resamples} resamples, seed "
        f"{config.seed}]; "
        "n = pairs or prompts.",
        "",
    ]
    if metrics:
        lines += ["| model | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for e in results["models"]:
            cells = [_cell(e["metrics"][m]) if m in e["metrics"] else "" for m in metrics]
            lines.append(f"| {e['name']} | " + " | ".join(cells) + " |")
        ns = {
            m: sorted({e["metrics"][m]["n"] for e in results["models"] if m in e["metrics"]})
            for m in metrics
        }
        lines += ["", "n: " + ", ".join(f"{m} {'/'.join(map(str, v))}" for m, v in ns.items())]
        cut = {
            e["name"]: e["pairs_truncated"] for e in results["models"] if e.get("pairs_truncated")
        }
        if cut:
            lines.append(
                f"Responses cut to max_length={config.max_length} (as in training): "
                + ", ".join(f"{k} {v}" for k, v in cut.items())
            )
        lines.append("")
    if config.pairs and not config.reference:
        lines += [
            "No `reference` was given: the implicit-reward accuracy (docs/algorithms.md) was not "
            "computed; only the reference-free form is reported.",
            "",
        ]
    lines += _paired_lines(results, metrics, config)
    lines += ["## Definitions", ""] + [f"- `{k}`: {v}" for k, v in results["definitions"].items()]
    if results.get("reference"):
        lines.append(f"- reference model of the implicit reward: `{results['reference']}`")
    if results.get("baseline"):
        lines.append(
            f"- win-rate baseline: `{results['baseline']}`; reward model `{config.reward_model}`, "
            f"input template `{config.reward_template}`; generations in `generations/`"
        )
    if results.get("run_stages"):
        lines += [
            "",
            "## Log-prob gap over training stages",
            "",
            f"Demonstration − negative under each stage's start model, run `{config.run_dir}`.",
            "",
            "| stage | logp gap | n |",
            "|---|---|---|",
        ]
        lines += [f"| {s['stage']} | {_cell(s)} | {s['n']} |" for s in results["run_stages"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def plot_metrics(out: Path, results: dict, metrics: list[str]) -> list[str]:
    """metrics.png (one panel per metric: value per model with its interval) and, with a run
    folder, logp_gap_over_stages.png. Returns the file names written."""
    import matplotlib  # here, not at the top: importing demoalign should not load matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if metrics:
        names = [e["name"] for e in results["models"]]
        fig, axes = plt.subplots(
            1, len(metrics), figsize=(max(4, 3.2 * len(metrics)), 3.6), squeeze=False
        )
        for ax, metric in zip(axes[0], metrics):
            xs, ys, lo, hi = [], [], [], []
            for i, e in enumerate(results["models"]):
                if metric in e["metrics"]:
                    m = e["metrics"][metric]
                    (
                        xs.append(i),
                        ys.append(m["value"]),
                        lo.append(m["value"] - m["low"]),
                        hi.append(m["high"] - m["value"]),
                    )
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4)
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(metric, fontsize=9)
            if metric in ("pair_win_rate", "implicit_reward_accuracy", "win_rate_vs_baseline"):
                ax.axhline(0.5, color="gray", ls="--", lw=1)
        fig.tight_layout()
        fig.savefig(out / "metrics.png", dpi=110)
        plt.close(fig)
        written.append("metrics.png")
    stages = results.get("run_stages")
    if stages:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = [s["stage"] for s in stages]
        ax.errorbar(
            xs,
            [s["value"] for s in stages],
            capsize=4,
            marker="o",
            yerr=[
                [s["value"] - s["low"] for s in stages],
                [s["high"] - s["value"] for s in stages],
            ],
        )
        ax.set_xlabel("stage")
        ax.set_ylabel("log π(demo) − log π(negative)")
        fig.tight_layout()
        fig.savefig(out / "logp_gap_over_stages.png", dpi=110)
        plt.close(fig)
        written.append("logp_gap_over_stages.png")
    return written
