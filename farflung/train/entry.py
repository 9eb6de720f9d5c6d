"""The worker process entry point: ``python -m farflung.train CONFIG ...``.

The same entry serves farflung's local launcher and ``torchrun`` across machines;
both describe the job through RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""

from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from farflung.comm import DistInfo, init_distributed, shutdown_distributed
from farflung.comm import watchdog as wd
from farflung.comm.dist import store_barrier
from farflung.comm.errors import NonFiniteError, Reconfigure, first_line, is_comm_failure, say
from farflung.config import Config, ConfigError
from farflung.data import INDEX_FILE, DataError
from farflung.membership.member import Member, MembershipLost
from farflung.model.hf import HFCheckpointError
from farflung.netlab.emulation import install_link_model_from_env
from farflung.train import checkpoint as ckpt
from farflung.train import runfolder
from farflung.train.checkpoint import CheckpointError
from farflung.train.contract import (
    COORDINATOR_ENV,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_NONFINITE,
    EXIT_PEER_LOST,
    EXIT_USAGE,
    ID_ENV,
    JOIN_ENV,
    name_this_process,
    write_report,
)
from farflung.train.dataprep import ensure_data
from farflung.train.options import (
    add_train_args,
    apply_bind_args,
    check_out_dir,
    out_dir,
    raise_interrupt,
    resolve_config,
)
from farflung.train.progress import print_summary

if TYPE_CHECKING:
    from farflung.train.elastic_worker import ElasticWorker, LeftGroups


def prepare_data_on_node(cfg: Config, info: DistInfo, show_progress: bool) -> None:
    """Every node gets ``data.dir`` without assuming a shared filesystem: LOCAL_RANK 0
    prepares it when missing, its node peers wait for the index file, then all ranks
    wait for each other with no deadline (a first preparation may take much longer than
    ``parallel.timeout_s``; a dead or frozen rank is the watchdog's to catch)."""
    if info.local_rank == 0:
        ensure_data(cfg, show_progress=show_progress)
    else:
        while not (Path(cfg.data.dir) / INDEX_FILE).is_file():
            time.sleep(0.2)
    dog = wd.active()
    if dog is not None:
        store_barrier(dog.store, "data", info.world_size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m farflung.train", description=__doc__)
    add_train_args(p)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    rank = int(os.environ.get("RANK", "0"))
    name_this_process(rank)
    code = _guarded(args, rank)
    if code == 0:
        shutdown_distributed()
        return 0
    # peers may be gone already: tearing the process group down could block or abort
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _guarded(args: argparse.Namespace, rank: int) -> int:
    """Run, turning expected failures into one line, a report and an exit code."""
    try:
        return _run(args)
    except ConfigError as e:
        return _fail(rank, "usage", EXIT_USAGE, f"config error: {e}")
    except (DataError, CheckpointError, HFCheckpointError) as e:
        return _fail(rank, "usage", EXIT_USAGE, f"error: {e}")
    except KeyboardInterrupt:
        _say(rank, "interrupted; continue later with --resume (from the last checkpoint)")
        return EXIT_INTERRUPTED
    except NonFiniteError as e:  # every rank raises it at the same step: rank 0 says it
        return _fail(rank, "nonfinite", EXIT_NONFINITE, f"error: {e}")
    except MembershipLost as e:
        if e.leave:
            _say(rank, f"rank {rank}: {e}", always=True)
            return 0
        _say(
            rank,
            f"rank {rank}: elastic worker: {e}; if the coordinator is gone, continue the "
            "run with --resume (from its last checkpoint)",
            always=True,
        )
        write_report(rank, "lost_peer", EXIT_PEER_LOST, str(e))
        return EXIT_PEER_LOST
    except Exception as e:
        if is_comm_failure(e):
            return _comm_failed(rank, e)
        write_report(rank, "crash", EXIT_FAILED, f"{type(e).__name__}: {first_line(e)}")
        raise


def _fail(rank: int, kind: str, code: int, msg: str) -> int:
    _say(rank, msg)
    write_report(rank, kind, code, msg)
    return code


def _comm_failed(rank: int, e: BaseException) -> int:
    """A collective failed: name the peer whose heartbeat stopped, if one did."""
    dog = wd.active()
    lost = None
    try:
        lost = dog.diagnose() if dog is not None else None
    except KeyboardInterrupt:  # the launcher is stopping us already
        pass
    if lost is not None:
        msg, said = lost.message, f"{lost.message}; a collective failed ({first_line(e)})"
        extra = {"lost": lost.ranks, "via": lost.via, "silent_s": lost.silent_s}
    else:
        msg = f"communication failed ({first_line(e)}); a peer may have died or its link is down"
        said, extra = msg, {"lost": [], "via": "comm"}
    _say(rank, f"rank {rank}: {said}", always=True)
    write_report(rank, "lost_peer", EXIT_PEER_LOST, msg, **extra)
    return EXIT_PEER_LOST


# gloo (torch 2.13, CPU) raises plain RuntimeError, not a DistError, from collectives:
def _on_lost(rank: int) -> Callable[[wd.Lost], None]:
    def report(lost: wd.Lost) -> None:
        write_report(
            rank,
            "lost_peer",
            EXIT_PEER_LOST,
            lost.message,
            lost=lost.ranks,
            via=lost.via,
            silent_s=lost.silent_s,
        )

    return report


def _run(args: argparse.Namespace) -> int:
    # heavy imports after argument errors
    from farflung.train.loop import Worker
    from farflung.train.pipeline import PipelineWorker

    cfg = resolve_config(args)
    out = out_dir(args)
    if cfg.elastic.enabled:
        return _run_elastic(args, cfg, out)
    check_out_dir(out, args.resume, args.force)
    info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
    dog = wd.start_watchdog(
        info.rank, info.world_size, cfg.parallel.timeout_s, on_lost=_on_lost(info.rank)
    )
    install_link_model_from_env()  # before any Comm exists
    torch.set_num_threads(
        cfg.train.threads or max(1, (os.cpu_count() or 1) // info.local_world_size)
    )
    if info.local_rank == 0 and args.force and out.exists() and not args.resume:
        # each node clears its own --out (no shared filesystem assumed; every node
        # checked it before the rendezvous); nodes that do share one may race here,
        # so files already gone are fine
        shutil.rmtree(out, ignore_errors=True)
    if info.local_rank == 0:
        runfolder.mark_run(out)
        if args.resume:  # before the data barrier: no rank saves before every node did this
            ckpt.remove_stale_tmp(out / "checkpoints")
    prepare_data_on_node(cfg, info, show_progress=not args.quiet)
    if cfg.pipeline.stages > 1:
        worker = PipelineWorker(
            cfg, out, info, show_progress=not args.quiet, placement=args.placement
        )
    else:
        worker = Worker(cfg, out, info, show_progress=not args.quiet)
    if args.resume and worker.resume():
        _say(info.rank, f"resumed {out} at step {worker.step}")
    worker.write_config()
    summary = worker.run()
    if dog is not None:
        dog.stop()  # says "done" first: slower peers must not report this rank as lost
    if info.rank == 0 and not args.quiet:
        print_summary({out.name: summary})
    return 0


def _run_elastic(args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """One worker of an elastic run: started by the launcher (the coordinator's
    address in the environment) or by hand with ``--join HOST:PORT``."""
    from farflung.comm.collectives import set_epoch_source
    from farflung.membership.state_transfer import StateServer
    from farflung.train.elastic_worker import LeftGroups

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where it waits
    address, joining, wid = _elastic_role(args)
    torch.set_num_threads(
        cfg.train.threads
        or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    )
    ensure_data(cfg, show_progress=False)
    runfolder.mark_run(out)
    step = _held_checkpoint(args, out)
    key = _run_key(args)
    apply_bind_args(args)  # --bind / --port-range: where the state server listens
    holder: dict[str, ElasticWorker] = {}
    # joiners fetch this worker's snapshots here, with a ticket the coordinator signed
    server = StateServer(
        lambda step: holder["w"].provide(step) if "w" in holder else None,
        key,
        timeout_s=cfg.parallel.timeout_s,
    )
    member = Member(
        address,
        key=key,
        wid=wid,
        join=joining,
        step=step,
        state_port=server.port,
        connect_timeout_s=cfg.parallel.timeout_s,
    )
    server.donor_id = member.id  # the donor a ticket must name
    set_epoch_source(member.current_epoch)
    left = LeftGroups.for_run(cfg)  # the groups of generations left, for this process's life
    holder["w"] = worker = _enter(cfg, out, member, key, left)
    worker.run()
    member.close()
    server.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # abandoned process groups' destructors would wait on dead peers


def _elastic_role(args: argparse.Namespace) -> tuple[str, bool, int | None]:
    """The coordinator's address, whether this worker joins a running job, and its id
    (initial workers started by the launcher; None: the coordinator assigns one)."""
    address = getattr(args, "join", None) or os.environ.get(COORDINATOR_ENV)
    if not address:
        raise ConfigError(
            "elastic.enabled = true needs a coordinator: run with `farflung train "
            "--workers N` or join a running one with --join HOST:PORT"
        )
    joining = bool(getattr(args, "join", None)) or os.environ.get(JOIN_ENV) == "1"
    wid = None if joining or ID_ENV not in os.environ else int(os.environ[ID_ENV])
    return address, joining, wid


def _held_checkpoint(args: argparse.Namespace, out: Path) -> int:
    """The newest valid checkpoint this worker holds (0: none, or not resuming).

    Every initial worker (`--join` ones included: before generation 0 forms they are
    initial) tells the coordinator the checkpoint it holds; the run resumes there."""
    if not args.resume or os.environ.get(JOIN_ENV) == "1":  # a respawned joiner
        return 0
    # before this worker's hello: no member saves before every initial one did this
    ckpt.remove_stale_tmp(out / "checkpoints")
    valid, _ = ckpt.verified(out / "checkpoints", rank=0)
    return max(valid, default=0)


def _run_key(args: argparse.Namespace) -> str:
    """The run key from --key-file, FARFLUNG_KEY_FILE or FARFLUNG_RUN_KEY (ConfigError
    when it is missing or its file is unsafe)."""
    from farflung.comm.channel import load_key

    try:
        key = load_key(getattr(args, "key_file", None))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if key is None:
        raise ConfigError(
            "an elastic worker needs the run key: pass --key-file PATH (the coordinator "
            "prints where it is) or set FARFLUNG_KEY_FILE or FARFLUNG_RUN_KEY"
        )
    return key


def _enter(cfg: Config, out: Path, member: Member, key: str, left: LeftGroups) -> ElasticWorker:
    """This worker's first generation, entered: a generation may be replaced while the
    worker enters it, and a peer or the donor may fail meanwhile (it says so, and
    waits for the next)."""
    from farflung.comm.collectives import pinned_epoch
    from farflung.comm.dist import pick_backend
    from farflung.train.elastic_worker import ElasticWorker, join_group

    backend, gen_no = pick_backend(cfg.parallel.backend), -1
    while True:
        gen = member.next_generation(gen_no)
        gen_no = gen["gen"]
        try:
            info = join_group(member, gen, backend, cfg.parallel.timeout_s, left)
            with pinned_epoch(member.gen_epoch[gen_no]):
                return ElasticWorker(cfg, out, info, member, gen, key, left)
        except Reconfigure:
            continue
        except Exception as e:
            if not is_comm_failure(e):
                raise
            _say(member.id or 0, f"entering generation {gen_no} failed ({first_line(e)})", True)
            member.fault(gen_no, first_line(e))


def _say(rank: int, msg: str, always: bool = False) -> None:
    if rank == 0 or always:
        say(f"farflung: {msg}")
