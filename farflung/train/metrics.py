"""What ``metrics.jsonl`` holds: one record per optimizer step, aggregated over ranks
(loss averaged over the ranks that computed one, bytes summed, seconds the maximum),
from the rows every rank keeps for each step. Gathering those rows during training is
:mod:`farflung.train.telemetry`'s; this module loads no torch, so launchers and
reports read and write records without it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from farflung.comm import MeterSnapshot

KINDS = ("dp", "pp_fwd", "pp_bwd", "pp_tied", "init", "ctrl")
_FIELDS = (
    "step",
    "lr",
    "tokens",
    "elapsed",
    "loss",
    "wall",
    "compute",
    "comm",
    "codec",
    "sent",
    "recv",
    "skipped",
    "has_loss",
) + tuple(f"sent_{k}" for k in KINDS)


@dataclass
class StepRecord:
    """One optimizer step, aggregated over ranks."""

    step: int
    loss: float
    lr: float
    tokens: int
    elapsed_s: float
    wall_s: float
    compute_s: float
    comm_s: float
    codec_s: float
    bytes_sent: int
    bytes_recv: int
    bytes_by_kind: dict[str, int]
    skipped_ranks: int = 0
    """How many ranks did not apply this step's update (non-finite numbers)."""

    def to_json(self) -> str:
        d = dict(self.__dict__)
        for k in ("loss", "elapsed_s", "wall_s", "compute_s", "comm_s", "codec_s"):
            d[k] = round(d[k], 6) if math.isfinite(d[k]) else None  # JSON has no NaN
        return json.dumps(d)


def local_row(
    step: int,
    lr: float,
    tokens: int,
    elapsed: float,
    loss: float,
    wall: float,
    snap: MeterSnapshot,
    skipped: bool,
    has_loss: bool = True,
) -> list[float]:
    """This rank's numbers for one step, in :data:`_FIELDS` order. ``has_loss``: False
    on pipeline stages before the last, whose ``loss`` is left out of the mean."""
    row = [step, lr, tokens, elapsed, loss, wall, wall - snap.seconds, snap.seconds]
    row += [snap.work.get("codec", 0.0), snap.sent, snap.recv, float(skipped)]
    row += [1.0 if has_loss else 0.0]
    row += [snap.by_kind[k].sent if k in snap.by_kind else 0 for k in KINDS]
    return [float(v) for v in row]


def aggregate(rows: Any) -> StepRecord:
    """One step's record from every rank's row (``rows``: ranks x fields, anything
    numpy reads as float64)."""
    table = np.asarray(rows, dtype=np.float64)
    col = {name: table[:, i] for i, name in enumerate(_FIELDS)}
    return StepRecord(
        step=int(col["step"][0]),
        loss=_mean_loss(col["loss"], col["has_loss"]),
        lr=float(col["lr"][0]),
        tokens=int(col["tokens"][0]),
        elapsed_s=float(col["elapsed"].max()),
        wall_s=float(col["wall"].max()),
        compute_s=float(col["compute"].max()),
        comm_s=float(col["comm"].max()),
        codec_s=float(col["codec"].max()),
        bytes_sent=int(col["sent"].sum()),
        bytes_recv=int(col["recv"].sum()),
        bytes_by_kind={k: int(col[f"sent_{k}"].sum()) for k in KINDS},
        skipped_ranks=int(col["skipped"].sum()),
    )


def _mean_loss(loss: np.ndarray, has: np.ndarray) -> float:
    """Mean over the ranks that computed a loss (a NaN among them stays NaN)."""
    picked = loss[has > 0]
    return float(picked.mean()) if len(picked) else math.nan


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (used on resume so files match the checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut short by the interruption
    path.write_text("".join(k + "\n" for k in keep))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
