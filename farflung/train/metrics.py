"""Per-step telemetry off the critical path, and ``metrics.jsonl``.

Every rank keeps its own numbers for each step (loss, seconds, bytes by kind). Every
``train.log_every`` steps they are gathered in one asynchronous all-gather on a process
group of their own (metered as ``ctrl`` traffic), which is collected only
``log_every`` steps later: by then it has long arrived, so no step waits on a slow
link for telemetry and ranks of local-step methods are not re-synchronised by it. At
evaluations, checkpoints and the end the loop drains what is left (those are sync
points anyway). Rank 0 writes one aggregated record per step: loss averaged over
ranks, bytes summed, seconds the maximum over ranks."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from farflung.comm import Comm, Handle, MeterSnapshot

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


def aggregate(rows: torch.Tensor) -> StepRecord:
    """One step's record from every rank's row (``rows``: ranks x fields)."""
    col = {name: rows[:, i] for i, name in enumerate(_FIELDS)}
    return StepRecord(
        step=int(col["step"][0].item()),
        loss=_mean_loss(col["loss"], col["has_loss"]),
        lr=col["lr"][0].item(),
        tokens=int(col["tokens"][0].item()),
        elapsed_s=col["elapsed"].max().item(),
        wall_s=col["wall"].max().item(),
        compute_s=col["compute"].max().item(),
        comm_s=col["comm"].max().item(),
        codec_s=col["codec"].max().item(),
        bytes_sent=int(col["sent"].sum().item()),
        bytes_recv=int(col["recv"].sum().item()),
        bytes_by_kind={k: int(col[f"sent_{k}"].sum().item()) for k in KINDS},
        skipped_ranks=int(col["skipped"].sum().item()),
    )


def _mean_loss(loss: torch.Tensor, has: torch.Tensor) -> float:
    """Mean over the ranks that computed a loss (a NaN among them stays NaN)."""
    picked = loss[has > 0]
    return picked.mean().item() if len(picked) else math.nan


class Telemetry:
    """Buffers this rank's rows and gathers them in the background.

    ``comm`` is a Comm over a process group used for nothing else (its collectives are
    launched asynchronously and may still be in flight while training runs);
    ``on_record`` receives each aggregated record, on every rank, in step order."""

    def __init__(
        self, comm: Comm, every: int, on_record: Callable[[StepRecord], None], device: Any
    ) -> None:
        self.comm, self.every, self.on_record, self.device = comm, every, on_record, device
        self.rows: list[list[float]] = []
        self.pending: tuple[Handle, torch.Tensor] | None = None

    def add(self, row: list[float]) -> None:
        """Buffer one step's row; every ``every`` rows, collect the previous gather and
        launch the next one."""
        self.rows.append(row)
        if len(self.rows) >= self.every:
            self._collect()
            self._launch()

    def drain(self) -> None:
        """Everything buffered and in flight, written now (a sync point: all ranks)."""
        self._collect()
        if self.rows:
            self._launch()
            self._collect()

    def _launch(self) -> None:
        mine = torch.tensor(self.rows, dtype=torch.float64, device=self.device)
        self.rows = []
        out = torch.empty((self.comm.size, *mine.shape), dtype=mine.dtype, device=self.device)
        self.pending = (self.comm.all_gather_async(out, mine, kind="ctrl"), out)

    def _collect(self) -> None:
        if self.pending is None:
            return
        handle, out = self.pending
        self.pending = None
        handle.wait()
        gathered = out.cpu()  # ranks x steps x fields
        for i in range(gathered.shape[1]):
            self.on_record(aggregate(gathered[:, i, :]))


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
