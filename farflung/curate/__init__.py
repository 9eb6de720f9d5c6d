"""Corpus curation before tokenizing: RedPajama-v2 quality signals (``signals``), rules
and the paper presets (``rules``, ``presets/``), fuzzy dedup (``dedup``), lenient
document readers (``documents``), bounded resumable stages on executors (``pipeline``)
and the steps as one recipe (``recipe``). It reads corpora with :mod:`farflung.data`
and hands kept documents back to :func:`farflung.data.prepare`; nothing in training
imports it.

Typical use (``farflung data ...``, ``farflung prepare --filter``)::

    from farflung.curate.pipeline import open_executor
    from farflung.curate.recipe import run_dedup, run_filter, run_signals

    with open_executor("process", processes=8) as ex:      # or "dask", scheduler=ADDR
        run_signals(["corpus/"], "out/signals", ex)          # RedPajama-v2 signals
        run_filter("out/signals", "gopher", "out/filter", ex)  # preset or rule file
        run_dedup(["out/filter"], "out/dedup", ex, threshold=0.8)
    prepare(["out/dedup/kept"], ...)
"""
