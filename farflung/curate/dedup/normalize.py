"""Text normalisation and exact-duplicate keys, as RedPajama-v2 defines them.

RedPajama-v2 (``app/src/utilities/text/normalization.py``) normalises a document before
it splits it into words for MinHash and for most quality signals: ASCII punctuation
(``string.punctuation``) removed, lower-cased, leading and trailing whitespace stripped,
every run of whitespace collapsed to one space, then Unicode NFD. Exact dedup here hashes
that same normalised text, so two documents are exact duplicates exactly when they have
the same normalised word sequence, and an exact duplicate is always also a MinHash
duplicate at every threshold.

RedPajama-v2's own exact dedup (``app/src/bloomfilter.py``) used CCNet's ``digest``, the
SHA-1 of the raw page text; ``exact_key(text, normalized=False)`` gives that definition.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata

_STRIP_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """RedPajama-v2's normalisation, in its order: punctuation, lower case, spaces, NFD.

    The order matters for agreement with the reference: NFD comes last, so punctuation
    that only NFD produces stays (U+037E GREEK QUESTION MARK becomes a kept ``;``), and
    the only whitespace left is single spaces (NFD maps no character to whitespace
    except U+2000/U+2001, which are whitespace already and were collapsed before).
    """
    text = text.translate(_STRIP_PUNCTUATION).lower().strip()
    text = _WHITESPACE.sub(" ", text)
    return unicodedata.normalize("NFD", text)


def words(text: str) -> list[str]:
    """The normalised words of ``text`` (RedPajama-v2's ``Document.normalized_words``)."""
    return normalize(text).split()


def exact_key(text: str, normalized: bool = True) -> str:
    """Hex SHA-1 of the normalised text (or of the raw text, with ``normalized=False``).

    SHA-1 from hashlib, not Python's ``hash``, because ``hash`` of a str is salted per
    process and keys are computed in different worker processes and compared later.
    Every text that normalises to nothing (empty, only spaces or punctuation) gets the
    same key, the SHA-1 of the empty string, and so counts as a duplicate of the others.
    """
    data = normalize(text) if normalized else text
    return hashlib.sha1(data.encode("utf-8")).hexdigest()
