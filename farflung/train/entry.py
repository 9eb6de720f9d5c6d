"""The worker process entry point: ``python -m farflung.train CONFIG ...``.

The same entry serves farflung's local launcher and ``torchrun`` across machines;
both describe the job through RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

from farflung.comm import init_distributed, shutdown_distributed
from farflung.comm.emulation import install_link_model_from_env
from farflung.config import Config, ConfigError, load_config
from farflung.data import DataError, ShardIndex, prepare
from farflung.parallel import algorithm_names, check_parallel_config
from farflung.train.checkpoint import CheckpointError
from farflung.train.progress import print_summary

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


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


def resolve_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, args.set, choices={"parallel.algorithm": algorithm_names()})
    check_parallel_config(cfg.parallel)
    return cfg


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path("runs") / Path(args.config).stem


def check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse to mix a new run into an old one's files."""
    used = out.is_dir() and any((out / n).exists() for n in ("metrics.jsonl", "checkpoints"))
    if used and not resume and not force:
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it, "
            "--force to replace it, or another --out"
        )


def ensure_data(cfg: Config, show_progress: bool = True) -> ShardIndex:
    """Prepare the configured corpus when its folder holds no index yet."""
    if not (Path(cfg.data.dir) / "index.json").is_file():
        d = cfg.data
        prepare(
            d.sources,
            d.dir,
            d.vocab_size,
            d.val_fraction,
            d.shard_tokens,
            seed=cfg.train.seed,
            progress=show_progress,
        )
    return ShardIndex.load(cfg.data.dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m farflung.train", description=__doc__)
    add_train_args(p)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    code = _guarded(args, int(os.environ.get("RANK", "0")))
    if code == 0:
        shutdown_distributed()
        return 0
    # peers may be gone already: tearing the process group down could block or abort
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _guarded(args: argparse.Namespace, rank: int) -> int:
    """Run, turning expected failures into one line and an exit code."""
    try:
        return _run(args)
    except ConfigError as e:
        _say(rank, f"config error: {e}")
        return EXIT_USAGE
    except (DataError, CheckpointError) as e:
        _say(rank, f"error: {e}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say(rank, "interrupted; continue later with --resume (from the last checkpoint)")
        return EXIT_INTERRUPTED
    except (RuntimeError, torch.distributed.DistError) as e:
        if not is_comm_failure(e):
            raise
        _say(
            rank,
            f"rank {rank}: communication failed ({_first_line(e)}); a peer may have "
            "died or its link is down",
            always=True,
        )
        return EXIT_FAILED


_COMM_WORDS = (
    "gloo",
    "nccl",
    "connection",
    "timed out",
    "timeout",
    "broken pipe",
    "peer",
    "socket",
    "closed",
)


def is_comm_failure(e: BaseException) -> bool:
    """True for errors raised by a collective whose peer or link failed."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return any(w in text for w in _COMM_WORDS)


def _run(args: argparse.Namespace) -> int:
    from farflung.train.loop import Worker  # heavy imports after argument errors

    cfg = resolve_config(args)
    out = out_dir(args)
    check_out_dir(out, args.resume, args.force)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    install_link_model_from_env()  # before any Comm exists
    torch.set_num_threads(
        cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    )
    if info.rank == 0:
        if args.force and out.exists() and not args.resume:
            shutil.rmtree(out)
        ensure_data(cfg, show_progress=not args.quiet)
    torch.distributed.barrier()
    worker = Worker(cfg, out, info, show_progress=not args.quiet)
    if args.resume and worker.resume():
        _say(info.rank, f"resumed {out} at step {worker.step}")
    worker.write_config()
    summary = worker.run()
    if info.rank == 0 and not args.quiet:
        print_summary({out.name: summary})
    return 0


def raise_interrupt(signum: int, frame: object) -> None:
    """Turn SIGTERM into KeyboardInterrupt so clean-up code runs."""
    raise KeyboardInterrupt


def _say(rank: int, msg: str, always: bool = False) -> None:
    if rank == 0 or always:
        print(f"farflung: {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
