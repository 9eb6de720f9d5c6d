"""Document-level natural-language signals (RedPajama-v2's ``natural_language.py``).

farflung's own implementation of their definitions; each function's docstring states
the definition it computes. (``rps_doc_frac_lines_end_with_ellipsis`` comes from the
line pass in :mod:`~farflung.curate.signals.lines`, which already finds each line's end.)
"Words" are the normalised words and "tokens" the raw WordPunct tokens of
:mod:`~farflung.curate.signals.text`, as in RedPajama-v2.
"""

from __future__ import annotations

import numpy as np

from farflung.curate.signals.chars import ASCII_ALPHA, LOWER_OR_TITLE, SENTENCE_END, UPPER, WORD
from farflung.curate.signals.spans import Score, Spans, doc_span, ratio, rounded
from farflung.curate.signals.text import ParsedDoc

NAMES = (
    "rps_doc_word_count",
    "rps_doc_mean_word_length",
    "rps_doc_symbol_to_word_ratio",
    "rps_doc_num_sentences",
    "rps_doc_frac_no_alph_words",
    "rps_doc_frac_unique_words",
    "rps_doc_unigram_entropy",
    "rps_doc_frac_all_caps_words",
)


def num_sentences(doc: ParsedDoc) -> float:
    """Matches of ``\\b[^.!?]+[.!?]*`` in the raw text.

    Each match runs from its first word character to the end of the next run of
    ``.!?``, so there is exactly one per stretch between ``.!?`` characters that holds a
    word character: we count those stretches instead of running the regex.
    """
    stretch = np.cumsum(doc.flags & SENTENCE_END)[(doc.flags & WORD) != 0]
    if stretch.size == 0:
        return 0.0
    return float(1 + np.count_nonzero(stretch[1:] != stretch[:-1]))


def mean_word_length(doc: ParsedDoc) -> float | None:
    """Characters per normalised word."""
    return ratio(int(doc.word_lengths.sum()), doc.n_words)


def symbol_to_word_ratio(doc: ParsedDoc) -> float | None:
    """(``#`` + ``...`` + ``…`` occurrences in the raw text) per raw token."""
    text = doc.text
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return ratio(float(symbols), doc.n_tokens)


def token_flags(doc: ParsedDoc) -> np.ndarray:
    """The OR of the character flags of each raw token.

    ``reduceat`` runs each token on to the next token's start; the characters in between
    are spaces, whose only flag is SPACE, so the other flags are the token's own.
    """
    if doc.n_tokens == 0:
        return np.zeros(0, dtype=doc.flags.dtype)
    return np.bitwise_or.reduceat(doc.flags, doc.tok_starts)


def frac_no_alph_words(flags: np.ndarray) -> float | None:
    """Fraction of raw tokens without an ASCII letter, computed as RedPajama-v2 does it."""
    if flags.size == 0:
        return None
    with_alpha = float(np.count_nonzero(flags & ASCII_ALPHA))
    return rounded(1.0 - with_alpha / flags.size)


def frac_all_caps_words(flags: np.ndarray) -> float | None:
    """Fraction of raw tokens for which ``str.isupper()`` holds.

    That is: at least one uppercase character and no lowercase or titlecase one.
    """
    if flags.size == 0:
        return None
    caps = ((flags & UPPER) != 0) & ((flags & LOWER_OR_TITLE) == 0)
    return ratio(float(np.count_nonzero(caps)), flags.size)


def unigram_entropy(counts: np.ndarray) -> float | None:
    """``sum(-c/N * log(c/N))`` over the counts ``c`` of distinct normalised words."""
    if counts.size == 0:
        return None
    total = counts.sum()
    return rounded(float(np.sum(-counts / total * np.log(counts / total))))


def natural_language_signals(doc: ParsedDoc) -> dict[str, Spans]:
    """Every signal of :data:`NAMES`, each one span over the whole document."""
    n_chars = len(doc.text)
    flags = token_flags(doc)
    _, counts = doc.word_ids
    scores: dict[str, Score] = {
        "rps_doc_word_count": doc.n_words,
        "rps_doc_mean_word_length": mean_word_length(doc),
        "rps_doc_symbol_to_word_ratio": symbol_to_word_ratio(doc),
        "rps_doc_num_sentences": num_sentences(doc),
        "rps_doc_frac_no_alph_words": frac_no_alph_words(flags),
        "rps_doc_frac_unique_words": ratio(float(counts.size), doc.n_words),
        "rps_doc_unigram_entropy": unigram_entropy(counts),
        "rps_doc_frac_all_caps_words": frac_all_caps_words(flags),
    }
    return {name: doc_span(n_chars, score) for name, score in scores.items()}
