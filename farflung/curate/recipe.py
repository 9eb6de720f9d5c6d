"""The data recipe's steps as pipeline stages: signals, filter, dedup, then tokenize.

Each step reads documents, writes one output folder and can be run alone
(``farflung data signals|filter|dedup|tokenize``) or chained (``farflung prepare
--filter gopher --dedup 0.8``). A step's folder holds ``manifest.json`` (its inputs,
shard plan and settings; ``complete`` once every shard is done), per-shard outputs and
``done/`` markers (see :mod:`farflung.curate.pipeline`), so an interrupted step resumes
where it stopped. Output documents are JSON lines ``{"id", "text"}`` under ``kept/``,
keeping the ids the documents came in with, so any step's folder can be the input of
the next one, or of ``farflung prepare --source DIR/kept``.

Layout::

    signals/  signals/<shard>.jsonl   {"id", "quality_signals": {name: [[start, end, score]]}}
    filter/   kept/<shard>.jsonl      {"id", "text"} (lines dropped by drop_lines rules cut)
              rejected/<shard>.jsonl  {"id", "text", "rejected_by", "failed"} (--rejected)
    dedup/    keys/<shard>.*.npy      exact keys, MinHash signatures (+ shingle hashes), per shard
              clusters.jsonl          {"survivor", "members"} per duplicate cluster
              kept/<shard>.jsonl      {"id", "text"}: documents outside clusters + survivors
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import lru_cache
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from farflung.curate.documents import IssueLog, ReadOptions
from farflung.curate.pipeline import (
    MANIFEST,
    Executor,
    InlineExecutor,
    InputShard,
    ShardOutput,
    check_unchanged,
    done_files,
    plan_shards,
    read_shard,
    remove_stale_files,
    run_stage,
    shard_from_json,
    shard_to_json,
)
from farflung.curate.rules import (
    ALL_LINES_DROPPED,
    RuleSet,
    Verdict,
    check_signals,
    cut_lines,
    evaluate,
    load_rules,
)
from farflung.data.corpus import BUNDLED, Document
from farflung.data.errors import DataError
from farflung.data.shards import sha256_file, write_json

FORMAT = 1
KEPT = "kept"
_ORJSON = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY
ISSUES_FILE = "issues.jsonl"
CLUSTERS_FILE = "clusters.jsonl"
DSIR_FILE = "dsir.npz"


@dataclass(frozen=True)
class Sharding:
    """How inputs are cut into shards (``--shard-docs``, ``--shard-mb``)."""

    docs: int = 10_000
    mb: float = 64.0


DEFAULT_READ = ReadOptions()
DEFAULT_SHARDING = Sharding()


# ---------------------------------------------------------------------------- manifests


def read_manifest(folder: Path, stage: str | None = None) -> dict[str, Any]:
    """The manifest of a complete step folder; DataError says what to run otherwise."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder} is not a farflung data folder (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}): run the step again") from None
    if stage is not None and manifest.get("stage") != stage:
        raise DataError(f"{folder} holds {manifest.get('stage')!r} output, not {stage!r}")
    if not manifest.get("complete"):
        raise DataError(
            f"{folder}: its {manifest.get('stage')} step did not finish: run it again to resume"
        )
    return manifest


def resolve_sources(sources: list[str], opts: ReadOptions) -> tuple[list[str], ReadOptions]:
    """Inputs with step folders replaced by their ``kept/`` documents.

    Step outputs are always ``{"id", "text"}`` lines, so folders are read with those
    fields; mixing them with raw inputs read by other field names is an error.
    """
    resolved, stages = [], 0
    for source in sources:
        path = Path(source)
        if source != BUNDLED and (path / MANIFEST).is_file():
            manifest = read_manifest(path)
            if manifest["stage"] not in ("filter", "dedup"):
                raise DataError(
                    f"{source} holds {manifest['stage']} output, which has no documents: "
                    f"filter it first (farflung data filter {source} --rules ...)"
                )
            resolved.append(str(path / KEPT))
            stages += 1
        else:
            resolved.append(source)
    if stages and (opts.text_field, opts.id_field) != ("text", "id"):
        if stages < len(sources):
            raise DataError("step folders are read with fields text/id: give raw inputs alone")
        opts = ReadOptions(max_doc_bytes=opts.max_doc_bytes)
    return resolved, opts


def _start(out: Path, stage: str, sources: list[str], settings: dict, shards: list) -> None:
    """Write the step's manifest (not complete yet) before any shard runs."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "stage": stage,
        "complete": False,
        "sources": [str(s) for s in sources],
        "settings": settings,
        "shards": [shard_to_json(s) if isinstance(s, InputShard) else s for s in shards],
    }
    write_json(out / MANIFEST, manifest)


def _finish(out: Path, summary: dict) -> dict:
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    manifest.update(complete=True, summary=summary)
    write_json(out / MANIFEST, manifest)
    return manifest


def _issues_summary(out: Path, results: dict[str, dict]) -> dict[str, Any]:
    """Bad input of every shard: counts by kind, and the listed ones in ``issues.jsonl``."""
    counts: Counter[str] = Counter()
    listed = []
    for result in results.values():
        counts.update(result["issues"]["counts"])
        listed += result["issues"]["listed"]
    tmp = out / (ISSUES_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for issue in listed:
            f.write(json.dumps(issue, ensure_ascii=False) + "\n")
    tmp.replace(out / ISSUES_FILE)
    return {"counts": dict(counts), "first": listed[:5], "file": str(out / ISSUES_FILE)}


def _write_jsonl(f: Any, record: dict) -> None:
    """One JSON line to a binary file. orjson, not json: writing signal records (a span
    per line of every document) took as long as a third of computing them."""
    f.write(orjson.dumps(record, option=_ORJSON))


# ---------------------------------------------------------------------------- signals


@dataclass(frozen=True)
class _SignalsArg:
    shard: InputShard
    read: ReadOptions
    dsir: str | None
    dsir_sha: str | None


def run_signals(
    sources: list[str],
    out: Path,
    executor: Executor,
    opts: ReadOptions = DEFAULT_READ,
    sharding: Sharding = DEFAULT_SHARDING,
    dsir_reference: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """RedPajama-v2 quality signals of every document, one JSON line each, per shard."""
    from farflung.curate.signals import SIGNAL_NAMES

    out = Path(out)
    sources, opts = resolve_sources(sources, opts)
    shards = plan_shards(sources, sharding.docs, sharding.mb)
    dsir = None
    if dsir_reference:
        dsir = _fit_dsir(sources, dsir_reference, out, opts, sharding, executor, progress)
    settings = {"read": asdict(opts), "dsir_reference": dsir_reference}
    _start(out, "signals", sources, settings, shards)
    dsir_sha = sha256_file(dsir) if dsir else None
    items = [(s.name, _SignalsArg(s, opts, dsir, dsir_sha)) for s in shards]
    results = run_stage("signals", _signals_shard, items, out, settings, executor, progress)
    remove_stale_files(out / "signals", [f"{s.name}.jsonl" for s in shards])
    # The names documents got (DSIR's only with a model); the full list for no documents.
    names = {n for r in results.values() for n in r["signals"]} or set(SIGNAL_NAMES)
    summary = {
        "documents": sum(r["documents"] for r in results.values()),
        "chars": sum(r["chars"] for r in results.values()),
        "issues": _issues_summary(out, results),
        "signals": sorted(names),
    }
    return _finish(out, summary)


def _signals_shard(arg: _SignalsArg, out: ShardOutput) -> dict:
    from farflung.curate.signals import compute_signals

    issues = IssueLog(arg.shard.name)
    ctx = _signal_context(arg.dsir, arg.dsir_sha)
    n = chars = 0
    names: set[str] = set()
    with out.open(f"signals/{arg.shard.name}.jsonl", "wb") as f:
        for doc in read_shard(arg.shard, arg.read, issues):
            signals = compute_signals(doc.text, ctx)
            if n == 0:
                names.update(signals)
            _write_jsonl(f, {"id": doc.id, "quality_signals": signals})
            n += 1
            chars += len(doc.text)
    return {"documents": n, "chars": chars, "issues": issues.to_json(), "signals": sorted(names)}


@lru_cache(maxsize=4)
def _signal_context(dsir: str | None, dsir_sha: str | None) -> Any:
    """The signal context of a worker process, built once per DSIR model (word lists,
    model); keyed by the model's checksum too, since a refit model keeps its path."""
    from farflung.curate.signals import ImportanceModel, SignalContext

    return SignalContext.default(importance=ImportanceModel.load(dsir) if dsir else None)


@dataclass(frozen=True)
class _CountArg:
    shard: InputShard
    read: ReadOptions


@dataclass(frozen=True)
class _ModelArg:
    counts: tuple[tuple[str, ...], tuple[str, ...]]  # target and source count files
    sums: tuple[str, ...]  # their checksums: new counts refit the model
    totals: tuple[tuple[int, int], tuple[int, int]]  # (documents, tokens) of each


def _fit_dsir(
    sources: list[str],
    reference: list[str],
    out: Path,
    opts: ReadOptions,
    sharding: Sharding,
    executor: Executor,
    progress: bool,
) -> str:
    """Fit DSIR's hashed uni+bigram models: target = ``reference``, source = the
    inputs. Counts are taken per shard on every worker and summed (they add up)."""
    counts, sums, totals = [], [], []
    for role, corpus, read in (("target", reference, ReadOptions()), ("source", sources, opts)):
        shards = plan_shards(corpus, sharding.docs, sharding.mb)
        items = [(s.name, _CountArg(s, read)) for s in shards]
        root = out / "dsir" / role
        results = run_stage(f"dsir-{role}", _count_shard, items, root, {}, executor, progress)
        files = done_files(root, f"dsir-{role}", [s.name for s in shards])
        counts.append(tuple(str(root / rel) for f in files.values() for rel in f))
        sums += [digest for f in files.values() for digest in f.values()]
        totals.append(tuple(sum(r[k] for r in results.values()) for k in ("documents", "tokens")))
    arg = _ModelArg(tuple(counts), tuple(sums), tuple(totals))
    run_stage("dsir", _fit_model, [("model", arg)], out, {}, InlineExecutor(), False)
    return str(out / DSIR_FILE)


def _fit_model(arg: _ModelArg, out: ShardOutput) -> dict:
    from farflung.curate.signals import ImportanceModel

    (target, source), (t_total, s_total) = arg.counts, arg.totals
    model = ImportanceModel.from_counts(
        (sum(np.load(f) for f in target), *t_total), (sum(np.load(f) for f in source), *s_total)
    )
    with out.open(DSIR_FILE, "wb") as f:
        model.save(f)
    return {}


def _count_shard(arg: _CountArg, out: ShardOutput) -> dict:
    from farflung.curate.signals.importance import count_features

    docs = read_shard(arg.shard, arg.read, IssueLog(arg.shard.name))
    counts, n, tokens = count_features(d.text for d in docs)
    with out.open(f"counts/{arg.shard.name}.npy", "wb") as f:
        np.save(f, counts, allow_pickle=False)
    return {"documents": n, "tokens": tokens}


# ---------------------------------------------------------------------------- filter


@dataclass(frozen=True)
class _FilterArg:
    shard: InputShard
    read: ReadOptions
    signals: str
    signals_sha: str
    rules: RuleSet
    rejected: bool


def run_filter(
    signals_dir: Path,
    rules: str | RuleSet,
    out: Path,
    executor: Executor,
    rejected: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Keep the documents that pass ``rules`` (a preset name, a file or a RuleSet)."""
    signals_dir, out = Path(signals_dir), Path(out)
    manifest = read_manifest(signals_dir, "signals")
    ruleset = load_rules(rules) if isinstance(rules, str) else rules
    runnable = check_signals(ruleset, manifest["summary"]["signals"], str(signals_dir))
    skipped = [r.name for r in ruleset.rules if r not in runnable.rules]
    opts = ReadOptions(**manifest["settings"]["read"])
    shards = [shard_from_json(s) for s in manifest["shards"]]
    check_unchanged(shards, f"the signals step ({signals_dir})")
    markers = done_files(signals_dir, "signals", [s.name for s in shards])
    settings = {"rules": asdict(runnable), "rejected": rejected}
    _start(out, "filter", manifest["sources"], settings, shards)
    items = []
    for s in shards:
        rel = f"signals/{s.name}.jsonl"
        arg = _FilterArg(s, opts, str(signals_dir / rel), markers[s.name][rel], runnable, rejected)
        items.append((s.name, arg))
    results = run_stage("filter", _filter_shard, items, out, settings, executor, progress)
    remove_stale_files(out / KEPT, [f"{s.name}.jsonl" for s in shards])
    remove_stale_files(out / "rejected", [f"{s.name}.jsonl" for s in shards] if rejected else [])
    summary = _sum_counts(results.values())
    summary.update(
        rules=ruleset.name, skipped_rules=skipped, order=[r.name for r in runnable.rules]
    )
    return _finish(out, summary)


def _filter_shard(arg: _FilterArg, out: ShardOutput) -> dict:
    name = arg.shard.name
    docs = read_shard(arg.shard, arg.read, IssueLog(name))  # issues were counted by signals
    counts = {"documents": 0, "kept": 0, "edited": 0, "chars_in": 0, "chars_out": 0}
    failed: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    rejected = out.open(f"rejected/{name}.jsonl", "wb") if arg.rejected else nullcontext()
    with open(arg.signals, "rb") as sf, out.open(f"{KEPT}/{name}.jsonl", "wb") as kf:
        with rejected as rf:
            for doc, line in zip_longest(docs, sf):
                record = _paired(doc, line, arg.signals)
                verdict = evaluate(arg.rules, record["quality_signals"])
                counts["documents"] += 1
                counts["chars_in"] += len(doc.text)
                failed.update(verdict.failed)
                lines.update(verdict.lines)
                text = cut_lines(doc.text, verdict.dropped) if verdict.dropped else doc.text
                if verdict.rejected_by is None and not text.strip():
                    verdict.rejected_by = ALL_LINES_DROPPED
                    failed[ALL_LINES_DROPPED] += 1
                if verdict.rejected_by is not None:
                    removed[verdict.rejected_by] += 1
                    if rf is not None:
                        _write_jsonl(rf, _rejected_record(doc, verdict))
                    continue
                counts["kept"] += 1
                counts["edited"] += bool(verdict.dropped)
                counts["chars_out"] += len(text)
                _write_jsonl(kf, {"id": doc.id, "text": text})
    return {**counts, "failed": dict(failed), "removed": dict(removed), "lines": dict(lines)}


def _paired(doc: Document | None, line: bytes | None, signals: str) -> dict:
    """The signal record of ``doc``; any mismatch means the inputs changed since."""
    if doc is None or line is None:
        raise DataError(f"{signals} does not match its input documents: run signals again")
    record = orjson.loads(line)
    if record.get("id") != doc.id:
        raise DataError(
            f"{signals}: record {record.get('id')!r} where the input has {doc.id!r}: "
            "the input changed since its signals were computed; run signals again"
        )
    return record


def _rejected_record(doc: Document, verdict: Verdict) -> dict:
    return {
        "id": doc.id,
        "text": doc.text,
        "rejected_by": verdict.rejected_by,
        "failed": verdict.failed,
    }


def _sum_counts(results: Any) -> dict[str, Any]:
    """Shard results added up: plain counts and per-rule counters."""
    total: dict[str, Any] = {}
    for result in results:
        for key, value in result.items():
            if isinstance(value, dict):
                total.setdefault(key, Counter()).update(value)
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


# ---------------------------------------------------------------------------- dedup


@dataclass(frozen=True)
class _KeysArg:
    shard: InputShard
    read: ReadOptions
    fuzzy: bool
    shingles: bool = False


@dataclass(frozen=True)
class _ClusterArg:
    shards: tuple[str, ...]
    root: str
    sums: tuple[str, ...]
    threshold: float | None
    verify: str | None = None


@dataclass(frozen=True)
class _WriteArg:
    shard: InputShard
    read: ReadOptions
    drop: str
    drop_sha: str


def run_dedup(
    sources: list[str],
    out: Path,
    executor: Executor,
    threshold: float | None = 0.8,
    opts: ReadOptions = DEFAULT_READ,
    sharding: Sharding = DEFAULT_SHARDING,
    progress: bool = True,
    verify: bool | str | None = False,
) -> dict[str, Any]:
    """Exact (``threshold`` None) or exact + MinHash LSH dedup at a Jaccard ``threshold``:
    clusters written out, one survivor per cluster (its first document) kept.

    ``verify``: band for recall and keep only the candidate pairs that reach
    ``threshold``, instead of RedPajama-v2's banding alone (see
    :func:`farflung.curate.dedup.duplicate_pairs`): by exact Jaccard ("shingles"; the keys
    stage then also stores each document's shingle hashes, about 4 bytes per word) or by
    signature agreement ("signatures", or True)."""
    out = Path(out)
    verify = _check_dedup_args(threshold, verify)
    sources, opts = resolve_sources(sources, opts)
    shards = plan_shards(sources, sharding.docs, sharding.mb)
    settings = {"read": asdict(opts), "threshold": threshold, "verify": verify}
    _start(out, "dedup", sources, settings, shards)
    fuzzy = threshold is not None
    shingles = fuzzy and verify == "shingles"
    keys_items = [(s.name, _KeysArg(s, opts, fuzzy, shingles)) for s in shards]
    keyed = run_stage("keys", _keys_shard, keys_items, out, settings, executor, progress)
    found, drops = _run_clusters(out, tuple(s.name for s in shards), settings)
    write_items = [
        (s.name, _WriteArg(s, opts, str(out / f"drop/{s.name}.json"), drops[f"drop/{s.name}.json"]))
        for s in shards
    ]
    written = run_stage("write", _write_shard, write_items, out, settings, executor, progress)
    remove_stale_files(out / KEPT, [f"{s.name}.jsonl" for s in shards])
    remove_stale_files(out / "drop", [f"{s.name}.json" for s in shards])
    summary = {
        "documents": sum(r["documents"] for r in keyed.values()),
        "kept": sum(r["kept"] for r in written.values()),
        "clusters": found["clusters"],
        "duplicates": found["duplicates"],
        "threshold": threshold,
        "verify": verify,
        "issues": _issues_summary(out, keyed),
    }
    return _finish(out, summary)


def _check_dedup_args(threshold: float | None, verify: bool | str | None) -> str | None:
    """``verify`` normalised (None, "signatures" or "shingles"); DataError, naming the
    option, for a verify mode or threshold that dedup cannot run with."""
    from farflung.curate.dedup import lsh_params, verify_mode

    try:
        mode = verify_mode(verify)
    except ValueError as exc:
        raise DataError(f"--verify: {exc}") from None
    if threshold is not None:
        try:
            lsh_params(threshold)
        except ValueError as exc:
            raise DataError(f"--threshold {threshold}: {exc}") from None
    return mode


def _run_clusters(
    out: Path, names: tuple[str, ...], settings: dict
) -> tuple[dict[str, int], dict[str, str]]:
    """The clusters sub-stage, in this process since it needs every shard's keys at
    once: its counts and the checksum of each shard's drop list."""
    files = done_files(out, "keys", names)
    sums = tuple(sorted(d for f in files.values() for d in f.values()))
    arg = _ClusterArg(names, str(out), sums, settings["threshold"], settings["verify"])
    found = run_stage(
        "clusters", _cluster_all, [("all", arg)], out, settings, InlineExecutor(), False
    )["all"]
    return found, done_files(out, "clusters", ["all"])["all"]


def _keys_shard(arg: _KeysArg, out: ShardOutput) -> dict:
    from farflung.curate.dedup import shard_exact_keys, shard_keys, shard_shingle_keys

    name = arg.shard.name
    issues = IssueLog(name)
    pairs = ((d.id, d.text) for d in read_shard(arg.shard, arg.read, issues))
    arrays: dict[str, np.ndarray] = {}
    if arg.shingles:
        ids, keys, signatures, sets = shard_shingle_keys(pairs)
        arrays.update(minhash=signatures, shingles=sets.flat, offsets=sets.offsets)
    elif arg.fuzzy:
        ids, keys, arrays["minhash"] = shard_keys(pairs)
    else:
        ids, keys = shard_exact_keys(pairs)
    arrays["exact"] = keys
    for kind, array in arrays.items():
        with out.open(f"keys/{name}.{kind}.npy", "wb") as f:
            np.save(f, array, allow_pickle=False)
    with out.open(f"keys/{name}.ids.json") as f:
        json.dump(ids, f, ensure_ascii=False)
    return {"documents": len(ids), "issues": issues.to_json()}


def _cluster_all(arg: _ClusterArg, out: ShardOutput) -> dict:
    """Cluster every shard's keys at once; write clusters.jsonl and per-shard drop lists."""
    from farflung.curate.dedup import ShingleSets, cluster, exact_clusters, merge_clusters

    root = Path(arg.root)
    ids: list[str] = []
    where: list[tuple[str, int]] = []  # (shard, index in shard) of each position
    keys, sigs, sets = [], [], []
    for name in arg.shards:
        shard_ids = json.loads((root / f"keys/{name}.ids.json").read_text(encoding="utf-8"))
        ids += shard_ids
        where += [(name, i) for i in range(len(shard_ids))]
        keys.append(_load_keys(root, name, "exact"))
        if arg.threshold is not None:
            sigs.append(_load_keys(root, name, "minhash"))
        if arg.threshold is not None and arg.verify == "shingles":
            sets.append(ShingleSets(*(_load_keys(root, name, k) for k in ("shingles", "offsets"))))
    # Positions, not document ids, name documents here: ids need not be unique.
    pos = [str(i) for i in range(len(ids))]
    all_keys = np.concatenate(keys) if keys else np.array([], dtype="S40")
    found = exact_clusters(pos, all_keys.tolist())
    if arg.threshold is not None and sigs:
        shingles = ShingleSets.concat(sets) if sets else None
        fuzzy = cluster(pos, np.concatenate(sigs), arg.threshold, arg.verify, shingles)
        found = merge_clusters(pos, found, fuzzy)
    drops: dict[str, list[int]] = {name: [] for name in arg.shards}
    with out.open(CLUSTERS_FILE, "wb") as f:
        for members in found:
            index = sorted(int(m) for m in members)  # survivor: first in input order
            for i in index[1:]:
                drops[where[i][0]].append(where[i][1])
            _write_jsonl(f, {"survivor": ids[index[0]], "members": [ids[i] for i in index]})
    for name, dropped in drops.items():
        with out.open(f"drop/{name}.json") as f:
            json.dump(sorted(dropped), f)
    return {"clusters": len(found), "duplicates": sum(len(m) - 1 for m in found)}


def _load_keys(root: Path, shard: str, kind: str) -> np.ndarray:
    return np.load(root / f"keys/{shard}.{kind}.npy", allow_pickle=False)


def _write_shard(arg: _WriteArg, out: ShardOutput) -> dict:
    drop = set(json.loads(Path(arg.drop).read_text(encoding="utf-8")))
    name = arg.shard.name
    kept = 0
    with out.open(f"{KEPT}/{name}.jsonl", "wb") as f:
        for i, doc in enumerate(read_shard(arg.shard, arg.read, IssueLog(name))):
            if i not in drop:
                _write_jsonl(f, {"id": doc.id, "text": doc.text})
                kept += 1
    return {"kept": kept}


# ---------------------------------------------------------------------------- recipe


def run_recipe(
    sources: list[str],
    work: Path,
    executor: Executor,
    rules: str | None = None,
    dedup: float | str | None = None,
    opts: ReadOptions = DEFAULT_READ,
    sharding: Sharding = DEFAULT_SHARDING,
    progress: bool = True,
) -> tuple[list[str], dict[str, dict]]:
    """signals -> filter (with ``rules``) -> dedup (a Jaccard threshold or ``"exact"``)
    under ``work``; returns the sources to tokenize and each step's manifest."""
    work = Path(work)
    steps: dict[str, dict] = {}
    current = list(sources)
    if rules is not None:
        steps["signals"] = run_signals(
            current, work / "signals", executor, opts, sharding, progress=progress
        )
        steps["filter"] = run_filter(
            work / "signals", rules, work / "filter", executor, False, progress
        )
        current, opts = [str(work / "filter")], ReadOptions(max_doc_bytes=opts.max_doc_bytes)
    if dedup is not None:
        threshold = None if dedup == "exact" else float(dedup)
        steps["dedup"] = run_dedup(
            current, work / "dedup", executor, threshold, opts, sharding, progress
        )
        current = [str(work / "dedup")]
    resolved, _ = resolve_sources(current, ReadOptions())
    return resolved, steps
