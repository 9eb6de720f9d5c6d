"""RedPajama-v2's quality signals, computed by farflung.

Typical use::

    from farflung.curate.signals import SignalContext, ImportanceModel, compute_signals

    model = ImportanceModel.fit(reference_texts, corpus_texts, buckets=10_000)
    model.save("dsir.npz")                       # later: ImportanceModel.load("dsir.npz")
    ctx = SignalContext.default(importance=model)
    signals = compute_signals(text, ctx)         # {name: [[start, end, score], ...]}

The names, span format and values follow the definitions in RedPajama-v2's public
code (togethercomputer/RedPajama-Data, ``app/src/core/quality_signals/``); the code
here is farflung's own implementation of those definitions, vectorised over the
document's code points. Each module says which definitions it implements and where it
departs from them: :mod:`.text` (normalisation, words, lines), :mod:`.natural_language`,
:mod:`.content`, :mod:`.lines`, :mod:`.repetition` (including Gopher's line and
paragraph duplication, which RedPajama-v2 does not publish) and :mod:`.importance`
(DSIR, with a stable hash in place of Python's salted ``hash``).
"""

from farflung.curate.signals.compute import (
    IMPORTANCE_NAMES,
    LINE_SIGNAL_NAMES,
    SIGNAL_NAMES,
    compute_signals,
)
from farflung.curate.signals.context import SignalContext
from farflung.curate.signals.importance import ImportanceModel, count_features
from farflung.curate.signals.wordlists import load_word_list

__all__ = [
    "IMPORTANCE_NAMES",
    "LINE_SIGNAL_NAMES",
    "SIGNAL_NAMES",
    "ImportanceModel",
    "SignalContext",
    "compute_signals",
    "count_features",
    "load_word_list",
]
