"""Put local workers behind an emulated network.

``--netlab SPEC``: one network namespace per host, joined through a bridge, with
tc shaping the bandwidth for real; one-way delay (netem is unavailable) is added
in-process. Without root, ``ip`` or ``tc``, it falls back to the in-process link
model with a message. ``--link-model SPEC``: the in-process model only (bandwidth and
delay, no congestion or contention between pairs).

SPEC is ``off``, ``BANDWIDTH[,DELAY]`` (``100mbit,20ms``), a scenario name
(``regional``, ``world``, ...) or a matrix file (``links.json``).

Hosts: each worker is a host of its own unless a pipeline placement
(:class:`~farflung.parallel.pipeline.StageMap`) puts several on one. SPEC then
describes the placement's hosts: a uniform link or a scenario over that many hosts,
or a matrix file that names every placement host (rows are matched by name, and
hosts it names that the placement does not use are left out) or, if it names none of
them, has exactly as many hosts, taken in the placement's order of first appearance.
Ranks on one host share its namespace (and its shaped uplink); between them traffic
is unshaped, as between two GPUs of one machine.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from farflung.config import ConfigError
from farflung.netlab.emulation import delay_only, has_delay, link_env, rank_hosts_env
from farflung.netlab.link import LinkMatrix
from farflung.train.launch import Placement

if TYPE_CHECKING:  # the package pulls in every parallel algorithm; only the type is needed
    from farflung.parallel.pipeline import StageMap

OFF = ("", "off", "none")


def parse_link_spec(spec: str, workers: int) -> LinkMatrix:
    try:
        return LinkMatrix.from_spec(spec, workers)
    except (ValueError, OSError) as e:
        raise ConfigError(f"link spec {spec!r}: {e}") from None


def hosts_matrix(spec: str, names: list[str]) -> LinkMatrix:
    """The links between the placement's hosts ``names`` (in that order), from SPEC."""
    try:
        written = LinkMatrix.from_spec(spec)  # only a matrix file needs no host count
    except (ValueError, OSError):
        written = None  # a uniform link or a scenario (or an error, said again below)
    if written is None:
        m = parse_link_spec(spec, len(names))
        return LinkMatrix(m.bandwidth_bps, m.delay_s, names, m.regions)
    have = written.hosts
    if set(names) <= set(have):
        # by name: the planner writes placements with the matrix's own host names
        idx = [have.index(h) for h in names]
        return LinkMatrix(
            [[written.bandwidth_bps[i][j] for j in idx] for i in idx],
            [[written.delay_s[i][j] for j in idx] for i in idx],
            names,
            None if written.regions is None else [written.regions[i] for i in idx],
        )
    unknown = [h for h in names if h not in have]
    if len(unknown) == len(names) and written.n == len(names):
        # no name in common: by position, hosts in order of first appearance
        return LinkMatrix(written.bandwidth_bps, written.delay_s, names, written.regions)
    raise ConfigError(
        f"link spec {spec!r}: the matrix's hosts {have} do not fit the placement's hosts "
        f"{names} (not in the matrix: {unknown}); allowed: a matrix that names every "
        f"placement host, or one of exactly {len(names)} hosts (taken in the placement's "
        "order of first appearance)"
    )


@contextlib.contextmanager
def network(
    netlab: str | None,
    link_model: str | None,
    workers: int,
    run_dir: Path,
    stage_map: StageMap | None = None,
) -> Iterator[Placement]:
    """Yield the placement of ``workers`` local ranks for the requested network.

    ``stage_map`` says which host each rank runs on (default: each its own)."""
    if netlab and link_model:
        raise ConfigError("give --netlab or --link-model, not both")
    if stage_map is not None and stage_map.world != workers:
        raise ConfigError(
            f"the placement has {stage_map.world} ranks but {workers} workers were asked for"
        )
    spec = netlab or link_model
    if spec is None or spec.strip().lower() in OFF:
        yield Placement.plain(workers)
        return
    if stage_map is None:
        matrix, rank_hosts = parse_link_spec(spec, workers), list(range(workers))
    else:
        matrix, rank_hosts = hosts_matrix(spec, stage_map.hosts), stage_map.rank_hosts()
    shared = matrix.n < workers
    over = f" over {matrix.n} hosts" if shared else ""
    # identity needs no map; the workers' default is each rank its own host
    host_env = rank_hosts_env(rank_hosts) if shared else {}
    run_dir.mkdir(parents=True, exist_ok=True)
    if netlab:
        from farflung.netlab import Lab, available

        ok, reason = available()
        if ok:
            with Lab(matrix) as lab:
                yield _lab_placement(lab, matrix, spec + over, run_dir, rank_hosts, host_env)
            return
        print(
            f"farflung: the network lab is unavailable ({reason}); emulating {spec} "
            "in-process instead (bandwidth and delay, no congestion)",
            file=sys.stderr,
        )
    env = {**link_env(matrix, run_dir / "links.json"), **host_env}
    placement = Placement.plain(workers, env)
    placement.description = f"{spec}{over} (in-process link model)"
    yield placement


def _lab_placement(
    lab,
    matrix: LinkMatrix,
    spec: str,
    run_dir: Path,
    rank_hosts: list[int],
    host_env: dict[str, str],
) -> Placement:
    """Each rank in its host's namespace, talking over that host's interface."""
    matrix.to_file(run_dir / "links.json")
    extra = link_env(delay_only(matrix), run_dir / "delays.json") if has_delay(matrix) else {}
    how = "netlab: tc shaping" + (" + in-process delay" if extra else "")
    extra = {**extra, **host_env} if extra else {}  # the map only matters to the delay model
    return Placement(
        prefixes=[lab.exec_prefix(h) for h in rank_hosts],
        envs=[{"GLOO_SOCKET_IFNAME": lab.iface(h), **extra} for h in rank_hosts],
        master_addr=lab.address(rank_hosts[0]),
        description=f"{spec} ({how})",
        coordinator_addr=lab.hub_address,
        coordinator_netns=lab.bridge_netns,
    )
