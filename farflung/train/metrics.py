"""Per-step telemetry: gather each rank's numbers, write ``metrics.jsonl``.

One small all-gather per step (metered as ``ctrl`` traffic) brings every rank's loss,
bytes and seconds to every rank; rank 0 writes the record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from farflung.comm import Comm, MeterSnapshot

KINDS = ("dp", "pp_fwd", "pp_bwd", "init", "ctrl")
_FIELDS = ("loss", "wall", "compute", "comm", "codec", "sent", "recv") + tuple(
    f"sent_{k}" for k in KINDS
)


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

    def to_json(self) -> str:
        d = dict(self.__dict__)
        for k in ("loss", "lr", "elapsed_s", "wall_s", "compute_s", "comm_s", "codec_s"):
            d[k] = round(d[k], 6) if k != "lr" else d[k]
        return json.dumps(d)


def gather_step(
    comm: Comm, loss: float, wall: float, compute: float, snap: MeterSnapshot
) -> dict[str, Any]:
    """All ranks' numbers for this step: loss averaged, bytes summed, seconds max."""
    local = [loss, wall, compute, snap.seconds, snap.work.get("codec", 0.0), snap.sent, snap.recv]
    local += [snap.by_kind[k].sent if k in snap.by_kind else 0 for k in KINDS]
    mine = torch.tensor(local, dtype=torch.float64)
    allr = torch.empty(comm.size, len(_FIELDS), dtype=torch.float64)
    comm.all_gather(allr, mine, kind="ctrl")
    col = {name: allr[:, i] for i, name in enumerate(_FIELDS)}
    return {
        "loss": col["loss"].mean().item(),
        "wall_s": col["wall"].max().item(),
        "compute_s": col["compute"].max().item(),
        "comm_s": col["comm"].max().item(),
        "codec_s": col["codec"].max().item(),
        "bytes_sent": int(col["sent"].sum().item()),
        "bytes_recv": int(col["recv"].sum().item()),
        "bytes_by_kind": {k: int(col[f"sent_{k}"].sum().item()) for k in KINDS},
    }


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
