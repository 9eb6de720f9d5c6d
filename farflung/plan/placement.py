"""Pipeline placement: which rank holds which stage and which data-parallel replica,
and on which host it runs.

Ranks form a ``stages x dp`` grid (world = stages x dp). Without a placement file the
order is stage-major: rank ``r`` holds stage ``r // dp``, replica ``r % dp``, and runs
on a host of its own named ``rank{r}`` (:meth:`StageMap.default`).

The placement file (``farflung train --placement FILE``; ``farflung plan`` writes
them) is JSON::

    {
      "stages": 2,
      "ranks": [
        {"rank": 0, "stage": 0, "replica": 0, "host": "a"},
        {"rank": 1, "stage": 0, "replica": 1, "host": "a"},
        {"rank": 2, "stage": 1, "replica": 0, "host": "b"},
        {"rank": 3, "stage": 1, "replica": 1, "host": "b"}
      ]
    }

- ``ranks`` (required): one entry per rank ``0 .. world-1``, each exactly once, in
  any order. Per entry: ``rank``, ``stage`` (``0 <= stage < pipeline.stages``) and
  ``replica`` (``0 <= replica < dp``) are required integers; ``host`` is an optional
  non-empty string (default ``rank{r}``: a host of its own). Ranks with the same
  ``host`` share a machine: traffic between them crosses no emulated link. Every
  stage has exactly ``dp = world / stages`` ranks and every ``(stage, replica)`` pair
  appears once. Keys other than these four are rejected, so a misspelt ``host`` is
  not silently dropped.
- ``stages`` (optional): if present it must equal the config's ``pipeline.stages``.
- Any other top-level key (the planner's ``predicted`` figures, a comment) is
  ignored, so planners may annotate their output freely.

Hosts are numbered in order of first appearance by rank (:attr:`StageMap.hosts`);
that number indexes the hosts of a link matrix (see :mod:`farflung.train.network`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farflung.config import ConfigError, read_json

__all__ = ["Slot", "StageMap"]

RANK_KEYS = ("rank", "stage", "replica", "host")


@dataclass(frozen=True)
class Slot:
    """One rank's place: the stage it holds, its data-parallel replica, its host."""

    rank: int
    stage: int
    replica: int
    host: str


def _grid_shape(world: int, stages: int, source: str) -> int:
    """``dp`` for ``world`` ranks in ``stages`` stages, or a ConfigError."""
    for name, v in (("world size", world), ("pipeline.stages", stages)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{source}: {name} must be an integer >= 1, got {v!r}")
    if world % stages:
        raise ConfigError(
            f"{source}: the {world} workers do not divide into pipeline.stages = {stages}; "
            f"allowed: a world size that is a multiple of {stages}"
        )
    return world // stages


def _ranges(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class StageMap:
    """The rank -> (stage, replica, host) map of a ``stages x dp`` pipeline grid.

    Build it with :meth:`default`, :meth:`load` or :meth:`from_dict`, which validate;
    ``slots[r]`` is rank ``r``'s :class:`Slot`."""

    stages: int
    dp: int
    slots: tuple[Slot, ...]
    # (stage, replica) -> rank, built once: rank_of is asked on every p2p call
    _grid: dict[tuple[int, int], int] = field(
        init=False, repr=False, compare=False, hash=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self._grid.update({(s.stage, s.replica): s.rank for s in self.slots})

    # ---- construction -----------------------------------------------------------------

    @classmethod
    def default(cls, world: int, stages: int) -> StageMap:
        """Stage-major order, every rank on a host of its own: rank ``r`` holds stage
        ``r // dp``, replica ``r % dp``, host ``rank{r}``."""
        dp = _grid_shape(world, stages, "default placement")
        slots = tuple(Slot(r, r // dp, r % dp, f"rank{r}") for r in range(world))
        return cls(stages, dp, slots)

    @classmethod
    def load(cls, path: str | Path, world: int, stages: int) -> StageMap:
        """Read and validate a placement file (format in the module docstring) for
        ``world`` ranks and the config's ``pipeline.stages``."""
        hint = (
            '; expected an object like {"stages": 2, "ranks": [{"rank": 0, "stage": 0, '
            '"replica": 0, "host": "a"}, ...]}'
        )
        raw = read_json(path, "placement file", hint)
        return cls.from_dict(raw, world, stages, source=f"placement file {Path(path)}")

    @classmethod
    def from_dict(
        cls, d: dict[str, Any], world: int, stages: int, source: str = "placement"
    ) -> StageMap:
        """Validate ``d`` (the file's JSON object) for ``world`` ranks in ``stages``
        stages; every error is a ConfigError that starts with ``source``."""
        if not isinstance(d, dict):
            raise ConfigError(
                f"{source}: expected a JSON object with a 'ranks' list, got {type(d).__name__}"
            )
        if "stages" in d:
            fs = d["stages"]
            if fs != stages or isinstance(fs, bool):
                raise ConfigError(
                    f'{source}: the file says "stages": {fs!r} but the config has '
                    f'pipeline.stages = {stages}; make them agree (or drop "stages" '
                    "from the file)"
                )
        dp = _grid_shape(world, stages, source)
        entries = d.get("ranks")
        if not isinstance(entries, list):
            raise ConfigError(
                f"{source}: 'ranks' must be a list of {world} entries "
                '{"rank", "stage", "replica", "host"}, '
                f"got {entries!r}"
            )
        slots = [_slot(e, i, source) for i, e in enumerate(entries)]
        _check_ranks(slots, world, source)
        ordered = sorted(slots, key=lambda s: s.rank)
        _check_grid(ordered, stages, dp, source)
        return cls(stages, dp, tuple(ordered))

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON object (every key written, hosts included)."""
        return {
            "stages": self.stages,
            "ranks": [
                {"rank": s.rank, "stage": s.stage, "replica": s.replica, "host": s.host}
                for s in self.slots
            ],
        }

    def to_file(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the placement file; :meth:`load` reads it back equal. ``extra``: more
        top-level keys (a planner's predictions), which :meth:`load` ignores."""
        p = Path(path)
        entries = ",\n".join("  " + json.dumps(e) for e in self.to_dict()["ranks"])
        rest = "".join(f',\n "{k}": {json.dumps(v)}' for k, v in (extra or {}).items())
        # one rank per line: the file is meant to be read and edited by hand
        p.write_text(f'{{\n "stages": {self.stages},\n "ranks": [\n{entries}\n ]{rest}\n}}\n')
        return p

    # ---- queries ----------------------------------------------------------------------

    @property
    def world(self) -> int:
        return len(self.slots)

    def _slot(self, rank: int) -> Slot:
        if not 0 <= rank < len(self.slots):
            raise IndexError(f"rank {rank} out of range (world size {len(self.slots)})")
        return self.slots[rank]

    def stage_of(self, rank: int) -> int:
        return self._slot(rank).stage

    def replica_of(self, rank: int) -> int:
        return self._slot(rank).replica

    def rank_of(self, stage: int, replica: int) -> int:
        try:
            return self._grid[(stage, replica)]
        except KeyError:
            raise IndexError(
                f"no rank holds stage {stage}, replica {replica} "
                f"({self.stages} stages x {self.dp} replicas)"
            ) from None

    def stage_ranks(self, stage: int) -> list[int]:
        """The data-parallel group of ``stage``, ordered by replica."""
        return [self.rank_of(stage, k) for k in range(self.dp)]

    def pipeline_ranks(self, replica: int) -> list[int]:
        """Pipeline ``replica``, ordered by stage (first stage first)."""
        return [self.rank_of(s, replica) for s in range(self.stages)]

    @property
    def hosts(self) -> list[str]:
        """Distinct host names in order of first appearance by rank."""
        return list(dict.fromkeys(s.host for s in self.slots))

    def host_index(self, rank: int) -> int:
        """Index of ``rank``'s host in :attr:`hosts` (a link matrix's host number)."""
        return self.hosts.index(self._slot(rank).host)

    def rank_hosts(self) -> list[int]:
        """:meth:`host_index` of every rank, by rank."""
        index = {h: i for i, h in enumerate(self.hosts)}
        return [index[s.host] for s in self.slots]


def _check_ranks(slots: list[Slot], world: int, source: str) -> None:
    """Every rank 0..world-1 exactly once."""
    by_rank: dict[int, list[int]] = {}  # rank -> indexes of the entries naming it
    for i, s in enumerate(slots):
        if not 0 <= s.rank < world:
            raise ConfigError(
                f"{source}: ranks[{i}] has rank {s.rank}; allowed: 0..{world - 1} ({world} workers)"
            )
        by_rank.setdefault(s.rank, []).append(i)
    dup = sorted(r for r, idx in by_rank.items() if len(idx) > 1)
    missing = [r for r in range(world) if r not in by_rank]
    if dup or missing:
        parts = []
        if dup:
            parts.append(
                "duplicate rank(s) "
                + "; ".join(f"{r} (entries {_ranges(by_rank[r])})" for r in dup)
            )
        if missing:
            parts.append(f"missing rank(s) {_ranges(missing)}")
        raise ConfigError(
            f"{source}: {' and '.join(parts)}; every rank 0..{world - 1} must appear exactly once"
        )


def _check_grid(ordered: list[Slot], stages: int, dp: int, source: str) -> None:
    """Stages in range, dp replicas each, every (stage, replica) pair once."""
    world = len(ordered)
    for s in ordered:
        if not 0 <= s.stage < stages:
            raise ConfigError(
                f"{source}: rank {s.rank} has stage {s.stage}; allowed: "
                f"0..{stages - 1} (pipeline.stages = {stages})"
            )
    per_stage = {st: [s.rank for s in ordered if s.stage == st] for st in range(stages)}
    if any(len(ranks) != dp for ranks in per_stage.values()):
        counts = "; ".join(
            f"stage {st}: {len(rs)} (ranks {_ranges(rs) or 'none'})" for st, rs in per_stage.items()
        )
        raise ConfigError(
            f"{source}: every stage needs the same number of replicas, dp = "
            f"{world} workers / {stages} stages = {dp}; got {counts}"
        )
    seen: dict[tuple[int, int], int] = {}
    for s in ordered:
        if not 0 <= s.replica < dp:
            raise ConfigError(
                f"{source}: rank {s.rank} has replica {s.replica}; allowed: 0..{dp - 1} "
                f"(dp = {world} workers / {stages} stages)"
            )
        if (s.stage, s.replica) in seen:
            raise ConfigError(
                f"{source}: ranks {seen[(s.stage, s.replica)]} and {s.rank} both hold "
                f"stage {s.stage}, replica {s.replica}; each (stage, replica) pair must "
                "appear exactly once"
            )
        seen[(s.stage, s.replica)] = s.rank


def _slot(entry: Any, i: int, source: str) -> Slot:
    """``ranks[i]`` as a Slot (types and keys checked; ranges are checked later)."""
    if not isinstance(entry, dict):
        raise ConfigError(
            f"{source}: ranks[{i}] must be an object "
            '{"rank": R, "stage": S, "replica": K, "host": "name"}, '
            f"got {entry!r}"
        )
    unknown = sorted(set(entry) - set(RANK_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: ranks[{i}] has unknown key(s) {unknown}; allowed: {', '.join(RANK_KEYS)}"
        )
    vals = {}
    for key in ("rank", "stage", "replica"):
        if key not in entry:
            raise ConfigError(
                f"{source}: ranks[{i}] has no {key!r}; rank, stage, replica are required"
            )
        v = entry[key]
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{source}: ranks[{i}].{key} must be an integer, got {v!r}")
        vals[key] = v
    host = entry.get("host", f"rank{vals['rank']}")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError(f"{source}: ranks[{i}].host must be a non-empty string, got {host!r}")
    return Slot(vals["rank"], vals["stage"], vals["replica"], host)
