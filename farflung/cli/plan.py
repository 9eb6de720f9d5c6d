"""``farflung plan``: map devices to pipeline stages and data-parallel groups.

Inputs: a config (model, batch, ``parallel.*``, ``pipeline.*``), the links between
hosts (``--links SPEC`` or ``--scenario NAME``) and the devices (``--devices FILE``,
else one identical device of :data:`~farflung.plan.devices.REFERENCE_TFLOPS` per
host). Compute per pipeline position is ``stage_flops / (tflops x 1e12 x``
:data:`EFFICIENCY` ``)`` on the fastest device, the others slowed by their speed
ratio. The shape is ``--stages/--dp`` or, without them, the cheapest planned shape
among the pipeline depths that divide the devices, fit ``model.n_layer``, the batch
and the memory: each stage's predicted peak (:mod:`farflung.plan.memory`: 16 bytes per
parameter for fp32 weights, gradients and AdamW, the data-parallel algorithm's state,
autocast's weight copies and the activations of the micro-batches in flight, with or
without recompute) must fit the smallest device's ``memory_gb``.

Outputs: a placement file for ``farflung train --placement`` (rank = stage x dp +
replica, in the planned pipeline order) with the ``predicted`` step seconds and the
``baselines``, the links between its hosts (``*.links.json``, for ``--netlab`` /
``--link-model``), and a table comparing the plan with DT-FM's search, rank order and
random placements."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farflung.config import Config, ConfigError, check_pipeline, validate
from farflung.train.options import resolve_config

if TYPE_CHECKING:  # both import numpy: the parser is built without them
    import numpy as np

    from farflung.plan.devices import Device

EFFICIENCY = 0.4
"""Fraction of peak FLOPS a device reaches on training (model FLOPs utilisation)."""
DEFAULT_VOCAB = 4096
N_RANDOM = 20


def log(msg: str) -> None:
    print(f"farflung plan: {msg}", file=sys.stderr, flush=True)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="place devices into pipeline stages and data-parallel groups "
        "over a slow network; writes a placement file for train --placement",
    )
    p.add_argument("config", help="TOML config (model, batch, parallel, pipeline)")
    links = p.add_mutually_exclusive_group(required=True)
    links.add_argument(
        "--links", metavar="SPEC", help="BANDWIDTH[,DELAY] (100mbit,20ms), scenario or matrix file"
    )
    links.add_argument("--scenario", metavar="NAME", help="a scenario: regional, world, ...")
    p.add_argument("--devices", metavar="FILE", help="devices JSON (default: one per host)")
    p.add_argument(
        "--workers", dest="n_devices", type=int, help="number of devices (default: from the links)"
    )
    p.add_argument("--stages", type=int, help="pipeline stages (with --dp; default: searched)")
    p.add_argument("--dp", type=int, help="data-parallel replicas per stage")
    p.add_argument(
        "--cost-model",
        choices=("schedule", "dtfm"),
        default="schedule",
        help="schedule: the pipeline schedule played out over the links (default); "
        "dtfm: DT-FM's objective, DP + 2 x the sum of boundary costs",
    )
    p.add_argument("--budget-s", type=float, default=10.0, help="seconds per search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="placement.json", help="placement file to write")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_plan)


# ---- inputs --------------------------------------------------------------------------------


def resolve_vocab(cfg: Config) -> tuple[Config, str]:
    """``model.vocab_size`` when set, else the prepared data's, else DEFAULT_VOCAB."""
    if cfg.model.vocab_size > 0:
        return cfg, "model.vocab_size"
    index = Path(cfg.data.dir) / "index.json"
    vocab, how = DEFAULT_VOCAB, f"default {DEFAULT_VOCAB} (no prepared data at {cfg.data.dir})"
    try:
        vocab = int(json.loads(index.read_text())["vocab_size"])
        how = f"from {index}"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab)), how


def dp_codec(cfg: Config) -> tuple[str, int]:
    """The data-parallel codec spec and the steps between syncs."""
    from farflung.parallel import REGISTRY

    par = cfg.parallel
    cls = REGISTRY[par.algorithm]
    codec = par.codec or getattr(cls, "default_codec", "identity")
    sync_every = par.local_steps if par.algorithm == "diloco" else 1
    return codec, sync_every


def resolve_devices(args: argparse.Namespace) -> tuple[list[Device], Any]:
    """(devices, the LinkMatrix between their hosts, hosts named as the devices say)."""
    from farflung.netlab.link import LinkMatrix
    from farflung.plan.devices import identical_devices, load_devices

    spec = args.links or args.scenario
    if args.devices:
        devices = load_devices(args.devices)
        if args.n_devices is not None and args.n_devices != len(devices):
            raise ConfigError(
                f"--workers {args.n_devices} but {args.devices} lists {len(devices)} devices"
            )
        hosts = list(dict.fromkeys(d.host for d in devices))
    else:
        devices, hosts = [], None
    try:
        try:
            written = LinkMatrix.from_spec(spec)  # a matrix file needs no host count
        except ValueError:
            written = None
        if written is None:
            n = len(hosts) if hosts else args.n_devices
            if n is None:
                raise ConfigError(f"--workers N is needed with link spec {spec!r}")
            m = LinkMatrix.from_spec(spec, n)
            link = LinkMatrix(m.bandwidth_bps, m.delay_s, hosts or m.hosts, m.regions)
        elif hosts is None:
            if args.n_devices is not None and args.n_devices != written.n:
                raise ConfigError(f"--workers {args.n_devices} but {spec} has {written.n} hosts")
            link = written
        elif set(hosts) <= set(written.hosts):
            idx = [written.hosts.index(h) for h in hosts]
            link = LinkMatrix(
                [[written.bandwidth_bps[i][j] for j in idx] for i in idx],
                [[written.delay_s[i][j] for j in idx] for i in idx],
                hosts,
                None if written.regions is None else [written.regions[i] for i in idx],
            )
        elif written.n == len(hosts):
            link = LinkMatrix(written.bandwidth_bps, written.delay_s, hosts, written.regions)
        else:
            raise ConfigError(
                f"{spec}: its hosts {written.hosts} do not name the devices' hosts {hosts} "
                f"and it has {written.n} hosts, not {len(hosts)}"
            )
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"links {spec!r}: {e}") from None
    if not devices:
        devices = identical_devices(list(link.hosts))
    return devices, link


def device_links(devices: list[Device], link: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-device delay (s) and bandwidth (bytes/s); devices of one host: 0 and inf."""
    import numpy as np

    h = [link.hosts.index(d.host) for d in devices]
    delay = np.array(link.delay_s, dtype=float)[np.ix_(h, h)]
    bw = np.array(link.bandwidth_bps, dtype=float)[np.ix_(h, h)] / 8.0
    same = np.equal.outer(h, h)
    delay[same], bw[same] = 0.0, np.inf
    return delay, bw


# ---- shapes ----------------------------------------------------------------------------------


@dataclass
class Shape:
    pp: int
    dp: int
    cfg: Config
    work: Any
    problem: Any


def make_shape(
    cfg: Config, devices: list[Device], link_arrays, pp: int, dp: int, model: str = "schedule"
) -> Shape:
    """The problem of one layout under the cost ``model``, or a ConfigError saying why
    it does not fit."""
    import numpy as np

    from farflung.plan.cost import Problem
    from farflung.plan.workload import overlaps, workload

    p = cfg.pipeline
    layers = p.layers if len(p.layers) == pp else []
    scfg = replace(cfg, pipeline=replace(p, stages=pp, layers=layers))
    validate(scfg)  # the rules `farflung train` applies: stages <= n_layer, ...
    check_pipeline(scfg, pp * dp)  # ... and a batch that splits into dp x M
    codec, sync_every = dp_codec(cfg)
    try:
        work = workload(scfg, pp, dp, codec, sync_every)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_memory(scfg, devices, pp, dp)
    tflops = np.array([d.tflops for d in devices])
    fastest = tflops.max() * 1e12 * EFFICIENCY
    delay, bw = link_arrays
    problem = Problem(
        delay,
        bw,
        pp,
        dp,
        work.stage_c_dp,
        work.c_pp,
        speed=tflops / tflops.max(),
        stage_compute_s=[f / fastest for f in work.stage_flops],
        micro_batches=p.micro_batches,
        schedule=p.schedule,
        model=model,
        dp_overlap=overlaps(cfg),
        c_tied=work.c_tied,
    )
    return Shape(pp, dp, scfg, work, problem)


def check_memory(cfg: Config, devices: list[Device], pp: int, dp: int) -> None:
    """A ConfigError when a stage's predicted peak exceeds the smallest device's
    ``memory_gb``, naming the parts of the prediction."""
    from farflung.plan.memory import layout_memory

    mems = [d.memory_gb for d in devices if d.memory_gb is not None]
    if not mems:
        return
    ranks = layout_memory(cfg, pp, dp, device="cuda")
    worst = max(range(pp), key=lambda s: ranks[s].total)
    need = ranks[worst]
    if need.total / 1e9 <= min(mems):
        return
    small = min(devices, key=lambda d: d.memory_gb or math.inf)
    parts = ", ".join(
        f"{k} {v / 1e9:.3g}"
        for k, v in need.as_dict().items()
        if k in ("static", "state", "casts", "activations", "transient") and v
    )
    raise ConfigError(
        f"{pp} stages x {dp} replicas: stage {worst} needs {need.total / 1e9:.3g} GB "
        f"({parts} GB; model.activation_checkpointing = "
        f"{cfg.model.activation_checkpointing!r}, train.precision = "
        f"{cfg.train.precision!r}) but device {small.name!r} has memory_gb = "
        f"{small.memory_gb:g}"
    )


def choose_shape(args, cfg, devices, link_arrays) -> Shape:
    """The given ``--stages/--dp``, or the cheapest fitting shape (quick searches)."""
    import numpy as np

    from farflung.plan.search import plan_search

    n = len(devices)
    if args.stages is not None or args.dp is not None:
        pp = args.stages if args.stages is not None else n // args.dp
        dp = args.dp if args.dp is not None else n // max(pp, 1)
        if pp < 1 or dp < 1 or pp * dp != n:
            raise ConfigError(f"--stages {pp} x --dp {dp} must equal the {n} devices")
        return make_shape(cfg, devices, link_arrays, pp, dp, args.cost_model)
    shapes, why = [], []
    for pp in (k for k in range(1, n + 1) if n % k == 0 and k <= cfg.model.n_layer):
        try:
            shapes.append(make_shape(cfg, devices, link_arrays, pp, n // pp, args.cost_model))
        except ConfigError as e:
            why.append(f"pp={pp}: {e}")
    if not shapes:
        raise ConfigError(f"no pipeline shape fits the {n} devices: " + "; ".join(why))
    for w in why:
        log(f"skipped {w}")
    if len(shapes) == 1:
        return shapes[0]
    each = args.budget_s / len(shapes)
    costs = []
    for s in shapes:
        c = plan_search(s.problem, seed=args.seed, budget_s=each).cost.total
        log(f"shape pp={s.pp} x dp={s.dp}: {c:.4g} s/step ({each:.2g} s search)")
        costs.append(c)
    return shapes[int(np.argmin(costs))]


# ---- command ---------------------------------------------------------------------------------


def _figures(b: Any) -> dict[str, float]:
    return {"total": b.total, "compute": b.compute, "pp": b.pp, "dp": b.dp}


def cmd_plan(args: argparse.Namespace) -> int:
    if args.budget_s <= 0:
        raise ConfigError(f"--budget-s must be > 0, got {args.budget_s}")
    cfg = resolve_config(args)  # as `farflung train` reads it: init_from, algorithm, codec
    cfg, vocab_how = resolve_vocab(cfg)
    log(f"model: vocab_size {cfg.model.vocab_size} ({vocab_how})")
    codec, sync_every = dp_codec(cfg)
    log(
        f"data parallel: {cfg.parallel.algorithm}, codec {codec!r}, sync every {sync_every} "
        f"step(s); pipeline boundaries: {cfg.pipeline.compression}"
    )
    devices, link = resolve_devices(args)
    log(f"devices: {len(devices)} on {link.n} host(s); links: {link.describe()}")
    log(f"compute: stage FLOPs / (TFLOPS x 1e12 x efficiency {EFFICIENCY}); speed 1 = 100 TFLOPS")
    from farflung.plan.workload import overlaps

    hidden = " (hidden behind the next step)" if overlaps(cfg) else ""
    log(f"cost model: {args.cost_model}; data-parallel sync after the pipeline{hidden}")
    arrays = device_links(devices, link)
    log("choosing the shape" if args.stages is None and args.dp is None else "pricing the shape")
    shape = choose_shape(args, cfg, devices, arrays)
    problem = shape.problem
    log(f"shape: {shape.pp} stage(s) x {shape.dp} replica(s); searching ({args.budget_s:g} s)")
    plan, rows = compare(problem, args)
    from farflung.plan.memory import layout_memory

    memory = [r.as_dict() for r in layout_memory(shape.cfg, shape.pp, shape.dp, device="cuda")]
    log(
        "predicted peak memory per rank, by stage: "
        + ", ".join(f"{m['total'] / 1e9:.3g} GB" for m in memory)
    )
    out = Path(args.out)
    links_out = out.with_name(out.stem + ".links.json")
    write_placement(out, plan, rows, devices, shape, links_out, memory)
    link.to_file(links_out)
    log(f"wrote {out} and {links_out}")
    print_table(rows, devices, shape)
    set_stages = f" --set pipeline.stages={shape.pp}" if shape.pp != cfg.pipeline.stages else ""
    print(
        f"train with: farflung train {args.config} --workers {len(devices)}{set_stages} "
        f"--placement {out} --link-model {links_out}"
    )
    return 0


def compare(problem: Any, args: argparse.Namespace) -> tuple[Any, dict]:
    """farflung's plan, and the table rows of it and its baselines: DT-FM's search,
    rank order, random placements (mean and best)."""
    import numpy as np

    from farflung.plan.search import dtfm_search, plan_search, random_placement, rank_order

    plan = plan_search(problem, seed=args.seed, budget_s=args.budget_s)
    log(f"plan: {plan.cost.total:.4g} s/step; DT-FM search ({args.budget_s:g} s)")
    dtfm = dtfm_search(problem, seed=args.seed, budget_s=args.budget_s)
    log(f"DT-FM: {dtfm.cost.total:.4g} s/step; rank order and {N_RANDOM} random placements")
    rank = rank_order(problem)
    rng = np.random.default_rng(args.seed)
    rands = [random_placement(problem, rng) for _ in range(N_RANDOM)]
    best = min(rands, key=lambda r: r.cost.total)
    mean = {k: float(np.mean([_figures(r.cost)[k] for r in rands])) for k in _figures(best.cost)}
    rows = {
        name: (_figures(r.cost), r.cost.bottleneck, r.seconds, r.groups)
        for name, r in (("plan", plan), ("dtfm", dtfm), ("rank order", rank))
    }
    rows["random mean"] = (mean, None, None, None)
    rows["random best"] = (_figures(best.cost), best.cost.bottleneck, best.seconds, best.groups)
    return plan, rows


def write_placement(
    out: Path,
    plan: Any,
    rows: dict,
    devices: list[Device],
    shape: Shape,
    links: Path,
    memory: list[dict],
) -> None:
    """The placement file: rank = stage x dp + replica in the planned pipeline order,
    with the predictions beside it (``farflung train`` ignores them): step seconds, and
    each stage's peak memory per rank by part (``memory_bytes``)."""
    from farflung.plan.placement import Slot, StageMap

    slots = [
        Slot(stage * shape.dp + rep, stage, rep, devices[dev].host)
        for stage, group in enumerate(plan.groups)
        for rep, dev in enumerate(group)
    ]
    extra = {
        "dp": shape.dp,
        "devices": [devices[dev].name for group in plan.groups for dev in group],
        "predicted": {
            **_baseline(_figures(plan.cost), plan.groups, devices),
            "method": plan.method,
        },
        "baselines": {
            name: _baseline(figs, groups, devices) for name, (figs, *_, groups) in rows.items()
        },
        "memory_bytes": memory,
        "links": str(links),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    StageMap(shape.pp, shape.dp, tuple(slots)).to_file(out, extra)


def _baseline(figs: dict, groups: list | None, devices: list[Device]) -> dict:
    """A row's figures and, for a single placement, its devices by pipeline stage (so
    that a baseline can be trained too)."""
    if groups is None:
        return figs
    return {**figs, "stages": [[devices[d].name for d in group] for group in groups]}


def print_table(rows: dict, devices: list[Device], shape: Shape) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"predicted step time, {shape.pp} stage(s) x {shape.dp} replica(s)")
    for col in ("method", "step s", "compute s", "pipeline s", "data-parallel s", "x plan"):
        t.add_column(col, justify="left" if col == "method" else "right")
    t.add_column("bottleneck link")
    t.add_column("search s", justify="right")
    ref = rows["plan"][0]["total"]
    for name, (f, neck, secs, _) in rows.items():
        link = "" if neck is None else f"{devices[neck[0]].host} - {devices[neck[1]].host}"
        t.add_row(
            name,
            f"{f['total']:.4g}",
            f"{f['compute']:.4g}",
            f"{f['pp']:.4g}",
            f"{f['dp']:.4g}",
            f"{f['total'] / ref:.2f}" if ref > 0 else "-",
            link,
            "" if secs is None else f"{secs:.2f}",
        )
    Console(width=140).print(t)
