"""The data pipeline: lenient readers of every format, bounded shards, resumable stages,
the process pool and a Dask LocalCluster giving the same output."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farflung.curate.documents import IssueLog, ReadOptions
from farflung.curate.pipeline import (
    InlineExecutor,
    ProcessExecutor,
    ShardOutput,
    marker_path,
    open_executor,
    plan_shards,
    read_shard,
    run_stage,
)
from farflung.curate.recipe import Sharding, run_dedup, run_filter, run_signals
from farflung.data.errors import DataError


def read_all(sources: list[str], docs: int = 3, mb: float = 1.0, **opts) -> tuple[list, dict, list]:
    """(id, text) of every good document, issue counts and the listed issues."""
    out, counts, listed = [], {}, []
    for shard in plan_shards(sources, docs, mb):
        issues = IssueLog(shard.name)
        out += [(d.id, d.text) for d in read_shard(shard, ReadOptions(**opts), issues)]
        for kind, n in issues.counts.items():
            counts[kind] = counts.get(kind, 0) + n
        listed += issues.listed
    return out, counts, listed


def test_every_format_reads_the_same_documents(tmp_path: Path) -> None:
    records = [{"text": f"document number {i}", "id": f"doc-{i}"} for i in range(7)]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(lines)
    table = pa.table({"id": [r["id"] for r in records], "text": [r["text"] for r in records]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    want = [(r["id"], r["text"]) for r in records]
    for name in ("a.jsonl", "a.jsonl.gz", "a.parquet"):
        for docs in (1, 3, 100):  # shard boundaries must not lose or repeat documents
            got, counts, _ = read_all([str(tmp_path / name)], docs=docs)
            assert got == want, (name, docs)
            assert counts == {}


def test_ids_fields_and_txt_files(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "b.txt").write_text("a whole file\nis one document\n")
    (corpus / "a.jsonl").write_text(
        json.dumps({"body": "first", "key": 7}) + "\n\n" + json.dumps({"body": "second"}) + "\n"
    )
    pq.write_table(pa.table({"body": ["row one", "row two"]}), corpus / "c.parquet")
    got, counts, _ = read_all([str(corpus)], text_field="body", id_field="key")
    assert got == [
        ("7", "first"),  # numeric ids become text
        ("corpus/a.jsonl:3", "second"),  # no id: <file>:<line>, blank lines counted
        ("corpus/c.parquet:1", "row one"),  # parquet rows count from 1 too
        ("corpus/c.parquet:2", "row two"),
        ("corpus/sub/b.txt", "a whole file\nis one document\n"),
    ]
    assert counts == {}


def test_bad_input_is_counted_with_shard_and_line(tmp_path: Path) -> None:
    good = json.dumps({"text": "fine"})
    rows = [
        good.encode(),  # 1
        b'{"text": "caf\xe9"}',  # 2: latin-1 byte, not UTF-8
        b'{"text": "   "}',  # 3: empty
        b'{"text": "' + b"x" * 300 + b'"}',  # 4: enormous single line
        b'{"text": "unterminated',  # 5: malformed JSON
        b'{"body": "no text field"}',  # 6
        b'{"text": 12}',  # 7: not a string
        b"[1, 2]",  # 8: not an object
        b'{"text": "lone \\ud800 surrogate"}',  # 9
        good.encode(),  # 10
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    (tmp_path / "bad.txt").write_bytes(b"ok line\n\xff\xfe")
    pq.write_table(pa.table({"text": ["ok", None, ""]}), tmp_path / "bad.parquet")
    got, counts, listed = read_all([str(tmp_path)], docs=4, max_doc_bytes=200)
    name = tmp_path.name
    assert [i for i, _ in got] == [
        f"{name}/bad.jsonl:1",
        f"{name}/bad.jsonl:10",
        f"{name}/bad.parquet:1",
    ]
    assert counts == {"not-utf8": 3, "empty": 2, "too-long": 1, "bad-json": 2, "no-text": 3}
    where = {(i["file"].split("/")[-1], i["line"], i["kind"]) for i in listed}
    assert ("bad.jsonl", 2, "not-utf8") in where
    assert ("bad.jsonl", 4, "too-long") in where
    assert ("bad.jsonl", 5, "bad-json") in where
    assert ("bad.txt", 2, "not-utf8") in where
    assert ("bad.parquet", 2, "no-text") in where
    shards = {i["shard"] for i in listed if i["file"].endswith("bad.jsonl") and i["line"] > 4}
    assert shards == {"00001", "00002"}  # lines 5-8 and 9-10 are the second and third shard


def test_missing_text_column_is_one_issue_per_piece(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": ["a", "b", "c"]}), tmp_path / "x.parquet")
    got, counts, listed = read_all([str(tmp_path / "x.parquet")])
    assert got == [] and counts == {"no-text": 3}
    assert "no 'text' column" in listed[0]["detail"]


def test_shards_are_bounded_by_docs_and_bytes(tmp_path: Path) -> None:
    (tmp_path / "big.jsonl").write_text(
        "".join(json.dumps({"text": "y" * 1000}) + "\n" for _ in range(50))
    )
    for i in range(5):
        (tmp_path / f"small{i}.txt").write_text(f"small file {i}")
    shards = plan_shards([str(tmp_path)], shard_docs=20, shard_mb=10_000 / (1 << 20))
    assert all(s.docs <= 20 and s.nbytes <= 10_000 + 1100 for s in shards)
    assert len(shards[-1].pieces) == 5  # small files packed together
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no input files"):
        plan_shards([str(tmp_path / "empty")], 10, 1)


def test_an_enormous_line_is_skipped_without_holding_it(tmp_path: Path) -> None:
    import tracemalloc

    huge = json.dumps({"text": "z" * (16 << 20)})
    lines = [json.dumps({"text": "before"}), huge, json.dumps({"text": "after"})]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    tracemalloc.start()
    try:
        got, counts, listed = read_all([str(tmp_path)], max_doc_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [t for _, t in got] == ["before", "after"] * 2
    assert counts == {"too-long": 2} and {i["line"] for i in listed} == {2}
    assert peak < 8 << 20  # the 16 MiB line was never read whole


# ---------------------------------------------------------------------------- stages


def count_stage(arg: tuple, out: ShardOutput) -> dict:
    """A test stage: writes the shard's ids; logs every run; fails where told to."""
    shard, log, fail = arg
    if fail and Path(fail).exists() and shard.name == "00002":
        raise RuntimeError("injected failure")
    issues = IssueLog(shard.name)
    with out.open(f"ids/{shard.name}.txt") as f:
        n = 0
        for doc in read_shard(shard, ReadOptions(), issues):
            f.write(doc.id + "\n")
            n += 1
    with open(log, "a") as f:
        f.write(shard.name + "\n")
    return {"documents": n}


def corpus(tmp_path: Path, n: int = 40) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(
        "".join(json.dumps({"text": f"text {i}", "id": f"d{i}"}) + "\n" for i in range(n))
    )
    return path


def run_counts(src: Path, out: Path, log: Path, executor) -> dict:
    """Run the count stage; shard 00002 fails while a file "fail" lies beside ``log``."""
    shards = plan_shards([str(src)], 5, 1)
    items = [(s.name, (s, str(log), str(log.parent / "fail"))) for s in shards]
    return run_stage("count", count_stage, items, out, {"v": 1}, executor, progress=False)


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "ids").iterdir())}


def test_failed_shard_is_redone_alone_and_corruption_detected(tmp_path: Path) -> None:
    src, log, fail = corpus(tmp_path), tmp_path / "log", tmp_path / "fail"
    ref = run_counts(src, tmp_path / "ref", tmp_path / "ref.log", InlineExecutor())
    fail.touch()
    with open_executor("process", 2) as ex:
        assert isinstance(ex, ProcessExecutor)
        with pytest.raises(DataError, match=r"1 of 8 shards failed \(00002: RuntimeError"):
            run_counts(src, tmp_path / "out", log, ex)
        assert sorted(log.read_text().split()) == [f"{i:05d}" for i in range(8) if i != 2]
        assert not (tmp_path / "out" / "ids" / "00002.txt.tmp").exists()
        fail.unlink()
        log.write_text("")
        assert run_counts(src, tmp_path / "out", log, ex) == ref
        assert log.read_text().split() == ["00002"]  # finished shards were not redone
        assert outputs(tmp_path / "out") == outputs(tmp_path / "ref")
        # A corrupt output (changed after its marker was written) is detected and redone.
        (tmp_path / "out" / "ids" / "00005.txt").write_text("garbage\n")
        log.write_text("")
        run_counts(src, tmp_path / "out", log, ex)
        assert log.read_text().split() == ["00005"]
        assert outputs(tmp_path / "out") == outputs(tmp_path / "ref")
        # Changed settings redo everything (they are part of each shard's key).
        log.write_text("")
        shards = plan_shards([str(src)], 5, 1)
        items = [(s.name, (s, str(log), str(fail))) for s in shards]
        run_stage("count", count_stage, items, tmp_path / "out", {"v": 2}, ex, progress=False)
        assert len(log.read_text().split()) == 8


KILL_SCRIPT = """
import sys, time
from pathlib import Path
from farflung.curate.pipeline import InlineExecutor, plan_shards, read_shard, run_stage
from farflung.curate.documents import IssueLog, ReadOptions

def slow(arg, out):
    shard, log, pause = arg
    with out.open(f"ids/{shard.name}.txt") as f:
        for doc in read_shard(shard, ReadOptions(), IssueLog(shard.name)):
            f.write(doc.id + "\\n")
        if shard.name == "00003" and Path(pause).exists():
            f.flush()
            Path(pause).unlink()
            time.sleep(120)  # killed here, half-way through its shard
    with open(log, "a") as f:
        f.write(shard.name + "\\n")
    return {"documents": 0}

src, out, log, pause = sys.argv[1:]
items = [(s.name, (s, log, pause)) for s in plan_shards([src], 5, 1)]
run_stage("slow", slow, items, Path(out), {"v": 1}, InlineExecutor(), progress=False)
"""


def test_sigkilled_run_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    src, log, pause = corpus(tmp_path), tmp_path / "log", tmp_path / "pause"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)

    def run(out: Path) -> subprocess.Popen:
        args = [sys.executable, str(script), str(src), str(out), str(log), str(pause)]
        return subprocess.Popen(args)

    pause.touch()
    proc = run(tmp_path / "out")
    try:
        deadline = time.monotonic() + 60
        while pause.exists():  # removed by shard 00003 once its output is half written
            assert proc.poll() is None and time.monotonic() < deadline, "never got to 00003"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    out = tmp_path / "out"
    assert log.read_text().split() == ["00000", "00001", "00002"]
    assert (out / "ids" / "00003.txt.tmp").exists()  # the half-written temp file
    assert not (out / "ids" / "00003.txt").exists()
    assert not marker_path(out, "slow", "00003").exists()
    log.write_text("")
    assert run(out).wait(timeout=120) == 0
    assert log.read_text().split() == ["00003", "00004", "00005", "00006", "00007"]
    # the same ids files, written in one uninterrupted run
    run_counts(src, tmp_path / "ref", tmp_path / "ref.log", InlineExecutor())
    assert outputs(out) == outputs(tmp_path / "ref")


# ---------------------------------------------------------------------------- executors


def near_duplicate_corpus(path: Path) -> None:
    """Documents of distinct words, plus exact copies and copies with a word changed."""
    docs = [" ".join(f"w{i}x{j}" for j in range(60)) for i in range(30)]
    docs += [docs[3], docs[7]]  # exact copies
    docs += [docs[5].replace("w5x40", "edited")]  # 1 of 60 words: Jaccard 47/73 of 13-grams
    docs += [docs[9] + " one more"]  # near copy: Jaccard 48/50
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(docs))
    )


def dedup_outputs(out: Path) -> dict[str, bytes]:
    files = sorted((out / "kept").iterdir()) + [out / "clusters.jsonl"]
    return {p.name: p.read_bytes() for p in files}


DASK_SCRIPT = """
import sys
from pathlib import Path
from farflung.curate.pipeline import DaskExecutor
from farflung.curate.recipe import Sharding, run_dedup, run_filter, run_signals

src, out = sys.argv[1], Path(sys.argv[2])
ex = DaskExecutor(workers=2, processes=False)
try:
    run_signals([src], out / "signals", ex, sharding=Sharding(6, 1), progress=False)
    run_filter(out / "signals", "c4", out / "filter", ex, rejected=True, progress=False)
    run_dedup([src], out / "dedup", ex, 0.8, sharding=Sharding(6, 1), progress=False)
finally:
    ex.close()
"""


def folder_bytes(out: Path, *subdirs: str) -> dict[str, bytes]:
    return {f"{d}/{p.name}": p.read_bytes() for d in subdirs for p in sorted((out / d).iterdir())}


def test_dask_local_cluster_gives_the_process_pool_output(tmp_path: Path) -> None:
    """The same shards on a dask.distributed LocalCluster (2 workers), in a fresh
    interpreter: pytest puts tests/ first on sys.path, where tests/distributed.py (the
    gloo helper) shadows the ``distributed`` package."""
    src = tmp_path / "in.jsonl"
    near_duplicate_corpus(src)
    script = tmp_path / "dask_run.py"
    script.write_text(DASK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The Dask run starts first and the pool runs meanwhile: mostly start-up, on two cores.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(src), str(tmp_path / "dask")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pool = tmp_path / "pool"
    try:
        with open_executor("process", 2) as ex:
            run_signals([str(src)], pool / "signals", ex, sharding=Sharding(6, 1), progress=False)
            run_filter(pool / "signals", "c4", pool / "filter", ex, rejected=True, progress=False)
            summary = run_dedup(
                [str(src)], pool / "dedup", ex, 0.8, sharding=Sharding(6, 1), progress=False
            )
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert summary["summary"]["duplicates"] == 3
    if "No module named 'dask'" in stderr or "No module named 'distributed'" in stderr:
        pytest.skip("dask.distributed is not installed")
    assert proc.returncode == 0, stderr
    dask = tmp_path / "dask"
    assert dedup_outputs(dask / "dedup") == dedup_outputs(pool / "dedup")
    assert folder_bytes(dask, "signals/signals") == folder_bytes(pool, "signals/signals")
    assert folder_bytes(dask, "filter/kept", "filter/rejected") == folder_bytes(
        pool, "filter/kept", "filter/rejected"
    )
    clusters = [json.loads(line) for line in (pool / "dedup" / "clusters.jsonl").open()]
    assert [c["members"] for c in clusters] == [["d3", "d30"], ["d7", "d31"], ["d9", "d33"]]


def test_open_executor_rejects_bad_choices() -> None:
    with pytest.raises(DataError, match="unknown executor 'ray'"):
        open_executor("ray")
    with pytest.raises(DataError, match="--scheduler only applies"):
        open_executor("process", 2, "tcp://localhost:8786")
    with open_executor("process", 1) as ex:
        assert isinstance(ex, InlineExecutor)


def test_truncated_gzip_keeps_every_complete_line_across_pieces(tmp_path):
    """A .jsonl.gz cut anywhere: planned into several pieces, reading them yields
    exactly the complete lines zlib can decompress (the reference), in order, and one
    damaged-file issue at the first lost line."""
    import zlib

    from farflung.curate.documents import list_pieces, read_piece

    lines = [
        json.dumps({"id": f"d{i}", "text": f"text {i} " + "x" * (i % 97)}) for i in range(3000)
    ]
    packed = gzip.compress("\n".join(lines).encode() + b"\n")
    for cut in (len(packed) // 3, len(packed) - 9):  # mid-stream; in the trailer
        (tmp_path / "t.jsonl.gz").write_bytes(packed[:cut])
        readable = zlib.decompressobj(31).decompress(packed[:cut])
        want = readable[: readable.rfind(b"\n") + 1].decode().splitlines()
        pieces = list_pieces([str(tmp_path)], max_docs=250, max_bytes=1 << 20)
        assert len(pieces) > 2 and pieces[-1].damage and not any(p.damage for p in pieces[:-1])
        issues = IssueLog("s")
        got = [d.id for p in pieces for d in read_piece(p, ReadOptions(), issues)]
        assert got == [json.loads(line)["id"] for line in want]
        assert issues.counts == {"damaged-file": 1}
        assert issues.listed[0]["line"] == len(want) + 1
