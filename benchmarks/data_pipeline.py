"""Data pipeline speed and quality: RedPajama-v2 signals, the Gopher filter, MinHash dedup,
with datatrove beside it on the same documents in the same invocation.

Corpus: the bundled corpus (38 Shakespeare plays + CPython's pydoc topics) cut at line
ends into windows of 150-600 words, plus near-duplicates (copies of windows with a few
words replaced or deleted, so that their Jaccard falls on both sides of 0.8) and junk
(repeated lines, symbol soup, very short texts, lorem ipsum, bullet and dash lists,
ellipsis lines, number tables, phrase spam), shuffled. All of it from one seed.

Per stage and process count, both sides are timed the same way: the library functions,
in a pool of P forked processes (warmed up first: word lists, spaCy's tokenizer) over
the documents held in memory, from the first task handed out to the last result back.

* ``signals``: farflung's ``compute_signals`` (every RedPajama-v2 signal); peer:
  datatrove's ``GopherQualityFilter`` and ``GopherRepetitionFilter`` both run on every
  document (the statistics its Gopher filtering computes). No decisions: ``agreement``
  is null.
* ``filter``: text -> keep/reject: farflung's signals + the ``gopher`` preset's rules;
  peer: the two datatrove filters chained (repetition only on what quality kept), on
  datatrove ``Document`` objects. ``agreement``: fraction of documents with the same
  decision; disagreements by rule go to stderr and ``filter_disagreement``.
* ``dedup``: text -> duplicate clusters at Jaccard 0.8: farflung's ``shard_keys``
  (exact keys + RedPajama-v2 MinHash, word 13-grams, 128 permutations) in the pool,
  then exact + MinHash clustering: with RedPajama-v2's 9x13 bands, with
  ``verify="signatures"`` and with ``verify="shingles"`` (its keys timed apart: they
  also keep each document's shingle hashes); peer: datatrove's MinHash stages 1-3
  (signatures per rank, buckets per band, clustering) with the same shingles size and
  bands (13-grams, 9x13, 32-bit SHA-1), through its files in a temporary folder, as it
  is built to run.
  ``agreement``: fraction of documents both sides put (or both leave out of) a cluster.
  ``recall``: pairs at true Jaccard >= 0.8 that end up in one cluster; ``precision``:
  reported pairs at true Jaccard >= 0.8 (``doc_*``: the same per document). True Jaccard
  is computed here independently: plain Python sets of word 13-grams of RedPajama-v2's
  normalised words.

``speedup`` = docs_per_s / peer_docs_per_s at the same process count, i.e. per process.
MB are 10**6 bytes of UTF-8 input text. ``pipeline_docs_per_s`` is farflung's own
pipeline on the same documents as a .jsonl file (``run_signals`` / ``run_filter`` /
``run_dedup`` with P processes: reading, sharding, writing outputs and done markers
included; its filter reads stored signals rather than computing them).
JSON on the last line::

    {"results": [{"stage": "signals"|"filter"|"dedup", "processes": ..., "docs_per_s": ...,
                  "peer_docs_per_s": ..., "speedup": ..., "agreement": ...}, ...]}

    python benchmarks/data_pipeline.py [--docs N] [--processes 1 2] [--skip-peer]
                                       [--repeat R] [--seed S]

The peer needs ``pip install 'farflung[bench]'`` (datatrove and spaCy, pinned).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import string
import struct
import sys
import tempfile
import time
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# datatrove's clustering draws a tqdm bar; the benchmark's stderr is for its own report.
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from farflung.curate.dedup import (  # noqa: E402
    RPV2_SEED,
    VERIFY_FN_WEIGHT,
    ShingleSets,
    cluster,
    duplicate_pairs,
    exact_clusters,
    lsh_params,
    merge_clusters,
    optimal_params,
    recall_params,
    shard_keys,
    shard_shingle_keys,
)
from farflung.curate.pipeline import open_executor  # noqa: E402
from farflung.curate.recipe import Sharding, run_dedup, run_filter, run_signals  # noqa: E402
from farflung.curate.rules import check_signals, evaluate, load_rules  # noqa: E402
from farflung.curate.signals import SIGNAL_NAMES, SignalContext, compute_signals  # noqa: E402
from farflung.data.corpus import bundled_documents  # noqa: E402

THRESHOLD = 0.8
NGRAM = 13
NEAR_FRACTION = 0.12  # near-duplicates per base window
JUNK_FRACTION = 0.06  # junk documents per base window
CHUNKS_PER_PROCESS = 4  # tasks per process: some load balance, few hand-offs
BORDER = 0.05  # pairs this close to the threshold are left out of the *_clear scores
# Set-up work that every process does once (word lists, spaCy, the tables of non-ASCII
# characters) is done on these before any timing.
WARM_UP = [
    "Caf\u00e9 \u2018quoted\u2019 \u2026 \u2022 bullet \u2014 na\u00efve r\u00e9sum\u00e9 " * 20
]
WARM_DOCS = 8

Span = tuple[int, int]


def log(msg: str) -> None:
    print(f"[data_pipeline] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    ids: list[str]
    texts: list[str]
    kinds: list[str]  # "clean", "near-dup" or the junk generator's name

    @property
    def mb(self) -> float:
        return sum(len(t.encode("utf-8")) for t in self.texts) / 1e6


def windows(rng: random.Random) -> list[str]:
    """The bundled documents cut at line ends into runs of 150-600 words."""
    out = []
    for doc in bundled_documents():
        buf: list[str] = []
        words, target = 0, rng.randint(150, 600)
        for line in doc.text.splitlines(keepends=True):
            buf.append(line)
            words += len(line.split())
            if words >= target:
                out.append("".join(buf))
                buf, words, target = [], 0, rng.randint(150, 600)
        if words:
            out.append("".join(buf))
    return out


def near_duplicate(rng: random.Random, text: str, vocab: list[str]) -> str:
    """A copy with a few words replaced (70%) or deleted (30%).

    Two in three copies get 0-4 edits, the rest 0.8-2.5% of their words edited. One edit
    breaks up to 13 of a document's 13-grams, so on 150-600-word windows the first kind
    falls on both sides of Jaccard 0.8 and the second mostly below it (near misses that
    precision is measured on).
    """
    parts = re.split(r"(\s+)", text)  # words at even positions, whitespace kept between
    spots = [i for i in range(0, len(parts), 2) if any(c.isalpha() for c in parts[i])]
    if rng.random() < 2 / 3:
        edits = rng.randint(0, 4)
    else:
        edits = max(1, round(len(spots) * rng.uniform(0.008, 0.025)))
    for i in rng.sample(spots, min(edits, len(spots))):
        parts[i] = rng.choice(vocab) if rng.random() < 0.7 else ""
    return "".join(parts)


LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua enim ad minim veniam quis nostrud "
    "exercitation ullamco laboris nisi aliquip ex ea commodo consequat duis aute irure"
).split()
SYMBOLS = ["#", "##", "$$", "%", "&&", "@", "***", "...", "|", "~~", "=>", "{}", "0x1f", "42", "::"]


def _lines(rng: random.Random, n: int, make: Callable[[], str]) -> str:
    return "\n".join(make() for _ in range(n)) + "\n"


def _words(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))


def junk(kind: str, rng: random.Random, lines: list[str], vocab: list[str]) -> str:
    """One junk document of the given kind: what the Gopher rules exist to catch."""
    if kind == "repeated_lines":
        body = rng.sample(lines, rng.randint(3, 8)) + [rng.choice(lines)] * rng.randint(15, 40)
        rng.shuffle(body)
        return "\n".join(body) + "\n"
    if kind == "symbol_soup":
        return _lines(rng, rng.randint(10, 30), lambda: " ".join(rng.choices(SYMBOLS, k=12)))
    if kind == "short":
        return _words(rng, vocab, 5, 40) + "\n"
    if kind == "lorem_ipsum":
        sentence = lambda: " ".join(rng.choices(LOREM, k=rng.randint(6, 14))).capitalize() + "."  # noqa: E731
        return "Lorem ipsum dolor sit amet. " + " ".join(sentence() for _ in range(30)) + "\n"
    if kind in ("bullets", "dash_list"):
        mark = "\u2022" if kind == "bullets" else "-"
        return _lines(rng, rng.randint(12, 30), lambda: f"{mark} {_words(rng, vocab, 3, 10)}")
    if kind == "ellipsis_lines":
        return _lines(rng, rng.randint(12, 30), lambda: _words(rng, vocab, 4, 12) + "...")
    if kind == "numbers":
        number = lambda: str(round(rng.uniform(0, 2000), rng.choice((0, 1, 2))))  # noqa: E731
        return _lines(rng, rng.randint(12, 30), lambda: " ".join(number() for _ in range(8)))
    if kind == "phrase_spam":
        phrase = _words(rng, vocab, 3, 5)
        return " ".join([phrase] * rng.randint(30, 80)) + " " + _words(rng, vocab, 10, 30) + "\n"
    raise ValueError(kind)


JUNK_KINDS = (
    "repeated_lines",
    "symbol_soup",
    "short",
    "lorem_ipsum",
    "bullets",
    "dash_list",
    "ellipsis_lines",
    "numbers",
    "phrase_spam",
)


def build_corpus(seed: int, docs: int | None) -> Corpus:
    """Windows (a seeded sample of ``docs`` of them in all), near-duplicates and junk."""
    rng = random.Random(seed)
    base = windows(rng)
    if docs is not None:
        keep = min(len(base), max(1, round(docs / (1 + NEAR_FRACTION + JUNK_FRACTION))))
        base = [base[i] for i in sorted(rng.sample(range(len(base)), keep))]
    lines = [ln for w in base for ln in w.splitlines() if 5 <= len(ln.split()) <= 12]
    vocab = sorted({w for w in " ".join(base).split() if w.isalpha() and len(w) > 2})
    items = [(t, "clean") for t in base]
    items += [
        (near_duplicate(rng, rng.choice(base), vocab), "near-dup")
        for _ in range(round(NEAR_FRACTION * len(base)))
    ]
    items += [
        (junk(kind, rng, lines, vocab), kind)
        for kind in itertools.islice(itertools.cycle(JUNK_KINDS), round(JUNK_FRACTION * len(base)))
    ]
    rng.shuffle(items)
    return Corpus(
        ids=[f"d{i:05d}" for i in range(len(items))],
        texts=[t for t, _ in items],
        kinds=[k for _, k in items],
    )


# ---------------------------------------------------------------------------- true Jaccard

_PUNCT = str.maketrans("", "", string.punctuation)


def rpv2_words(text: str) -> list[str]:
    """RedPajama-v2's normalised words, written out here rather than imported: ASCII
    punctuation deleted, lower case, whitespace collapsed, NFD, split."""
    text = re.sub(r"\s+", " ", text.translate(_PUNCT).lower().strip())
    return unicodedata.normalize("NFD", text).split()


def shingles(text: str) -> set[str]:
    words = rpv2_words(text)
    return {" ".join(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def true_jaccard(texts: list[str]) -> dict[tuple[int, int], float]:
    """Jaccard of every pair of documents sharing a 13-gram (other pairs are 0), found
    through an inverted index instead of comparing all pairs."""
    sets = [shingles(t) for t in texts]
    owners: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            owners[g].append(i)
    shared: Counter[tuple[int, int]] = Counter()
    for docs in owners.values():
        if len(docs) > 1:
            shared.update(itertools.combinations(docs, 2))
    return {(a, b): c / (len(sets[a]) + len(sets[b]) - c) for (a, b), c in shared.items()}


def components_of(n: int, pairs: Iterable[tuple[int, int]]) -> list[int]:
    """Connected-component label of each of n nodes (plain union-find, for scoring)."""
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(x) for x in range(n)]


def score(
    n: int, reported: list[tuple[int, int]], linked: list[tuple[int, int]], truth: dict
) -> dict[str, float | None]:
    """Recall and precision at Jaccard >= 0.8, of pairs and of documents.

    ``reported``: the pairs a method emits; ``linked``: every pair it clustered on
    (reported plus exact), whose connected components are its clusters. ``*_clear``:
    the same pair scores without pairs whose true Jaccard is within ``BORDER`` of the
    threshold, where 128 permutations estimate it with a standard deviation of 0.035.
    """
    label = components_of(n, linked)
    size = Counter(label)
    true_pairs = {p for p, j in truth.items() if j >= THRESHOLD}
    true_docs = {i for p in true_pairs for i in p}
    clustered = {i for i in range(n) if size[label[i]] > 1}
    out = {}
    for suffix, keep in (("", lambda j: True), ("_clear", lambda j: abs(j - THRESHOLD) >= BORDER)):
        wanted = {p for p in true_pairs if keep(truth[p])}
        together = sum(label[a] == label[b] for a, b in wanted)
        claims = [truth.get((min(p), max(p)), 0.0) for p in reported]
        hits = [j >= THRESHOLD for j in claims if keep(j)]
        out[f"recall{suffix}"] = _ratio(together, len(wanted))
        out[f"precision{suffix}"] = _ratio(sum(hits), len(hits))
    out["doc_recall"] = _ratio(len(true_docs & clustered), len(true_docs))
    out["doc_precision"] = _ratio(len(true_docs & clustered), len(clustered))
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


# ---------------------------------------------------------------------------- worker pools

_DOCS: list[str] = []  # set before a pool forks: workers read documents from here
_STATE: dict[str, Any] = {}


def _setup(side: str, barrier: Any) -> None:
    """Per worker: build what every document needs once, then warm it up on a few."""
    _STATE.clear()
    _STATE["barrier"] = barrier
    if side == "ours":
        _STATE["ctx"] = SignalContext.default()
        rules = load_rules("gopher")
        # as `farflung data filter` does: optional rules on signals not computed are dropped
        _STATE["rules"] = check_signals(rules, SIGNAL_NAMES, "benchmark")
        for text in WARM_UP + _DOCS[:WARM_DOCS]:
            compute_signals(text, _STATE["ctx"])
        shard_keys((str(i), text) for i, text in enumerate(WARM_UP + _DOCS[:WARM_DOCS]))
    else:
        from datatrove.data import Document
        from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
        from loguru import logger

        logger.disable("datatrove")
        _STATE["quality"], _STATE["repetition"] = GopherQualityFilter(), GopherRepetitionFilter()
        _STATE["doc"] = Document
        for text in WARM_UP + _DOCS[:WARM_DOCS]:
            _STATE["quality"].filter(Document(text=text, id="warm-up"))
            _STATE["repetition"].filter(Document(text=text, id="warm-up"))


def _sync(_: int) -> None:
    """Held until every worker has finished its set-up (one per worker, by the barrier)."""
    _STATE["barrier"].wait(timeout=300)


def _ours_signals(span: Span) -> list:
    ctx = _STATE["ctx"]
    for i in range(*span):
        compute_signals(_DOCS[i], ctx)
    return []


def _ours_filter(span: Span) -> list[tuple[int, str | None, list[str]]]:
    ctx, rules = _STATE["ctx"], _STATE["rules"]
    out = []
    for i in range(*span):
        verdict = evaluate(rules, compute_signals(_DOCS[i], ctx))
        out.append((i, verdict.rejected_by, verdict.failed))
    return out


def _ours_keys(span: Span) -> tuple[int, np.ndarray, np.ndarray]:
    _, keys, sigs = shard_keys((str(i), _DOCS[i]) for i in range(*span))
    return span[0], keys, sigs


def _ours_shingle_keys(span: Span) -> tuple[int, np.ndarray, np.ndarray, ShingleSets]:
    _, keys, sigs, sets = shard_shingle_keys((str(i), _DOCS[i]) for i in range(*span))
    return span[0], keys, sigs, sets


def _reason(result: bool | tuple[bool, str]) -> str | None:
    """datatrove's filter result as a rejection reason (None: kept)."""
    return None if result is True else result[1]


def _peer_signals(span: Span) -> list[tuple[int, str | None, str | None]]:
    quality, repetition, doc = _STATE["quality"], _STATE["repetition"], _STATE["doc"]
    out = []
    for i in range(*span):
        d = doc(text=_DOCS[i], id=str(i))
        out.append((i, _reason(quality.filter(d)), _reason(repetition.filter(d))))
    return out


def _peer_filter(span: Span) -> list[tuple[int, str | None]]:
    quality, repetition, doc = _STATE["quality"], _STATE["repetition"], _STATE["doc"]
    out = []
    for i in range(*span):
        d = doc(text=_DOCS[i], id=str(i))
        reason = _reason(quality.filter(d))
        out.append((i, reason if reason else _reason(repetition.filter(d))))
    return out


def _peer_config() -> Any:
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    bands, rows = lsh_params(THRESHOLD)
    return MinhashConfig(
        n_grams=NGRAM,
        num_buckets=bands,
        hashes_per_bucket=rows,
        seed=RPV2_SEED,
        hash_config=HashConfig(precision=32, hash_fc="sha1"),
    )


def _peer_signatures(task: tuple[int, int, Span, str]) -> None:
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    rank, world, (start, stop), folder = task
    docs = (_STATE["doc"](text=_DOCS[i], id=str(i)) for i in range(start, stop))
    MinhashDedupSignature(folder, config=_peer_config()).run(docs, rank, world)


def _peer_buckets(task: tuple[int, str, str]) -> None:
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    bucket, sigs, dups = task
    config = _peer_config()
    MinhashDedupBuckets(sigs, dups, config=config).run(None, bucket, config.num_buckets)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds, and CPU seconds summed over every process that did the work.

    The CPU figure is what a process costs whatever else the machine runs: on a shared
    machine, documents per CPU second is the steadier per-process rate.
    """

    wall: float
    cpu: float

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


def _cpu_timed(job: tuple[Callable, Any]) -> tuple[float, Any]:
    """Run one task in a worker; return its CPU seconds with its result."""
    fn, task = job
    start = time.process_time()
    result = fn(task)
    return time.process_time() - start, result


def in_parent(fn: Callable[[], Any]) -> tuple[Timing, Any]:
    """Time work done in this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


class Pool:
    """P forked workers set up for one side, timed only once every one is ready."""

    def __init__(self, side: str, processes: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.processes = processes
        self.pool = ctx.Pool(processes, _setup, (side, ctx.Barrier(processes)))
        self.pool.map(_sync, range(processes), chunksize=1)

    def timed(self, fn: Callable, tasks: list) -> tuple[Timing, list]:
        """Wall time from handing out ``tasks`` to the last result (CPU time: the
        workers'), and the results."""
        start = time.perf_counter()
        done = list(self.pool.imap_unordered(_cpu_timed, [(fn, t) for t in tasks], chunksize=1))
        wall = time.perf_counter() - start
        return Timing(wall, sum(cpu for cpu, _ in done)), [result for _, result in done]

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


def spans(n: int, parts: int) -> list[Span]:
    """``parts`` contiguous, nearly equal ranges covering 0..n."""
    edges = [round(k * n / parts) for k in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(edges) if b > a]


def best(repeat: int, run: Callable[[], tuple[Timing, Any]]) -> tuple[Timing, Any]:
    """The fastest of ``repeat`` runs (the machine is shared; noise only adds time)."""
    runs = [run() for _ in range(repeat)]
    return min(runs, key=lambda r: r[0].wall)


def best_two(
    side: str, processes: int, n: int, repeat: int, first: Callable, second: Callable
) -> tuple[tuple[Timing, Any], tuple[Timing, Any]]:
    """Time two task functions over the same ``n`` documents in one pool of ``side``'s
    workers, each the best of ``repeat`` runs."""
    pool = Pool(side, processes)
    tasks = spans(n, CHUNKS_PER_PROCESS * processes)
    try:
        return (
            best(repeat, lambda: pool.timed(first, tasks)),
            best(repeat, lambda: pool.timed(second, tasks)),
        )
    finally:
        pool.close()


# ---------------------------------------------------------------------------- our side


def ours_filter_and_signals(
    processes: int, n: int, repeat: int
) -> tuple[Timing, Timing, dict[int, tuple]]:
    (t_signals, _), (t_filter, found) = best_two(
        "ours", processes, n, repeat, _ours_signals, _ours_filter
    )
    return t_signals, t_filter, {i: (rej, failed) for part in found for i, rej, failed in part}


def ours_dedup(processes: int, n: int, repeat: int) -> dict[str, Any]:
    """Keys and signatures in the pool (a second time keeping shingle hashes, for the
    exact mode, so that the other rows do not pay for storing them), then clustering
    each way in this process."""
    (t_keys, parts), (t_shingle_keys, shingle_parts) = best_two(
        "ours", processes, n, repeat, _ours_keys, _ours_shingle_keys
    )
    parts.sort(key=lambda p: p[0])
    shingle_parts.sort(key=lambda p: p[0])
    keys = np.concatenate([p[1] for p in parts]).tolist()
    sigs = np.concatenate([p[2] for p in parts])
    sets = ShingleSets.concat([p[3] for p in shingle_parts])
    pos = [str(i) for i in range(n)]
    out: dict[str, Any] = {}
    for verify in (False, "signatures", "shingles"):
        shingles = sets if verify == "shingles" else None

        def clustering(verify: Any = verify, shingles: Any = shingles) -> tuple[list, list]:
            exact = exact_clusters(pos, keys)
            found = cluster(pos, sigs, THRESHOLD, verify, shingles)
            return exact, merge_clusters(pos, exact, found)

        seconds, (exact, clusters) = in_parent(clustering)
        pairs = duplicate_pairs(sigs, THRESHOLD, verify, shingles)  # untimed: for precision
        exact_pairs = [(int(c[0]), int(m)) for c in exact for m in c[1:]]
        out[{False: "rpv2", "signatures": "verify", "shingles": "shingles"}[verify]] = {
            "keys": t_shingle_keys if shingles is not None else t_keys,
            "clustering": seconds,
            "clusters": [[int(m) for m in c] for c in clusters],
            "reported": [tuple(p) for p in pairs.tolist()],
            "linked": [tuple(p) for p in pairs.tolist()] + exact_pairs,
        }
    return out


# ---------------------------------------------------------------------------- datatrove


def peer_filter_and_signals(
    processes: int, n: int, repeat: int
) -> tuple[Timing, Timing, dict[int, tuple], dict[int, str | None]]:
    (t_all, both), (t_chain, chained) = best_two(
        "peer", processes, n, repeat, _peer_signals, _peer_filter
    )
    reasons = {i: (q, r) for part in both for i, q, r in part}
    decisions = {i: reason for part in chained for i, reason in part}
    return t_all, t_chain, reasons, decisions


def peer_dedup(processes: int, n: int, repeat: int, work: Path) -> dict[str, Any]:
    """datatrove's MinHash stages 1-3 through files; returns time, pairs and clusters."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupCluster
    from loguru import logger

    logger.disable("datatrove")  # its clustering runs here, in the main process
    pool = Pool("peer", processes)
    ranks = spans(n, CHUNKS_PER_PROCESS * processes)
    config = _peer_config()

    def run() -> tuple[Timing, str]:
        folder = tempfile.mkdtemp(prefix="datatrove-minhash-", dir=work)
        sigs, dups, out = (f"{folder}/{name}" for name in ("sigs", "dups", "out"))
        world = len(ranks)
        t1, _ = pool.timed(_peer_signatures, [(r, world, s, sigs) for r, s in enumerate(ranks)])
        t2, _ = pool.timed(_peer_buckets, [(b, sigs, dups) for b in range(config.num_buckets)])
        step = MinhashDedupCluster(dups, out, config=config, save_cluster_id=True)
        t3, _ = in_parent(lambda: step.run(None, 0, 1))
        return t1 + t2 + t3, folder

    try:
        seconds, folder = best(repeat, run)
    finally:
        pool.close()
    offsets = [s[0] for s in ranks]
    return {"timing": seconds, **_read_peer_dedup(Path(folder), offsets)}


def _read_peer_dedup(folder: Path, offsets: list[int]) -> dict[str, Any]:
    """Pairs (from the .dups files) and cluster members (.clusters), as corpus positions."""
    pairs = []
    for path in sorted((folder / "dups").glob("*.dups")):
        data = path.read_bytes()
        for f1, d1, f2, d2 in struct.iter_unpack("<4I", data):
            pairs.append((offsets[f1] + d1, offsets[f2] + d2))
    clustered: dict[int, int] = {}
    for path in sorted((folder / "out").glob("*.clusters")):
        rank = int(path.stem)
        for doc, cid in struct.iter_unpack("<2I", path.read_bytes()):
            clustered[offsets[rank] + doc] = cid
    removed = sum(len(p.read_bytes()) // 4 for p in (folder / "out").glob("*.remove"))
    return {"reported": pairs, "clustered": clustered, "removed": removed}


# ---------------------------------------------------------------------------- farflung pipeline


def pipeline_seconds(corpus_file: Path, n: int, processes: int, work: Path) -> dict[str, Any]:
    """farflung's own pipeline end to end, stage by stage, on the corpus as .jsonl."""
    sharding = Sharding(docs=max(1, math.ceil(n / 8)), mb=64.0)  # 8 shards whatever P
    out: dict[str, Any] = {}
    with open_executor("process", processes) as ex:
        start = time.perf_counter()
        run_signals([str(corpus_file)], work / "signals", ex, sharding=sharding, progress=False)
        out["signals"] = time.perf_counter() - start
        start = time.perf_counter()
        filt = run_filter(work / "signals", "gopher", work / "filter", ex, progress=False)
        out["filter"] = time.perf_counter() - start
        start = time.perf_counter()
        dedup = run_dedup(
            [str(corpus_file)], work / "dedup", ex, THRESHOLD, sharding=sharding, progress=False
        )
        out["dedup"] = time.perf_counter() - start
    out["kept"] = filt["summary"]["kept"]
    out["duplicates"] = dedup["summary"]["duplicates"]
    return out


# ---------------------------------------------------------------------------- report


def filter_disagreement(
    ours: dict[int, tuple], peer: dict[int, tuple], kinds: list[str]
) -> dict[str, Any]:
    """Where the two Gopher filters decide differently, and by which rule.

    ``ours_fails``: documents failing each of our rules (a document can fail several);
    ``peer_fails``: datatrove's reasons (the first failing check of each filter, quality
    first). ``ours_only``: our rejecting rule where datatrove keeps; ``peer_only``: datatrove's
    reason (quality filter first, then repetition) where we keep; ``by_kind``: the
    corpus kind of the documents decided differently.
    """
    ours_only: Counter[str] = Counter()
    peer_only: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    for i, (rejected_by, _) in ours.items():
        q, r = peer[i]
        theirs = q or r
        if (rejected_by is None) == (theirs is None):
            continue
        by_kind[kinds[i]] += 1
        if rejected_by is not None:
            ours_only[rejected_by] += 1
        else:
            peer_only[theirs] += 1
    return {
        "ours_fails": dict(Counter(r for _, failed in ours.values() for r in failed).most_common()),
        "peer_fails": dict(Counter(q or r for q, r in peer.values() if q or r).most_common()),
        "ours_only": dict(ours_only.most_common()),
        "peer_only": dict(peer_only.most_common()),
        "by_kind": dict(by_kind.most_common()),
    }


def kept_by_kind(
    ours: dict[int, tuple], peer: dict[int, str | None], kinds: list[str]
) -> dict[str, list[int]]:
    """Per corpus kind: ``[documents, kept by farflung, kept by datatrove]`` (the last
    without a peer run)."""
    table: dict[str, list[int]] = {}
    for i, kind in enumerate(kinds):
        counts = table.setdefault(kind, [0, 0, 0] if peer else [0, 0])
        counts[0] += 1
        counts[1] += ours[i][0] is None
        if peer:
            counts[2] += peer[i] is None
    return table


def rate(n: int, mb: float, seconds: float | None) -> tuple[float | None, float | None]:
    if not seconds:
        return None, None
    return round(n / seconds, 1), round(mb / seconds, 3)


def row(
    stage: str,
    processes: int,
    n: int,
    mb: float,
    ours: Timing,
    peer: Timing | None,
    pipeline_s: float | None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row: the keys the issue asks for first, then the rest."""
    docs_per_s, mb_per_s = rate(n, mb, ours.wall)
    peer_docs_per_s, peer_mb_per_s = rate(n, mb, peer.wall if peer else None)
    cpu_docs, _ = rate(n, mb, ours.cpu)
    peer_cpu_docs, _ = rate(n, mb, peer.cpu if peer else None)
    pipe_docs, pipe_mb = rate(n, mb, pipeline_s)
    return {
        "stage": stage,
        "processes": processes,
        "docs_per_s": docs_per_s,
        "peer_docs_per_s": peer_docs_per_s,
        "speedup": _quotient(docs_per_s, peer_docs_per_s),
        "agreement": extra.pop("agreement", None),
        "mb_per_s": mb_per_s,
        "peer_mb_per_s": peer_mb_per_s,
        "docs_per_cpu_s": cpu_docs,
        "peer_docs_per_cpu_s": peer_cpu_docs,
        "cpu_speedup": _quotient(cpu_docs, peer_cpu_docs),
        "pipeline_docs_per_s": pipe_docs,
        "pipeline_mb_per_s": pipe_mb,
        "seconds": round(ours.wall, 3),
        "peer_seconds": round(peer.wall, 3) if peer else None,
        **extra,
    }


def _quotient(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def agreement(a: Iterable[bool], b: Iterable[bool]) -> float:
    pairs = list(zip(a, b, strict=True))
    return round(sum(x == y for x, y in pairs) / len(pairs), 4)


def corpus_stats(corpus: Corpus, truth: dict) -> dict[str, Any]:
    return {
        "documents": len(corpus.texts),
        "mb": round(corpus.mb, 3),
        "kinds": dict(Counter(corpus.kinds).most_common()),
        "pairs_at_or_above_0.8": sum(j >= THRESHOLD for j in truth.values()),
        "pairs_0.5_to_0.8": sum(0.5 <= j < THRESHOLD for j in truth.values()),
        "pairs_within_0.05_of_0.8": sum(abs(j - THRESHOLD) < BORDER for j in truth.values()),
    }


def print_table(results: list[dict]) -> None:
    for r in results:
        extra = f" ({r['lsh']})" if "lsh" in r else ""
        peer = r["peer_docs_per_s"]
        quality = ""
        if "recall" in r:
            quality = f", recall {r['recall']}, precision {r['precision']}"
        log(
            f"{r['stage']:>7}{extra} x{r['processes']}: {r['docs_per_s']:,.0f} docs/s "
            f"({r['mb_per_s']:.2f} MB/s), datatrove "
            f"{'-' if peer is None else f'{peer:,.0f}'} docs/s, speedup {r['speedup']}, "
            f"agreement {r['agreement']}{quality}; per CPU second {r['docs_per_cpu_s']:,.0f} "
            f"vs {r['peer_docs_per_cpu_s'] or '-'} docs"
        )


# ---------------------------------------------------------------------------- main


def run_all(corpus: Corpus, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n, mb = len(corpus.texts), corpus.mb
    truth = true_jaccard(corpus.texts)
    corpus_file = work / "corpus.jsonl"
    with open(corpus_file, "w", encoding="utf-8") as f:
        for doc_id, text in zip(corpus.ids, corpus.texts, strict=True):
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    results, disagreement, by_kind = [], {}, {}
    for p in args.processes:
        log(f"{p} process(es): farflung")
        t_sig, t_filt, verdicts = ours_filter_and_signals(p, n, args.repeat)
        dedup = ours_dedup(p, n, args.repeat)
        pipe = pipeline_seconds(corpus_file, n, p, work / f"pipeline{p}")
        peer: dict[str, Any] = {}
        if not args.skip_peer:
            log(f"{p} process(es): datatrove")
            t_all, t_chain, reasons, decisions = peer_filter_and_signals(p, n, args.repeat)
            peer = {"all": t_all, "chain": t_chain, "reasons": reasons, "decisions": decisions}
            peer["dedup"] = peer_dedup(p, n, args.repeat, work)
        results += rows_for(p, n, mb, truth, t_sig, t_filt, verdicts, dedup, pipe, peer)
        if peer:
            disagreement = filter_disagreement(verdicts, peer["reasons"], corpus.kinds)
        by_kind = kept_by_kind(verdicts, peer.get("decisions", {}), corpus.kinds)
    return {
        "corpus": corpus_stats(corpus, truth),
        "results": results,
        "filter_kept_by_kind": by_kind,
        "filter_disagreement": disagreement,
    }


def rows_for(
    p: int,
    n: int,
    mb: float,
    truth: dict,
    t_sig: Timing,
    t_filt: Timing,
    verdicts: dict[int, tuple],
    dedup: dict[str, Any],
    pipe: dict[str, Any],
    peer: dict[str, Any],
) -> list[dict[str, Any]]:
    """The signals, filter and three dedup rows of one process count."""
    ours_keep = [verdicts[i][0] is None for i in range(n)]
    filt_extra: dict[str, Any] = {"kept": sum(ours_keep), "pipeline_kept": pipe["kept"]}
    if peer:
        peer_keep = [peer["decisions"][i] is None for i in range(n)]
        filt_extra.update(agreement=agreement(ours_keep, peer_keep), peer_kept=sum(peer_keep))
    out = [
        row("signals", p, n, mb, t_sig, peer.get("all"), pipe["signals"]),
        row("filter", p, n, mb, t_filt, peer.get("chain"), pipe["filter"], **filt_extra),
    ]
    peer_dedup_ = peer.get("dedup")
    bands = {
        "rpv2": "rpv2 {}x{}".format(*lsh_params(THRESHOLD)),
        "verify": "verify {}x{} + signature check".format(
            *optimal_params(THRESHOLD, 128, VERIFY_FN_WEIGHT)
        ),
        "shingles": "verify-shingles {}x{} + exact Jaccard".format(*recall_params(THRESHOLD, 128)),
    }
    for variant, label in bands.items():
        found = dedup[variant]
        clustered = {m for c in found["clusters"] for m in c}
        extra: dict[str, Any] = {
            "lsh": label,
            **score(n, found["reported"], found["linked"], truth),
            "duplicates_removed": sum(len(c) - 1 for c in found["clusters"]),
        }
        if variant == "rpv2":
            extra["pipeline_duplicates_removed"] = pipe["duplicates"]
        if peer_dedup_:
            theirs = set(peer_dedup_["clustered"])
            extra["agreement"] = agreement(
                [i in clustered for i in range(n)], [i in theirs for i in range(n)]
            )
            peer_score = score(n, peer_dedup_["reported"], peer_dedup_["reported"], truth)
            extra.update({f"peer_{k}": v for k, v in peer_score.items()})
            extra["peer_duplicates_removed"] = peer_dedup_["removed"]
        timing = found["keys"] + found["clustering"]
        pipeline_s = pipe["dedup"] if variant == "rpv2" else None  # the pipeline has no verify
        peer_t = peer_dedup_["timing"] if peer_dedup_ else None
        out.append(row("dedup", p, n, mb, timing, peer_t, pipeline_s, **extra))
    return out


def peer_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("datatrove", "spacy", "regex"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--docs", type=int, help="about this many documents (default: all windows)")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-peer", action="store_true", help="farflung only (no datatrove)")
    p.add_argument("--repeat", type=int, default=1, help="time each step R times, keep the best")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    corpus = build_corpus(args.seed, args.docs)
    log(f"corpus: {len(corpus.texts):,} documents, {corpus.mb:.2f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        _DOCS[:] = corpus.texts
        report = run_all(corpus, args, Path(tmp))
    print_table(report["results"])
    log(f"filter: [documents, kept, datatrove kept] {json.dumps(report['filter_kept_by_kind'])}")
    if report["filter_disagreement"]:
        log(f"filter disagreement: {json.dumps(report['filter_disagreement'])}")
    header = {
        "benchmark": "data_pipeline",
        "seed": args.seed,
        "cpus": os.cpu_count(),
        "timing": "library functions in a pool of P forked processes, documents in memory",
        "peer": None if args.skip_peer else peer_versions(),
    }
    print(json.dumps({**header, **report}))


if __name__ == "__main__":
    main()
