"""The planner's per-step sizes against the real model's stages and hand formulas."""

from __future__ import annotations

import math

import pytest

from farflung.compress import HEADER_NBYTES
from farflung.config import Config, ModelConfig, PipelineConfig, TrainConfig
from farflung.model import GPT, GPTStage
from farflung.plan.workload import workload


def config(**pipeline) -> Config:
    model = ModelConfig(n_layer=5, n_head=2, d_model=32, context=16, vocab_size=300)
    return Config(
        model=model, train=TrainConfig(batch_size=16), pipeline=PipelineConfig(**pipeline)
    )


@pytest.mark.parametrize("tied", [True, False])
def test_stage_parameters_are_what_the_stages_hold(tied):
    cfg = config(stages=2, layers=[3, 2])
    cfg.model.tie_embeddings = tied
    w = workload(cfg, stages=2, dp=1)
    gpt = GPT(cfg.model)
    held = [sum(p.numel() for p in GPTStage(gpt, a, b).parameters()) for a, b in [(0, 3), (3, 5)]]
    assert list(w.stage_params) == held
    assert w.layers == (3, 2)
    # the tied embedding's fp32 gradient crosses first <-> last: 300 x 32 x 4 bytes
    assert w.c_tied == (300 * 32 * 4 if tied else 0)
    assert workload(cfg, stages=1, dp=2).c_tied == 0  # one stage holds both copies


def test_boundary_bytes_match_the_payload_formats():
    b, t, d = 16 // 2, 16, 32  # batch per pipeline (dp 2), context, width
    none = workload(config(stages=2, compression="none"), stages=2, dp=2)
    assert none.c_pp_fwd == none.c_pp_bwd == b * t * d * 4
    half = workload(config(stages=2, compression="fp16"), stages=2, dp=2)
    assert half.c_pp_fwd == b * t * d * 2
    aq = workload(config(stages=2, compression="aqsgd", fwd_bits=3, bwd_bits=6), stages=2, dp=2)
    # one fp16 scale per sample and channel, then the codes bit-packed
    assert aq.c_pp_fwd == b * d * 2 + math.ceil(b * t * d * 3 / 8)
    assert aq.c_pp_bwd == b * d * 2 + math.ceil(b * t * d * 6 / 8)
    assert aq.c_pp == (aq.c_pp_fwd + aq.c_pp_bwd) / 2


def test_data_parallel_bytes_follow_the_codec_and_the_sync_interval():
    cfg = config(stages=2, layers=[3, 2])
    w = workload(cfg, stages=2, dp=2)
    largest = max(w.stage_params)
    assert w.c_dp == largest * 4 + HEADER_NBYTES  # identity: fp32 plus the header
    assert w.stage_c_dp == tuple(float(n * 4 + HEADER_NBYTES) for n in w.stage_params)
    every = workload(cfg, stages=2, dp=2, sync_every=10)
    assert every.c_dp == pytest.approx(w.c_dp / 10)
    # CocktailSGD's chain (random-k 0.1, top-k 0.2, 4 bits): ~0.02 x 4.5 bits a value
    ck = workload(cfg, stages=2, dp=2, dp_codec="cocktail")
    assert w.c_dp / 250 < ck.c_dp < w.c_dp / 100
    q = workload(cfg, stages=2, dp=2, dp_codec="quantize:bits=4")
    # 4 bits a value plus an fp16 scale per bucket of 128, against 32 bits
    assert q.c_dp == HEADER_NBYTES + 2 * math.ceil(largest / 128) + math.ceil(largest * 4 / 8)


def test_stage_flops_count_blocks_and_the_head():
    cfg = config(stages=2, layers=[3, 2], micro_batches=4)
    w = workload(cfg, stages=2, dp=1)
    d, t, v = 32, 16, 300
    tokens = 16 // 4 * t  # one micro-batch
    block = 2 * (4 + 2 * 4) * d * d + 4 * t * d  # projections + MLP, attention
    assert w.stage_flops[0] == 3 * tokens * 3 * block
    assert w.stage_flops[1] == 3 * tokens * (2 * block + 2 * d * v)
