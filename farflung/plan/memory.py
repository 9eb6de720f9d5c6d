"""What one rank of a layout holds in memory at its peak: the planner's memory check,
and the prediction ``benchmarks/rehearsal.py`` holds against measured peaks.

The parts, for the ``P`` parameters of a rank's stage:

- ``static``: fp32 weights, gradients and AdamW's two moments, 16 bytes per parameter
  (whatever ``train.precision``: autocast keeps fp32 masters).
- ``state``: the data-parallel algorithm's own buffers (:func:`state_bytes_per_param`:
  CocktailSGD's global copy, result buffers and delta snapshot; DiLoCo's global copy
  and outer momentum; ...), which live as long as the run.
- ``casts``: under bf16/fp16 autocast, the low-precision copy of every weight matrix
  that the forward makes and the backward keeps (2 bytes each).
- ``activations``: what the forward saves for the backward, for the micro-batches in
  flight (one without a pipeline; all M under GPipe; ``stages - s`` under 1F1B), per
  block from :func:`block_saved_per_token` (counted from the model's own operations:
  ``tests/test_memory.py`` checks it against autograd's saved tensors), or only the
  block's input for a recomputed block plus one block rebuilt in the backward; the last
  stage adds the head's saved tensors and its gradient's temporaries.
- ``transient``: temporaries of the algorithm's sync, which runs after the backward
  has freed the activations (DiLoCo's pseudo-gradient, ...), or beside the next
  forward and backward when it is overlapped (``overlapped``: CocktailSGD's).
- ``checkpoint``: what writing a checkpoint adds (:func:`checkpoint_bytes`).
- ``optimizer``: AdamW's temporaries in its step: the per-parameter loop (torch's CPU
  default) makes one of the largest tensor's size; the fused kernel (``auto`` on
  CUDA) none.
- ``runtime``: the process itself on a CPU (its peak RSS includes torch's libraries);
  0 on CUDA, whose ``max_memory_allocated`` counts tensors only.

The peak is ``static + state + runtime + max(casts + activations [+ transient when
overlapped], transient, optimizer, checkpoint)`` on CUDA, whose
``max_memory_allocated`` counts live tensors. On a CPU the phases' temporaries are
summed instead (``retained``): glibc serves allocations below its mmap threshold, which
rises to 32 MB after the first large free, from heaps it rarely gives back, so peak RSS
keeps much of what each phase freed (on ``benchmarks/rehearsal.py`` the larger-of
prediction fell 25-27% short on the ranks without checkpoint copies; the sum is within
13% on every rank). It
assumes dropout 0 inside attention (SDPA's fused kernels keep no T x T scores); with
dropout the T x T scores are counted approximately. AQ-SGD's per-sample buffers live in
memory-mapped scratch files (disk, not device memory) and are reported apart
(``aqsgd_disk``: every sample of ``data.max_samples``, 0 when that is 0)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from farflung.config import Config, ModelConfig, ParallelConfig
from farflung.model import balanced_layers
from farflung.model.llama import ffn_width, kv_heads
from farflung.plan.workload import embedding_params, overlaps, stage_params

FP32 = 4
STATIC_PER_PARAM = 16
"""fp32 weights (4), gradients (4) and AdamW's two moments (8)."""
CPU_RUNTIME_BYTES = 360_000_000
"""Peak RSS of a CPU worker whose tensors are negligible (a 2-worker run of a one-block,
width-32 model peaked at 355 MB per rank on 2026-12-08): Python, torch's libraries and
gloo's buffers."""


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds at its peak, by part (see the module docstring)."""

    params: int
    static: int
    state: int
    casts: int
    activations: int
    transient: int
    optimizer: int
    checkpoint: int
    runtime: int
    overlapped: bool = False
    aqsgd_disk: int = 0

    retained: bool = False

    @property
    def total(self) -> int:
        """The predicted peak: the larger of the backward's and the later phases'
        temporaries, or (``retained``, on a CPU) their sum."""
        backward = self.casts + self.activations + (self.transient if self.overlapped else 0)
        later = (self.transient, self.optimizer, self.checkpoint)
        if self.retained:
            extra = backward + sum(later) - (self.transient if self.overlapped else 0)
        else:
            extra = max(backward, *later)
        return self.static + self.state + self.runtime + extra

    def as_dict(self) -> dict[str, int]:
        """Every part and the total, for JSON."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def compute_bytes(precision: str, device: str) -> int:
    """Bytes per element of the compute dtype: 2 for bf16/fp16 (``auto`` on CUDA), 4."""
    if precision == "auto":
        return 2 if device == "cuda" else FP32
    return FP32 if precision == "fp32" else 2


def block_saved_per_token(m: ModelConfig, low: int, context: int) -> float:
    """Bytes one block saves for its backward per token, in compute dtype bytes ``low``.

    gpt2: the MLP's two hidden tensors and six of width d (the attention and MLP inputs
    in the compute dtype, the fused q/k/v, attention's output) in ``low``; the two
    LayerNorms' fp32 inputs and statistics; attention's log-sum-exp per head.
    llama: four MLP hidden tensors (gate, up, silu, product), q and attention's output,
    the five casts of the normalised inputs (q, k, v, gate, up: one shared tensor in
    fp32, where there is no cast) and k, v of the key/value width; the RMSNorms keep
    their fp32 input and normalised value, and 1 / rms; the rotary tables per sequence
    are added by :func:`block_saved_bytes`."""
    d, f, heads = m.d_model, ffn_width(m), m.n_head
    lse = FP32 * heads
    if m.arch == "gpt2":
        per = (2 * f + 6 * d) * low + 2 * d * FP32 + lse + 4 * FP32
    else:
        kv = kv_heads(m) * (d // heads)
        width_d = 7 if low < FP32 else 4  # fp32: the norms' outputs are the linears' inputs
        per = (width_d * d + 2 * kv + 4 * f) * low + 4 * d * FP32 + lse + 2 * FP32
    if m.dropout > 0:  # SDPA falls back to its math path: scores, probabilities, masks
        per += 3 * FP32 * heads * context + 3 * FP32 * d + 2 * d
    return float(per)


def block_saved_bytes(m: ModelConfig, low: int, batch: int, context: int) -> int:
    """Bytes one block saves for ``batch`` sequences of ``context`` tokens."""
    tokens = batch * context
    per = block_saved_per_token(m, low, context) * tokens
    if m.arch == "llama":  # cos and sin, cast for q and k in each block (fp32: one pair)
        per += (4 * low if low < FP32 else 2 * FP32) * context * (m.d_model // m.n_head)
    return int(per)


def head_saved_per_token(m: ModelConfig, low: int) -> int:
    """Bytes the last stage's head saves per token: the final norm's fp32 input (and,
    for llama, its normalised value) and statistics, the head's input in the compute
    dtype, cross-entropy's fp32 log-probabilities and the int64 target."""
    d, v = m.d_model, m.vocab_size
    norm = (2 * d * FP32 + FP32) if m.arch == "llama" else (d * FP32 + 2 * FP32)
    return norm + d * low + v * FP32 + 8


def head_bytes(m: ModelConfig, low: int, tokens: int) -> int:
    """The head at the backward's start: its saved tensors, the logits themselves, and
    the two fp32 vocabulary-wide temporaries of their gradient."""
    return tokens * (head_saved_per_token(m, low) + m.vocab_size * (low + 2 * FP32))


def stage_activation_bytes(
    cfg: Config, blocks: range, last: bool, in_flight: int, batch: int, low: int
) -> int:
    """Activations of one stage's ``blocks`` (model block indices) for ``in_flight``
    micro-batches of ``batch`` sequences each, with ``model.activation_checkpointing``."""
    m = cfg.model
    full = block_saved_bytes(m, low, batch, m.context)
    every = m.recompute_every() or 0
    kept = sum(1 for i in blocks if not (every and i % every == 0))
    redone = len(blocks) - kept
    per_mb = kept * full + redone * batch * m.context * m.d_model * FP32
    if last:
        tokens = batch * m.context
        chunk = min(m.loss_chunk or tokens, tokens)
        # chunked: each chunk keeps only its slice of the last block's output
        per_mb += head_bytes(m, low, chunk) + (tokens * m.d_model * FP32 if chunk < tokens else 0)
    return per_mb * in_flight + (full if redone else 0)  # one block rebuilt at a time


@dataclass(frozen=True)
class AlgorithmBytes:
    """Bytes per parameter a data-parallel algorithm adds: ``persistent`` for the whole
    run, ``transient`` while it syncs, ``checkpoint`` while its state is written (the
    copies its ``state_dict`` makes) and ``swap`` (4 where the model a checkpoint or an
    evaluation writes is the global one, swapped in over a saved copy of the local)."""

    persistent: float
    transient: float
    checkpoint: float
    swap: float


def algorithm_bytes(p: ParallelConfig, replicas: int) -> AlgorithmBytes:
    """What ``p.algorithm`` among ``replicas`` adds per parameter (see the algorithms in
    ``farflung.parallel``):

    - allreduce: the flat buckets (none for a world of one);
    - compressed: two result buffers, the residual and the owner's chunk residual;
      the flat gradients and their compensated copy while syncing;
    - cocktail: the global copy, two result buffers, the delta snapshot, the owner's
      chunk residual (with ``error_feedback``); the codec chain's working set while
      syncing (its encode and decode take ~2.7 and ~3.2 bytes per element of their
      chunk, measured at 40 M elements on a CPU; 4 bytes per parameter counted);
    - diloco: the global copy and the outer momentum (and the owner's chunk residual
      with a lossy codec); the pseudo-gradient, the flat parameters, the average and the
      decoded own contribution while syncing;
    - gossip: its public copy and one per ring neighbour; the flat parameters, their
      difference and the mix while gossiping.

    Their checkpoints copy the global (or public) copies and the residuals."""
    a, n = p.algorithm, replicas
    if n == 1 and a in ("allreduce", "compressed"):
        return AlgorithmBytes(0.0, 0.0, 0.0, 0.0)
    owner = FP32 / n
    if a == "allreduce":
        return AlgorithmBytes(FP32, 0.0, 0.0, 0.0)
    if a == "compressed":
        ef = FP32 + owner if p.error_feedback else 0.0
        return AlgorithmBytes(2 * FP32 + ef, 2 * FP32, ef, 0.0)
    if a == "cocktail":
        ef = owner if p.error_feedback else 0.0
        return AlgorithmBytes(4 * FP32 + ef, FP32, FP32 + ef, FP32)
    if a == "diloco":
        momentum = FP32 if p.outer_momentum > 0 else 0
        ef = owner if (p.codec or "identity") != "identity" and p.error_feedback else 0.0
        return AlgorithmBytes(FP32 + momentum + ef, 4 * FP32, FP32 + ef, FP32)
    if a == "gossip":
        copies = FP32 * (1 + min(2, n - 1))
        return AlgorithmBytes(copies, 3 * FP32, copies, FP32)
    raise ValueError(f"parallel.algorithm {a!r}: no memory model")


def largest_tensor(m: ModelConfig, stage: int, stages: int) -> int:
    """Elements of the stage's largest parameter: the embedding or head table on the
    first and last stage, else a block's widest matrix."""
    d, f = m.d_model, ffn_width(m)
    widest = max(d * f, 3 * d * d if m.arch == "gpt2" else d * d)
    ends = stage == 0 or stage == stages - 1
    return max(widest, m.vocab_size * d) if ends else widest


def in_flight(cfg: Config, stage: int, stages: int) -> int:
    """Micro-batches whose activations a stage holds at once."""
    if stages == 1:
        return 1
    m = cfg.pipeline.micro_batches
    return m if cfg.pipeline.schedule == "gpipe" else min(m, stages - stage)


def layout_memory(cfg: Config, stages: int, dp: int, device: str = "cuda") -> list[RankMemory]:
    """The predicted peak of every stage of a ``stages`` x ``dp`` layout of ``cfg``
    (``pipeline.layers`` when it has ``stages`` entries, else balanced) on a ``device``
    kind (``cuda`` or ``cpu``): its replica 0, which writes the stage's weights into
    checkpoints (and, on stage 0, assembles the model)."""
    return [rank_memory(cfg, stages, dp, s * dp, device) for s in range(stages)]


def rank_memory(cfg: Config, stages: int, dp: int, rank: int, device: str = "cuda") -> RankMemory:
    """The predicted peak of ``rank`` (= stage x dp + replica) of the layout."""
    m, p = cfg.model, cfg.pipeline
    s, replica = divmod(rank, dp)
    layers = list(p.layers) if len(p.layers) == stages else balanced_layers(m, stages)
    params = stage_params(cfg, layers)
    n = params[s]
    low = compute_bytes(cfg.train.precision, device)
    local = cfg.train.batch_size // dp
    batch = max(1, local // p.micro_batches) if stages > 1 else cfg.train.micro_batch_size or local
    algo = algorithm_bytes(cfg.parallel, dp)
    blocks = range(sum(layers[:s]), sum(layers[: s + 1]))
    acts = stage_activation_bytes(
        cfg, blocks, s == stages - 1, in_flight(cfg, s, stages), batch, low
    )
    disk = 0
    if stages > 1 and p.compression == "aqsgd":  # fp16 m(xi) per sample, per side
        disk = ((s > 0) + (s < stages - 1)) * 2 * m.context * m.d_model * cfg.data.max_samples
    # autocast casts every weight matrix, not the embedding tables (looked up)
    matrices = n - (embedding_params(m) if s == 0 else 0)
    fused = cfg.optim.fused == "true" or (cfg.optim.fused == "auto" and device == "cuda")
    return RankMemory(
        params=n,
        static=STATIC_PER_PARAM * n,
        state=int(algo.persistent * n),
        casts=2 * matrices if low < FP32 else 0,
        activations=acts,
        transient=int(algo.transient * n),
        optimizer=0 if fused else FP32 * largest_tensor(m, s, stages),
        checkpoint=checkpoint_bytes(algo, params, s, replica, stages),
        runtime=CPU_RUNTIME_BYTES if device == "cpu" else 0,
        overlapped=overlaps(cfg) and dp > 1,
        aqsgd_disk=disk,
        retained=device == "cpu",
    )


def checkpoint_bytes(
    algo: AlgorithmBytes, params: list[int], stage: int, replica: int, stages: int
) -> int:
    """What writing a checkpoint adds, at the larger of its two moments: while the
    rank's state is saved, the algorithm's copies and, on a pipeline's replica 0, its
    stage's weights (a copy, the global ones swapped in where they differ); then, on the
    rank that writes model.safetensors, the global model swapped in (one stage) or every
    stage's weights read back from the rank files (several)."""
    n = params[stage]
    saving = algo.checkpoint * n
    if replica == 0 and stages > 1:
        saving += (algo.swap + FP32) * n
    writing = 0.0
    if replica == 0 and stage == 0:
        writing = FP32 * sum(params) if stages > 1 else algo.swap * n
    return int(max(saving, writing))
