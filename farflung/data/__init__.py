"""Data layer: corpus readers, tokenizers, token shards (and loss masks) and sample batches.

Typical use::

    from farflung.data import prepare, ShardIndex, TokenStream, SampleSet, batch_ids

    prepare(["bundled"], "data/bundled", vocab_size=4096, val_fraction=0.05,
            shard_tokens=1 << 22)
    index = ShardIndex.load("data/bundled")
    samples = SampleSet(TokenStream(index, "train"), context=256)
    x, y = samples.batch(batch_ids(step, batch_size, len(samples), seed))

Fine-tuning data (``{"prompt", "response"}`` JSON lines, encoded with a checkpoint's
tokenizer and its chat template; ``y`` is then -100 on prompt tokens)::

    prepare(["chat.jsonl"], "data/chat", vocab_size=0, val_fraction=0.05,
            shard_tokens=1 << 22, tokenizer="/models/gpt2")

Curating a corpus first (signals, rules, dedup) is :mod:`farflung.curate`'s job.
"""

from farflung.data.corpus import BUNDLED, Document, bundled_documents, iter_documents
from farflung.data.errors import DataError
from farflung.data.loader import IGNORE_INDEX, SampleSet, batch_ids, rank_slice, val_batch_ids
from farflung.data.shards import (
    FORMAT,
    INDEX_FILE,
    Shard,
    ShardIndex,
    TokenStream,
    assign_val,
    is_prepared,
    prepare,
    sha256_file,
)
from farflung.data.tokenizer import (
    CONFIG_FILE,
    EOT,
    TEMPLATE_FILE,
    TOKENIZER_FILE,
    Tokenizer,
    TokenizerFiles,
    tokenizer_files,
    train_tokenizer,
)

__all__ = [
    "BUNDLED",
    "CONFIG_FILE",
    "EOT",
    "FORMAT",
    "IGNORE_INDEX",
    "INDEX_FILE",
    "TEMPLATE_FILE",
    "TOKENIZER_FILE",
    "DataError",
    "Document",
    "SampleSet",
    "Shard",
    "ShardIndex",
    "TokenStream",
    "Tokenizer",
    "TokenizerFiles",
    "assign_val",
    "batch_ids",
    "bundled_documents",
    "is_prepared",
    "iter_documents",
    "prepare",
    "rank_slice",
    "sha256_file",
    "tokenizer_files",
    "train_tokenizer",
    "val_batch_ids",
]
