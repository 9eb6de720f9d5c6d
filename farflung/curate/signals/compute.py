"""``compute_signals``: every quality signal of one document, in RedPajama-v2's format."""

from __future__ import annotations

from functools import lru_cache

from farflung.curate.signals import content, lines, natural_language, repetition
from farflung.curate.signals.context import SignalContext
from farflung.curate.signals.spans import Spans, doc_span, rounded
from farflung.curate.signals.text import ParsedDoc

IMPORTANCE_NAMES = ("rps_doc_importance", "rps_doc_importance_length_correction")
"""Present only when the context holds a DSIR model."""

LINE_SIGNAL_NAMES = lines.NAMES
"""The signals with one span per line; every other signal has one span per document."""

SIGNAL_NAMES = (
    natural_language.NAMES[:4]
    + (lines.ELLIPSIS_NAME,)
    + natural_language.NAMES[4:]
    + content.NAMES
    + lines.NAMES
    + repetition.NGRAM_NAMES
    + repetition.GOPHER_NAMES
    + IMPORTANCE_NAMES
)
"""Every name :func:`compute_signals` can return, in the order it returns them."""


@lru_cache(maxsize=1)
def _default_context() -> SignalContext:
    return SignalContext.default()


def compute_signals(text: str, ctx: SignalContext | None = None) -> dict[str, Spans]:
    """Every quality signal of ``text``: ``{name: [[start, end, score], ...]}``.

    Document-level signals are one span ``[0, len(text), score]``; line-level signals
    (:data:`LINE_SIGNAL_NAMES`) one span per line, with character offsets into ``text``.
    A score is ``None`` where RedPajama-v2's is (a ratio over no words or no lines).
    ``ctx`` defaults to the shipped English word lists without a DSIR model.
    """
    ctx = ctx or _default_context()
    doc = ParsedDoc(text)
    found: dict[str, Spans] = {}
    found.update(natural_language.natural_language_signals(doc))
    found.update(content.content_signals(doc, ctx))
    found.update(lines.line_signals(doc))
    found.update(repetition.ngram_signals(doc))
    found.update(repetition.gopher_signals(text))
    if ctx.importance is not None:
        found.update(importance_signals(doc, ctx))
    return {name: found[name] for name in SIGNAL_NAMES if name in found}


def importance_signals(doc: ParsedDoc, ctx: SignalContext) -> dict[str, Spans]:
    """The DSIR log-ratio, plain and length-corrected (None for an empty text)."""
    n_chars, model = len(doc.text), ctx.importance
    if n_chars == 0 or model is None:
        return {name: doc_span(n_chars, None) for name in IMPORTANCE_NAMES}
    base = model.log_ratio_of(doc.token_hashes[0])
    corrected = base + model.length_correction(doc.n_tokens)
    return {
        IMPORTANCE_NAMES[0]: doc_span(n_chars, rounded(base)),
        IMPORTANCE_NAMES[1]: doc_span(n_chars, rounded(corrected)),
    }
