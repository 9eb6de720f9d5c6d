"""``farflung <verb>``: the command line.

Each verb imports its machinery (torch above all, ~2 s) when it runs, so that the
parser, ``--help`` and usage and config errors answer at once; tests/test_cli_startup.py
holds this module to it."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from farflung.cli import data, net, plan
from farflung.config import Config, ConfigError, check_batch, load_config
from farflung.train.contract import EXIT_INTERRUPTED, EXIT_USAGE
from farflung.train.options import (
    add_train_args,
    apply_bind_args,
    claim_out_dir,
    out_dir,
    raise_interrupt,
    resolve_config,
)

if TYPE_CHECKING:
    from farflung.parallel.pipeline import StageMap

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)  # a bad config file fails before these imports (torch)
    from farflung.train.dataprep import ensure_data
    from farflung.train.forkserver import may_fork
    from farflung.train.launch import launch_local
    from farflung.train.network import network

    if (args.join or args.replay) and not cfg.elastic.enabled:
        raise ConfigError(
            "--join and --replay are for elastic runs; allowed with --set elastic.enabled=true"
        )
    if (args.key_file or args.bind or args.port_range) and not cfg.elastic.enabled:
        raise ConfigError(
            "--key-file, --bind and --port-range are for elastic runs; allowed with "
            "--set elastic.enabled=true"
        )
    apply_bind_args(args)  # checked here; a --join worker inherits them
    check_batch(cfg, args.workers)
    may_fork()  # FARFLUNG_WORKER_START is checked before anything is claimed
    stage_map = load_placement(args, cfg)  # before anything is prepared or launched
    out = out_dir(args)
    claim_out_dir(out, args.resume, args.force)  # --force: only on a farflung run
    ensure_data(cfg, show_progress=not args.quiet)
    worker_args = [args.config, "--out", str(out)]
    for item in args.set:
        worker_args += ["--set", item]
    worker_args += [f for f, on in (("--resume", args.resume), ("--quiet", args.quiet)) if on]
    if getattr(args, "placement", None):
        # absolute: the workers need not share the launcher's working directory
        worker_args += ["--placement", str(Path(args.placement).resolve())]
    if cfg.elastic.enabled and args.join:  # one worker, entering a running job
        import os
        import subprocess

        from farflung.comm.channel import KEY_FILE_ENV

        cmd = [sys.executable, "-m", "farflung.train", *worker_args, "--join", args.join]
        env = dict(os.environ)
        if args.key_file:
            env[KEY_FILE_ENV] = str(Path(args.key_file).resolve())
        return subprocess.call(cmd, env=env)
    with network(args.netlab, args.link_model, args.workers, out, stage_map=stage_map) as placement:
        if placement.description != "unshaped" and not args.quiet:
            print(f"farflung: network {placement.description}", file=sys.stderr)
        if cfg.elastic.enabled:
            return run_elastic(worker_args, args, cfg, out, placement)
        return launch_local(worker_args, args.workers, placement=placement)


def run_elastic(
    worker_args: list[str], args: argparse.Namespace, cfg: Config, out: Path, placement
) -> int:
    """The coordinator here, the workers as local processes; the summary at the end."""
    from farflung.train.elastic_run import launch_elastic
    from farflung.train.progress import print_summary

    replay = None
    if args.replay:
        from farflung.train.metrics import read_jsonl

        replay = read_jsonl(Path(args.replay))
    code = launch_elastic(
        worker_args,
        args.workers,
        cfg,
        out,
        placement,
        quiet=args.quiet,
        replay=replay,
        resume=args.resume,
        key_file=args.key_file,
        bind=args.bind,
        port_range=args.port_range,
    )
    summary = out / "summary.json"
    if code == 0 and summary.is_file() and not args.quiet:
        import json

        print_summary({out.name: json.loads(summary.read_text())})
    return code


def cmd_coordinator(args: argparse.Namespace) -> int:
    """The coordinator alone, in the foreground: workers on any machine run
    ``farflung train CONFIG --join HOST:PORT`` (or the same under torchrun)."""
    import json
    import socket

    args.set = [*args.set, "elastic.enabled=true"]
    cfg = resolve_config(args)  # a bad config file fails before these imports (torch)
    from farflung.comm.channel import KEY_FILE_ENV
    from farflung.train.elastic_run import config_args, run_key, start_coordinator
    from farflung.train.progress import print_summary

    out = out_dir(args)
    claim_out_dir(out, args.resume, args.force)  # --force: only on a farflung run
    key, key_env = run_key(out, args.key_file)  # made in --out (0600) when none is given
    bound = args.bind not in ("", "0.0.0.0", "::")
    host = args.host or (args.bind if bound else socket.getfqdn())
    port = args.port if args.port is not None else (0 if args.port_range else 29400)
    coord, _ = start_coordinator(
        cfg,
        out,
        args.workers,
        host,
        key=key,
        key_env=key_env,
        config=config_args(args.config, args.set),
        bind=args.bind,
        port=port,
        port_range=args.port_range,
        resume=args.resume,
        quiet=args.quiet,
    )
    if not args.quiet and KEY_FILE_ENV in key_env:
        print(
            f"farflung: copy {key_env[KEY_FILE_ENV]} to each worker machine (chmod 600); "
            "it is the run's secret",
            file=sys.stderr,
        )
    try:
        while not coord.finished.wait(0.5):
            pass
    finally:
        coord.close()
    if coord.error is not None:
        print(f"farflung: the coordinator stopped the run: {coord.error}", file=sys.stderr)
        return 1
    summary = out / "summary.json"
    if not args.quiet and summary.is_file():
        print_summary({out.name: json.loads(summary.read_text())})
    return 0


def load_placement(args: argparse.Namespace, cfg: Config) -> StageMap | None:
    """The rank -> stage, replica, host map of this run: ``--placement FILE``
    validated against ``--workers`` and ``pipeline.stages``; without a file, the
    default stage-major map for a pipeline (each rank its own host), else None."""
    from farflung.parallel.pipeline import StageMap

    path = getattr(args, "placement", None)
    if path:
        return StageMap.load(path, args.workers, cfg.pipeline.stages)
    if cfg.pipeline.stages > 1:
        return StageMap.default(args.workers, cfg.pipeline.stages)
    return None


def cmd_prepare(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    sources = args.source or cfg.data.sources
    target = args.out or cfg.data.dir
    if args.filter is not None or args.dedup is not None:
        sources = data.run_recipe(args, sources, Path(target))
    return data.tokenize_to(sources, target, args.vocab_size, cfg, args.tokenizer)


def cmd_sample(args: argparse.Namespace) -> int:
    from farflung.train.sample import sample_text

    print(
        sample_text(
            args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k, args.seed
        )
    )
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from farflung.train.export import export_hf

    found = export_hf(args.run, args.out, force=args.force, dtype=args.dtype)
    print(f"exported {found} to {args.out} (Hugging Face format: config.json, model.safetensors)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the demo config with plain all-reduce and with CocktailSGD over the same
    emulated link, then compare them side by side."""
    from farflung.train.progress import print_summary
    from farflung.train.report import load_summaries, write_report

    root = Path(args.out)
    runs = []
    for algorithm in args.algorithms:
        run = root / algorithm
        print(f"\n== {algorithm} over {args.network} ==", flush=True)
        # through the parser, so the run gets every `farflung train` default
        argv = ["train", str(DEMO_CONFIG), "--out", str(run), "--force"]
        argv += ["--workers", str(args.workers), "--netlab", args.network]
        for item in [*args.set, f"parallel.algorithm={algorithm}"]:
            argv += ["--set", item]
        code = cmd_train(build_parser().parse_args(argv))
        if code != 0:
            return code
        runs.append(run)
    png = write_report(runs, root / "report.png")
    print_summary(load_summaries(runs))
    print(f"plot of loss against time and against bytes sent: {png}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from farflung.train.progress import print_summary
    from farflung.train.report import load_summaries, write_report

    runs = [Path(r) for r in args.runs]
    png = write_report(runs, Path(args.out))
    print_summary(load_summaries(runs))
    print(f"wrote {png}")
    return 0


def add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--netlab",
        metavar="SPEC",
        help="run each worker in its own network namespace behind shaped links "
        "(root; falls back to --link-model): off, BANDWIDTH[,DELAY] such as "
        "100mbit,20ms, a scenario (datacenter, spot, multi-university, regional, "
        "world) or a matrix file",
    )
    p.add_argument(
        "--link-model", metavar="SPEC", help="emulate the links in-process only (same SPEC forms)"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farflung", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train with N local worker processes")
    add_train_args(t)
    t.add_argument("--workers", type=int, default=1, help="local worker processes")
    t.add_argument(
        "--replay",
        metavar="EVENTS",
        help="elastic runs: reproduce the membership changes of another run's "
        "events.jsonl at the same steps (a reference run for a faulted one)",
    )
    add_network_args(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "coordinator",
        help="serve an elastic run whose workers run elsewhere (they start with --join)",
    )
    c.add_argument("config", help="TOML config file (elastic.enabled is implied)")
    c.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    c.add_argument("--out", help="run folder for metrics and events (default: runs/<config>)")
    c.add_argument("--workers", type=int, required=True, help="initial workers to wait for")
    c.add_argument(
        "--port", type=int, default=None, help="port to listen on (default 29400, or --port-range)"
    )
    c.add_argument("--host", default="", help="address the workers reach this host at")
    c.add_argument(
        "--bind",
        default="0.0.0.0",
        metavar="ADDR",
        help="address the coordinator and its rendezvous store listen on (default: every "
        "interface; name the private network's address, docs/security.md)",
    )
    c.add_argument(
        "--port-range",
        metavar="LOW-HIGH",
        help="ports the coordinator and its store take (for firewall rules), e.g. 29400-29409",
    )
    c.add_argument(
        "--key-file",
        metavar="PATH",
        help="the run key (mode 0600); default FARFLUNG_KEY_FILE / FARFLUNG_RUN_KEY, else a "
        "new one in --out/run.key",
    )
    c.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    c.add_argument("--force", action="store_true", help="replace what --out holds")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_coordinator)
    pr = sub.add_parser("prepare", help="train a tokenizer and write token shards")
    pr.add_argument("config", nargs="?", help="TOML config (its [data] section is used)")
    pr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pr.add_argument("--source", action="append", help="'bundled' or a .txt/.jsonl file/folder")
    pr.add_argument("--out", help="output folder (default: data.dir)")
    pr.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size")
    data.add_tokenizer_arg(pr)
    data.add_recipe_args(pr)
    pr.set_defaults(func=cmd_prepare)

    s = sub.add_parser("sample", help="generate text from a checkpoint or run folder")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", default="")
    s.add_argument("--tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser(
        "export-hf",
        help="write a run's model and tokenizer as a Hugging Face folder "
        "(transformers' from_pretrained loads it)",
    )
    e.add_argument("run", help="run folder (its newest valid checkpoint) or a checkpoint")
    e.add_argument("out", help="folder to write")
    e.add_argument("--force", action="store_true", help="replace a model already in OUT")
    e.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="what the weights are stored as (the run's fp32 masters, rounded; default fp32)",
    )
    e.set_defaults(func=cmd_export_hf)

    d = sub.add_parser(
        "demo",
        help="all-reduce vs CocktailSGD on the bundled corpus, "
        "over an emulated slow link, compared in a plot",
    )
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--out", default="runs/demo")
    d.add_argument(
        "--network", default="100mbit,10ms", help="link SPEC for --netlab (off for none)"
    )
    d.add_argument("--algorithms", nargs="+", default=["allreduce", "cocktail"])
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="plot runs side by side and print their summaries")
    r.add_argument("runs", nargs="+", help="run folders")
    r.add_argument("--out", default="report.png", help="PNG file to write")
    r.set_defaults(func=cmd_report)

    net.add_parsers(sub, add_network_args)
    plan.add_parser(sub)
    data.add_parsers(sub)
    return p


# Errors a user can fix, printed as one line without a traceback: (module, class name).
# Their modules import torch, so they are looked up only among the modules loaded when
# an error arrives; an error class whose module was never imported cannot be raised.
USER_ERRORS = (
    ("farflung.data.errors", "DataError"),
    ("farflung.train.checkpoint", "CheckpointError"),
    ("farflung.model.hf", "HFCheckpointError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[m], name) for m, name in USER_ERRORS if m in sys.modules]
    return (FileNotFoundError, *loaded)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    # Ctrl+C must stop a run even when farflung was started from a script in the
    # background, where the shell makes SIGINT ignored and Python would keep it so
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if getattr(args, "workers", 1) < 1:
        print("farflung: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"farflung: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except user_errors() as e:  # evaluated only once an exception is raised
        print(f"farflung: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("farflung: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
