"""Put local workers behind an emulated network.

``--netlab SPEC``: one network namespace per worker, joined through a bridge, with
tc shaping the bandwidth for real; one-way delay (netem is unavailable) is added
in-process. Without root, ``ip`` or ``tc``, it falls back to the in-process link
model with a message. ``--link-model SPEC``: the in-process model only (bandwidth and
delay, no congestion or contention between pairs).

SPEC is ``off``, ``BANDWIDTH[,DELAY]`` (``100mbit,20ms``), a scenario name
(``regional``, ``world``, ...) or a matrix file (``links.json``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from farflung.comm.emulation import delay_only, has_delay, link_env
from farflung.comm.link import LinkMatrix
from farflung.config import ConfigError
from farflung.train.launch import Placement

OFF = ("", "off", "none")


def parse_link_spec(spec: str, workers: int) -> LinkMatrix:
    try:
        return LinkMatrix.from_spec(spec, workers)
    except (ValueError, OSError) as e:
        raise ConfigError(f"link spec {spec!r}: {e}") from None


@contextlib.contextmanager
def network(
    netlab: str | None, link_model: str | None, workers: int, run_dir: Path
) -> Iterator[Placement]:
    """Yield the placement of ``workers`` local ranks for the requested network."""
    if netlab and link_model:
        raise ConfigError("give --netlab or --link-model, not both")
    spec = netlab or link_model
    if spec is None or spec.strip().lower() in OFF:
        yield Placement.plain(workers)
        return
    matrix = parse_link_spec(spec, workers)
    run_dir.mkdir(parents=True, exist_ok=True)
    if netlab:
        from farflung.comm.netlab import Lab, available

        ok, reason = available()
        if ok:
            with Lab(matrix) as lab:
                yield _lab_placement(lab, matrix, spec, run_dir)
            return
        print(
            f"farflung: the network lab is unavailable ({reason}); emulating {spec} "
            "in-process instead (bandwidth and delay, no congestion)",
            file=sys.stderr,
        )
    env = link_env(matrix, run_dir / "links.json")
    placement = Placement.plain(workers, env)
    placement.description = f"{spec} (in-process link model)"
    yield placement


def _lab_placement(lab, matrix: LinkMatrix, spec: str, run_dir: Path) -> Placement:
    matrix.to_file(run_dir / "links.json")
    extra = link_env(delay_only(matrix), run_dir / "delays.json") if has_delay(matrix) else {}
    n = matrix.n
    how = "netlab: tc shaping" + (" + in-process delay" if extra else "")
    return Placement(
        prefixes=[lab.exec_prefix(i) for i in range(n)],
        envs=[{"GLOO_SOCKET_IFNAME": lab.iface(i), **extra} for i in range(n)],
        master_addr=lab.address(0),
        description=f"{spec} ({how})",
    )
