"""compressed and cocktail on real gloo processes: training, numerics against
references, the background thread, and checkpoint state."""

from __future__ import annotations

import io
import threading
import time

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from farflung.comm import Comm
from farflung.config import ModelConfig, ParallelConfig
from farflung.model import GPT, param_groups
from farflung.parallel import make_algorithm
from farflung.parallel.flat import flat_grads, flat_params

CFG = ModelConfig(n_layer=2, n_head=2, d_model=32, context=16, vocab_size=64)
BATCH = 8


def _batch(step: int, rank: int, world: int):
    # two fixed batches in turn: a tiny model memorises them within a few dozen steps
    g = torch.Generator().manual_seed(1000 + step % 2)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, CFG.context + 1), generator=g)
    share = BATCH // world
    mine = tokens[rank * share : (rank + 1) * share]
    return mine[:, :-1], mine[:, 1:]


def _setup(name: str, pcfg: dict):
    torch.manual_seed(0)
    model = GPT(CFG)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)
    algo = make_algorithm(name, model, opt, Comm(), ParallelConfig(algorithm=name, **pcfg))
    algo.setup()
    return model, opt, algo


def _steps(model, opt, algo, rank, world, first: int, last: int) -> list[float]:
    losses = []
    for step in range(first, last):
        x, y = _batch(step, rank, world)
        _, loss = model(x, y)
        loss.backward()
        algo.sync_gradients()
        opt.step()
        opt.zero_grad(set_to_none=True)
        algo.after_step(step + 1)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses


def train_worker(rank: int, world: int, name: str, pcfg: dict, steps: int) -> dict:
    model, opt, algo = _setup(name, pcfg)
    algo.comm.meter.snapshot(reset=True)
    losses = _steps(model, opt, algo, rank, world, 0, steps)
    algo.close()
    with algo.eval_parameters() as m:
        evaluated = flat_params(list(m.parameters()))
    return {
        "losses": losses,
        "local": flat_params(list(model.parameters())),
        "eval": evaluated,
        "dp_sent": algo.comm.meter.snapshot().by_kind["dp"].sent,
    }


@pytest.fixture(scope="module")
def baseline():
    return run_distributed(train_worker, 2, "allreduce", {}, 25)


@pytest.mark.parametrize(
    "name, pcfg",
    [
        ("compressed", {}),
        ("compressed", {"codec": "topk:ratio=0.05", "warmup_steps": 2}),
        ("cocktail", {}),
        ("cocktail", {"overlap": False, "warmup_steps": 3}),
    ],
)
def test_loss_falls_and_bytes_shrink(name, pcfg, baseline):
    res = run_distributed(train_worker, 2, name, pcfg, 25)
    losses = res[0]["losses"]
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], losses
    assert res[0]["dp_sent"] < baseline[0]["dp_sent"] / 4
    # every rank agrees on the model it evaluates
    torch.testing.assert_close(res[0]["eval"], res[1]["eval"])


def test_compressed_identity_equals_allreduce():
    ours = run_distributed(train_worker, 3, "compressed", {"codec": "identity"}, 6)
    base = run_distributed(train_worker, 3, "allreduce", {}, 6)
    torch.testing.assert_close(ours[0]["losses"], base[0]["losses"], rtol=1e-5, atol=0)


def _two_workers() -> tuple[list[GPT], list[torch.optim.Optimizer]]:
    """The sequential simulation's two workers: one start, each its own AdamW."""
    torch.manual_seed(0)
    models = [GPT(CFG), GPT(CFG)]
    models[1].load_state_dict(models[0].state_dict())
    return models, [torch.optim.AdamW(param_groups(m, 0.0), lr=3e-3) for m in models]


def _local_steps(models: list[GPT], opts: list[torch.optim.Optimizer], step: int) -> None:
    """Each simulated worker's own AdamW step on its half of step ``step``'s batch."""
    for r, (m, o) in enumerate(zip(models, opts, strict=True)):
        _, loss = m(*_batch(step, r, 2))
        loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)


@pytest.mark.parametrize("scale", [1.0, 1.5])
def test_cocktail_identity_is_model_averaging(scale):
    """With an exact codec and no overlap, cocktail averages the local models every
    step, x̄ ← x̄ + s·(mean_i x_i − x̄) with s = delta_scale; checked against a
    sequential simulation of the two workers."""
    pcfg = {"codec": "identity", "overlap": False, "delta_scale": scale}
    ours = run_distributed(train_worker, 2, "cocktail", pcfg, 5)
    models, opts = _two_workers()
    for step in range(5):
        start = [p.detach().clone() for p in models[0].parameters()]
        _local_steps(models, opts, step)
        with torch.no_grad():
            pairs = zip(start, models[0].parameters(), models[1].parameters(), strict=True)
            for x, p0, p1 in pairs:
                new = x + scale * ((p0 + p1) / 2 - x)
                p0.copy_(new)
                p1.copy_(new)
    expected = flat_params(list(models[0].parameters()))
    for r in range(2):
        torch.testing.assert_close(ours[r]["local"], expected, rtol=1e-4, atol=1e-5)


def _bf16_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean of two workers' numbers as the sync carries it: halves in bfloat16."""
    return ((a / 2).bfloat16() + (b / 2).bfloat16()).float()


def _hand_factored(v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Adafactor's estimate from the workers' mean row and column sums, written out."""
    m0, m1 = v0.reshape(-1, v0.shape[-1]), v1.reshape(-1, v1.shape[-1])
    r = _bf16_mean(m0.sum(dim=1), m1.sum(dim=1))
    c = _bf16_mean(m0.sum(dim=0), m1.sum(dim=0))
    est = torch.zeros_like(m0)
    for i in range(est.shape[0]):
        for j in range(est.shape[1]):
            est[i, j] = r[i] * c[j] / r.sum()
    return est.view_as(v0)


@pytest.mark.parametrize("mode", ["full", "factored"])
def test_cocktail_shared_moments_against_simulation(mode):
    """moment_sync_every = 2 with an exact codec and no overlap: after steps 2 and 4
    both workers' AdamW second moments become the mean of theirs (``full``) or the
    factored estimate of that mean (matrices; vectors whole), and the models are
    averaged every step; checked against a sequential simulation."""
    pcfg = {"codec": "identity", "overlap": False, "moment_sync_every": 2, "moment_sync": mode}
    ours = run_distributed(train_worker, 2, "cocktail", pcfg, 5)
    models, opts = _two_workers()
    for step in range(5):
        _local_steps(models, opts, step)
        with torch.no_grad():
            for p0, p1 in zip(models[0].parameters(), models[1].parameters(), strict=True):
                mean = (p0 + p1) / 2
                p0.copy_(mean)
                p1.copy_(mean)
                if (step + 1) % 2:
                    continue
                v0, v1 = (o.state[p]["exp_avg_sq"] for o, p in zip(opts, (p0, p1), strict=True))
                if mode == "factored" and v0.dim() >= 2:
                    v = _hand_factored(v0, v1)
                else:
                    v = _bf16_mean(v0, v1)
                v0.copy_(v)
                v1.copy_(v)
    expected = flat_params(list(models[0].parameters()))
    for r in range(2):
        torch.testing.assert_close(ours[r]["local"], expected, rtol=1e-4, atol=1e-5)


BETA2 = 0.5


def overlapped_moments_worker(rank: int, world: int) -> dict:
    """Cocktail, overlap on, full moments shared every step: per step this rank's
    squared gradients and every rank's second moments once after_step returns."""
    model, opt, algo = _setup("cocktail", {"moment_sync_every": 1, "moment_sync": "full"})
    for group in opt.param_groups:  # a short memory, so that step t+1's g² weighs a lot
        group["betas"] = (0.9, BETA2)
    sq, v_all = [], []
    for step in range(4):
        _, loss = model(*_batch(step, rank, world))
        loss.backward()
        sq.append(flat_grads(algo.params).square())
        opt.step()
        opt.zero_grad(set_to_none=True)
        algo.after_step(step + 1)
        v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in algo.params])
        gathered = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(gathered, v)
        v_all.append(gathered)
    algo.close()
    return {"sq": sq, "v": v_all}


def test_shared_moments_arrive_one_step_late_without_losing_a_step():
    """The moments taken after step t arrive after step t+1, and Adam's update of
    step t+1 must survive: v_i(t+1) = β2 · mean_j v_j(t) + (1 − β2) g_i(t+1)². (The
    mean travels in bfloat16, hence the tolerance; dropping step t+1's g², which
    weighs half, or the mean, would miss it by far more.)"""
    res = run_distributed(overlapped_moments_worker, 2)
    for r in range(2):
        for t in range(1, 4):
            mean = (res[r]["v"][t - 1][0] + res[r]["v"][t - 1][1]) / 2
            expected = BETA2 * mean + (1 - BETA2) * res[r]["sq"][t]
            torch.testing.assert_close(res[r]["v"][t][r], expected, rtol=1e-2, atol=1e-12)


def test_factored_moments_by_hand():
    """Row sums (3, 7), column sums (4, 6), total 10: the estimate is r_i c_j / 10;
    a rank-1 matrix comes back exactly; vectors travel whole."""
    from farflung.parallel.moments import estimates, moment_stats, stats_numel

    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([w, b])
    opt.state[w]["exp_avg_sq"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    opt.state[b]["exp_avg_sq"] = torch.tensor([5.0, 6.0, 7.0])
    stats = moment_stats(opt, [w, b])
    assert stats.tolist() == [3.0, 7.0, 4.0, 6.0, 5.0, 6.0, 7.0]
    assert stats_numel([w, b]) == 7
    est_w, est_b = estimates(stats, [w.data, b.data])
    torch.testing.assert_close(est_w, torch.tensor([[1.2, 1.8], [2.8, 4.2]]))
    assert est_b.tolist() == [5.0, 6.0, 7.0]
    rank1 = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 4.0]))
    w3 = torch.nn.Parameter(torch.zeros(3, 2))
    opt3 = torch.optim.AdamW([w3])
    opt3.state[w3]["exp_avg_sq"] = rank1.clone()
    (est,) = estimates(moment_stats(opt3, [w3]), [w3.data])
    torch.testing.assert_close(est, rank1)
    assert moment_stats(torch.optim.AdamW([w3]), [w3]) is None  # no step taken yet


def test_factored_and_full_statistics_by_hand():
    """A 3x5 matrix, a 2x3x4 tensor (rows over its first two dimensions) and a vector:
    ``factored`` sends row and column sums (3 + 5, 6 + 4) and the vector, 21 numbers;
    ``full`` sends everything, 15 + 24 + 3 = 42, and gets every moment back exactly."""
    from farflung.parallel.moments import estimates, moment_stats, stats_numel

    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 5), (2, 3, 4), (3,))]
    opt = torch.optim.AdamW(params)
    moments = [
        torch.arange(1.0, 16.0).view(3, 5),
        torch.arange(1.0, 25.0).view(2, 3, 4),
        torch.tensor([5.0, 6.0, 7.0]),
    ]
    for p, v in zip(params, moments, strict=True):
        opt.state[p]["exp_avg_sq"] = v.clone()
    factored = moment_stats(opt, params, "factored")
    assert factored.tolist() == [
        *[15.0, 40.0, 65.0],  # 3x5: row sums
        *[18.0, 21.0, 24.0, 27.0, 30.0],  # column sums
        *[10.0, 26.0, 42.0, 58.0, 74.0, 90.0],  # 2x3x4: sums of its 6 rows of 4
        *[66.0, 72.0, 78.0, 84.0],  # its 4 column sums
        *[5.0, 6.0, 7.0],  # the vector, whole
    ]
    full = moment_stats(opt, params, "full")
    assert full.tolist() == [*range(1, 16), *range(1, 25), 5.0, 6.0, 7.0]
    assert stats_numel(params) == stats_numel(params, "factored") == 21
    assert stats_numel(params, "full") == 42
    for est, v in zip(estimates(full, moments, "full"), moments, strict=True):
        assert torch.equal(est, v)
    with pytest.raises(ValueError, match="42 numbers, expected 21"):
        list(estimates(full, moments, "factored"))


def slow_sync_worker(rank: int, world: int, delay: float) -> dict:
    """cocktail with its sync slowed down: a thread that touched the parameters, or a
    training thread that did not wait for it, would give different numbers."""
    from farflung.parallel.cocktail import Cocktail

    original = Cocktail._sync
    seen_threads = set()

    def slow(self, *args):
        seen_threads.add(threading.current_thread().name)
        time.sleep(delay)
        return original(self, *args)

    Cocktail._sync = slow
    try:
        out = train_worker(rank, world, "cocktail", {}, 8)
    finally:
        Cocktail._sync = original
    out["threads"] = sorted(seen_threads)
    return out


def test_cocktail_background_sync_never_races():
    fast = run_distributed(slow_sync_worker, 2, 0.0)
    slow = run_distributed(slow_sync_worker, 2, 0.15)
    for r in range(2):
        assert fast[r]["losses"] == slow[r]["losses"]
        assert torch.equal(fast[r]["local"], slow[r]["local"])
        assert slow[r]["threads"] and all(t.startswith("cocktail-sync") for t in slow[r]["threads"])


def resume_worker(rank: int, world: int, name: str, pcfg: dict) -> dict:
    """6 steps straight vs 3 steps, checkpoint through torch.save, restore, 3 more."""
    model, opt, algo = _setup(name, pcfg)
    straight = _steps(model, opt, algo, rank, world, 0, 6)
    algo.close()
    final = flat_params(list(model.parameters()))

    model, opt, algo = _setup(name, pcfg)
    first = _steps(model, opt, algo, rank, world, 0, 3)
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict()}, buf
    )
    algo.close()
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model, opt, algo = _setup(name, pcfg)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    algo.load_state_dict(state["algo"])
    rest = _steps(model, opt, algo, rank, world, 3, 6)
    algo.close()
    return {
        "straight": straight,
        "resumed": first + rest,
        "final": final,
        "resumed_final": flat_params(list(model.parameters())),
    }


@pytest.mark.parametrize(
    "name, pcfg",
    [
        ("compressed", {"codec": "topk:ratio=0.1+quantize:bits=4"}),
        ("cocktail", {}),
        # the checkpoint holds a sync in flight that carries shared moments
        ("cocktail", {"moment_sync_every": 1}),
    ],
)
def test_state_dict_resume_is_exact(name, pcfg):
    for res in run_distributed(resume_worker, 2, name, pcfg):
        assert res["straight"] == res["resumed"]
        assert torch.equal(res["final"], res["resumed_final"])


def unoverlapped_worker(rank: int, world: int) -> dict:
    from farflung.comm.collectives import set_link_model
    from farflung.netlab.link import LinkMatrix, LinkModel

    set_link_model(LinkModel(LinkMatrix.uniform(world, "1gbit", "100ms")))
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        comm = Comm()
        algo = make_algorithm("cocktail", model, opt, comm, ParallelConfig(overlap=False))
        algo.setup()
        comm.meter.snapshot(reset=True)
        t0 = time.perf_counter()
        algo.after_step(1)  # the sync runs and is applied before this returns
        elapsed = time.perf_counter() - t0
        dp = comm.meter.snapshot().by_kind["dp"]
        algo.close()
        return {"elapsed": elapsed, "blocked": dp.seconds, "hidden": dp.hidden_seconds}
    finally:
        set_link_model(None)


def test_cocktail_without_overlap_counts_its_wait_once():
    """With overlap off the training thread waits for the whole sync (two phases, a
    100 ms delay each): that wait is the blocked time, counted once. It used to be
    counted twice, once more as the sync thread's own."""
    for res in run_distributed(unoverlapped_worker, 2):
        assert res["blocked"] >= 0.2  # it did wait for both phases
        assert res["blocked"] <= res["elapsed"] + 0.01
        assert res["hidden"] >= 0.2  # the thread's own time, not blocking
