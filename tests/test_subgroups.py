"""Every data-parallel algorithm on a subgroup, as pipeline parallelism runs them: a
world of 4 split into the data-parallel groups {0, 1} and {2, 3}, each training on
its own data. Each group must agree within itself, stay independent of the other,
and count the traffic of a group of two."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from farflung.comm.dist import new_group, subgroup_like
from farflung.comm.sharded import chunk_contexts, chunk_sizes, status_nbytes
from farflung.compress import make_codec
from farflung.parallel import NonFiniteStep, cocktail, compressed, diloco, distribute
from farflung.parallel.ddp_hook import codec_hook
from farflung.parallel.flat import flat_params

STEPS = 4
SHORT = timedelta(seconds=20)  # the members-only groups' timeout
BATCH = 8
LR = 0.1

CASES = {  # name: (algorithm, options)
    "allreduce": ("allreduce", {}),
    "compressed": ("compressed", {}),
    "cocktail-overlap": ("cocktail", {"overlap": True}),
    "cocktail-foreground": ("cocktail", {"overlap": False}),
    "diloco": ("diloco", {"local_steps": 2}),
    "gossip": ("gossip", {}),
    "ddp-hook": ("ddp", {}),
}


def _model(rank: int) -> torch.nn.Module:
    # every rank starts elsewhere: the algorithm's setup must copy its group's rank 0
    torch.manual_seed(rank)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stream of its own for every rank, and a different target map for each group."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(BATCH, 6, generator=g)
    w = torch.randn(6, 2, generator=torch.Generator().manual_seed(rank // 2))
    return x, x @ w


def _loss(model: torch.nn.Module, step: int, rank: int) -> torch.Tensor:
    x, y = _batch(step, rank)
    return torch.nn.functional.mse_loss(model(x), y)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return flat_params(list(model.parameters()))


def _train(rank: int, group, algorithm: str, options: dict) -> dict:
    model = _model(rank)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    algo = distribute(model, opt, algorithm, group=group, **options)
    init = algo.comm.meter.snapshot(reset=True).by_kind["init"]
    params = []
    for step in range(STEPS):
        _loss(model, step, rank).backward()
        algo.step()
        params.append(_flat(model))
    algo.close()
    with algo.eval_parameters() as m:
        synced = _flat(m)
    dp = algo.comm.meter.snapshot().by_kind["dp"]
    return {"params": params, "synced": synced, "init": init, "dp": dp}


def _train_ddp(rank: int, group) -> dict:
    model = _model(rank)
    ddp = DDP(model, process_group=group)
    state, hook = codec_hook("identity", model=ddp)  # the group comes from the DDP
    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    params = []
    for step in range(STEPS):
        _loss(ddp, step, rank).backward()
        opt.step()
        opt.zero_grad()
        params.append(_flat(model))
    dp = state.comm.meter.snapshot().by_kind["dp"]
    return {"params": params, "synced": params[-1], "dp": dp, "hook_size": state.comm.size}


def _nonfinite_report(rank: int, group) -> list[int] | None:
    """The ranks a non-finite step is blamed on, when global rank 3 has one."""
    model = _model(rank)
    algo = distribute(model, torch.optim.SGD(model.parameters(), lr=LR), group=group)
    _loss(model, 0, rank).backward()
    try:
        algo.step(finite=rank != 3)
    except NonFiniteStep as e:
        return e.ranks
    return None


def _reference(group_ranks: list[int]) -> torch.Tensor:
    """allreduce on a group, on one process: SGD on the members' batches together."""
    model = _model(group_ranks[0])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        xs, ys = zip(*(_batch(step, r) for r in group_ranks), strict=True)
        torch.nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        opt.zero_grad()
    return _flat(model)


def worker(rank: int, world: int) -> dict:
    """One start-up of four processes for all the cases (it costs more than they do)."""
    out = _algorithms_on_subgroups(rank)
    # last: it leaves the members of a pair in different numbers of groups
    out["members_only"] = _members_only_groups(rank)
    dist.barrier()  # rank 0 holds the store: it must outlive the late pair's set-ups
    return out


def _algorithms_on_subgroups(rank: int) -> dict:
    # as a pipeline mesh makes them: every rank creates every group, in the same order
    groups = [new_group([0, 1]), new_group([2, 3])]
    mine = groups[rank // 2]
    pair = [rank // 2 * 2, rank // 2 * 2 + 1]
    out = {"init": _flat(_model(rank)), "reference": _reference(pair)}
    try:  # torch's stand-in for a group this rank is not in
        model = _model(rank)
        distribute(model, torch.optim.SGD(model.parameters()), group=groups[1 - rank // 2])
    except ValueError as e:
        out["refused"] = str(e)
    out["nonfinite"] = _nonfinite_report(rank, mine)
    for case, (algorithm, options) in CASES.items():
        if algorithm == "ddp":
            out[case] = _train_ddp(rank, mine)
        else:
            out[case] = _train(rank, mine, algorithm, options)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(worker, 4)


def test_a_group_this_rank_is_not_in_is_refused(results):
    assert all("not a member" in r["refused"] for r in results)


def test_a_non_finite_step_is_reported_by_global_rank_in_its_group_only(results):
    # group rank 1 of {2, 3} is global rank 3; the other group saw nothing
    assert [r["nonfinite"] for r in results] == [None, None, [3], [3]]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_group_members_agree_and_groups_differ(results, case):
    synced = [r[case]["synced"] for r in results]
    if case == "gossip":  # two ranks' neighbour averages: the same up to rounding
        assert _close(synced[0], synced[1]) and _close(synced[2], synced[3])
    else:
        assert torch.equal(synced[0], synced[1]) and torch.equal(synced[2], synced[3])
    # each group learned its own data (compared as progress from each group's start: a
    # sync over the world would move both groups alike)
    progress = [synced[r] - results[r]["init"] for r in (0, 2)]
    assert not _close(*progress)
    if case in ("allreduce", "compressed", "ddp-hook"):  # identical after every step
        for a, b in [(0, 1), (2, 3)]:
            for pa, pb in zip(results[a][case]["params"], results[b][case]["params"], strict=True):
                assert torch.equal(pa, pb)


def test_allreduce_on_a_group_matches_one_process_on_both_batches(results):
    # the reference starts from the group's rank 0: setup broadcast from the right rank
    for r in results:
        assert _close(r["allreduce"]["params"][-1], r["reference"])


def _numel() -> int:
    return sum(p.numel() for p in _model(0).parameters())


def _sharded_sent(spec: str, step: int, seed: int, r: int, n: int = 2) -> int:
    """What group rank ``r`` sends in one sharded all-reduce round over ``n`` ranks."""
    codec = make_codec(spec)
    sizes, ctxs = chunk_sizes(_numel(), n), chunk_contexts(step, seed, n)
    phase1 = sum(1 + codec.payload_nbytes(sizes[j], ctxs[j]) for j in range(n) if j != r)
    phase2 = (n - 1) * (status_nbytes(2, n) + codec.payload_nbytes(sizes[r], ctxs[r]))
    return phase1 + phase2


def test_bytes_are_those_of_a_group_of_two(results):
    numel = _numel()
    for rank, r in enumerate(results):
        g = rank % 2  # rank in its group
        # setup: a broadcast from the group's rank 0 to the one other member
        init = r["allreduce"]["init"]
        assert (init.sent, init.recv) == ((numel * 4, 0) if g == 0 else (0, numel * 4))
        # ring all-reduce of n=2: the payload (gradients + 2 flags) once each way;
        # a world of 4 would count 2 * 3/4 of it
        assert r["allreduce"]["dp"].sent == STEPS * (numel + 2) * 4
        expect = {
            "compressed": [
                _sharded_sent("quantize:bits=4", s, compressed.MASK_SEED, g) for s in range(STEPS)
            ],
            "cocktail-overlap": [
                _sharded_sent("cocktail", s, cocktail.MASK_SEED, g) for s in range(STEPS)
            ],
            "diloco": [
                _sharded_sent("identity", k, diloco.MASK_SEED, g) for k in range(1, STEPS // 2 + 1)
            ],
        }
        expect["cocktail-foreground"] = expect["cocktail-overlap"]
        for case, rounds in expect.items():
            assert r[case]["dp"].sent == sum(rounds), case
        # gossip: one neighbour in a ring of two (two in a ring of four)
        assert r["gossip"]["dp"].sent == STEPS * _sharded_payload("identity", numel)
        assert r["ddp-hook"]["hook_size"] == 2
        # one round per step, and one fp32 all-reduce (n=2: the payload once) when DDP
        # re-cuts its bucket after the first step and the server residuals move
        hook = STEPS * _sharded_sent("identity", 0, 0, g) + numel * 4
        assert r["ddp-hook"]["dp"].sent == hook


def _sharded_payload(spec: str, numel: int) -> int:
    return make_codec(spec).payload_nbytes(numel, chunk_contexts(0, 0, 1)[0])


# -- helper groups created by their members only ------------------------------


def _members_only_groups(rank: int) -> dict:
    """Each pair makes its groups alone, at its own pace (rank 2 late), while the other
    pair is busy with its own: nothing may wait for a non-member (a deadlock would end
    in a timeout error after SHORT)."""
    t0 = time.perf_counter()
    if rank == 2:
        time.sleep(1.0)
    pair = [rank // 2 * 2, rank // 2 * 2 + 1]
    dp = new_group(pair, members_only=True, timeout=SHORT)
    helper, again = subgroup_like(dp, SHORT), subgroup_like(dp, SHORT)  # same ranks, twice
    names = [g.group_name for g in (dp, helper, again)]
    ranks = [dist.get_process_group_ranks(g) for g in (dp, helper, again)]
    # the dp group and a helper in use at once, from two threads (as cocktail does)
    side = torch.tensor([float(rank)])
    thread = threading.Thread(target=dist.all_reduce, args=(side,), kwargs={"group": helper})
    thread.start()
    main = torch.tensor([10.0 * rank])
    dist.all_reduce(main, group=dp)
    thread.join()
    model = _model(rank)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    algo = distribute(model, opt, "cocktail", group=dp, timeout_s=SHORT.seconds)
    cocktail_ranks = dist.get_process_group_ranks(algo.sync_comm.group)
    algo.close()
    return {
        "names": names,
        "ranks": ranks,
        "sums": (side.item(), main.item()),
        "cocktail_ranks": cocktail_ranks,
        "errors": _refusals(rank, pair, dp),
        "seconds": time.perf_counter() - t0,
    }


def _refusals(rank: int, pair: list[int], dp) -> list[str]:
    """What members-only creation refuses: a non-member, and members that would name
    the group differently (it would wait for the timeout instead)."""
    errors = []
    try:
        new_group([r for r in range(4) if r not in pair], members_only=True, timeout=SHORT)
    except ValueError as e:
        errors.append(str(e))
    if rank % 2 == 0:  # one member more than its peer
        new_group([rank], members_only=True, timeout=SHORT)
    try:
        subgroup_like(dp, SHORT)
    except RuntimeError as e:
        errors.append(str(e))
    return errors


def test_members_only_groups_are_created_concurrently_without_waiting(results):
    results = [r["members_only"] for r in results]
    for rank, r in enumerate(results):
        pair = [rank // 2 * 2, rank // 2 * 2 + 1]
        assert r["ranks"] == [pair] * 3
        assert len(set(r["names"])) == 3  # same ranks, three distinct groups
        assert r["sums"] == (float(sum(pair)), 10.0 * sum(pair))
        assert r["cocktail_ranks"] == pair
        assert "not among" in r["errors"][0]
        assert "different numbers" in r["errors"][1]
        assert r["seconds"] < SHORT.seconds  # no group waited for a timeout
    assert results[0]["names"] == results[1]["names"]
    assert set(results[0]["names"]).isdisjoint(results[2]["names"])
