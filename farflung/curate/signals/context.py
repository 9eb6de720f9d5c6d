"""What the signals need beyond the text: word lists and an optional DSIR model.

A context is built once per process and reused for every document. Building it turns
the word lists into sorted arrays of stable hashes, so that matching a document's words
against them is one vectorised search rather than a set lookup per word.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from farflung.curate.signals.hashing import ngram_hashes, string_hashes
from farflung.curate.signals.importance import ImportanceModel
from farflung.curate.signals.wordlists import BAD_WORDS_EN, STOP_WORDS_EN, load_word_list


@dataclass(frozen=True, eq=False)
class SignalContext:
    """Word lists and models shared by every document of a run.

    ``bad_words``: entries counted by ``rps_doc_ldnoobw_words`` (multi-word entries are
    matched as word n-grams of the normalised text). ``stop_words``: matched against the
    raw tokens by ``rps_doc_stop_word_fraction``. ``importance``: a fitted DSIR model;
    without one the importance signals are left out.
    """

    bad_words: frozenset[str]
    stop_words: frozenset[str]
    importance: ImportanceModel | None = None
    _stop_h1: np.ndarray = field(init=False, repr=False, compare=False)
    _stop_h2: np.ndarray = field(init=False, repr=False, compare=False)
    _bad_grams: list[tuple[np.ndarray, np.ndarray]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bad_words", frozenset(self.bad_words))
        object.__setattr__(self, "stop_words", frozenset(self.stop_words))
        h1, h2 = string_hashes(sorted(w for w in self.stop_words if w))
        order = np.argsort(h1)
        object.__setattr__(self, "_stop_h1", h1[order])
        object.__setattr__(self, "_stop_h2", h2[order])
        object.__setattr__(self, "_bad_grams", _bad_gram_hashes(self.bad_words))

    @classmethod
    def default(cls, importance: ImportanceModel | None = None) -> SignalContext:
        """The shipped English lists (RedPajama-v2's), with an optional DSIR model."""
        words = _default_lists()
        return cls(bad_words=words[0], stop_words=words[1], importance=importance)

    def stop_word_mask(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        """Which of the tokens hashed ``(h1, h2)`` are stop words."""
        if self._stop_h1.size == 0 or h1.size == 0:
            return np.zeros(h1.size, dtype=bool)
        pos = np.minimum(np.searchsorted(self._stop_h1, h1), self._stop_h1.size - 1)
        return (self._stop_h1[pos] == h1) & (self._stop_h2[pos] == h2)

    def bad_gram_hashes(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Item ``n-1``: sorted hashes of (the n-word entries, the n-word beginnings of
        longer entries) of the bad-word list."""
        return self._bad_grams


@lru_cache(maxsize=1)
def _default_lists() -> tuple[frozenset[str], frozenset[str]]:
    return load_word_list(BAD_WORDS_EN), load_word_list(STOP_WORDS_EN)


def _bad_gram_hashes(entries: frozenset[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hash every entry, and every beginning of it, as an n-gram of its words.

    RedPajama-v2 counts an entry with k spaces as a (k+1)-gram of normalised words joined
    by single spaces; an entry with an empty part (two spaces in a row) can never match.
    """
    split = [e.split(" ") for e in entries]
    split = [parts for parts in split if all(parts)]
    longest = max(map(len, split), default=0)
    whole: list[set[int]] = [set() for _ in range(longest)]
    begun: list[set[int]] = [set() for _ in range(longest)]
    for parts in split:
        h1, _ = string_hashes(parts)
        for n in range(1, len(parts) + 1):
            gram = int(ngram_hashes(h1[:n], n)[0])
            (whole if n == len(parts) else begun)[n - 1].add(gram)
    as_array = lambda hashes: np.array(sorted(hashes), dtype=np.uint64)  # noqa: E731
    return [(as_array(w), as_array(b)) for w, b in zip(whole, begun, strict=True)]
