"""Per-step telemetry off the critical path.

Every rank keeps its own numbers for each step (loss, seconds, bytes by kind). Every
``train.log_every`` steps they are gathered in one asynchronous all-gather on a process
group of their own (metered as ``ctrl`` traffic), which is collected only
``log_every`` steps later: by then it has long arrived, so no step waits on a slow
link for telemetry and ranks of local-step methods are not re-synchronised by it. At
evaluations, checkpoints and the end the loop drains what is left (those are sync
points anyway). Rank 0 writes one aggregated record per step
(:func:`farflung.train.metrics.aggregate`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from farflung.comm import Comm, Handle
from farflung.train.metrics import StepRecord, aggregate


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
            self.on_record(aggregate(gathered[:, i, :].numpy()))
