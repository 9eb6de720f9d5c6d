"""Content signals (RedPajama-v2's ``content.py``): bad words, stop words, lorem ipsum,
curly brackets. farflung's own implementation of their definitions.

``rps_doc_ut1_blacklist`` is left out: it classifies the document's *domain* with the
UT1 URL blacklist, which needs both the URL (``compute_signals`` sees only the text)
and a list that is only distributed as a download.
"""

from __future__ import annotations

import re

import numpy as np

from farflung.curate.signals.arrays import isin_sorted
from farflung.curate.signals.context import SignalContext
from farflung.curate.signals.hashing import extend_ngrams
from farflung.curate.signals.spans import Spans, doc_span, ratio, rounded
from farflung.curate.signals.text import ParsedDoc

NAMES = (
    "rps_doc_curly_bracket",
    "rps_doc_lorem_ipsum",
    "rps_doc_stop_word_fraction",
    "rps_doc_ldnoobw_words",
)
# RedPajama-v2 counts with this case-insensitive regex once "lorem ipsum" is found
# verbatim; on lowercased text the two differ only for characters like the long s (ſ).
_LOREM = re.compile(r"lorem ipsum", re.IGNORECASE)


def curly_bracket(text: str) -> float:
    """``{`` and ``}`` per character of the raw text (0 for an empty text)."""
    brackets = text.count("{") + text.count("}")
    return ratio(float(brackets), len(text)) if brackets else 0.0


def lorem_ipsum(doc: ParsedDoc) -> float:
    """Occurrences of ``lorem ipsum`` per character of the normalised text."""
    if doc.n_words == 0 or "lorem" not in doc.norm_text:
        return 0.0
    norm = " ".join(doc.norm_text.split())
    if "lorem ipsum" not in norm:
        return 0.0
    return rounded(len(_LOREM.findall(norm)) / len(norm))


def stop_word_fraction(doc: ParsedDoc, ctx: SignalContext) -> float:
    """Raw tokens that are stop words (case-sensitive) per raw token; 0 with no words."""
    if doc.n_words == 0:
        return 0.0
    stop = ctx.stop_word_mask(*doc.token_hashes)
    return rounded(int(np.count_nonzero(stop)) / doc.n_tokens)


def ldnoobw_words(doc: ParsedDoc, ctx: SignalContext) -> float:
    """Normalised word n-grams that are entries of the bad-word list, over every n.

    Follows, one word at a time, only the positions whose words so far begin some
    entry; each hash hit is then checked as a str, so a hash collision can never count
    a word that is not on the list.
    """
    h1, found = doc.word_hashes[0], 0
    at = np.arange(doc.n_words)
    grams = h1
    for n, (whole, begun) in enumerate(ctx.bad_gram_hashes(), start=1):
        if n > 1:
            grams = extend_ngrams(grams, h1, at + n - 1)
        for i in at[isin_sorted(grams, whole)].tolist():
            found += " ".join(doc.word(j) for j in range(i, i + n)) in ctx.bad_words
        keep = isin_sorted(grams, begun) & (at + n < doc.n_words)
        at, grams = at[keep], grams[keep]
        if at.size == 0:
            break
    return float(found)


def content_signals(doc: ParsedDoc, ctx: SignalContext) -> dict[str, Spans]:
    """Every signal of :data:`NAMES`."""
    scores = (
        curly_bracket(doc.text),
        lorem_ipsum(doc),
        stop_word_fraction(doc, ctx),
        ldnoobw_words(doc, ctx) if doc.n_words else 0.0,
    )
    return {name: doc_span(len(doc.text), s) for name, s in zip(NAMES, scores, strict=True)}
