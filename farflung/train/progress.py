"""What a person watching a run sees: a progress bar and a summary table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from tqdm import tqdm


class Progress:
    """A tqdm bar on the main rank with loss, tokens/s and bytes per step."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            unit="step",
            dynamic_ncols=True,
            leave=True,
        )

    def update(self, rec: Any, step: int) -> None:
        if self.bar.disable:
            return
        tok_s = rec.tokens / rec.elapsed_s if rec.elapsed_s else 0.0
        self.bar.set_postfix(
            loss=f"{rec.loss:.3f}",
            tok_s=f"{tok_s:,.0f}",
            sent_step=human_bytes(rec.bytes_sent),
            refresh=False,
        )
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"  # pragma: no cover


def summary_table(summaries: dict[str, dict[str, Any]]) -> Table:
    """One column per run (name -> summary.json contents)."""
    table = Table(title="farflung run summary")
    table.add_column("")
    for name in summaries:
        table.add_column(name, justify="right")
    rows = [
        ("algorithm", lambda s: s["algorithm"]),
        ("workers", lambda s: str(s["world_size"])),
        ("pipeline", _pipeline),
        ("parameters", lambda s: f"{s['params']:,}"),
        ("steps", lambda s: str(s["steps"])),
        ("tokens", lambda s: f"{s['tokens']:,}"),
        ("final val loss", lambda s: f"{s['final_val_loss']:.4f}"),
        ("tokens/s", lambda s: f"{s['tokens_per_s']:,.0f}"),
        ("wall time", lambda s: f"{s['wall_s']:.1f} s"),
        ("precision", lambda s: s.get("precision", "fp32")),
        ("peak memory / rank", _peak),
        ("sent (all ranks)", lambda s: human_bytes(s["bytes_sent_total"])),
        ("sent / step / rank", lambda s: human_bytes(s["bytes_sent_per_step_per_rank"])),
    ]
    for label, fmt in rows:
        table.add_row(label, *(fmt(s) for s in summaries.values()))
    return table


def _peak(s: dict[str, Any]) -> str:
    """The largest rank's peak memory (``-`` when the run did not record it)."""
    peaks = s.get("peak_bytes_per_rank") or []
    return human_bytes(max(peaks)) if peaks else "-"


def _pipeline(s: dict[str, Any]) -> str:
    """``2 stages x 2, aqsgd 4/8`` (or ``-`` without a pipeline)."""
    p = s.get("pipeline")
    if not p:
        return "-"
    how = p["compression"]
    if how in ("quantize", "aqsgd"):
        how += f" {p['fwd_bits']}/{p['bwd_bits']}"
    return f"{p['stages']} stages x {p['dp']}, {p['schedule']}, {how}"


def print_summary(summaries: dict[str, dict[str, Any]]) -> None:
    Console().print(summary_table(summaries))
