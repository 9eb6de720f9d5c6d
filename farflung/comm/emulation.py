"""Hand a link model from the launcher to its workers.

The launcher writes the matrix the workers must emulate in-process to a file and
names it in ``FARFLUNG_LINK_FILE``; each worker installs it before it communicates.
In the network lab, tc shapes the bandwidth for real and only the one-way delay is
emulated in-process (netem is unavailable), so the lab passes a delay-only matrix;
:class:`~farflung.comm.collectives.Comm` adds those delays after the real (shaped)
transfer has completed, so a call takes the shaped time plus the delay."""

from __future__ import annotations

import math
import os
from pathlib import Path

from farflung.comm.collectives import set_link_model
from farflung.comm.link import LinkMatrix, LinkModel

ENV = "FARFLUNG_LINK_FILE"


def delay_only(matrix: LinkMatrix) -> LinkMatrix:
    """The same delays with unlimited bandwidth (for links shaped by tc)."""
    n = matrix.n
    return LinkMatrix(
        [[math.inf] * n for _ in range(n)], matrix.delay_s, matrix.hosts, matrix.regions
    )


def has_delay(matrix: LinkMatrix) -> bool:
    return any(d > 0 for row in matrix.delay_s for d in row)


def link_env(matrix: LinkMatrix, path: Path) -> dict[str, str]:
    """Write ``matrix`` to ``path``; the environment that makes workers emulate it."""
    matrix.to_file(path)
    return {ENV: str(path)}


def install_link_model_from_env() -> LinkModel | None:
    """Install the link model named by ``FARFLUNG_LINK_FILE`` (if any) for this process."""
    path = os.environ.get(ENV)
    if not path:
        return None
    model = LinkModel(LinkMatrix.from_file(path))
    set_link_model(model)
    return model
