"""DSIR importance weights: how much more likely a document is under a target corpus.

farflung's own implementation of RedPajama-v2's importance signals
(``app/src/core/quality_signals/importance_weights.py``, ``utils/dsir.py`` and
``artifacts/hash_dist.py``), after Xie et al. 2023, "Data Selection for Language Models
via Importance Resampling". A document's features are the counts of its raw
(WordPunct) tokens and token bigrams hashed into ``buckets`` buckets; each corpus is a
bag-of-hashed-n-grams model ``p = counts / counts.sum()``, and the signal is

    log p_target(doc) - log p_source(doc) = features . (log(p_t + 1e-8) - log(p_s + 1e-8))

``rps_doc_importance_length_correction`` adds ``log(Pois(k; lambda_t) + 1e-8) -
log(Pois(k; lambda_s) + 1e-8)``, each lambda being the mean number of tokens per document
of its corpus, as RedPajama-v2 fits it.

Where we differ, and why:

* Hashing: RedPajama-v2 hashes with Python's ``hash()``, which is salted per process,
  so its buckets cannot be reproduced. farflung uses the stable code-point hash of
  :mod:`~farflung.curate.signals.hashing`; the numbers therefore differ from theirs by
  construction, while meaning the same thing.
* Length correction: RedPajama-v2 fits lambda in tokens but evaluates the Poisson at
  the document's length in *characters*, which for most documents makes both
  probabilities underflow to 0 and the correction vanish. farflung evaluates it at the
  token count, the unit lambda was fitted in.
* RedPajama-v2 ships one signal per fixed target (Wikipedia, books, OpenWebText);
  farflung has one user-chosen target, hence names without the target's name.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from farflung.curate.signals.chars import code_points, flags_of
from farflung.curate.signals.hashing import U64, mix64, run_hashes
from farflung.curate.signals.text import word_punct_tokens
from farflung.data.errors import DataError

FORMAT = "farflung-dsir-1"
"""Written into every saved model; a file of another format is refused on load."""
DEFAULT_BUCKETS = 10_000
_EPS = 1e-8  # RedPajama-v2's smoothing of both the distributions and the Poisson terms
_UNI_SALT = U64(0x452821E638D01377)
_BI_SALT = U64(0xBE5466CF34E90C6C)
_BI_MULT = U64(0xD6E8FEB86659FD93)


def hashed_features(token_h1: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of every unigram and every bigram of a token sequence (by its stable hashes)."""
    uni = mix64(token_h1 ^ _UNI_SALT)
    bi = mix64((token_h1[:-1] * _BI_MULT) ^ token_h1[1:] ^ _BI_SALT)
    return (np.concatenate([uni, bi]) % U64(buckets)).astype(np.int64)


def token_hashes(text: str) -> np.ndarray:
    """The stable hash of every raw token of ``text``, in order."""
    cp = code_points(text)
    starts, ends = word_punct_tokens(flags_of(cp))
    return run_hashes(cp, starts, ends, both=False)[0]


def count_features(
    texts: Iterable[str], buckets: int = DEFAULT_BUCKETS
) -> tuple[np.ndarray, int, int]:
    """``(bucket counts, documents, tokens)`` over ``texts``, streamed.

    Counts of disjoint parts of a corpus add up, so a pipeline can count shards in
    parallel and sum them before :meth:`ImportanceModel.from_counts`.
    """
    if buckets < 1:
        raise DataError(f"DSIR needs at least one hash bucket, got {buckets}")
    counts = np.zeros(buckets, dtype=np.int64)
    docs = tokens = 0
    for text in texts:
        h1 = token_hashes(text)
        counts += np.bincount(hashed_features(h1, buckets), minlength=buckets)
        docs += 1
        tokens += h1.size
    return counts, docs, tokens


@dataclass(eq=False)
class ImportanceModel:
    """Hashed uni+bigram models of a target and a source corpus (DSIR)."""

    target_counts: np.ndarray
    source_counts: np.ndarray
    target_lambda: float
    source_lambda: float
    log_ratio: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.target_counts = np.asarray(self.target_counts, dtype=np.int64)
        self.source_counts = np.asarray(self.source_counts, dtype=np.int64)
        if self.target_counts.shape != self.source_counts.shape or self.buckets < 1:
            raise DataError("DSIR target and source counts must have the same, non-zero length")
        if self.target_counts.sum() == 0 or self.source_counts.sum() == 0:
            raise DataError("DSIR needs at least one token in both the target and the source")
        p_t = self.target_counts / self.target_counts.sum()
        p_s = self.source_counts / self.source_counts.sum()
        self.log_ratio = np.log(p_t + _EPS) - np.log(p_s + _EPS)

    @property
    def buckets(self) -> int:
        return int(self.target_counts.size)

    @classmethod
    def fit(
        cls,
        target_texts: Iterable[str],
        source_texts: Iterable[str],
        buckets: int = DEFAULT_BUCKETS,
    ) -> ImportanceModel:
        """Fit on a reference corpus (target) and the corpus being scored (source)."""
        return cls.from_counts(
            count_features(target_texts, buckets), count_features(source_texts, buckets)
        )

    @classmethod
    def from_counts(
        cls, target: tuple[np.ndarray, int, int], source: tuple[np.ndarray, int, int]
    ) -> ImportanceModel:
        """A model from :func:`count_features` results (possibly summed over shards)."""
        (t_counts, t_docs, t_tokens), (s_counts, s_docs, s_tokens) = target, source
        if t_docs == 0 or s_docs == 0:
            raise DataError("DSIR needs at least one target and one source document")
        return cls(t_counts, s_counts, t_tokens / t_docs, s_tokens / s_docs)

    def save(self, path: str | Path | BinaryIO) -> None:
        """Write the model as .npz data to ``path`` (exactly that name) or an open file."""
        if isinstance(path, (str, Path)):
            with open(path, "wb") as f:
                self.save(f)
            return
        np.savez(
            path,
            format=np.array(FORMAT),
            target_counts=self.target_counts,
            source_counts=self.source_counts,
            lambdas=np.array([self.target_lambda, self.source_lambda]),
        )

    @classmethod
    def load(cls, path: str | Path) -> ImportanceModel:
        """Read a model written by :meth:`save`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z or str(z["format"]) != FORMAT:
                    raise DataError(f"{path}: not a farflung DSIR model ({FORMAT})")
                lambdas = z["lambdas"]
                return cls(z["target_counts"], z["source_counts"], *map(float, lambdas))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: cannot read DSIR model: {exc}") from exc

    def log_ratio_of(self, token_h1: np.ndarray) -> float:
        """``log p_target(doc) - log p_source(doc)`` of a document given its token hashes."""
        return float(self.log_ratio[hashed_features(token_h1, self.buckets)].sum())

    def length_correction(self, n_tokens: int) -> float:
        """RedPajama-v2's Poisson length term, at the document's token count."""
        return math.log(_poisson(n_tokens, self.target_lambda) + _EPS) - math.log(
            _poisson(n_tokens, self.source_lambda) + _EPS
        )

    def score(self, text: str) -> tuple[float, float]:
        """``(importance, importance with length correction)`` of one document, unrounded."""
        h1 = token_hashes(text)
        base = self.log_ratio_of(h1)
        return base, base + self.length_correction(h1.size)


def _poisson(k: int, lam: float) -> float:
    """Poisson probability of ``k``, computed in log space so that large k cannot overflow."""
    if lam <= 0:
        return 1.0 if k == 0 else 0.0
    return math.exp(k * math.log(lam) - lam - math.lgamma(k + 1))
