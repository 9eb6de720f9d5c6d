"""Pipeline parallelism end to end: schedules, exactness against a single process,
the 1F1B memory bound, AQ-SGD buffers and resume, bytes on the wire, every
data-parallel algorithm on a stage's replicas, failures and config errors.

The expectations come from elsewhere than the code under test: a single-process
``farflung train --workers 1`` run with the same global batch and micro-batch (the
reference every pipeline run must match), in-process autograd on the whole GPT, and
payload sizes written out by hand from the documented wire formats.

Every ``farflung train`` costs seconds of start-up, so the runs are shared: the
module starts them in a small thread pool as soon as it begins (only the groups the
selected tests use), and each test waits for the runs it reads.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cli import run_cli
from distributed import run_distributed
from safetensors.torch import load_file, load_model

# the tiny corpus and the CLI helper are shared with the CLI tests
from tiny_runs import farflung

from farflung.compress.activations import BoundaryCodec
from farflung.config import ModelConfig
from farflung.data import Tokenizer, batch_ids
from farflung.model import GPT, GPTStage
from farflung.parallel.pipeline import StageMap
from farflung.parallel.pipeline.mesh import Mesh
from farflung.parallel.pipeline.runtime import Boundary, MicroBatch, StageRunner
from farflung.plan.schedule import make_schedule, peak_in_flight
from farflung.train.metrics import read_jsonl

# ---------------------------------------------------------------- the shared runs

STEPS, BATCH, M, MICRO = 8, 8, 4, 2  # pipeline.micro_batches = 4 (the default): 2 each
CONTEXT, D_MODEL = 16, 32
SEED = 1234
MAX_SAMPLES = 24  # 3 steps per epoch: epochs line up with steps, no repeat in a step
EVAL_EVERY = 4  # evaluations after steps 4 and 8: step 5's record holds eval traffic
AFTER_EVAL = {5}  # (the evaluation after step 8 ends the run)
POOL_WORKERS = 3  # runs at once; each is 1-4 worker processes
RUN_TIMEOUT = 420  # seconds; the pool shares two cores with the rest of the suite


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


PP2 = sets("pipeline.stages=2")
DP2 = sets("pipeline.stages=2", "pipeline.micro_batches=2")  # 4 / dp 2 / 2 = 2 each
AQSGD = PP2 + sets(
    "pipeline.compression=aqsgd",
    "pipeline.fwd_bits=8",
    "pipeline.bwd_bits=8",
    # a checkpoint after step 2: mid-way through the first epoch (16 of 24 samples
    # have a buffer row), what the resume test restarts from
    "train.checkpoint_every=2",
    "train.keep_checkpoints=10",
    # and in bf16: the resume below is exact under autocast too
    "train.precision=bf16",
)
CUT_ENV = {"FARFLUNG_FAULTS": "1:4:EXIT"}  # rank 1 exits after step 3, before step 4
# a placement that is not stage-major: rank 0 holds the last stage
PLACEMENT = {
    "stages": 2,
    "ranks": [
        {"rank": 0, "stage": 1, "replica": 0, "host": "b"},
        {"rank": 1, "stage": 0, "replica": 1, "host": "a"},
        {"rank": 2, "stage": 0, "replica": 0, "host": "a"},
        {"rank": 3, "stage": 1, "replica": 1, "host": "b"},
    ],
}
DP_ALGORITHMS = {
    "compressed": (),
    "cocktail": (),
    "diloco": ("parallel.local_steps=3",),
    "gossip": (),
}


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess

    def ok(self) -> Run:
        assert self.proc.returncode == 0, f"{self.out.name} failed:\n{self.proc.stderr}"
        return self

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(self.out / "metrics.jsonl")}

    def records(self) -> dict[int, dict]:
        return {r["step"]: r for r in read_jsonl(self.out / "metrics.jsonl")}

    def evals(self) -> dict[int, float]:
        return {e["step"]: e["val_loss"] for e in read_jsonl(self.out / "eval.jsonl")}

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def checkpoint(self, step: int = STEPS) -> Path:
        return self.out / "checkpoints" / f"step_{step:08d}"

    def rank_state(self, rank: int, step: int = STEPS) -> dict:
        path = self.checkpoint(step) / f"rank{rank}.pt"
        return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def root(tiny) -> Path:  # noqa: F811
    """The tiny corpus with a 6-block config (so 2 and 3 stages both work)."""
    (tiny / "pipe.toml").write_text(f"""
[model]
n_layer = 6
n_head = 2
d_model = {D_MODEL}
context = {CONTEXT}
[data]
dir = "{tiny / "data"}"
max_samples = {MAX_SAMPLES}
[optim]
lr = 3e-3
warmup_steps = 2
[train]
steps = {STEPS}
batch_size = {BATCH}
eval_every = {EVAL_EVERY}
eval_batches = 2
checkpoint_every = 0
threads = 1
seed = {SEED}
""")
    (tiny / "placement.json").write_text(json.dumps(PLACEMENT))
    return tiny


def train(root: Path, name: str, *args: str, workers: int, env: dict | None = None) -> Run:
    out = root / "pp" / name
    proc = farflung(
        "train",
        str(root / "pipe.toml"),
        "--workers",
        str(workers),
        "--out",
        str(out),
        "--quiet",
        *args,
        env=env,
        timeout=RUN_TIMEOUT,
    )
    return Run(out, proc)


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(POOL_WORKERS) as ex:
        yield ex


def _submit(pool: ThreadPoolExecutor, jobs: dict[str, Callable[[], object]]) -> dict[str, Future]:
    return {name: pool.submit(job) for name, job in jobs.items()}


@pytest.fixture(scope="module")
def exact(root, pool) -> dict[str, Future]:
    """The single-process reference and the pipeline runs that must match it."""
    return _submit(
        pool,
        {
            "ref": lambda: train(root, "ref", *sets("train.micro_batch_size=2"), workers=1),
            "gpipe": lambda: train(
                root, "gpipe", *PP2, *sets("pipeline.schedule=gpipe"), workers=2
            ),
            "1f1b": lambda: train(root, "1f1b", *PP2, *sets("pipeline.schedule=1f1b"), workers=2),
            "three": lambda: train(root, "three", *sets("pipeline.stages=3"), workers=3),
            "dp2": lambda: train(root, "dp2", *DP2, workers=4),
            "placed": lambda: train(
                root, "placed", *DP2, "--placement", str(root / "placement.json"), workers=4
            ),
        },
    )


def _cut_and_resume(root: Path) -> tuple[Run, Run]:
    cut = train(root, "aqsgd_cut", *AQSGD, workers=2, env=CUT_ENV)
    resumed = train(root, "aqsgd_cut", *AQSGD, "--resume", workers=2)
    return cut, resumed


@pytest.fixture(scope="module")
def codecs(root, pool) -> dict[str, Future]:
    """Two stages under each boundary compression (none is ``exact["1f1b"]``)."""
    return _submit(
        pool,
        {
            "aqsgd": lambda: train(root, "aqsgd", *AQSGD, workers=2),
            "aqsgd_cut": lambda: _cut_and_resume(root),
            "fp16": lambda: train(
                root, "fp16", *PP2, *sets("pipeline.compression=fp16"), workers=2
            ),
            # untied: no tied-embedding traffic at all
            "quantize": lambda: train(
                root,
                "quantize",
                *PP2,
                *sets(
                    "pipeline.compression=quantize",
                    "pipeline.fwd_bits=4",
                    "pipeline.bwd_bits=8",
                    "model.tie_embeddings=false",
                ),
                workers=2,
            ),
        },
    )


@pytest.fixture(scope="module")
def algorithms(root, pool) -> dict[str, Future]:
    """Two stages x two replicas under every data-parallel algorithm but allreduce
    (that one is ``exact["dp2"]``)."""
    return _submit(
        pool,
        {
            name: (
                lambda name=name, extra=extra: train(
                    root, name, *DP2, *sets(f"parallel.algorithm={name}", *extra), workers=4
                )
            )
            for name, extra in DP_ALGORITHMS.items()
        },
    )


@pytest.fixture(scope="module", autouse=True)
def _start_runs(request):
    """Start the run groups the selected tests of this module use, all at once."""
    wanted = {
        name
        for item in request.session.items
        if item.module is request.module
        for name in item.fixturenames
    }
    for group in ("exact", "codecs", "algorithms"):
        if group in wanted:
            request.getfixturevalue(group)


def by_step_close(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want)
    bad = {s: (got[s], want[s]) for s in want if got[s] != pytest.approx(want[s], rel=rel)}
    assert not bad, f"differ (step: got, want): {bad}"


# ---------------------------------------------------------------- 1. schedules (pure)

CASES = [(s, stages, m) for stages in range(1, 5) for s in range(stages) for m in range(1, 9)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_every_micro_batch_runs_forward_once_then_backward_once(name):
    for stage, stages, m in CASES:
        actions = make_schedule(name, stage, stages, m)
        assert sorted(actions) == sorted(
            [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
        )
        for i in range(m):
            assert actions.index(("F", i)) < actions.index(("B", i)), (stage, stages, m, i)


def _live(actions) -> int:
    """Micro-batches held at once, counted here without peak_in_flight."""
    held, most = set(), 0
    for kind, i in actions:
        (held.add if kind == "F" else held.remove)(i)
        most = max(most, len(held))
    return most


def test_peak_in_flight_is_stages_minus_stage_for_1f1b_and_m_for_gpipe():
    for stage, stages, m in CASES:
        one = make_schedule("1f1b", stage, stages, m)
        assert _live(one) == peak_in_flight(one) == min(stages - stage, m), (stage, stages, m)
        gp = make_schedule("gpipe", stage, stages, m)
        assert _live(gp) == peak_in_flight(gp) == m, (stage, stages, m)


def test_last_stage_of_1f1b_alternates_forward_and_backward():
    for stages in range(1, 5):
        for m in range(1, 9):
            actions = make_schedule("1f1b", stages - 1, stages, m)
            assert actions == [a for i in range(m) for a in (("F", i), ("B", i))]


def test_unknown_schedule_and_stage_out_of_range_are_refused():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("zigzag", 0, 2, 4)
    with pytest.raises(ValueError, match="stage 2"):
        make_schedule("1f1b", 2, 2, 4)


# ---------------------------------------------------------------- 2. exactness


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "three", "dp2", "placed"])
def test_pipeline_matches_the_single_process_run(root, exact, name):
    ref, run = exact["ref"].result().ok(), exact[name].result().ok()
    assert sorted(ref.losses()) == list(range(1, STEPS + 1))
    by_step_close(run.losses(), ref.losses())
    assert sorted(ref.evals()) == [4, 8]
    by_step_close(run.evals(), ref.evals())
    assert run.summary()["final_val_loss"] == pytest.approx(ref.summary()["final_val_loss"], 1e-5)
    # the assembled whole model: same names, same weights, loads into a GPT
    got = load_file(run.checkpoint() / "model.safetensors")
    want = load_file(ref.checkpoint() / "model.safetensors")
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    vocab = Tokenizer.load(root / "data" / "tokenizer.json").vocab_size
    model = GPT(
        ModelConfig(n_layer=6, n_head=2, d_model=D_MODEL, context=CONTEXT, vocab_size=vocab)
    )
    missing, unexpected = load_model(model, str(run.checkpoint() / "model.safetensors"))
    assert not missing and not unexpected


def test_pipeline_summary_describes_the_grid(exact):
    p = exact["three"].result().ok().summary()["pipeline"]
    assert (p["stages"], p["dp"], p["schedule"], p["micro_batches"]) == (3, 1, "1f1b", M)
    assert sum(p["layers"]) == 6 and min(p["layers"]) >= 1
    p = exact["dp2"].result().ok().summary()["pipeline"]
    assert (p["stages"], p["dp"], p["micro_batches"]) == (2, 2, 2)


def test_summary_counts_rank_0s_live_micro_batches(exact):
    peak = {
        n: exact[n].result().ok().summary()["pipeline"]["peak_live_micro_batches"]
        for n in exact
        if n != "ref"
    }
    # rank 0 holds stage 0 (of 2 or 3) except in "placed", where it holds the last stage
    assert peak == {"gpipe": M, "1f1b": 2, "three": 3, "dp2": 2, "placed": 1}


def test_data_parallel_replicas_of_each_stage_hold_the_same_weights(exact):
    for name, pairs in (("dp2", [(0, 1), (2, 3)]), ("placed", [(2, 1), (0, 3)])):
        run = exact[name].result().ok()
        for a, b in pairs:
            wa, wb = run.rank_state(a)["model"], run.rank_state(b)["model"]
            assert sorted(wa) == sorted(wb)
            assert all(torch.equal(wa[k], wb[k]) for k in wa), (name, a, b)


# ---------------------------------------------------------------- 3. memory bound, counted

STAGES_MEM, M_MEM = 3, 6


def _stage_step(rank: int, world: int) -> dict:
    """One step of stage ``rank`` of a 3-block GPT under both schedules; returns the
    peak of micro-batches held, the loss and the blocks' gradients, and the same
    gradients from plain autograd on the whole model (computed in this process)."""
    from farflung.comm import Comm

    cfg = ModelConfig(n_layer=STAGES_MEM, n_head=2, d_model=16, context=8, vocab_size=64)
    torch.manual_seed(0)
    full = GPT(cfg)
    whole = copy.deepcopy(full)
    tokens = torch.randint(
        0, 64, (M_MEM, 1, cfg.context + 1), generator=torch.Generator().manual_seed(1)
    )
    mbs = [MicroBatch(np.array([i]), tokens[i, :, :-1], tokens[i, :, 1:]) for i in range(M_MEM)]

    total = sum(whole(mb.x, mb.y)[1] for mb in mbs) / M_MEM
    total.backward()
    want = {n: p.grad.clone() for n, p in whole.blocks[rank].named_parameters()}

    stage = GPTStage(full, rank, rank + 1)
    mesh = Mesh.create(StageMap.default(world, world), rank)  # as a PipelineWorker does
    comm = Comm()

    def side(offset: int) -> Boundary | None:
        if mesh.neighbour(offset) is None:
            return None
        fwd, bwd = (Comm(mesh.links[(offset, d)], comm.meter) for d in ("fwd", "bwd"))
        codec = BoundaryCodec("none")
        return Boundary(stage=rank + offset, send=codec, recv=codec, fwd=fwd, bwd=bwd)

    out = {"want": want, "whole_loss": total.item()}
    for schedule in ("gpipe", "1f1b"):
        stage.zero_grad(set_to_none=True)
        runner = StageRunner(
            stage, comm, rank, world, side(-1), side(+1), schedule,
            (1, cfg.context, cfg.d_model), torch.device("cpu"),
        )  # fmt: skip
        loss = runner.train_step(mbs, step=0)
        grads = {n: p.grad.clone() for n, p in full.blocks[rank].named_parameters()}
        out[schedule] = {"peak": runner.stats.peak_live, "loss": loss, "grads": grads}
    return out


def test_stage_holds_at_most_stages_minus_s_micro_batches_under_1f1b():
    results = run_distributed(_stage_step, STAGES_MEM)
    for s, r in enumerate(results):
        assert r["1f1b"]["peak"] == STAGES_MEM - s
        assert r["gpipe"]["peak"] == M_MEM
        for schedule in ("gpipe", "1f1b"):  # and both compute what autograd computes
            for n, g in r["want"].items():
                torch.testing.assert_close(r[schedule]["grads"][n], g, rtol=1e-5, atol=1e-7)
    last = results[-1]
    assert last["1f1b"]["loss"] == pytest.approx(last["whole_loss"], rel=1e-6)
    assert last["gpipe"]["loss"] == pytest.approx(last["whole_loss"], rel=1e-6)


# ---------------------------------------------------------------- 4. AQ-SGD


def _buffers(run: Run, step: int = STEPS) -> tuple[dict, dict]:
    return run.rank_state(0, step)["aqsgd"], run.rank_state(1, step)["aqsgd"]


def test_aqsgd_buffers_agree_on_both_sides_and_cover_the_samples_seen(codecs):
    run = codecs["aqsgd"].result().ok()
    sender, receiver = _buffers(run)
    assert sorted(sender) == ["rank0-to-rank1"] and sorted(receiver) == ["rank1-from-rank0"]
    s, r = sender["rank0-to-rank1"], receiver["rank1-from-rank0"]
    assert list(s["shape"]) == list(r["shape"]) == [MAX_SAMPLES, CONTEXT, D_MODEL]
    assert torch.equal(s["ids"], r["ids"]) and torch.equal(s["rows"], r["rows"])
    assert s["ids"].tolist() == list(range(MAX_SAMPLES))  # every sample visited
    assert s["rows"].dtype == torch.float16 and torch.isfinite(s["rows"]).all()
    assert s["rows"].abs().amax(dim=(1, 2)).min() > 0  # no row left unwritten
    # mid-way through the first epoch: exactly the samples of steps 1 and 2
    sender, receiver = _buffers(run, step=2)
    s, r = sender["rank0-to-rank1"], receiver["rank1-from-rank0"]
    seen = np.unique(np.concatenate([batch_ids(k, BATCH, MAX_SAMPLES, SEED) for k in (0, 1)]))
    assert len(seen) == 2 * BATCH
    assert s["ids"].tolist() == seen.tolist()
    assert torch.equal(s["ids"], r["ids"]) and torch.equal(s["rows"], r["rows"])


def test_aqsgd_at_8_bits_trains_like_no_compression(exact, codecs):
    plain = exact["1f1b"].result().ok()
    aq = codecs["aqsgd"].result().ok()
    first, last = plain.evals()[4], plain.evals()[8]
    got = aq.evals()[8]
    # within 1% of the uncompressed run's loss, and within a fifth of what the
    # uncompressed run learnt between its two evaluations
    assert got == pytest.approx(last, rel=0.01)
    assert abs(got - last) < 0.2 * (first - last)
    by_step_close(aq.losses(), plain.losses(), rel=0.02)


def test_aqsgd_resume_mid_epoch_is_exact(codecs):
    whole = codecs["aqsgd"].result().ok()
    cut, resumed = codecs["aqsgd_cut"].result()
    assert cut.proc.returncode != 0
    assert "rank 1" in cut.proc.stderr
    resumed.ok()
    assert resumed.summary()["steps_this_run"] == STEPS - 2  # from the step-2 checkpoint
    assert resumed.losses() == whole.losses()
    assert resumed.evals() == whole.evals()
    for a, b in zip(_buffers(resumed), _buffers(whole), strict=True):
        assert sorted(a) == sorted(b)
        for name in a:
            assert torch.equal(a[name]["ids"], b[name]["ids"]), name
            assert torch.equal(a[name]["rows"], b[name]["rows"]), name
    for rank in (0, 1):
        wa, wb = resumed.rank_state(rank)["model"], whole.rank_state(rank)["model"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        # the committer's generator too: writing model.safetensors draws nothing from it
        ra, rb = resumed.rank_state(rank)["rng"], whole.rank_state(rank)["rng"]
        assert torch.equal(ra, rb), rank


# ---------------------------------------------------------------- 5. bytes


def quantized_nbytes(b: int, bits: int) -> int:
    """One fp16 scale per (sample, channel), then the packed codes."""
    return 2 * b * D_MODEL + math.ceil(b * CONTEXT * D_MODEL * bits / 8)


FP32 = 4 * MICRO * CONTEXT * D_MODEL
FP16 = 2 * MICRO * CONTEXT * D_MODEL


EVAL_VALUES = 2 * BATCH * CONTEXT * D_MODEL  # eval_batches x batch_size samples


def _check_bytes(run: Run, fwd: Callable[[int], int], bwd: int, tied: int, eval_width: int) -> None:
    """Per step: M payloads each way, the tied gradients, and after an evaluation its
    activations too (fp32 without compression, else fp16: ``eval_width`` bytes)."""
    recs = run.records()
    assert sorted(recs) == list(range(1, STEPS + 1))
    for step, rec in recs.items():
        evaluated = EVAL_VALUES * eval_width if step in AFTER_EVAL else 0
        kinds = rec["bytes_by_kind"]
        assert kinds["pp_fwd"] == M * fwd(step) + evaluated, step
        assert kinds["pp_bwd"] == M * bwd, step
        assert kinds.get("pp_tied", 0) == tied, step


def test_bytes_per_step_match_the_payload_formats(root, exact, codecs):
    vocab = Tokenizer.load(root / "data" / "tokenizer.json").vocab_size
    tied = 2 * vocab * D_MODEL * 4  # both ends send their fp32 gradient
    _check_bytes(exact["1f1b"].result().ok(), lambda s: FP32, FP32, tied, 4)
    _check_bytes(codecs["fp16"].result().ok(), lambda s: FP16, FP16, tied, 2)
    q = codecs["quantize"].result().ok()
    _check_bytes(q, lambda s: quantized_nbytes(MICRO, 4), quantized_nbytes(MICRO, 8), 0, 2)
    # AQ-SGD: the first epoch (steps 1-3) fresh in fp16, later ones quantized
    epoch = MAX_SAMPLES // BATCH

    def aq_fwd(step: int) -> int:
        return FP16 if step <= epoch else quantized_nbytes(MICRO, 8)

    _check_bytes(codecs["aqsgd"].result().ok(), aq_fwd, quantized_nbytes(MICRO, 8), tied, 2)
    # resumed at step 2 (16 of 24 samples seen): step 3 still sends its 8 fresh
    _, resumed = codecs["aqsgd_cut"].result()
    _check_bytes(resumed.ok(), aq_fwd, quantized_nbytes(MICRO, 8), tied, 2)
    # the summary totals are the per-step sums
    s = q.summary()["bytes_sent_by_kind_total"]
    assert s["pp_bwd"] == STEPS * M * quantized_nbytes(MICRO, 8)
    # one evaluation in fp16: the one after step 4 (the final one belongs to no step)
    assert s["pp_fwd"] == STEPS * M * quantized_nbytes(MICRO, 4) + EVAL_VALUES * 2
    assert s.get("pp_tied", 0) == 0


# ---------------------------------------------------------------- 6. data-parallel algorithms


@pytest.mark.parametrize("name", ["allreduce", *DP_ALGORITHMS])
def test_every_algorithm_trains_a_stage_over_its_replicas(exact, algorithms, name):
    run = (exact["dp2"] if name == "allreduce" else algorithms[name]).result().ok()
    assert run.summary()["algorithm"] == name
    evals = run.evals()
    assert sorted(evals) == [4, 8]
    assert math.isfinite(evals[8]) and evals[8] < evals[4]
    assert all(math.isfinite(v) for v in run.losses().values())
    assert sum(r["bytes_by_kind"]["dp"] for r in run.records().values()) > 0
    if name in ("allreduce", "compressed"):  # exact replicas: identical weights
        for a, b in ((0, 1), (2, 3)):
            wa, wb = run.rank_state(a)["model"], run.rank_state(b)["model"]
            assert all(torch.equal(wa[k], wb[k]) for k in wa), (name, a, b)


# ---------------------------------------------------------------- 7. failures


def test_a_killed_stage_ends_the_run_and_is_named(root):
    t0 = time.monotonic()
    run = train(
        root,
        "killed",
        *PP2,
        *sets("parallel.timeout_s=10", "train.steps=100"),
        workers=2,
        env={"FARFLUNG_FAULTS": "1:4:EXIT"},
    )
    took = time.monotonic() - t0
    assert run.proc.returncode != 0
    assert "worker rank 1 exited with code 17" in run.proc.stderr, run.proc.stderr
    assert not (run.out / "summary.json").exists()
    # start-up included; the link timeout is 10 s, the launcher stops the rest at once
    assert took < 60, f"took {took:.0f} s:\n{run.proc.stderr}"


CONFIG_ERRORS = {
    "too many stages": (
        7,
        sets("pipeline.stages=7"),
        ["pipeline.stages = 7", "model.n_layer = 6"],
    ),
    "batch over dp x micro-batches": (
        4,
        sets("pipeline.stages=2", "pipeline.micro_batches=3"),
        ["train.batch_size = 8", "pipeline.micro_batches = 3"],
    ),
    "world not a multiple of stages": (
        3,
        sets("pipeline.stages=2"),
        ["3 workers", "pipeline.stages = 2"],
    ),
    "layers not summing to n_layer": (
        2,
        sets("pipeline.stages=2", "pipeline.layers=[2, 3]"),
        ["pipeline.layers", "model.n_layer = 6"],
    ),
}


def test_config_errors_exit_2_and_name_the_keys(root):
    # refused before any worker starts: in this process (no interpreter start-up each)
    for name, (workers, args, _) in CONFIG_ERRORS.items():
        out = root / "pp" / f"bad-{name.replace(' ', '-')}"
        cmd = ["train", str(root / "pipe.toml"), "--workers", str(workers), "--out", str(out)]
        code, _, err = run_cli(*cmd, "--quiet", *args)
        assert code == 2, (name, err)
        assert "config error" in err, (name, err)
        for fragment in CONFIG_ERRORS[name][2]:
            assert fragment in err, (name, fragment, err)
        assert not out.exists(), name  # refused before anything was launched
