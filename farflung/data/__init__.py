"""Data layer: corpus readers, the byte-level BPE tokenizer, token shards and sample batches.

Typical use::

    from farflung.data import prepare, ShardIndex, TokenStream, SampleSet, batch_ids

    prepare(["bundled"], "data/bundled", vocab_size=4096, val_fraction=0.05,
            shard_tokens=1 << 22)
    index = ShardIndex.load("data/bundled")
    samples = SampleSet(TokenStream(index, "train"), context=256)
    x, y = samples.batch(batch_ids(step, batch_size, len(samples), seed))
"""

from farflung.data.corpus import BUNDLED, Document, bundled_documents, iter_documents
from farflung.data.errors import DataError
from farflung.data.loader import SampleSet, batch_ids, rank_slice, val_batch_ids
from farflung.data.shards import (
    FORMAT,
    INDEX_FILE,
    TOKENIZER_FILE,
    Shard,
    ShardIndex,
    TokenStream,
    assign_val,
    is_prepared,
    prepare,
    sha256_file,
)
from farflung.data.tokenizer import EOT, Tokenizer, train_tokenizer

__all__ = [
    "BUNDLED",
    "EOT",
    "FORMAT",
    "INDEX_FILE",
    "TOKENIZER_FILE",
    "DataError",
    "Document",
    "SampleSet",
    "Shard",
    "ShardIndex",
    "TokenStream",
    "Tokenizer",
    "assign_val",
    "batch_ids",
    "bundled_documents",
    "is_prepared",
    "iter_documents",
    "prepare",
    "rank_slice",
    "sha256_file",
    "train_tokenizer",
    "val_batch_ids",
]
