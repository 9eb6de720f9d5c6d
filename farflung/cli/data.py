"""``farflung data``: quality signals, rule filters, dedup and tokenizing, step by step.

    farflung data signals IN... --out DIR       RedPajama-v2 quality signals per document
    farflung data filter DIR --rules gopher --out DIR [--rejected]
    farflung data dedup IN... --out DIR [--threshold 0.8 | --exact] [--verify [signatures]]
    farflung data tokenize IN... --out DATA_DIR

Every step runs shard by shard on all cores (``--processes``, ``--executor dask``),
resumes where an interrupted run stopped, and takes the previous step's folder as its
input. ``farflung prepare --filter gopher --dedup 0.8`` chains them (see
:func:`add_recipe_args`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farflung.config import Config

RULE_HELP = "a preset (gopher, c4, rpv1, refinedweb) or a rule file (TOML)"


def add_parsers(sub: Any) -> None:
    """Register ``farflung data`` and its sub-commands."""
    p = sub.add_parser("data", help="quality signals, rule filters, dedup, tokenizing")
    verbs = p.add_subparsers(dest="data_verb", required=True)

    s = verbs.add_parser("signals", help="RedPajama-v2 quality signals of every document")
    s.add_argument("inputs", nargs="+", metavar="IN", help=".txt/.jsonl(.gz)/.parquet, folder")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument(
        "--dsir-reference",
        action="append",
        metavar="PATH",
        help="reference (target) corpus for DSIR importance weights; repeatable",
    )
    _add_read_args(s)
    add_run_args(s)
    s.set_defaults(func=cmd_signals)

    f = verbs.add_parser("filter", help="keep the documents that pass a rule set")
    f.add_argument("signals", metavar="SIGNALS_DIR", help="output folder of `data signals`")
    f.add_argument("--rules", required=True, help=RULE_HELP)
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--rejected", action="store_true", help="also write rejected documents")
    add_run_args(f, shards=False)  # the shards are the signals step's
    f.set_defaults(func=cmd_filter)

    d = verbs.add_parser("dedup", help="exact or MinHash LSH near-duplicate removal")
    d.add_argument("inputs", nargs="+", metavar="IN", help="inputs or a filter/dedup folder")
    d.add_argument("--out", required=True, help="output folder")
    how = d.add_mutually_exclusive_group()
    how.add_argument(
        "--threshold", type=float, default=0.8, help="Jaccard similarity (default 0.8)"
    )
    how.add_argument("--exact", action="store_true", help="exact (normalized text) dedup only")
    d.add_argument(
        "--verify",
        nargs="?",
        const="shingles",
        choices=["shingles", "signatures"],
        help="band for recall, then keep the pairs at >= threshold (better recall near the "
        "threshold than RedPajama-v2's banding): by exact Jaccard of their 13-grams "
        "(--verify alone: the most accurate, stores ~4 bytes per word) or by MinHash "
        "signature agreement (--verify signatures)",
    )
    _add_read_args(d)
    add_run_args(d)
    d.set_defaults(func=cmd_dedup)

    t = verbs.add_parser("tokenize", help="train a tokenizer and write token shards")
    t.add_argument("inputs", nargs="+", metavar="IN", help="filter/dedup folders or .txt/.jsonl")
    t.add_argument("--out", required=True, metavar="DATA_DIR", help="prepared data folder")
    t.add_argument("--config", help="TOML config (its [data] section is used)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    t.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size")
    add_tokenizer_arg(t)
    t.set_defaults(func=cmd_tokenize)

    r = verbs.add_parser("rules", help="show a rule set: its rules, thresholds and sources")
    r.add_argument("rules", help=RULE_HELP)
    r.set_defaults(func=cmd_rules)


def _add_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help="JSON/parquet text field")
    p.add_argument("--id-field", default="id", help="JSON/parquet id field")
    p.add_argument(
        "--max-doc-mb", type=float, default=32.0, help="skip larger documents (reported)"
    )


def add_run_args(p: argparse.ArgumentParser, shards: bool = True) -> None:
    """Shard size, parallelism and progress flags shared by every pipeline step."""
    if shards:
        p.add_argument("--shard-docs", type=int, default=10_000, help="documents per shard")
        p.add_argument("--shard-mb", type=float, default=64.0, help="megabytes per shard")
    p.add_argument("--processes", type=int, help="worker processes (default: every core)")
    p.add_argument(
        "--executor", choices=("process", "inline", "dask"), default="process", help="runner"
    )
    p.add_argument("--scheduler", metavar="ADDR", help="dask scheduler address (tcp://...)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_tokenizer_arg(p: argparse.ArgumentParser) -> None:
    """``--tokenizer PATH``: encode with an existing tokenizer (overrides data.tokenizer)."""
    p.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="use this Hugging Face tokenizer (a folder with tokenizer.json, or the file) "
        "instead of training one, e.g. the checkpoint you fine-tune; overrides data.tokenizer",
    )


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """``farflung prepare`` flags that run signals -> filter -> dedup before tokenizing."""
    p.add_argument("--filter", metavar="RULES", help=f"filter first with {RULE_HELP}")
    p.add_argument(
        "--dedup", metavar="THRESHOLD", help="dedup first: a Jaccard threshold (0.8) or exact"
    )
    add_run_args(p)


# ---------------------------------------------------------------------------- commands


def read_options(args: argparse.Namespace) -> Any:
    from farflung.curate.documents import ReadOptions
    from farflung.data.errors import DataError

    if args.max_doc_mb <= 0:
        raise DataError(f"--max-doc-mb must be positive, got {args.max_doc_mb}")
    return ReadOptions(args.text_field, args.id_field, int(args.max_doc_mb * (1 << 20)))


def executor(args: argparse.Namespace) -> Any:
    from farflung.curate.pipeline import open_executor

    return open_executor(args.executor, args.processes, args.scheduler)


def sharding(args: argparse.Namespace) -> Any:
    from farflung.curate.recipe import Sharding

    return Sharding(args.shard_docs, args.shard_mb)


def cmd_signals(args: argparse.Namespace) -> int:
    from farflung.curate.recipe import run_signals

    with executor(args) as ex:
        manifest = run_signals(
            args.inputs,
            Path(args.out),
            ex,
            read_options(args),
            sharding(args),
            dsir_reference=args.dsir_reference,
            progress=not args.quiet,
        )
    s = manifest["summary"]
    print(
        f"signals of {s['documents']:,} documents ({s['chars']:,} chars), "
        f"{len(manifest['shards'])} shard(s): {args.out}"
    )
    print_issues(s["issues"])
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    from farflung.curate.recipe import run_filter

    with executor(args) as ex:
        manifest = run_filter(
            Path(args.signals), args.rules, Path(args.out), ex, args.rejected, not args.quiet
        )
    print_filter_table(manifest["summary"])
    print(f"kept documents: {Path(args.out) / 'kept'}")
    return 0


def cmd_dedup(args: argparse.Namespace) -> int:
    from farflung.curate.recipe import run_dedup

    threshold = None if args.exact else args.threshold
    with executor(args) as ex:
        manifest = run_dedup(
            args.inputs,
            Path(args.out),
            ex,
            threshold,
            read_options(args),
            sharding(args),
            not args.quiet,
            verify=args.verify,
        )
    print_dedup(manifest["summary"], Path(args.out))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from farflung.config import load_config
    from farflung.curate.documents import ReadOptions
    from farflung.curate.recipe import resolve_sources

    cfg = load_config(args.config, args.set)
    sources, _ = resolve_sources(args.inputs, ReadOptions())
    return tokenize_to(sources, args.out, args.vocab_size, cfg, args.tokenizer)


def tokenize_to(
    sources: list[str],
    out: str,
    vocab_size: int | None,
    cfg: Config,
    tokenizer: str | None = None,
) -> int:
    """Train the tokenizer (or use ``tokenizer``, else the one the config names, as
    training's own preparation would) and write token shards: ``farflung prepare``'s
    last step."""
    from farflung.data import prepare
    from farflung.train.init import data_tokenizer

    d = cfg.data
    index = prepare(
        sources,
        out,
        vocab_size or d.vocab_size,
        d.val_fraction,
        d.shard_tokens,
        seed=cfg.train.seed,
        progress=True,
        tokenizer=tokenizer or data_tokenizer(cfg),
    )
    masked = ", loss masks on prompt tokens" if index.has_masks else ""
    print(
        f"prepared {out}: vocab {index.vocab_size}, train {index.tokens('train'):,} "
        f"tokens, val {index.tokens('val'):,} tokens{masked}"
    )
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from farflung.curate.rules import load_rules

    rules = load_rules(args.rules)
    t = Table(title=f"{rules.name}: {rules.description or ''}".rstrip(": "))
    for col in ("rule", "signal", "keep if", "action", "source"):
        t.add_column(col)
    for r in rules.rules:
        agg = f" ({r.aggregate} of lines)" if r.aggregate else ""
        action = r.action + (", optional" if r.optional else "")
        t.add_row(r.name, r.signal + agg, r.keep, action, r.source)
    Console(width=160).print(t)
    if rules.max_dropped_word_fraction is not None:
        print(
            f"documents whose dropped lines hold more than "
            f"{rules.max_dropped_word_fraction:g} of their words are rejected"
        )
    if rules.source:
        print(f"source: {rules.source}")
    return 0


def run_recipe(args: argparse.Namespace, sources: list[str], target: Path) -> list[str]:
    """``farflung prepare --filter/--dedup``: the steps under ``<target>/recipe``;
    returns the sources to tokenize."""
    from farflung.curate.recipe import run_recipe as recipe
    from farflung.data.corpus import find_pair_record
    from farflung.data.errors import DataError

    if (where := find_pair_record(sources)) is not None:
        raise DataError(
            f"--filter/--dedup work on plain text, but {where} is a prompt/response record: "
            "prepare instruction data without them (quality rules made for web text do not "
            "fit it, and the recipe's steps keep only a text field)"
        )
    dedup = args.dedup
    if dedup is not None and dedup != "exact":
        try:
            dedup = float(dedup)
        except ValueError:
            raise DataError(
                f"--dedup must be a Jaccard threshold or exact, got {dedup!r}"
            ) from None
    with executor(args) as ex:
        resolved, steps = recipe(
            sources,
            target / "recipe",
            ex,
            rules=args.filter,
            dedup=dedup,
            sharding=sharding(args),
            progress=not args.quiet,
        )
    if "signals" in steps:
        print_issues(steps["signals"]["summary"]["issues"])
    if "filter" in steps:
        print_filter_table(steps["filter"]["summary"])
    if "dedup" in steps:
        print_dedup(steps["dedup"]["summary"], target / "recipe" / "dedup")
    return resolved


# ---------------------------------------------------------------------------- reports


def print_issues(issues: dict) -> None:
    """Bad input, by kind, with the first few places (all listed in issues.jsonl)."""
    counts = issues["counts"]
    if not counts:
        return
    kinds = ", ".join(f"{n:,} {kind}" for kind, n in sorted(counts.items()))
    print(f"skipped {sum(counts.values()):,} bad input document(s): {kinds}", file=sys.stderr)
    for i in issues["first"]:
        print(
            f"  shard {i['shard']} {i['file']}:{i['line']}: {i['kind']}: {i['detail']}",
            file=sys.stderr,
        )
    print(f"  (listed in {issues['file']})", file=sys.stderr)


def print_filter_table(summary: dict) -> None:
    """What each rule removed: alone (``fails``) and given the rules before it."""
    from rich.console import Console
    from rich.table import Table

    n = summary.get("documents", 0)
    t = Table(title=f"rules {summary['rules']}: kept {summary.get('kept', 0):,} of {n:,}")
    failed, removed = summary.get("failed", {}), summary.get("removed", {})
    lines = summary.get("lines", {})
    columns = ["rule", "fails", "removed", "% removed"] + (["lines dropped"] if lines else [])
    for col in columns:
        t.add_column(col, justify="left" if col == "rule" else "right")
    order = list(summary["order"])
    order += [name for name in {**failed, **removed} if name not in order]
    for name in order:
        gone = removed.get(name, 0)
        pct = f"{100 * gone / n:.1f}" if n else "-"
        row = [name, f"{failed.get(name, 0):,}", f"{gone:,}", pct]
        t.add_row(*row, *([f"{lines.get(name, 0):,}"] if lines else []))
    for name in summary.get("skipped_rules", []):
        t.add_row(name, *["-"] * (len(columns) - 1), style="dim")
    Console(width=120).print(t)
    if summary.get("skipped_rules"):
        print(f"skipped (signal not computed): {', '.join(summary['skipped_rules'])}")
    if summary.get("edited"):
        print(f"{summary['edited']:,} kept documents had lines dropped")


def print_dedup(summary: dict, out: Path) -> None:
    how = "exact" if summary["threshold"] is None else f"Jaccard >= {summary['threshold']}"
    if summary["threshold"] is not None and summary.get("verify"):
        how += f", {summary['verify']} verified"
    print(
        f"dedup ({how}): {summary['documents']:,} documents, {summary['clusters']:,} "
        f"duplicate clusters, {summary['duplicates']:,} duplicates removed, "
        f"{summary['kept']:,} kept: {out / 'kept'} (clusters: {out / 'clusters.jsonl'})"
    )
    print_issues(summary["issues"])
