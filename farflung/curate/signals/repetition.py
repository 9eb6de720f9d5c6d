"""Repetition signals: word n-grams (RedPajama-v2's ``repetitions.py``) and Gopher's
duplicated lines and paragraphs (a farflung addition).

Word n-grams: farflung's own implementation of RedPajama-v2's definitions, over the
normalised words.

* ``rps_doc_frac_chars_top_{2,3,4}gram``: characters of the most frequent n-gram
  (its words' lengths, times its count) over all word characters; 0 when no n-gram
  occurs twice. Ties go to the n-gram seen first, as ``Counter.most_common`` does.
* ``rps_doc_frac_chars_dupe_{5..10}grams``: characters of the words covered by any
  n-gram that occurs more than once, each word counted once, over all word characters.

Both only ever look at n-grams that occur twice, and an n-gram can only occur twice if
both of its (n-1)-grams do, so each size is computed from the previous size's
duplicated positions only: one sort of shrinking candidate sets instead of a Counter
of every n-gram for nine values of n.

Lines and paragraphs: RedPajama-v2 does not publish these; they follow Gopher (Rae et
al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training Gopher",
appendix A, Table A1), read as datatrove's Gopher repetition filter reads them: lines
are ``text`` split at runs of newlines (so blank lines are not lines, and a document of
distinct paragraphs has no duplicate lines), paragraphs are ``text.strip()`` split at
two or more newlines; a line or paragraph is a duplicate when it equals an *earlier* one; the
fractions are duplicates over all lines (paragraphs), and characters of duplicates over
the characters of the whole text. Rounded and named like the RedPajama-v2 signals.
"""

from __future__ import annotations

import re

import numpy as np

from farflung.curate.signals.arrays import group
from farflung.curate.signals.spans import Spans, doc_span, ratio, rounded
from farflung.curate.signals.text import ParsedDoc

TOP_SIZES = (2, 3, 4)
DUPE_SIZES = (5, 6, 7, 8, 9, 10)
NGRAM_NAMES = tuple(f"rps_doc_frac_chars_top_{n}gram" for n in TOP_SIZES) + tuple(
    f"rps_doc_frac_chars_dupe_{n}grams" for n in DUPE_SIZES
)
GOPHER_NAMES = (
    "rps_doc_frac_dupe_lines",
    "rps_doc_frac_chars_dupe_lines",
    "rps_doc_frac_dupe_paragraphs",
    "rps_doc_frac_chars_dupe_paragraphs",
    "rps_doc_gopher_stop_words",
)
_PARAGRAPH_BREAK = re.compile(r"\n{2,}")
_LINE_BREAKS = re.compile(r"\n+")
# Gopher's quality filter (Rae et al. 2021, A.1.1) keeps documents holding at least two
# of these eight words; RedPajama-v2 has no signal for it (its stop-word fraction uses
# a 570-word list), so this one is a farflung addition. Matched case-insensitively
# between non-alphanumerics (so Markdown's "_the_" counts); the score is how many of
# the eight occur.
_GOPHER_STOP_WORDS = re.compile(
    r"(?<![^\W_])(?:the|be|to|of|and|that|have|with)(?![^\W_])", re.IGNORECASE
)


def _next_size(
    at: np.ndarray, ids: np.ndarray, words: np.ndarray, n_distinct: int, size: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """The duplicated ``size``-grams, from the duplicated ``size-1``-grams.

    ``at`` holds the sorted start positions of the duplicated ``size-1``-grams and
    ``ids`` their ids. Returns the same for ``size``, and ``(start, count)`` of the most
    frequent ``size``-gram (None when none repeats). An n-gram's code is (id of its
    first n-1 words) * (distinct words) + (id of its last word): distinct n-grams get
    distinct codes, and :func:`group` makes them dense ids again.
    """
    follows = at[1:] == at[:-1] + 1  # the size-gram at i needs both (size-1)-grams
    start, prefix = at[:-1][follows], ids[:-1][follows]
    if start.size == 0:
        return start, prefix, None
    new_ids, counts, first = group(prefix * n_distinct + words[start + size - 1])
    repeated = counts[new_ids] > 1
    best = int(counts.max())
    top = None
    if best > 1:
        # every occurrence of a repeated n-gram is among the candidates, so the first
        # candidate of a group is the n-gram's first occurrence, as Counter sees it
        tied = np.flatnonzero(counts == best)
        top = (int(start[first[tied]].min()), best)
    return start[repeated], new_ids[repeated], top


def _covered_chars(at: np.ndarray, size: int, char_ends: np.ndarray) -> int:
    """Characters of the words in the union of the ``size``-grams starting at ``at``.

    ``char_ends`` is the cumulative word length (0 first); each n-gram adds its
    characters up to where the next one starts, the last one all of its own.
    """
    stop = np.minimum(np.append(at[1:], at[-1] + size), at + size)
    return int((char_ends[stop] - char_ends[at]).sum())


def ngram_signals(doc: ParsedDoc) -> dict[str, Spans]:
    """Every signal of :data:`NGRAM_NAMES`."""
    words, counts = doc.word_ids
    lengths = doc.word_lengths
    char_ends = np.concatenate([[0], np.cumsum(lengths)])
    total = int(char_ends[-1])
    scores = dict.fromkeys(NGRAM_NAMES, 0.0)
    at = np.flatnonzero(counts[words] > 1)
    ids = words[at]
    for size in range(2, max(DUPE_SIZES) + 1):
        at, ids, top = _next_size(at, ids, words, int(counts.size), size)
        if top is None:
            break  # nothing repeats at this size, so nothing longer does either
        if size in TOP_SIZES:
            start, count = top
            chars = int(char_ends[start + size] - char_ends[start])
            scores[f"rps_doc_frac_chars_top_{size}gram"] = rounded(chars * count / total)
        if size in DUPE_SIZES:
            covered = _covered_chars(at, size, char_ends)
            scores[f"rps_doc_frac_chars_dupe_{size}grams"] = rounded(float(covered / total))
    return {name: doc_span(len(doc.text), score) for name, score in scores.items()}


def _duplicates(parts: list[str]) -> tuple[int, int]:
    """``(how many parts equal an earlier part, their characters)``."""
    unique = set(parts)
    return len(parts) - len(unique), sum(map(len, parts)) - sum(map(len, unique))


def gopher_signals(text: str) -> dict[str, Spans]:
    """Every signal of :data:`GOPHER_NAMES`."""
    lines = _LINE_BREAKS.split(text) if text else []
    paragraphs = _PARAGRAPH_BREAK.split(text.strip())
    dupe_lines, line_chars = _duplicates(lines)
    dupe_paragraphs, paragraph_chars = _duplicates(paragraphs)
    stop_words = {w.lower() for w in _GOPHER_STOP_WORDS.findall(text)}
    scores = (
        ratio(dupe_lines, len(lines)),
        ratio(line_chars, len(text)),
        ratio(dupe_paragraphs, len(paragraphs)),
        ratio(paragraph_chars, len(text)),
        len(stop_words),
    )
    return {name: doc_span(len(text), s) for name, s in zip(GOPHER_NAMES, scores, strict=True)}
