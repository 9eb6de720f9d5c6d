"""Token shards: turn a corpus into checksummed ``.npy`` files of token ids, and read them back.

On disk a prepared data folder holds ``tokenizer.json`` (with ``tokenizer_config.json``
and ``chat_template.jinja`` when an existing Hugging Face tokenizer has them), shards
``train_0000.npy``, ``val_0000.npy``, ... (1-D arrays of token ids, documents separated
by the end-of-text id), for instruction data loss-mask shards ``train_mask_0000.npy``,
... beside them, and ``index.json``, which lists every file with its sha256. The index
is written last, and removed first when preparing again, so a folder with an index is
always complete. See docs/data.md for the format.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from farflung.data.corpus import Document, iter_documents
from farflung.data.errors import DataError
from farflung.data.tokenizer import (
    CONFIG_FILE,
    MIN_VOCAB,
    TEMPLATE_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerFiles,
    tokenizer_files,
    train_tokenizer,
)

FORMAT = 1
"""Version of the on-disk layout; bumped when index.json changes incompatibly (optional
keys such as a split's ``masks`` are not: readers that predate them never see them)."""

INDEX_FILE = "index.json"
SPLITS = ("train", "val")
_SHARD_NAME = re.compile(r"^(train|val)(_mask)?_\d+\.npy$")
_COMPANIONS = {"tokenizer_config": CONFIG_FILE, "chat_template": TEMPLATE_FILE}
"""index.json keys of the optional tokenizer files, and the names they are copied to."""

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
    tokenizer: str | os.PathLike | None = None,
) -> ShardIndex:
    """Read ``sources``, train a tokenizer on the train split (or copy ``tokenizer``, a
    Hugging Face folder or tokenizer.json, to fine-tune a checkpoint with its own) and
    write token shards, plus loss-mask shards when there are prompt/response records.

    The corpus is read up to three times, streaming: once to list document ids (deciding
    the split and finding bad input before any slow work), once to train the tokenizer
    on training documents only (validation text must not shape the vocabulary), and
    once to encode. Every file is written to a temp name and renamed; ``index.json``
    comes last.
    """
    _check_prepare_args(vocab_size if tokenizer is None else None, val_fraction, shard_tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A half-rewritten folder must not look prepared if this run is interrupted.
    (out / INDEX_FILE).unlink(missing_ok=True)

    lengths, n_scanned, n_pairs = _scan(sources, progress)
    val = assign_val(lengths, val_fraction, seed)
    if tokenizer is None:
        tok, files = _new_tokenizer(sources, val, lengths, vocab_size, out, progress)
    else:
        tok, files = _copy_tokenizer(tokenizer, out)

    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    writers = {
        split: _ShardWriter(out, split, shard_tokens, dtype, masks=n_pairs > 0) for split in SPLITS
    }
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
        **_tokenizer_entries(files),
        "splits": {split: w.finish() for split, w in writers.items()},
    }
    write_json(out / INDEX_FILE, index)
    _remove_stale_files(out, index)
    # Hashes were just taken from the files themselves; no need to read them again.
    return ShardIndex.load(out, verify=False)


def _check_prepare_args(vocab_size: int | None, val_fraction: float, shard_tokens: int) -> None:
    """Reject arguments that would fail late or silently produce nonsense (``vocab_size``
    None: an existing tokenizer is used, so there is none to check)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if vocab_size is None:
        return
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + end-of-text)")
    if vocab_size > 1 << 32:
        raise DataError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def _new_tokenizer(
    sources: list[str],
    val: set[str],
    lengths: dict[str, int],
    vocab_size: int,
    out: Path,
    progress: bool,
) -> tuple[Tokenizer, TokenizerFiles]:
    """Train a tokenizer on the training documents of ``sources`` (``lengths``: characters
    per document id, for the progress bar) and save it into ``out``."""
    train_chars = sum(n for doc_id, n in lengths.items() if doc_id not in val)
    tok = train_tokenizer(_train_texts(sources, val, train_chars, progress), vocab_size)
    tok.save(out / TOKENIZER_FILE)
    return tok, TokenizerFiles(out / TOKENIZER_FILE)


def _copy_tokenizer(source: str | os.PathLike, out: Path) -> tuple[Tokenizer, TokenizerFiles]:
    """Load an existing tokenizer (failing before anything is copied) and copy its files
    into ``out`` byte for byte: training compares the sha256 of the data's tokenizer.json
    with the model's to catch data encoded with another tokenizer."""
    files = tokenizer_files(source)
    tok = Tokenizer.from_files(files.tokenizer, files.config, files.chat_template)
    copied = TokenizerFiles(
        _copy_file(files.tokenizer, out / TOKENIZER_FILE),
        files.config and _copy_file(files.config, out / CONFIG_FILE),
        files.chat_template and _copy_file(files.chat_template, out / TEMPLATE_FILE),
    )
    return tok, copied


def _copy_file(src: Path, dst: Path) -> Path:
    """Copy atomically (temp file, fsync, rename); a file onto itself is left alone."""
    if dst.exists() and dst.samefile(src):
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return dst


def _tokenizer_entries(files: TokenizerFiles) -> dict[str, dict[str, str]]:
    """index.json's ``tokenizer`` entry, plus one per companion file that exists."""
    entries = {"tokenizer": _file_entry(files.tokenizer)}
    for key, path in (("tokenizer_config", files.config), ("chat_template", files.chat_template)):
        if path is not None:
            entries[key] = _file_entry(path)
    return entries


def _file_entry(path: Path) -> dict[str, str]:
    return {"file": path.name, "sha256": sha256_file(path)}


def _scan(sources: list[str], progress: bool) -> tuple[dict[str, int], int, int]:
    """Characters per document id, the document count and the prompt/response count
    (first pass: cheap, fails early, and tells whether loss masks are needed)."""
    lengths: dict[str, int] = {}
    n_docs = n_pairs = 0
    bar = tqdm(desc="reading corpus", unit=" docs", disable=not progress)
    with bar:
        for doc in iter_documents(sources):
            # A repeated id (a file listed twice) keeps one split for all its copies.
            lengths[doc.id] = lengths.get(doc.id, 0) + doc.chars
            n_docs += 1
            n_pairs += doc.prompt is not None
            bar.update(1)
    if not lengths:
        raise DataError(f"no documents found in sources {sources}")
    return lengths, n_docs, n_pairs


def _train_texts(sources: list[str], val: set[str], total: int, progress: bool) -> Iterator[str]:
    """Texts of training documents, streamed to the tokenizer trainer with a progress bar.
    A prompt and its response go separately: no merge should span the two."""
    with tqdm(
        total=total, desc="training tokenizer", unit="char", unit_scale=True, disable=not progress
    ) as bar:
        for doc in iter_documents(sources):
            if doc.id not in val:
                bar.update(doc.chars)
                if doc.prompt is not None:
                    yield doc.prompt
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
            batch_chars += doc.chars
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
    """Encode one batch in parallel and append each document, in corpus order, to its
    split: a plain document's ids plus ``eot_id`` (all trained on), or a pair's prompt
    ids (not trained on) and response ids ending with ``eot_id`` (trained on)."""
    plain = [k for k, d in enumerate(batch) if d.prompt is None]
    pairs = [k for k, d in enumerate(batch) if d.prompt is not None]
    parts: dict[int, tuple[list[int], list[int]]] = {}
    if plain:
        for k, ids in zip(plain, tok.encode_batch([batch[k].text for k in plain]), strict=True):
            parts[k] = ([], [*ids, tok.eot_id])
    if pairs:
        encoded = tok.encode_pairs([(batch[k].prompt or "", batch[k].text) for k in pairs])
        parts.update(zip(pairs, encoded, strict=True))
    for k, doc in enumerate(batch):
        writers["val" if doc.id in val else "train"].add(*parts[k])


class _ShardWriter:
    """Cuts one split's token stream into shard files of exactly ``shard_tokens`` (last:
    fewer), and with ``masks`` the loss mask into shards of the same lengths beside them."""

    def __init__(
        self, out: Path, split: str, shard_tokens: int, dtype: np.dtype, masks: bool = False
    ) -> None:
        self.out = out
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.masks = masks
        self.shards: list[Shard] = []
        self.mask_shards: list[Shard] = []
        self.documents = 0
        self._parts: list[np.ndarray] = []
        self._mask_parts: list[np.ndarray] = []
        self._buffered = 0

    def add(self, prompt: list[int], target: list[int]) -> None:
        """Buffer one document — ``prompt`` ids (mask 0) then ``target`` ids (mask 1) —
        writing full shards as soon as there are enough."""
        self.documents += 1
        tokens = np.empty(len(prompt) + len(target), dtype=self.dtype)
        tokens[: len(prompt)] = prompt
        tokens[len(prompt) :] = target
        self._parts.append(tokens)
        if self.masks:
            mask = np.ones(len(tokens), dtype=np.uint8)
            mask[: len(prompt)] = 0
            self._mask_parts.append(mask)
        self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def finish(self) -> dict:
        """Write the remainder and return the split's index entry."""
        if self._buffered:
            self._flush(self._buffered)
        entry = {
            "tokens": sum(s.tokens for s in self.shards),
            "documents": self.documents,
            "shards": [asdict(s) for s in self.shards],
        }
        if self.masks:
            entry["masks"] = [asdict(s) for s in self.mask_shards]
        return entry

    def _flush(self, n: int) -> None:
        """Write the first ``n`` buffered tokens (and mask values) as the next shard."""
        k = len(self.shards)
        self._parts, head = _take(self._parts, n)
        self.shards.append(_save_array(self.out, f"{self.split}_{k:04d}.npy", head))
        if self.masks:
            self._mask_parts, head = _take(self._mask_parts, n)
            self.mask_shards.append(_save_array(self.out, f"{self.split}_mask_{k:04d}.npy", head))
        self._buffered -= n


def _take(parts: list[np.ndarray], n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The first ``n`` elements of buffered ``parts`` and the parts left after them."""
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    rest = data[n:]
    return ([rest] if len(rest) else []), data[:n]


def _save_array(out: Path, name: str, array: np.ndarray) -> Shard:
    """``np.save`` atomically and return the file's index entry."""
    path = out / name
    tmp = path.with_name(name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return Shard(file=name, tokens=len(array), sha256=digest)


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


def _remove_stale_files(out: Path, index: dict) -> None:
    """Delete files left by an earlier preparation of the same folder: shards and masks
    of a larger one, and tokenizer companions an existing tokenizer brought (a stale
    tokenizer_config.json would otherwise sit beside a tokenizer it does not belong to)."""
    listed = {
        s["file"]
        for split in index["splits"].values()
        for s in [*split["shards"], *split.get("masks", [])]
    }
    listed |= {index[key]["file"] for key in _COMPANIONS if key in index}
    for path in out.iterdir():
        stale = _SHARD_NAME.match(path.name) or path.name in _COMPANIONS.values()
        if stale and path.name not in listed:
            path.unlink()


# ---------------------------------------------------------------------------- reading


class ShardIndex:
    """A prepared data folder: its index.json, checked against the files it lists."""

    def __init__(self, data_dir: Path, meta: dict) -> None:
        self._dir = data_dir
        self._meta = meta
        self._tokenizer: Tokenizer | None = None
        try:
            splits = meta["splits"]
            self._splits = {name: _shards(split["shards"]) for name, split in splits.items()}
            self._masks = {
                name: _shards(split["masks"]) for name, split in splits.items() if "masks" in split
            }
            self._tokens = {name: int(split["tokens"]) for name, split in splits.items()}
            self._tokenizer_file = _file_shard(meta["tokenizer"])
            self._companions = {k: _file_shard(meta[k]) for k in _COMPANIONS if k in meta}
            self._vocab_size = int(meta["vocab_size"])
            self._dtype = np.dtype(meta["dtype"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{self.index_path} is malformed ({exc!r}): run `farflung prepare`"
            ) from exc
        for name, shards in self._splits.items():
            if sum(s.tokens for s in shards) != self._tokens[name]:
                raise DataError(f"{self.index_path}: {name} token count does not match its shards")
        self._check_masks_align()

    def _check_masks_align(self) -> None:
        """Masks, when present, cover every split shard for shard: a mask that does not
        line up with its tokens would silently train on the wrong ones."""
        if not self._masks:
            return
        for name, shards in self._splits.items():
            masks = self._masks.get(name)
            if masks is None or [m.tokens for m in masks] != [s.tokens for s in shards]:
                raise DataError(
                    f"{self.index_path}: the {name} loss masks do not match its token shards: "
                    "run `farflung prepare` again"
                )

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
        entries = [
            self._tokenizer_file,
            *self._companions.values(),
            *(s for ss in self._splits.values() for s in ss),
            *(m for ms in self._masks.values() for m in ms),
        ]
        for entry in entries:
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

    @property
    def has_masks(self) -> bool:
        """Whether loss masks lie beside the shards (the data has prompt/response records)."""
        return bool(self._masks)

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were encoded with (loaded once, then cached), from the
        files the index lists only: a stray tokenizer_config.json cannot change it."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_files(
                self._file(self._tokenizer_file.file),
                self._companion("tokenizer_config"),
                self._companion("chat_template"),
            )
        return self._tokenizer

    def _companion(self, key: str) -> Path | None:
        return self._file(self._companions[key].file) if key in self._companions else None

    def tokenizer_files(self) -> list[Path]:
        """tokenizer.json and the companions listed with it: what a run folder or an
        exported model needs to reproduce this data's tokenization."""
        entries = [self._tokenizer_file, *self._companions.values()]
        return [self._file(e.file) for e in entries]

    def tokens(self, split: str) -> int:
        """Total tokens of ``split``."""
        self._require(split)
        return self._tokens[split]

    def shards(self, split: str) -> list[Shard]:
        """The shards of ``split``, in stream order."""
        self._require(split)
        return list(self._splits[split])

    def masks(self, split: str) -> list[Shard]:
        """The loss-mask shards of ``split`` (aligned with :meth:`shards`); [] without."""
        self._require(split)
        return list(self._masks.get(split, []))

    def shard_path(self, shard: Shard) -> Path:
        """Where a shard's file lies."""
        return self._file(shard.file)

    def _require(self, split: str) -> None:
        if split not in self._splits:
            raise DataError(f"no split {split!r} in {self.index_path}; have {self.splits}")


class TokenStream:
    """A split's shards seen as one logical 1-D token array, memory-mapped (nothing is read
    until sliced, so any number of workers can open it cheaply); with its loss mask, when
    the folder has one, as a second array of the same length."""

    def __init__(self, index: ShardIndex, split: str) -> None:
        self.index = index
        self.split = split
        self._tokens = _Chain(
            [_open_shard(index.shard_path(s), s.tokens) for s in index.shards(split)]
        )
        masks = index.masks(split)
        self._mask = (
            _Chain([_open_shard(index.shard_path(m), m.tokens, np.uint8) for m in masks])
            if masks
            else None
        )

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def dtype(self) -> np.dtype:
        """Dtype of the stored token ids."""
        return self.index.dtype

    @property
    def has_mask(self) -> bool:
        """Whether a loss mask comes with the tokens."""
        return self._mask is not None

    def slice(self, start: int, end: int) -> np.ndarray:
        """Tokens ``[start, end)`` as a new array, stitched across shard boundaries."""
        return self._tokens.slice(start, end, self.dtype)

    def mask_slice(self, start: int, end: int) -> np.ndarray:
        """Loss-mask values (uint8, 1 = a training target) of tokens ``[start, end)``."""
        if self._mask is None:
            raise DataError(f"the {self.split!r} split of {self.index.dir} has no loss mask")
        return self._mask.slice(start, end, np.dtype(np.uint8))


class _Chain:
    """Arrays read as one: slices stitched across their boundaries."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._arrays = [a for a in arrays if len(a)]
        self._starts = [0]  # start offset of each array, then the total length
        for array in self._arrays:
            self._starts.append(self._starts[-1] + len(array))

    def __len__(self) -> int:
        return self._starts[-1]

    def slice(self, start: int, end: int, dtype: np.dtype) -> np.ndarray:
        if not 0 <= start <= end <= len(self):
            raise IndexError(f"slice [{start}, {end}) out of range for {len(self)} tokens")
        out = np.empty(end - start, dtype=dtype)
        k = bisect.bisect_right(self._starts, start) - 1
        pos = start
        while pos < end:
            base, array = self._starts[k], self._arrays[k]
            take = min(end, base + len(array)) - pos
            out[pos - start : pos - start + take] = array[pos - base : pos - base + take]
            pos += take
            k += 1
        return out


def _shards(entries: list[dict]) -> list[Shard]:
    return [Shard(str(e["file"]), int(e["tokens"]), str(e["sha256"])) for e in entries]


def _file_shard(entry: dict) -> Shard:
    """A non-shard file of the index (tokenizer and companions): name and checksum."""
    return Shard(str(entry["file"]), 0, str(entry["sha256"]))


def _open_shard(path: Path, tokens: int, dtype: type | None = None) -> np.ndarray:
    """Memory-map one shard and check that it is the 1-D array the index says it is
    (and, for a mask, that it holds uint8)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is corrupt or unreadable ({exc}): run `farflung prepare`") from exc
    if array.ndim != 1 or len(array) != tokens:
        raise DataError(f"{path} is corrupt: shape {array.shape}, index says {tokens} tokens")
    if dtype is not None and array.dtype != dtype:
        raise DataError(f"{path} is corrupt: dtype {array.dtype}, expected {np.dtype(dtype)}")
    return array
