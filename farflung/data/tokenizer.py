"""Byte-level BPE tokenizer, trained locally with Hugging Face ``tokenizers``.

Byte-level means every string — any Unicode, control characters, invalid-looking
sequences — maps to tokens and back exactly: the 256 byte symbols are always in the
vocabulary, and there is no normalizer to alter text. This module only wraps the
library so the rest of farflung sees a small, stable interface.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from farflung.data.errors import DataError

EOT = "<|endoftext|>"
"""The special token appended after every document."""

MIN_VOCAB = 257
"""256 byte symbols plus the end-of-text token: the smallest vocabulary that works."""


class Tokenizer:
    """A thin wrapper over a Hugging Face tokenizer with an end-of-text id.

    The literal text ``<|endoftext|>`` inside a document is encoded as ordinary
    characters, never as the special id: only the data pipeline inserts ``eot_id``,
    so document boundaries cannot be forged by the corpus and round trips are exact.
    """

    def __init__(self, hf: HFTokenizer) -> None:
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise DataError(f"tokenizer has no {EOT} token")
        # Not saved in tokenizer.json by the library, so set it on every construction.
        hf.encode_special_tokens = True
        self._hf = hf
        self._eot = eot

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer saved with :meth:`save` (a Hugging Face ``tokenizer.json``)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise DataError(f"cannot read tokenizer {path}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self._hf.to_str())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        """Actual number of ids (may be below the requested size on a small corpus)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of ``<|endoftext|>``, the document separator."""
        return self._eot

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the library."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ``eot_id`` decodes to ``<|endoftext|>`` so boundaries stay visible."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` ids (at most) on ``texts``.

    ``texts`` is consumed once, as a stream, so it may be a generator over a corpus
    that does not fit in memory.
    """
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + {EOT})")
    hf = HFTokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would change the text and break round trips.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        # All 256 byte symbols, even those absent from the corpus, so nothing is unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf)
