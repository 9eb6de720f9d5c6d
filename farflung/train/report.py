"""Plots of runs side by side: loss against wall-clock seconds and against bytes sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from farflung.train.metrics import read_jsonl


def load_summaries(runs: list[Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for run in runs:
        path = run / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (is {run} a finished run folder?)")
        out[run.name] = json.loads(path.read_text())
    return out


def write_report(runs: list[Path], png: Path) -> Path:
    """Two panels (training loss vs seconds, vs cumulative bytes sent), one line per run;
    validation points are drawn as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
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
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
