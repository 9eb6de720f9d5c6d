"""``farflung data signals | filter | dedup | tokenize`` and ``farflung prepare --filter
--dedup`` end to end on a small corpus with junk, duplicates and bad lines."""

from __future__ import annotations

import gzip
import json
import random
import zlib
from pathlib import Path

import pytest
from cli import run_cli

from farflung.data import ShardIndex

VOCAB = (
    "river mountain village teacher market window garden letter winter morning evening "
    "journey harbour lantern kitchen library orchard meadow bridge castle painter sailor "
    "farmer doctor student quiet bright gentle ancient narrow golden silver hollow "
    "walked carried opened remembered followed answered gathered noticed painted built "
    "slowly always often never together beyond across under between around"
).split()
STOP = "the of and to with that have be".split()


def prose(rng: random.Random, words: int = 120) -> str:
    """Readable-enough English: few punctuation tokens, no repeated n-grams to speak of."""
    out = []
    for i in range(words):
        out.append(rng.choice(STOP) if i % 3 == 0 else rng.choice(VOCAB))
        if i % 20 == 19:
            out[-1] += "."
    return " ".join(out).capitalize()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("corpus") / "web"
    root.mkdir()
    good = [prose(rng) for _ in range(10)]
    lines = [{"id": f"good-{i}", "text": t} for i, t in enumerate(good)]
    lines.append({"id": "short", "text": "Too short to keep."})
    lines.append({"id": "spam", "text": "buy now cheap pills " * 40})
    lines.append({"id": "copy-of-good-2", "text": good[2]})
    rows = [json.dumps(r).encode() for r in lines]
    rows.insert(4, b"{broken json")
    rows.insert(7, b'{"text": "bad \xff byte"}')
    (root / "a.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "gz-good", "text": prose(rng)}) + "\n")
    return root


def kept(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((folder / "kept").iterdir()) for line in p.open()]


def test_step_by_step_equals_prepare_recipe(corpus: Path, tmp_path: Path) -> None:
    common = ("--processes", "2", "--quiet")
    sig, filt, dd = tmp_path / "signals", tmp_path / "filter", tmp_path / "dedup"
    code, out, err = run_cli(
        "data", "signals", str(corpus), "--out", str(sig), "--shard-docs", "4", *common
    )
    assert code == 0, err
    assert "signals of 14 documents" in out
    assert "skipped 2 bad input document(s): 1 bad-json, 1 not-utf8" in err
    assert "web/a.jsonl:5: bad-json" in err and "web/a.jsonl:8: not-utf8" in err
    record = json.loads((sig / "signals" / "00000.jsonl").open().readline())
    assert record["id"] == "good-0"
    assert record["quality_signals"]["rps_doc_word_count"][0][2] == 120

    code, out, err = run_cli(
        "data",
        "filter",
        str(sig),
        "--rules",
        "gopher",
        "--out",
        str(filt),
        "--rejected",
        *common,
    )
    assert code == 0, err
    assert "rules gopher: kept 12 of 14" in out
    assert "too_few_words" in out and "stop_words" in out and "skipped" not in out
    rejected = {
        r["id"]: r["rejected_by"]
        for p in (filt / "rejected").iterdir()
        for r in map(json.loads, p.open())
    }
    # the spam repeats four words, none of them a Gopher stop word: the first rule it fails
    assert rejected == {"short": "too_few_words", "spam": "stop_words"}

    # The same shard size as the recipe below: prepare names documents by kept file and
    # line, so the train/val split follows the shard layout.
    code, out, err = run_cli(
        "data", "dedup", str(filt), "--out", str(dd), "--shard-docs", "4", *common
    )
    assert code == 0, err
    assert "1 duplicate clusters, 1 duplicates removed, 11 kept" in out
    clusters = [json.loads(line) for line in (dd / "clusters.jsonl").open()]
    assert clusters == [{"survivor": "good-2", "members": ["good-2", "copy-of-good-2"]}]
    assert "copy-of-good-2" not in {d["id"] for d in kept(dd)}
    for mode in ([], ["signatures"]):  # --verify alone: exact Jaccard of the shingles
        verified = tmp_path / f"dedup_verified{'_'.join(['', *mode])}"
        argv = ["data", "dedup", str(filt), "--out", str(verified), "--verify", *mode]
        code, out, err = run_cli(*argv)
        assert code == 0, err
        assert f"{mode[0] if mode else 'shingles'} verified" in out
        assert [json.loads(line) for line in (verified / "clusters.jsonl").open()] == clusters
        assert any(verified.glob("keys/*.shingles.npy")) == (not mode)

    data = tmp_path / "data"
    code, out, err = run_cli("data", "tokenize", str(dd), "--out", str(data), "--vocab-size", "300")
    assert code == 0, err
    stepwise = ShardIndex.load(data)

    recipe = tmp_path / "prepared"
    code, out, err = run_cli(
        "prepare",
        "--source",
        str(corpus),
        "--out",
        str(recipe),
        "--vocab-size",
        "300",
        "--filter",
        "gopher",
        "--dedup",
        "0.8",
        "--shard-docs",
        "4",
        *common,
    )
    assert code == 0, err
    assert "rules gopher: kept 12 of 14" in out and "11 kept" in out
    assert kept(recipe / "recipe" / "dedup") == kept(dd)
    together = ShardIndex.load(recipe)
    for split in ("train", "val"):
        assert together.tokens(split) == stepwise.tokens(split)


def test_user_rules_exact_dedup_and_errors(corpus: Path, tmp_path: Path) -> None:
    rules = tmp_path / "mine.toml"
    rules.write_text(
        'name = "long-only"\n'
        '[[rule]]\nname = "long"\nsignal = "rps_doc_word_count"\nkeep = ">= 100"\n'
    )
    sig = tmp_path / "signals"
    args = ("data", "signals", str(corpus), "--out", str(sig), "--processes", "1", "--quiet")
    reference = tmp_path / "reference.txt"
    reference.write_text(prose(random.Random(1), 300))
    assert run_cli(*args, "--dsir-reference", str(reference))[0] == 0
    record = json.loads((sig / "signals" / "00000.jsonl").open().readline())
    assert isinstance(record["quality_signals"]["rps_doc_importance"][0][2], float)
    markers = {p: p.stat().st_mtime_ns for p in (sig / "done").rglob("*.json")}
    assert run_cli(*args, "--dsir-reference", str(reference))[0] == 0  # nothing to redo
    assert markers == {p: p.stat().st_mtime_ns for p in (sig / "done").rglob("*.json")}
    code, out, _ = run_cli(
        "data", "filter", str(sig), "--rules", str(rules), "--out", str(tmp_path / "f")
    )
    assert code == 0 and "rules long-only: kept 13 of 14" in out
    code, out, _ = run_cli(
        "data", "dedup", str(corpus), "--out", str(tmp_path / "d"), "--exact", "--quiet"
    )
    assert code == 0 and "dedup (exact): 14 documents, 1 duplicate clusters" in out

    rules.write_text('[[rule]]\nsignal = "rps_doc_word_count"\nkeep = "at least 5"\n')
    code, _, err = run_cli(
        "data", "filter", str(sig), "--rules", str(rules), "--out", str(tmp_path / "g")
    )
    assert code == 2 and "rule 1: keep must be" in err
    code, _, err = run_cli(
        "data", "filter", str(corpus), "--rules", "c4", "--out", str(tmp_path / "h")
    )
    assert code == 2 and "is not a farflung data folder" in err
    code, _, err = run_cli(
        "prepare", "--source", str(corpus), "--out", str(tmp_path / "p"), "--dedup", "most"
    )
    assert code == 2 and "--dedup must be a Jaccard threshold or exact" in err


def test_filter_refuses_inputs_changed_since_their_signals(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": prose(random.Random(2))}) + "\n")
    sig = tmp_path / "signals"
    assert run_cli("data", "signals", str(src), "--out", str(sig), "--processes", "1")[0] == 0
    with src.open("a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    code, _, err = run_cli(
        "data", "filter", str(sig), "--rules", "c4", "--out", str(tmp_path / "f")
    )
    assert code == 2 and "a.jsonl changed (or went missing) since the signals step" in err


def _damaged_folder(root: Path, rng: random.Random) -> tuple[Path, list[str]]:
    """Good files beside a truncated .jsonl.gz, a gzip whose CRC is wrong and a .parquet
    that is not parquet; returns the folder and the ids a reader must keep."""
    folder = root / "damaged"
    folder.mkdir()
    good = [{"id": f"g{i}", "text": prose(rng)} for i in range(6)]
    (folder / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    # incompressible enough that half the compressed bytes hold some, not all, lines
    long = [{"id": f"t{i}", "text": prose(rng, 400)} for i in range(60)]
    packed = gzip.compress("".join(json.dumps(r) + "\n" for r in long).encode())
    (folder / "truncated.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    # the reference: what zlib itself decompresses of the truncated stream
    readable = zlib.decompressobj(31).decompress(packed[: len(packed) // 2])
    complete = readable[: readable.rfind(b"\n") + 1].decode().splitlines()
    assert 0 < len(complete) < len(long)  # the test needs a partial file
    crc = bytearray(gzip.compress(json.dumps({"id": "crc", "text": prose(rng)}).encode()))
    crc[-8] ^= 0xFF  # the CRC32 field of the gzip trailer
    (folder / "crc.jsonl.gz").write_bytes(bytes(crc))
    (folder / "fake.parquet").write_bytes(b"not a parquet file\n" * 20)
    want = [r["id"] for r in good] + [json.loads(line)["id"] for line in complete]
    return folder, want


def test_damaged_files_are_reported_and_skipped(tmp_path: Path) -> None:
    """`data signals` and `data dedup` over a folder with damaged files beside good
    ones: each damaged file is named (line, byte offset, reason) on stderr and in
    issues.jsonl / the manifest, a truncated gzip keeps its complete lines, the other
    files are processed, and the command succeeds."""
    folder, want = _damaged_folder(tmp_path, random.Random(7))
    for verb, extra in (("signals", []), ("dedup", ["--exact"])):
        out = tmp_path / verb
        code, _, err = run_cli("data", verb, str(folder), "--out", str(out), "--quiet", *extra)
        assert code == 0, err
        issues = [json.loads(line) for line in (out / "issues.jsonl").read_text().splitlines()]
        damaged = {Path(i["file"]).name: i for i in issues if i["kind"] == "damaged-file"}
        assert sorted(damaged) == ["crc.jsonl.gz", "fake.parquet", "truncated.jsonl.gz"]
        assert "truncated" in damaged["truncated.jsonl.gz"]["detail"]
        assert damaged["truncated.jsonl.gz"]["line"] == len(want) - 6 + 1
        assert "at byte" in damaged["truncated.jsonl.gz"]["detail"]
        assert "checksum" in damaged["crc.jsonl.gz"]["detail"]
        assert "parquet" in damaged["fake.parquet"]["detail"]
        for name in damaged:
            assert name in err  # the user sees it without opening a file
        summary = json.loads((out / "manifest.json").read_text())["summary"]
        assert summary["issues"]["counts"]["damaged-file"] == 3
        assert summary["documents"] == len(want)
    ids = [
        json.loads(line)["id"]
        for f in sorted((tmp_path / "signals" / "signals").iterdir())
        for line in f.read_text().splitlines()
    ]
    assert sorted(ids) == sorted(want)
    kept_ids = [r["id"] for r in kept(tmp_path / "dedup")]
    assert sorted(kept_ids) == sorted(want)
