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

The recipe before tokenizing (``farflung data ...``, ``farflung prepare --filter``)::

    from farflung.data.pipeline import open_executor
    from farflung.data.recipe import run_dedup, run_filter, run_signals

    with open_executor("process", processes=8) as ex:      # or "dask", scheduler=ADDR
        run_signals(["corpus/"], "out/signals", ex)          # RedPajama-v2 signals
        run_filter("out/signals", "gopher", "out/filter", ex)  # preset or rule file
        run_dedup(["out/filter"], "out/dedup", ex, threshold=0.8)
    prepare(["out/dedup/kept"], ...)

Modules: ``documents`` (lenient readers of .txt/.jsonl/.jsonl.gz/.parquet),
``pipeline`` (bounded shards, executors, resumable stages), ``signals``, ``rules`` (the
paper presets in ``presets/`` and user rule files), ``dedup`` and ``recipe`` (the
steps as pipeline stages).
"""

from farflung.data.corpus import BUNDLED, Document, bundled_documents, iter_documents
from farflung.data.errors import DataError
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

# The loader needs torch (2 s to import); the pipeline's worker processes import this
# package but never the loader, so its names are resolved on first use only.
_LAZY = {"IGNORE_INDEX", "SampleSet", "batch_ids", "rank_slice", "val_batch_ids"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from farflung.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
