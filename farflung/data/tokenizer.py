"""Tokenizers: byte-level BPE trained locally, or an existing Hugging Face one.

Byte-level means every string — any Unicode, control characters, invalid-looking
sequences — maps to tokens and back exactly: the 256 byte symbols are always in the
vocabulary, and there is no normalizer to alter text. Fine-tuning a published
checkpoint instead needs that checkpoint's own tokenizer, loaded from its Hugging Face
folder (``tokenizer.json``, plus ``tokenizer_config.json`` for the end-of-text token
and chat template). This module only wraps the library so the rest of farflung sees a
small, stable interface.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from farflung.data.errors import DataError

if TYPE_CHECKING:
    from farflung.data.chat import ChatTemplate

EOT = "<|endoftext|>"
"""The special token appended after every document by a farflung-trained tokenizer."""

MIN_VOCAB = 257
"""256 byte symbols plus the end-of-text token: the smallest vocabulary that works."""

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
"""Hugging Face's settings beside tokenizer.json: eos/bos tokens, chat template."""
TEMPLATE_FILE = "chat_template.jinja"
"""Where newer ``save_pretrained`` versions put the chat template instead of the config."""


@dataclass(frozen=True)
class TokenizerFiles:
    """The files that make up one tokenizer: tokenizer.json and its optional companions."""

    tokenizer: Path
    config: Path | None = None
    chat_template: Path | None = None


def tokenizer_files(path: str | os.PathLike) -> TokenizerFiles:
    """The files of the tokenizer at ``path``: a Hugging Face folder or a tokenizer.json.

    For a file, the companions are looked for beside it, so ``/models/llama`` and
    ``/models/llama/tokenizer.json`` name the same tokenizer.
    """
    path = Path(path).expanduser()
    folder, file = (path, path / TOKENIZER_FILE) if path.is_dir() else (path.parent, path)
    if path.is_dir() and not file.is_file():
        raise DataError(
            f"{path} has no {TOKENIZER_FILE} (a folder with only a slow tokenizer's files "
            "can be converted once with transformers: AutoTokenizer.from_pretrained(PATH)"
            ".save_pretrained(PATH))"
        )
    if not file.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    config, template = folder / CONFIG_FILE, folder / TEMPLATE_FILE
    return TokenizerFiles(
        file,
        config if config.is_file() else None,
        template if template.is_file() else None,
    )


class Tokenizer:
    """A thin wrapper over a Hugging Face tokenizer with an end-of-text id.

    In plain documents, the text of a special token (``<|endoftext|>``, ``</s>``,
    ``<|im_start|>``...) is encoded as ordinary characters, never as the special id:
    only the data pipeline inserts ``eot_id``, so document boundaries cannot be forged
    by the corpus and round trips are exact. Chat-template renderings are the one
    exception (``encode(..., special=True)``): there the markers are meant as tokens.
    """

    def __init__(
        self,
        hf: HFTokenizer,
        eot: str = EOT,
        bos: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        eot_id = hf.token_to_id(eot)
        if eot_id is None:
            raise DataError(f"tokenizer has no {eot} token")
        # Not saved in tokenizer.json by the library, so set it on every construction.
        hf.encode_special_tokens = True
        self._hf = hf
        self._hf_special: HFTokenizer | None = None
        self._eot = eot_id
        self._eot_token = eot
        self._bos_token = bos
        self._chat_template = chat_template
        self._template: ChatTemplate | None = None
        # Ids need not be dense in a published tokenizer: size the vocabulary by the
        # largest id so every id fits the model's embedding and the shard dtype.
        top = max(hf.get_vocab(with_added_tokens=True).values(), default=-1)
        self._vocab_size = max(hf.get_vocab_size(with_added_tokens=True), top + 1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer: a Hugging Face folder or a ``tokenizer.json`` file (one saved
        with :meth:`save`, or a checkpoint's, with its companions beside it)."""
        files = tokenizer_files(path)
        return cls.from_files(files.tokenizer, files.config, files.chat_template)

    @classmethod
    def from_files(
        cls,
        tokenizer: str | os.PathLike,
        config: str | os.PathLike | None = None,
        chat_template: str | os.PathLike | None = None,
    ) -> Tokenizer:
        """Load exactly these files (a prepared data folder lists them in its index).

        The end-of-text token is the config's ``eos_token``, else ``<|endoftext|>``
        when the vocabulary has it; a ``chat_template.jinja`` file wins over the
        config's ``chat_template``, as in ``transformers``.
        """
        path = Path(tokenizer)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise DataError(f"cannot read tokenizer {path}: {exc}") from exc
        settings = _read_config(Path(config)) if config is not None else {}
        eos = _token_text(settings.get("eos_token"))
        if eos is None and hf.token_to_id(EOT) is None:
            raise DataError(
                f"cannot tell the end-of-text token of {path}: "
                + (f"{config} has no eos_token" if config else f"no {CONFIG_FILE} beside it")
                + f" and the vocabulary has no {EOT}"
            )
        if eos is not None and hf.token_to_id(eos) is None:
            raise DataError(f"eos_token {eos!r} of {config} is not in the vocabulary of {path}")
        template = _chat_template(settings.get("chat_template"))
        if chat_template is not None:
            template = _read_text(Path(chat_template))
        return cls(hf, eos or EOT, _token_text(settings.get("bos_token")), template)

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
        """Number of ids (may be below the requested size on a small corpus)."""
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token, the document separator."""
        return self._eot

    @property
    def eot_token(self) -> str:
        """Text of the end-of-text token (``<|endoftext|>``, ``</s>``, ...)."""
        return self._eot_token

    @property
    def bos_token(self) -> str | None:
        """The config's ``bos_token``, which chat templates may print; None without one."""
        return self._bos_token

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None (plain prompt/response concatenation)."""
        return self._chat_template

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text`` (nothing added). ``special``: special-token text such as
        ``<|im_start|>`` becomes its id, as wanted for a rendered chat template."""
        return self._library(special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel by the library."""
        encodings = self._library(special).encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """Prompt ids and response ids of prompt/response pairs; each response ends with
        ``eot_id`` (added unless the template already put it there).

        The two parts are encoded separately, so the boundary between tokens that are
        not trained on (prompt) and tokens that are (response) is exact. With a chat
        template the parts are its renderings (see :meth:`ChatTemplate.split`).
        """
        template = self.template()
        parts = pairs if template is None else [template.split(p, r) for p, r in pairs]
        ids = self.encode_batch([t for part in parts for t in part], special=template is not None)
        out = []
        for prompt_ids, response_ids in zip(ids[0::2], ids[1::2], strict=True):
            if not response_ids or response_ids[-1] != self._eot:
                response_ids = [*response_ids, self._eot]
            out.append((prompt_ids, response_ids))
        return out

    def template(self) -> ChatTemplate | None:
        """The compiled chat template (compiled once), or None without one."""
        if self._chat_template is None:
            return None
        if self._template is None:
            from farflung.data.chat import ChatTemplate

            self._template = ChatTemplate(
                self._chat_template, self._bos_token or "", self._eot_token
            )
        return self._template

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; ``eot_id`` decodes to its token text so boundaries stay visible."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def _library(self, special: bool) -> HFTokenizer:
        """The library tokenizer for plain text, or a second copy that matches special
        tokens (the flag is per instance, and flipping it could race another thread)."""
        if not special:
            return self._hf
        if self._hf_special is None:
            hf = HFTokenizer.from_str(self._hf.to_str())
            hf.encode_special_tokens = False
            self._hf_special = hf
        return self._hf_special


def _read_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json as a dict, or a DataError naming the file."""
    try:
        settings = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(settings, dict):
        raise DataError(f"{path} is not a JSON object")
    return settings


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _token_text(value: Any) -> str | None:
    """A special token as the config writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(value: Any) -> str | None:
    """The config's ``chat_template``: a string, or a list of named templates of which
    the one named ``default`` is the one for plain conversations."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


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
