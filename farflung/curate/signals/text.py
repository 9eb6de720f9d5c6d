"""The one parse of a document that every signal reads: code points, lines, tokens, words.

This is farflung's own implementation of RedPajama-v2's document model
(``app/src/core/document.py`` and ``utilities/text`` in togethercomputer/RedPajama-Data),
computed over numpy arrays of code points instead of Python lists of strings:

* **Raw lines** are the matches of ``[^\\n]*\\n|[^\\n]+$``: every line keeps its ``\\n``,
  a last line without one counts, and the empty string after a final ``\\n`` does not.
  Line-level signals report ``[start, end)`` character offsets of these lines.
* **Raw words** are NLTK ``WordPunctTokenizer`` tokens, i.e. the matches of
  ``\\w+|[^\\w\\s]+``: runs of word characters and runs of other non-space characters.
* **Normalised text** deletes ``string.punctuation``, lowercases, strips, collapses
  whitespace to one space and applies NFD; **normalised words** are its ``split()``.
  Every step maps ``\\n`` to itself, so the normalised text's lines line up with the
  raw lines one for one (RedPajama-v2 normalises each line on its own; the result is
  the same, and tests/test_signals.py checks it).
"""

from __future__ import annotations

import string
import unicodedata
from functools import cached_property

import numpy as np

from farflung.curate.signals.arrays import group, runs
from farflung.curate.signals.chars import (
    ASCII_PUNCT,
    SPACE,
    WORD,
    code_points,
    flags_of,
    text_of,
)
from farflung.curate.signals.hashing import LONG_RUN, run_hashes

_DELETE_PUNCT = str.maketrans("", "", string.punctuation)
_ASCII_LOWER = np.arange(128, dtype=np.uint8)
_ASCII_LOWER[ord("A") : ord("Z") + 1] += 32


def raw_lines(cp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of RedPajama-v2's lines: each ends after its ``\\n``."""
    ends = np.flatnonzero(cp == 10) + 1
    if cp.size and cp[-1] != 10:
        ends = np.append(ends, cp.size)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return starts[: ends.size], ends


def word_punct_tokens(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the ``\\w+|[^\\w\\s]+`` tokens: runs of one non-space class."""
    # class 0 = space, 1 = word character, 2 = any other character
    cls = np.zeros(flags.size + 2, dtype=np.int8)
    cls[1:-1] = (2 - (flags & WORD).astype(np.int8)) * ((flags & SPACE) == 0)
    bounds = np.flatnonzero(cls[1:] != cls[:-1])
    starts, ends = bounds[:-1], bounds[1:]
    keep = cls[starts + 1] != 0
    return starts[keep], ends[keep]


def normalize(text: str, cp: np.ndarray, flags: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Code points of the normalised text before whitespace is collapsed, and the str if made.

    Collapsing and stripping whitespace is left to the word and line code, which only
    ever look at runs of non-space characters: that keeps one array for the whole
    document. ASCII needs no str at all: deleting punctuation and lowercasing are
    per-byte maps, and NFD leaves ASCII unchanged.
    """
    if cp.dtype == np.uint8:
        return _ASCII_LOWER[cp[(flags & ASCII_PUNCT) == 0]], None
    norm = unicodedata.normalize("NFD", text.translate(_DELETE_PUNCT).lower())
    return code_points(norm), norm


class ParsedDoc:
    """A document split every way the signals need, computed once and shared."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.cp = code_points(text)
        self.flags = flags_of(self.cp)
        self.line_starts, self.line_ends = raw_lines(self.cp)
        self.tok_starts, self.tok_ends = word_punct_tokens(self.flags)
        self.norm_cp, self._norm_text = normalize(text, self.cp, self.flags)
        self.norm_flags = flags_of(self.norm_cp)
        self.word_starts, self.word_ends = runs((self.norm_flags & SPACE) == 0)
        self.word_lengths = self.word_ends - self.word_starts
        # line k of the normalised text is line k of the raw text (see the module doc)
        self.norm_newlines = np.flatnonzero(self.norm_cp == 10)
        self.word_line = np.searchsorted(self.norm_newlines, self.word_starts)

    @property
    def n_lines(self) -> int:
        return int(self.line_starts.size)

    @property
    def n_tokens(self) -> int:
        return int(self.tok_starts.size)

    @property
    def n_words(self) -> int:
        return int(self.word_starts.size)

    @property
    def norm_text(self) -> str:
        """The normalised text (whitespace not yet collapsed), made on first use."""
        if self._norm_text is None:
            self._norm_text = text_of(self.norm_cp)
        return self._norm_text

    def word(self, i: int) -> str:
        """Normalised word ``i`` as a str (for the rare exact checks)."""
        return self.norm_text[self.word_starts[i] : self.word_ends[i]]

    @cached_property
    def token_hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """Two stable hashes of every raw token (stop words, DSIR features)."""
        return run_hashes(self.cp, self.tok_starts, self.tok_ends)

    @cached_property
    def word_hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """Two stable hashes of every normalised word."""
        return run_hashes(self.norm_cp, self.word_starts, self.word_ends)

    @cached_property
    def word_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, counts)``: equal words get equal dense ids; ``counts[id]`` occurrences."""
        if self.n_words == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        h1, h2 = self.word_hashes
        ids, counts, _ = group(h1)
        # h1 alone decides the ids; h2 and the lengths must agree within every id, or
        # two different words shared an h1, and the exact (slower) path decides instead.
        check_h2 = np.zeros(counts.size, dtype=h2.dtype)
        check_len = np.zeros(counts.size, dtype=self.word_lengths.dtype)
        check_h2[ids] = h2
        check_len[ids] = self.word_lengths
        consistent = np.array_equal(check_h2[ids], h2) and np.array_equal(
            check_len[ids], self.word_lengths
        )
        if consistent and int(self.word_lengths.max()) < LONG_RUN:
            return ids, counts
        return self._exact_word_ids()

    def _exact_word_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Word ids from the words themselves: exact, for documents with giant words."""
        words = self.norm_text.split()
        index: dict[str, int] = {}
        ids = np.fromiter(
            (index.setdefault(w, len(index)) for w in words), dtype=np.int64, count=len(words)
        )
        return ids, np.bincount(ids, minlength=len(index))
