"""Plots of runs side by side: loss against wall-clock seconds and against bytes sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from farflung.train.metrics import KINDS, read_jsonl


def load_summaries(runs: list[Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for run in runs:
        path = run / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (is {run} a finished run folder?)")
        out[run.name] = json.loads(path.read_text())
    return out


def write_report(runs: list[Path], png: Path) -> Path:
    """Three panels: training loss vs seconds and vs cumulative bytes sent (one line per
    run, validation points as markers), and each run's bytes by kind (data-parallel,
    pipeline forward and backward, tied embedding, control) as stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b, ax_k) = plt.subplots(
        1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.7]}
    )
    totals: dict[str, dict[str, float]] = {}
    for run in runs:
        steps = read_jsonl(run / "metrics.jsonl")
        if not steps:
            raise FileNotFoundError(f"{run}/metrics.jsonl: missing or empty")
        secs = [r["elapsed_s"] for r in steps]
        sent, total = [], 0
        for r in steps:
            total += r["bytes_sent"]
            sent.append(total / 1e6)
        loss = [r["loss"] for r in steps]
        totals[run.name] = {
            k: sum(r.get("bytes_by_kind", {}).get(k, 0) for r in steps) / 1e6 for k in KINDS
        }
        (line,) = ax_t.plot(secs, loss, label=run.name, lw=1)
        ax_b.plot(sent, loss, label=run.name, lw=1, color=line.get_color())
        by_step = {r["step"]: (r["elapsed_s"], s) for r, s in zip(steps, sent, strict=True)}
        evals = [e for e in read_jsonl(run / "eval.jsonl") if e["step"] in by_step]
        if evals:
            ax_t.plot(
                [by_step[e["step"]][0] for e in evals],
                [e["val_loss"] for e in evals],
                "o",
                color=line.get_color(),
                ms=4,
            )
            ax_b.plot(
                [by_step[e["step"]][1] for e in evals],
                [e["val_loss"] for e in evals],
                "o",
                color=line.get_color(),
                ms=4,
            )
    ax_t.set(
        xlabel="wall-clock seconds",
        ylabel="loss (line: train, dots: validation)",
        title="loss against time",
    )
    ax_b.set(xlabel="MB sent (all ranks, cumulative)", title="loss against bytes sent")
    ax_b.set_xscale("symlog")
    _bytes_by_kind(ax_k, totals)
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.3)
        ax.legend()
    ax_k.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _bytes_by_kind(ax: Any, totals: dict[str, dict[str, float]]) -> None:
    """Stacked bars: MB sent per run, split by kind (kinds no run used are left out)."""
    names = list(totals)
    bottom = [0.0] * len(names)
    for kind in KINDS:
        heights = [totals[n][kind] for n in names]
        if not any(heights):
            continue
        ax.bar(names, heights, bottom=bottom, label=kind)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set(ylabel="MB sent (all ranks)", title="bytes by kind")
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(alpha=0.3, axis="y")
