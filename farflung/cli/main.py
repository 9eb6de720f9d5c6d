"""``farflung <verb>``: the command line."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

from farflung.config import ConfigError, check_batch, load_config
from farflung.data import DataError
from farflung.train.checkpoint import CheckpointError
from farflung.train.entry import (
    EXIT_USAGE,
    add_train_args,
    check_out_dir,
    ensure_data,
    out_dir,
    raise_interrupt,
    resolve_config,
)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def cmd_train(args: argparse.Namespace) -> int:
    from farflung.train.launch import launch_local

    cfg = resolve_config(args)
    check_batch(cfg, args.workers)
    out = out_dir(args)
    check_out_dir(out, args.resume, args.force)
    if args.force and not args.resume and out.exists():
        shutil.rmtree(out)
    ensure_data(cfg, show_progress=not args.quiet)
    worker_args = [args.config, "--out", str(out)]
    for item in args.set:
        worker_args += ["--set", item]
    worker_args += [f for f, on in (("--resume", args.resume), ("--quiet", args.quiet)) if on]
    return launch_local(worker_args, args.workers)


def cmd_prepare(args: argparse.Namespace) -> int:
    from farflung.data import prepare

    cfg = load_config(args.config, args.set)
    d = cfg.data
    sources = args.source or d.sources
    target = args.out or d.dir
    index = prepare(
        sources,
        target,
        args.vocab_size or d.vocab_size,
        d.val_fraction,
        d.shard_tokens,
        seed=cfg.train.seed,
        progress=True,
    )
    print(
        f"prepared {target}: vocab {index.vocab_size}, train {index.tokens('train'):,} "
        f"tokens, val {index.tokens('val'):,} tokens"
    )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from farflung.train.sample import sample_text

    print(
        sample_text(
            args.checkpoint, args.prompt, args.tokens, args.temperature, args.top_k, args.seed
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from farflung.train.report import write_report

    ns = argparse.Namespace(
        config=str(DEMO_CONFIG),
        set=args.set,
        out=args.out,
        resume=False,
        force=True,
        quiet=False,
        workers=args.workers,
    )
    code = cmd_train(ns)
    if code == 0:
        png = write_report([Path(args.out)], Path(args.out) / "report.png")
        print(f"plot of loss against time and bytes: {png}")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from farflung.train.progress import print_summary
    from farflung.train.report import load_summaries, write_report

    runs = [Path(r) for r in args.runs]
    png = write_report(runs, Path(args.out))
    print_summary(load_summaries(runs))
    print(f"wrote {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farflung", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train with N local worker processes")
    add_train_args(t)
    t.add_argument("--workers", type=int, default=1, help="local worker processes")
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser("prepare", help="train a tokenizer and write token shards")
    pr.add_argument("config", nargs="?", help="TOML config (its [data] section is used)")
    pr.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pr.add_argument("--source", action="append", help="'bundled' or a .txt/.jsonl file/folder")
    pr.add_argument("--out", help="output folder (default: data.dir)")
    pr.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size")
    pr.set_defaults(func=cmd_prepare)

    s = sub.add_parser("sample", help="generate text from a checkpoint or run folder")
    s.add_argument("checkpoint")
    s.add_argument("--prompt", default="")
    s.add_argument("--tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sample)

    d = sub.add_parser("demo", help="prepare the bundled corpus and train a small GPT")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    d.set_defaults(func=cmd_demo)

    r = sub.add_parser("report", help="plot runs side by side and print their summaries")
    r.add_argument("runs", nargs="+", help="run folders")
    r.add_argument("--out", default="report.png", help="PNG file to write")
    r.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)
    if getattr(args, "workers", 1) < 1:
        print("farflung: --workers must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"farflung: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, CheckpointError, FileNotFoundError) as e:
        print(f"farflung: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("farflung: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
