"""What a pipeline x data-parallel layout moves and computes per step, from the real
model and the real codecs (not from formulas): the planner's ``c_dp``, ``c_pp`` and
per-stage compute.

- Parameters per stage come from building the model's shape (``balanced_layers`` or
  an explicit split), counted as the pipeline holds them (an untied or copied head on
  the last stage).
- ``c_dp``: the bytes of the largest stage's gradients as the data-parallel codec packs
  them (``make_codec(spec).payload_nbytes``), divided by how many steps pass between
  syncs (DiLoCo's ``local_steps``); ``stage_c_dp`` the same for every stage (the
  first and last carry the embeddings and the head, so stages differ).
- ``c_pp_fwd`` / ``c_pp_bwd``: one pipeline's activation and gradient bytes per step
  across one boundary, as the boundary codecs pack them (AQ-SGD counted in its steady
  state, every sample revisited).
- ``stage_flops``: forward + backward FLOPs per micro-batch of each stage (3x the
  forward: the backward costs about twice the forward).
- ``c_tied``: with tied embeddings and more than one stage, the fp32 gradient of the
  embedding each replica's first and last stage exchange after the pipeline (as the
  pipeline worker does: uncompressed, both ways at once)."""

from __future__ import annotations

from dataclasses import dataclass

from farflung.compress import CodecContext, make_codec
from farflung.compress.activations import BoundaryCodec
from farflung.config import Config, ModelConfig
from farflung.model import balanced_layers, block_flops, block_params, head_flops, max_positions

FP32 = 4


@dataclass(frozen=True)
class Workload:
    """Per-step sizes of one layout (see the module docstring)."""

    layers: tuple[int, ...]
    stage_params: tuple[int, ...]
    c_dp: float
    c_pp_fwd: float
    c_pp_bwd: float
    stage_flops: tuple[float, ...]
    c_tied: float = 0.0
    stage_c_dp: tuple[float, ...] = ()

    @property
    def c_pp(self) -> float:
        """DT-FM's single boundary size, whose cost counts twice (forward and
        backward): the mean of the two directions, so 2 c_pp = forward + backward."""
        return (self.c_pp_fwd + self.c_pp_bwd) / 2


def embedding_params(m: ModelConfig) -> int:
    """The token (and, for gpt2, position) embedding tables' parameters: stage 0's."""
    positions = max_positions(m) if m.arch == "gpt2" else 0  # llama: rotary, no table
    return (m.vocab_size + positions) * m.d_model


def overlaps(cfg: Config) -> bool:
    """Whether the data-parallel sync runs behind the next step (cocktail's overlap)."""
    return cfg.parallel.algorithm == "cocktail" and cfg.parallel.overlap


def stage_params(cfg: Config, layers: list[int]) -> list[int]:
    """Parameters each stage holds: its blocks, the embeddings on the first, the final
    norm and the head on the last (a copy when tied and there are several stages; the
    embedding itself with one)."""
    m = cfg.model
    out = [c * block_params(m) for c in layers]
    out[0] += embedding_params(m)
    head = 0 if m.tie_embeddings and len(layers) == 1 else m.vocab_size * m.d_model
    out[-1] += (2 if m.arch == "gpt2" else 1) * m.d_model + head
    return out


def workload(
    cfg: Config, stages: int, dp: int, dp_codec: str = "identity", sync_every: int = 1
) -> Workload:
    """Sizes for ``cfg``'s model cut into ``stages`` (``pipeline.layers`` or balanced),
    ``dp`` replicas, the global ``train.batch_size`` split into
    ``pipeline.micro_batches``, boundaries compressed as ``cfg.pipeline`` says and
    data-parallel traffic packed by the codec spec ``dp_codec`` every ``sync_every``
    steps."""
    m, p = cfg.model, cfg.pipeline
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be known (> 0) to size the head")
    layers = list(p.layers) if p.layers else balanced_layers(m, stages)
    params = stage_params(cfg, layers)
    codec = make_codec(dp_codec)
    # a rolling random-k mask's size may vary by an element from step to step: step 0's
    sizes = [codec.payload_nbytes(n, CodecContext()) for n in params]
    if None in sizes:
        raise ValueError(f"codec {dp_codec!r} does not know its payload size in advance")
    c_dp = [size / sync_every for size in sizes]
    shape = (cfg.train.batch_size // dp, m.context, m.d_model)
    fwd, bwd = boundary_codecs(cfg)
    micro_tokens = shape[0] // p.micro_batches * m.context
    flops = [3 * micro_tokens * c * block_flops(m) for c in layers]
    flops[-1] += 3 * micro_tokens * head_flops(m)
    return Workload(
        tuple(layers),
        tuple(params),
        float(max(c_dp)),
        float(fwd.payload_nbytes(shape)),
        float(bwd.payload_nbytes(shape)),
        tuple(flops),
        float(m.vocab_size * m.d_model * FP32 if m.tie_embeddings and stages > 1 else 0),
        tuple(float(c) for c in c_dp),
    )


def boundary_codecs(cfg: Config) -> tuple[BoundaryCodec, BoundaryCodec]:
    """Codecs with the payload sizes of a boundary's forward and backward direction.
    AQ-SGD's steady state (every sample revisited) sends one quantized block of the
    whole micro-batch, the size of ``quantize`` at the same bits."""
    p = cfg.pipeline
    if p.compression in ("none", "fp16"):
        return BoundaryCodec(p.compression), BoundaryCodec(p.compression)
    return BoundaryCodec("quantize", bits=p.fwd_bits), BoundaryCodec("quantize", bits=p.bwd_bits)
