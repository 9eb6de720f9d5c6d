"""Token shards: turn a corpus into checksummed ``.npy`` files of token ids, and read them back.

On disk a prepared data folder holds ``tokenizer.json``, shards ``train_0000.npy``,
``val_0000.npy``, ... (1-D arrays of token ids, documents separated by the
end-of-text id) and ``index.json``, which lists every file with its sha256. The index is
written last, and removed first when preparing again, so a folder with an index is
always complete. See docs/data.md for the format.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from farflung.data.corpus import Document, iter_documents
from farflung.data.errors import DataError
from farflung.data.tokenizer import MIN_VOCAB, Tokenizer, train_tokenizer

FORMAT = 1
"""Version of the on-disk layout; bumped when index.json changes incompatibly."""

INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
_SHARD_NAME = re.compile(r"^(train|val)_\d+\.npy$")

# Encode documents in batches this large so the library can spread them over cores
# while memory stays bounded on corpora that do not fit in it.
_BATCH_DOCS = 256
_BATCH_CHARS = 4 << 20


@dataclass(frozen=True)
class Shard:
    """One shard file of a split: its name inside the data folder, length and checksum."""

    file: str
    tokens: int
    sha256: str


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files never sit whole in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir`` holds an index (it may still fail verification on load)."""
    return (Path(data_dir) / INDEX_FILE).is_file()


# ---------------------------------------------------------------------------- splitting


def _split_score(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document id and seed alone."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_val(doc_ids: Iterable[str], val_fraction: float, seed: int = 0) -> set[str]:
    """The ids held out for validation: those whose hash score falls below ``val_fraction``.

    Hashing ids (instead of shuffling a list) makes each document's split independent
    of corpus order and of the other documents, so adding files does not reshuffle the
    old ones. With ``val_fraction > 0`` and at least two distinct ids, at least one
    document goes to each split, so a tiny corpus still has a validation set.
    """
    scores = {doc_id: _split_score(doc_id, seed) for doc_id in doc_ids}
    val = {doc_id for doc_id, score in scores.items() if score < val_fraction}
    if val_fraction > 0 and len(scores) >= 2:
        ranked = sorted(scores, key=lambda doc_id: (scores[doc_id], doc_id))
        if not val:
            val.add(ranked[0])
        if len(val) == len(scores):
            val.discard(ranked[-1])
    return val


# ---------------------------------------------------------------------------- preparing


def prepare(
    sources: list[str],
    out_dir: str | os.PathLike,
    vocab_size: int,
    val_fraction: float,
    shard_tokens: int,
    seed: int = 0,
    progress: bool = True,
) -> ShardIndex:
    """Read ``sources``, train a tokenizer on the train split and write token shards.

    The corpus is read three times, streaming: once to list document ids (deciding the
    split and finding bad input before any slow work), once to train the tokenizer on
    training documents only (validation text must not shape the vocabulary), and once to
    encode. Every file is written to a temp name and renamed; ``index.json`` comes last.
    """
    _check_prepare_args(vocab_size, val_fraction, shard_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A half-rewritten folder must not look prepared if this run is interrupted.
    (out / INDEX_FILE).unlink(missing_ok=True)

    lengths, n_scanned = _scan(sources, progress)
    val = assign_val(lengths, val_fraction, seed)
    train_chars = sum(n for doc_id, n in lengths.items() if doc_id not in val)

    texts = _train_texts(sources, val, train_chars, progress)
    tok = train_tokenizer(texts, vocab_size)
    tok.save(out / TOKENIZER_FILE)

    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    writers = {split: _ShardWriter(out, split, shard_tokens, dtype) for split in SPLITS}
    n_encoded = _encode(sources, tok, val, writers, sum(lengths.values()), progress)
    if n_encoded != n_scanned:
        raise DataError("the corpus changed while it was being prepared: run again")

    index = {
        "format": FORMAT,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eot_id": tok.eot_id,
        "sources": list(sources),
        "seed": seed,
        "val_fraction": val_fraction,
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256_file(out / TOKENIZER_FILE)},
        "splits": {split: w.finish() for split, w in writers.items()},
    }
    write_json(out / INDEX_FILE, index)
    _remove_stale_shards(out, index)
    # Hashes were just taken from the files themselves; no need to read them again.
    return ShardIndex.load(out, verify=False)


def _check_prepare_args(vocab_size: int, val_fraction: float, shard_tokens: int) -> None:
    """Reject arguments that would fail late or silently produce nonsense."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + end-of-text)")
    if vocab_size > 1 << 32:
        raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _scan(sources: list[str], progress: bool) -> tuple[dict[str, int], int]:
    """Characters per document id, and the document count (first pass: cheap, fails early)."""
    lengths: dict[str, int] = {}
    n_docs = 0
    bar = tqdm(desc="reading corpus", unit=" docs", disable=not progress)
    with bar:
        for doc in iter_documents(sources):
            # A repeated id (a file listed twice) keeps one split for all its copies.
            lengths[doc.id] = lengths.get(doc.id, 0) + len(doc.text)
            n_docs += 1
            bar.update(1)
    if not lengths:
        raise DataError(f"no documents found in sources {sources}")
    return lengths, n_docs


def _train_texts(sources: list[str], val: set[str], total: int, progress: bool) -> Iterator[str]:
    """Texts of training documents, streamed to the tokenizer trainer with a progress bar."""
    with tqdm(
        total=total, desc="training tokenizer", unit="char", unit_scale=True, disable=not progress
    ) as bar:
        for doc in iter_documents(sources):
            if doc.id not in val:
                bar.update(len(doc.text))
                yield doc.text


def _encode(
    sources: list[str],
    tok: Tokenizer,
    val: set[str],
    writers: dict[str, _ShardWriter],
    total_chars: int,
    progress: bool,
) -> int:
    """Encode every document in batches into its split's writer; returns documents seen."""
    batch: list[Document] = []
    batch_chars = 0
    n_docs = 0
    with tqdm(
        total=total_chars, desc="encoding", unit="char", unit_scale=True, disable=not progress
    ) as bar:
        for doc in iter_documents(sources):
            batch.append(doc)
            batch_chars += len(doc.text)
            n_docs += 1
            if len(batch) >= _BATCH_DOCS or batch_chars >= _BATCH_CHARS:
                _encode_batch(batch, tok, val, writers)
                bar.update(batch_chars)
                batch, batch_chars = [], 0
        if batch:
            _encode_batch(batch, tok, val, writers)
            bar.update(batch_chars)
    return n_docs


def _encode_batch(
    batch: list[Document], tok: Tokenizer, val: set[str], writers: dict[str, _ShardWriter]
) -> None:
    """Encode one batch in parallel and append each document plus ``eot_id`` to its split."""
    for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch]), strict=True):
        writer = writers["val" if doc.id in val else "train"]
        tokens = np.empty(len(ids) + 1, dtype=writer.dtype)
        tokens[:-1] = ids
        tokens[-1] = tok.eot_id
        writer.add(tokens)


class _ShardWriter:
    """Cuts one split's token stream into shard files of exactly ``shard_tokens`` (last: fewer)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out = out
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.shards: list[Shard] = []
        self.documents = 0
        self._parts: list[np.ndarray] = []
        self._buffered = 0

    def add(self, tokens: np.ndarray) -> None:
        """Buffer one document's tokens, writing full shards as soon as there are enough."""
        self.documents += 1
        self._parts.append(tokens)
        self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def finish(self) -> dict:
        """Write the remainder and return the split's index entry."""
        if self._buffered:
            self._flush(self._buffered)
        return {
            "tokens": sum(s.tokens for s in self.shards),
            "documents": self.documents,
            "shards": [asdict(s) for s in self.shards],
        }

    def _flush(self, n: int) -> None:
        """Write the first ``n`` buffered tokens as the next shard and keep the rest."""
        data = self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)
        rest = data[n:]
        self._parts = [rest] if len(rest) else []
        self._buffered = len(rest)
        name = f"{self.split}_{len(self.shards):04d}.npy"
        path = self.out / name
        tmp = path.with_name(name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, data[:n], allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        self.shards.append(Shard(file=name, tokens=n, sha256=digest))


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: a reader sees the old file, the new one, or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_stale_shards(out: Path, index: dict) -> None:
    """Delete shard files left by an earlier, larger preparation of the same folder."""
    listed = {s["file"] for split in index["splits"].values() for s in split["shards"]}
    for path in out.iterdir():
        if _SHARD_NAME.match(path.name) and path.name not in listed:
            path.unlink()


# ---------------------------------------------------------------------------- reading


class ShardIndex:
    """A prepared data folder: its index.json, checked against the files it lists."""

    def __init__(self, data_dir: Path, meta: dict) -> None:
        self._dir = data_dir
        self._meta = meta
        self._tokenizer: Tokenizer | None = None
        try:
            self._splits = {
                name: [
                    Shard(str(s["file"]), int(s["tokens"]), str(s["sha256"]))
                    for s in split["shards"]
                ]
                for name, split in meta["splits"].items()
            }
            self._tokens = {name: int(split["tokens"]) for name, split in meta["splits"].items()}
            self._tokenizer_file = Shard(
                str(meta["tokenizer"]["file"]), 0, str(meta["tokenizer"]["sha256"])
            )
            self._vocab_size = int(meta["vocab_size"])
            self._dtype = np.dtype(meta["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{self.index_path} is malformed ({exc!r}): run `farflung prepare`"
            ) from exc
        for name, shards in self._splits.items():
            if sum(s.tokens for s in shards) != self._tokens[name]:
                raise DataError(f"{self.index_path}: {name} token count does not match its shards")

    @classmethod
    def load(cls, data_dir: str | os.PathLike, verify: bool = True) -> ShardIndex:
        """Read ``index.json`` and check that every file it lists exists and, with
        ``verify``, that its sha256 matches (hashing streams the files)."""
        data_dir = Path(data_dir)
        path = data_dir / INDEX_FILE
        if not path.is_file():
            raise DataError(f"no prepared data in {data_dir}: run `farflung prepare`")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON ({exc}): run `farflung prepare`") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise DataError(
                f"{path} has format {found!r}, this farflung reads format {FORMAT}: "
                "run `farflung prepare` again"
            )
        index = cls(data_dir, meta)
        index.check(verify=verify)
        return index

    def check(self, verify: bool = True) -> None:
        """Raise DataError if a listed file is missing or (with ``verify``) corrupt."""
        for entry in [self._tokenizer_file, *(s for ss in self._splits.values() for s in ss)]:
            path = self._file(entry.file)
            if not path.is_file():
                raise DataError(
                    f"{path} is missing (listed in {INDEX_FILE}): run `farflung prepare`"
                )
            if verify and sha256_file(path) != entry.sha256:
                raise DataError(
                    f"{path} is corrupt: its sha256 does not match {INDEX_FILE}; "
                    "run `farflung prepare` again"
                )

    def _file(self, name: str) -> Path:
        """Path of a listed file; names must be plain so an index cannot point elsewhere."""
        if Path(name).name != name:
            raise DataError(f"{self.index_path}: bad file name {name!r}")
        return self._dir / name

    @property
    def dir(self) -> Path:
        """The data folder."""
        return self._dir

    @property
    def index_path(self) -> Path:
        """Path of index.json."""
        return self._dir / INDEX_FILE

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer (the model's embedding size at least)."""
        return self._vocab_size

    @property
    def dtype(self) -> np.dtype:
        """Numpy dtype of the shard arrays."""
        return self._dtype

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token that follows every document."""
        if "eot_id" in self._meta:
            return int(self._meta["eot_id"])
        return self.tokenizer().eot_id

    @property
    def sources(self) -> list[str]:
        """The corpus sources this folder was prepared from."""
        return list(self._meta.get("sources", []))

    @property
    def splits(self) -> list[str]:
        """Names of the splits (``train``, ``val``)."""
        return list(self._splits)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were encoded with (loaded once, then cached)."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.load(self._file(self._tokenizer_file.file))
        return self._tokenizer

    def tokens(self, split: str) -> int:
        """Total tokens of ``split``."""
        self._require(split)
        return self._tokens[split]

    def shards(self, split: str) -> list[Shard]:
        """The shards of ``split``, in stream order."""
        self._require(split)
        return list(self._splits[split])

    def shard_path(self, shard: Shard) -> Path:
        """Where a shard's file lies."""
        return self._file(shard.file)

    def _require(self, split: str) -> None:
        if split not in self._splits:
            raise DataError(f"no split {split!r} in {self.index_path}; have {self.splits}")


class TokenStream:
    """A split's shards seen as one logical 1-D token array, memory-mapped (nothing is read
    until sliced, so any number of workers can open it cheaply)."""

    def __init__(self, index: ShardIndex, split: str) -> None:
        self.index = index
        self.split = split
        self._arrays: list[np.ndarray] = []
        self._starts: list[int] = [0]  # start offset of each array, then the total length
        for shard in index.shards(split):
            if shard.tokens == 0:
                continue
            array = _open_shard(index.shard_path(shard), shard.tokens)
            self._arrays.append(array)
            self._starts.append(self._starts[-1] + len(array))

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the stored token ids."""
        return self.index.dtype

    def slice(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` as a new array, stitched across shard boundaries."""
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"slice [{start}, {end}) out of range for {len(self)} tokens")
        out = np.empty(end - start, dtype=self.dtype)
        k = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < end:
            base, array = self._starts[k], self._arrays[k]
            take = min(end, base + len(array)) - pos
            out[pos - start : pos - start + take] = array[pos - base : pos - base + take]
            pos += take
            k += 1
        return out


def _open_shard(path: Path, tokens: int) -> np.ndarray:
    """Memory-map one shard and check that it is the 1-D array the index says it is."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is corrupt or unreadable ({exc}): run `farflung prepare`") from exc
    if array.ndim != 1 or len(array) != tokens:
        raise DataError(f"{path} is corrupt: shape {array.shape}, index says {tokens} tokens")
    return array
