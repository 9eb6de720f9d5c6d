"""Hand a link model from the launcher to its workers.

The launcher writes the matrix the workers must emulate in-process to a file and
names it in ``FARFLUNG_LINK_FILE``; each worker installs it before it communicates.
In the network lab, tc shapes the bandwidth for real and only the one-way delay is
emulated in-process (netem is unavailable), so the lab passes a delay-only matrix;
:class:`~farflung.comm.collectives.Comm` adds those delays after the real (shaped)
transfer has completed, so a call takes the shaped time plus the delay.

When several ranks share a host (a pipeline placement), the matrix describes the
hosts, not the ranks, and ``FARFLUNG_RANK_HOSTS`` (``"0,0,1,1"``: the host index of
each global rank, by rank) tells each worker which host every rank is on."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from farflung.netlab.link import LinkMatrix, LinkModel

ENV = "FARFLUNG_LINK_FILE"
RANK_HOSTS_ENV = "FARFLUNG_RANK_HOSTS"


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


def rank_hosts_env(hosts: Sequence[int]) -> dict[str, str]:
    """The environment that tells workers the host index of every rank."""
    return {RANK_HOSTS_ENV: ",".join(str(int(h)) for h in hosts)}


def parse_rank_hosts(text: str) -> list[int]:
    """``"0,0,1,1"`` -> ``[0, 0, 1, 1]``."""
    try:
        hosts = [int(t) for t in text.split(",")]
    except ValueError:
        hosts = []
    if not hosts or any(h < 0 for h in hosts):
        raise ValueError(
            f"{RANK_HOSTS_ENV}={text!r}: expected the host index of every rank, "
            "comma-separated, such as 0,0,1,1"
        )
    return hosts


def install_link_model_from_env() -> LinkModel | None:
    """Install the link model named by ``FARFLUNG_LINK_FILE`` (if any) for this process,
    and the rank -> host map in ``FARFLUNG_RANK_HOSTS`` (if any)."""
    # here, not at the top: the launcher writes these variables and must not load torch
    from farflung.comm.collectives import set_link_model, set_rank_hosts

    path = os.environ.get(ENV)
    model = LinkModel(LinkMatrix.from_file(path)) if path else None
    text = os.environ.get(RANK_HOSTS_ENV)
    if text:
        hosts = parse_rank_hosts(text)
        if model is not None and max(hosts) >= model.matrix.n:
            raise ValueError(
                f"{RANK_HOSTS_ENV}={text!r} names host {max(hosts)}, but the link matrix "
                f"{path} has {model.matrix.n} hosts"
            )
        set_rank_hosts(hosts)
    if model is not None:
        set_link_model(model)
    return model
