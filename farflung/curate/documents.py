"""Documents for the data pipeline: lenient, streaming readers cut into bounded pieces.

Formats: ``.txt`` (one document per file), ``.jsonl`` and ``.jsonl.gz`` (one per line,
text and id from configurable fields) and ``.parquet`` (one per row, read a row group
at a time with pyarrow), plus the ``bundled`` corpus. Sources are listed exactly as
``farflung prepare`` lists them (:func:`farflung.data.corpus.source_files`), so a
document missing an id is named ``<file>:<line>`` by both.

Unlike corpus.py's readers, which stop ``prepare`` at the first bad line, these never
stop a run: on a corpus of millions of web pages some bytes are always broken, and
one bad line must not throw away hours of work. Each bad document — bytes that are
not UTF-8, empty text, a line larger than ``max_doc_bytes``, a line that is not a
JSON object, a missing or non-string text field — is skipped and recorded in an
:class:`IssueLog` with its shard, file and line number.

A damaged *file* is skipped the same way, as one ``damaged-file`` issue naming the
file, the line and byte offset where its damage begins, and the reason; the other
files go on. Where the format allows, its readable part is kept: a truncated
``.jsonl.gz`` (or one whose deflate stream breaks off) keeps every complete line
before the damage. A gzip whose checksum (CRC or length) does not match is skipped
whole: its bytes decompress but some are wrong, and which ones is unknown. A
``.parquet`` that pyarrow cannot open is skipped whole; a row group that fails to
read ends its piece there. Planning finds the damage (it reads every jsonl and gzip
file once anyway) and plans a :class:`Piece` carrying it, so the report travels with
the shards into ``issues.jsonl`` and the step's summary like any bad document.

A file is cut into :class:`Piece` s of at most ``max_docs`` documents and
``max_bytes`` bytes (jsonl: byte ranges at line boundaries, jsonl.gz: line ranges,
parquet: runs of row groups), which the pipeline packs into shards. Reading a piece
holds one line or one row-group batch at a time, so memory is bounded by the piece
size, never by the file or the corpus.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from farflung.data.corpus import BUNDLED, Document, bundled_documents, source_files

FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
"""File types the pipeline reads from a path source."""

ISSUE_KINDS = ("not-utf8", "empty", "too-long", "bad-json", "no-text", "damaged-file")
"""What can be wrong with one input document (``damaged-file``: with a whole file or
the rest of it, from the line it names)."""

DAMAGED = "damaged-file"

_READ_ERRORS = (EOFError, zlib.error, OSError)  # gzip.BadGzipFile is an OSError

MAX_LISTED = 100
"""Issues kept in detail per shard (counts stay exact): a fully broken file must not
turn its report into a copy of itself."""

_BLOCK = 1 << 20  # read size when scanning for line boundaries


@dataclass(frozen=True)
class ReadOptions:
    """How input records map to documents."""

    text_field: str = "text"
    """JSON / parquet field holding the document text."""
    id_field: str = "id"
    """Field holding the document id; without it the id is ``<file>:<line>``."""
    max_doc_bytes: int = 32 << 20
    """Documents (lines) larger than this are skipped as ``too-long`` without being
    held in memory whole."""


@dataclass(frozen=True)
class Piece:
    """A run of consecutive documents of one input file, the unit packed into shards.

    ``start``/``stop`` are byte offsets for ``.jsonl``, line indices for ``.jsonl.gz``,
    row-group indices for ``.parquet`` and document indices for the bundled corpus;
    ``first_line`` is the 1-based line (row) number of its first record.
    """

    path: str
    file_id: str
    fmt: str
    start: int
    stop: int
    first_line: int
    docs: int
    nbytes: int
    version: str = ""
    """The file's size and modification time when planned: a changed file changes the
    piece, and so redoes the shards that read it."""
    damage: str = ""
    """Non-empty: the file is damaged from ``first_line`` on, for this reason; the piece
    holds no documents and reading it reports the damage (once)."""


class IssueLog:
    """Bad input met while reading one shard: exact counts by kind, the first
    :data:`MAX_LISTED` with shard, file, line and what was wrong."""

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.counts: Counter[str] = Counter()
        self.listed: list[dict[str, Any]] = []

    def add(self, file: str, line: int, kind: str, detail: str, count: int = 1) -> None:
        """Record ``count`` documents skipped for ``kind`` at ``file``:``line``."""
        self.counts[kind] += count
        if len(self.listed) < MAX_LISTED:
            self.listed.append(
                {"shard": self.shard, "file": file, "line": line, "kind": kind, "detail": detail}
            )

    @property
    def total(self) -> int:
        """Documents skipped."""
        return sum(self.counts.values())

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary, stored in the shard's done marker."""
        return {"counts": dict(self.counts), "listed": self.listed}


# ---------------------------------------------------------------------------- planning


def list_pieces(sources: list[str], max_docs: int, max_bytes: int) -> list[Piece]:
    """Every input file of ``sources`` cut into pieces of at most ``max_docs``
    documents and about ``max_bytes`` bytes (a single larger document is its own piece).

    Planning reads jsonl files once for their line boundaries (a fast scan for
    newlines, nothing is parsed) and parquet files for their footers only.
    """
    pieces: list[Piece] = []
    for source in sources:
        if source == BUNDLED:
            pieces += _bundled_pieces(max_docs, max_bytes)
            continue
        for path, file_id in source_files(source, FORMATS):
            pieces += file_pieces(path, file_id, max_docs, max_bytes)
    return pieces


def file_pieces(path: Path, file_id: str, max_docs: int, max_bytes: int) -> list[Piece]:
    """The pieces of one file, by its format; a damaged file's readable part, then a
    piece carrying the damage (:attr:`Piece.damage`)."""
    fmt = ".jsonl.gz" if path.name.endswith(".jsonl.gz") else path.suffix
    where = os.path.abspath(path)  # workers (and later steps) may run in another folder
    try:
        stat = path.stat()
    except OSError as exc:
        return [_damaged(where, file_id, fmt, 1, "", f"cannot read it ({exc.strerror})")]
    version = f"{stat.st_size}:{stat.st_mtime_ns}"
    if fmt == ".txt":
        return [Piece(where, file_id, fmt, 0, 1, 1, 1, stat.st_size, version)]
    damage = ""
    if fmt == ".parquet":
        try:
            bounds = _parquet_runs(path, max_docs, max_bytes)
        except (OSError, _arrow_error()) as exc:  # ArrowInvalid: "not a parquet file"
            detail = f"not a readable parquet file ({type(exc).__name__}: {exc}); skipped whole"
            return [_damaged(where, file_id, fmt, 1, version, detail)]
    else:
        found: list[tuple[str, bool]] = []
        opener = gzip.open if fmt == ".jsonl.gz" else open
        with opener(path, "rb") as f:
            lengths = _line_lengths(f, found, stat.st_size)
            bounds = _cut(lengths, max_docs, max_bytes, by_bytes=fmt == ".jsonl")
        if found:
            damage, keep = found[0]
            bounds = bounds if keep else []
    pieces = [Piece(where, file_id, fmt, *b, version) for b in bounds]
    if damage:
        line = 1 if not bounds else bounds[-1][2] + bounds[-1][3]
        pieces.append(_damaged(where, file_id, fmt, line, version, damage))
    return pieces


def _damaged(path: str, file_id: str, fmt: str, line: int, version: str, why: str) -> Piece:
    """A piece standing for the damaged rest of a file, from ``line`` on."""
    return Piece(path, file_id, fmt, 0, 0, line, 0, 0, version, damage=why)


def _line_lengths(f: IO[bytes], damage: list[tuple[str, bool]], size: int) -> Iterator[int]:
    """Byte length of each line of ``f`` (newline included), found by scanning blocks,
    so an enormous line costs no more memory than a block. A read error (a truncated or
    corrupt gzip, an I/O error) ends the lines: the partial line before it is dropped,
    and ``damage`` gets the reason with the offsets where it was met, and whether the
    lines before it may be kept."""
    pending = done = 0
    try:
        # read1: one decompression at a time, so the lines before damage all come out
        while block := f.read1(_BLOCK):
            pos = 0
            while (nl := block.find(b"\n", pos)) >= 0:
                yield pending + nl + 1 - pos
                pending, pos = 0, nl + 1
            pending += len(block) - pos
            done += len(block)
    except _READ_ERRORS as exc:
        damage.append(_read_error(f, exc, done - pending, size))
        return
    if pending:
        yield pending


def _read_error(f: IO[bytes], exc: BaseException, good: int, size: int) -> tuple[str, bool]:
    """What went wrong reading ``f`` and where (the file offset reached: a gzip's
    compressed offset, within its read-ahead), and whether the ``good`` bytes of
    complete lines before it may be kept."""
    raw = getattr(f, "fileobj", None)  # a GzipFile's underlying file
    try:
        offset = (raw or f).tell()
    except (OSError, ValueError):
        offset = size
    where = f"at byte {offset} of {size}"
    # gzip says a checksum failed only in its message ("CRC check failed", "Incorrect
    # length of data produced"); the data came out, but some of it is wrong
    if isinstance(exc, gzip.BadGzipFile) and any(w in str(exc) for w in ("CRC", "length")):
        return f"gzip checksum does not match ({exc}) {where}; skipped whole", False
    reason = f"truncated ({exc})" if isinstance(exc, EOFError) else f"{type(exc).__name__}: {exc}"
    return f"{reason} {where}; the complete lines before it ({good} bytes) are kept", True


def _cut(
    lengths: Iterator[int], max_docs: int, max_bytes: int, by_bytes: bool
) -> list[tuple[int, int, int, int, int]]:
    """Group consecutive lines into ``(start, stop, first_line, docs, nbytes)`` runs
    bounded by ``max_docs`` lines and ``max_bytes`` bytes; start/stop are byte offsets
    (``by_bytes``) or line indices."""
    runs = []
    pos = line = start_pos = start_line = 0
    for n in lengths:
        pos += n
        line += 1
        if line - start_line >= max_docs or pos - start_pos >= max_bytes:
            runs.append(_run(start_pos, pos, start_line, line, by_bytes))
            start_pos, start_line = pos, line
    if line > start_line:
        runs.append(_run(start_pos, pos, start_line, line, by_bytes))
    return runs


def _run(pos0: int, pos1: int, line0: int, line1: int, by_bytes: bool) -> tuple:
    start, stop = (pos0, pos1) if by_bytes else (line0, line1)
    return (start, stop, line0 + 1, line1 - line0, pos1 - pos0)


def _parquet_runs(path: Path, max_docs: int, max_bytes: int) -> list[tuple]:
    """Runs of whole row groups (the smallest unit parquet reads efficiently), from the
    footer alone."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    runs, first, row = [], 0, 0
    docs = nbytes = 0
    for i, group in enumerate(groups):
        docs += group.num_rows
        nbytes += group.total_byte_size
        if docs >= max_docs or nbytes >= max_bytes or i == len(groups) - 1:
            runs.append((first, i + 1, row + 1, docs, nbytes))
            first, row, docs, nbytes = i + 1, row + docs, 0, 0
    return runs


def _bundled_pieces(max_docs: int, max_bytes: int) -> list[Piece]:
    sizes = (len(doc.text.encode("utf-8")) for doc in bundled_documents())
    return [Piece("", BUNDLED, BUNDLED, *b) for b in _cut(sizes, max_docs, max_bytes, False)]


# ---------------------------------------------------------------------------- reading


def read_piece(piece: Piece, opts: ReadOptions, issues: IssueLog) -> Iterator[Document]:
    """The good documents of ``piece``; bad ones are skipped into ``issues``, and so is
    the rest of the piece when its file fails to read (damaged since it was planned)."""
    if piece.damage:
        issues.add(piece.file_id, piece.first_line, DAMAGED, piece.damage)
        return
    try:
        yield from _read_piece(piece, opts, issues)
    except (*_READ_ERRORS, _arrow_error()) as exc:
        issues.add(piece.file_id, piece.first_line, DAMAGED, f"{type(exc).__name__}: {exc}")


def _arrow_error() -> type[Exception]:
    """pyarrow's base error (a corrupt parquet row group), imported when needed."""
    import pyarrow as pa

    return pa.ArrowException


def _read_piece(piece: Piece, opts: ReadOptions, issues: IssueLog) -> Iterator[Document]:
    if piece.fmt == ".txt":
        yield from _txt_documents(piece, opts, issues)
    elif piece.fmt == ".jsonl":
        with open(piece.path, "rb") as f:
            f.seek(piece.start)
            yield from _jsonl_documents(f, piece, opts, issues)
    elif piece.fmt == ".jsonl.gz":
        with gzip.open(piece.path, "rb") as f:
            for _ in itertools.islice(_lines(f, opts.max_doc_bytes), piece.start):
                pass  # gzip cannot seek: decompress and drop the lines before the piece
            yield from _jsonl_documents(f, piece, opts, issues)
    elif piece.fmt == ".parquet":
        yield from _parquet_documents(piece, opts, issues)
    elif piece.fmt == BUNDLED:
        docs = itertools.islice(bundled_documents(), piece.start, piece.stop)
        for line, doc in enumerate(docs, start=piece.first_line):
            if checked := _check(doc.text, doc.id, piece.file_id, line, opts, issues):
                yield checked
    else:
        raise ValueError(f"unknown piece format {piece.fmt!r}")


def _lines(f: IO[bytes], max_line: int) -> Iterator[tuple[int, bytes | None]]:
    """``(bytes consumed, line)`` for each line of ``f``; ``None`` stands for a line
    longer than ``max_line``, which is skipped in blocks instead of read whole."""
    while line := f.readline(max_line + 1):
        if len(line) <= max_line or line.endswith(b"\n"):
            yield len(line), line
            continue
        consumed = len(line)
        while chunk := f.readline(_BLOCK):
            consumed += len(chunk)
            if chunk.endswith(b"\n"):
                break
        yield consumed, None


def _jsonl_documents(
    f: IO[bytes], piece: Piece, opts: ReadOptions, issues: IssueLog
) -> Iterator[Document]:
    """The documents of ``piece``'s lines, read from ``f`` positioned at its start."""
    by_bytes = piece.fmt == ".jsonl"
    budget = piece.stop - piece.start
    used = 0
    for line_no, (n, raw) in enumerate(_lines(f, opts.max_doc_bytes), start=piece.first_line):
        used += n if by_bytes else 1
        doc = _jsonl_document(raw, piece.file_id, line_no, opts, issues)
        if doc is not None:
            yield doc
        if used >= budget:
            return


def _jsonl_document(
    raw: bytes | None, file_id: str, line: int, opts: ReadOptions, issues: IssueLog
) -> Document | None:
    """One JSON line as a document, or None (blank lines are skipped silently)."""
    if raw is None:
        issues.add(file_id, line, "too-long", f"line longer than {opts.max_doc_bytes} bytes")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        issues.add(file_id, line, "not-utf8", f"{exc.reason} at byte {exc.start} of the line")
        return None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        issues.add(file_id, line, "bad-json", exc.msg)
        return None
    if not isinstance(record, dict):
        issues.add(file_id, line, "bad-json", f"a JSON {type(record).__name__}, not an object")
        return None
    if opts.text_field not in record:
        issues.add(file_id, line, "no-text", f"no {opts.text_field!r} field")
        return None
    return _check(record[opts.text_field], record.get(opts.id_field), file_id, line, opts, issues)


def _txt_documents(piece: Piece, opts: ReadOptions, issues: IssueLog) -> Iterator[Document]:
    path = Path(piece.path)
    if path.stat().st_size > opts.max_doc_bytes:
        issues.add(piece.file_id, 1, "too-long", f"file larger than {opts.max_doc_bytes} bytes")
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        issues.add(piece.file_id, line, "not-utf8", f"{exc.reason} at byte {exc.start}")
        return
    if doc := _check(text, piece.file_id, piece.file_id, 1, opts, issues):
        yield doc


def _parquet_documents(piece: Piece, opts: ReadOptions, issues: IssueLog) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    names = pf.schema_arrow.names
    if opts.text_field not in names:
        detail = f"no {opts.text_field!r} column (has {', '.join(names)})"
        issues.add(piece.file_id, piece.first_line, "no-text", detail, count=piece.docs)
        return
    columns = [opts.text_field] + ([opts.id_field] if opts.id_field in names else [])
    row = piece.first_line
    groups = list(range(piece.start, piece.stop))
    for batch in pf.iter_batches(batch_size=1024, row_groups=groups, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        for text, raw_id in zip(texts, ids, strict=True):
            if isinstance(text, bytes):  # a binary column: decode like a jsonl line
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    issues.add(piece.file_id, row, "not-utf8", f"{exc.reason} at byte {exc.start}")
                    row += 1
                    continue
            if doc := _check(text, raw_id, piece.file_id, row, opts, issues):
                yield doc
            row += 1


def _check(
    text: Any, raw_id: Any, file_id: str, line: int, opts: ReadOptions, issues: IssueLog
) -> Document | None:
    """A document from a text value and an id value, or None with the reason recorded."""
    if not isinstance(text, str):
        what = "null" if text is None else type(text).__name__
        issues.add(file_id, line, "no-text", f"{opts.text_field!r} is {what}, not a string")
        return None
    if len(text) > opts.max_doc_bytes:
        issues.add(file_id, line, "too-long", f"text longer than {opts.max_doc_bytes} chars")
        return None
    if not text.strip():
        issues.add(file_id, line, "empty", "no text")
        return None
    try:
        text.encode("utf-8")  # JSON escapes such as "\ud800" decode to lone surrogates
    except UnicodeEncodeError as exc:
        issues.add(file_id, line, "not-utf8", f"{exc.reason} at character {exc.start}")
        return None
    return Document(id=_doc_id(raw_id, file_id, line), text=text)


def _doc_id(raw_id: Any, file_id: str, line: int) -> str:
    """The record's own id when it has one (strings as they are, numbers as text)."""
    if raw_id is None or isinstance(raw_id, bool) or raw_id == "":
        return f"{file_id}:{line}"
    return raw_id if isinstance(raw_id, str) else json.dumps(raw_id)
