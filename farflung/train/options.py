"""What ``farflung train`` (the launcher) and ``python -m farflung.train`` (the worker
entry) share before any work starts: their arguments, the config they resolve and the
run folder they claim.

This module imports no torch, so that a usage or config error, ``--help`` and an
``--out`` refusal answer in well under a second: the registry of algorithms and
``model.init_from`` are read only once the config file itself is valid."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from farflung.config import Config, ConfigError, load_config
from farflung.train import runfolder


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by ``farflung train`` and ``python -m farflung.train``."""
    p.add_argument("config", help="TOML config file (see configs/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint"
    )
    p.add_argument("--force", action="store_true", help="delete what --out holds and start afresh")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    p.add_argument(
        "--join",
        metavar="HOST:PORT",
        help="enter a running elastic run (elastic.enabled = true) through its coordinator",
    )
    p.add_argument(
        "--key-file",
        metavar="PATH",
        help="elastic runs: the run key (mode 0600; or FARFLUNG_KEY_FILE / FARFLUNG_RUN_KEY); "
        "the local launcher makes one in --out when none is given",
    )
    p.add_argument(
        "--bind",
        metavar="ADDR",
        help="elastic runs: the address this host's listeners bind (a --join worker's state "
        "server; the local launcher's coordinator); default: every interface for --join, "
        "127.0.0.1 for a local run",
    )
    p.add_argument(
        "--port-range",
        metavar="LOW-HIGH",
        help="elastic runs: the ports those listeners may take (for firewall rules)",
    )
    p.add_argument(
        "--placement",
        metavar="FILE",
        help="pipeline placement (JSON: rank -> stage, replica, host), as `farflung plan` "
        "writes it; default: stage-major rank order",
    )


def apply_bind_args(args: argparse.Namespace) -> None:
    """``--bind`` / ``--port-range`` as FARFLUNG_BIND / FARFLUNG_PORT_RANGE, for this
    process's listeners and the worker processes it starts (ConfigError when the range
    is malformed)."""
    from farflung.comm.binding import BIND_ENV, PORT_RANGE_ENV, parse_port_range

    if getattr(args, "port_range", None):
        try:
            parse_port_range(args.port_range)
        except ValueError as e:
            raise ConfigError(f"--port-range: {e}") from None
        os.environ[PORT_RANGE_ENV] = args.port_range
    if getattr(args, "bind", None):
        os.environ[BIND_ENV] = args.bind


def resolve_config(args: argparse.Namespace) -> Config:
    """The run's config: the file and ``--set`` checked first (no torch needed for
    their errors), then the algorithm and codec against the registry, then
    ``model.init_from``, which decides the architecture."""
    cfg = load_config(args.config, args.set)
    # the registry is filled by importing the algorithms, and they import torch
    from farflung.parallel import check_parallel_config
    from farflung.train import init

    check_parallel_config(cfg.parallel)
    return init.resolve(cfg)


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("runs") / Path(args.config).stem


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to mix a new run into an old one's files, and ``--force`` on a folder that
    is not a farflung run (checked before anything is deleted anywhere)."""
    used = out.is_dir() and any((out / n).exists() for n in ("metrics.jsonl", "checkpoints"))
    if used and not resume and not force:
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it, "
            "--force to replace it, or another --out"
        )
    if force and not resume and (out.exists() or out.is_symlink()):
        runfolder.check_removable(out)


def claim_out_dir(out: Path, resume: bool, force: bool) -> None:
    """What a launcher does with ``--out`` before it starts anything: check it
    (:func:`check_out_dir`), remove the old run on ``--force`` (only a farflung run
    gets here), and mark the folder as a farflung run."""
    check_out_dir(out, resume, force)
    if force and not resume and out.exists():
        shutil.rmtree(out)  # a new run starts with clean logs: no step appears twice
    runfolder.mark_run(out)


def raise_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt so clean-up code runs."""
    raise KeyboardInterrupt
