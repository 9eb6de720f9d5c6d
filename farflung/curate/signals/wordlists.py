"""The word lists that ship inside the package: no download at run time.

``ldnoobw_en.txt`` is the LDNOOBW English list that RedPajama-v2's
``rps_doc_ldnoobw_words`` counts; ``stopwords_en.txt`` is the English stop-word list of
its ``rps_doc_stop_word_fraction``. Each file names its source in a comment header.
Other languages: pass your own sets to :class:`~farflung.curate.signals.SignalContext`,
or a file in the same format to :func:`load_word_list`.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
BAD_WORDS_EN = HERE / "ldnoobw_en.txt"
STOP_WORDS_EN = HERE / "stopwords_en.txt"


def load_word_list(path: str | Path) -> frozenset[str]:
    """The entries of a word-list file: one per line, stripped; ``#`` lines are comments."""
    with open(path, encoding="utf-8") as f:
        entries = (line.strip() for line in f)
        return frozenset(e for e in entries if e and not e.startswith("#"))
