"""DiLoCo and ring gossip on real gloo processes: DiLoCo against a single-process
simulation of n workers, gossip against neighbour averaging computed from gathered
parameters, traffic against the formulas, compressed variants, and state round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from farflung.comm import Comm
from farflung.comm.sharded import chunk_sizes
from farflung.compress import HEADER_NBYTES
from farflung.config import ModelConfig, ParallelConfig
from farflung.model import GPT, param_groups
from farflung.parallel import make_algorithm
from farflung.parallel.flat import add_to_params, flat_params, set_params, trainable

CFG = ModelConfig(n_layer=2, n_head=2, d_model=32, context=16, vocab_size=64)
BATCH = 12
FAST_LR = 1e-2  # for the "it trains" checks: a visible drop within a few dozen steps
H, ROUNDS = 3, 2  # diloco: local steps per round, rounds compared with the reference
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9


def _random_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, CFG.vocab_size, (BATCH, CFG.context + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _pattern_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable data: each token is the previous one plus one (mod vocab)."""
    g = torch.Generator().manual_seed(200 + step)
    start = torch.randint(0, CFG.vocab_size, (BATCH, 1), generator=g)
    tokens = (start + torch.arange(CFG.context + 1)) % CFG.vocab_size
    return tokens[:, :-1], tokens[:, 1:]


def _model_and_opt(seed: int = 0, lr: float = 3e-3) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPT(CFG)
    return model, torch.optim.AdamW(param_groups(model, 0.1), lr=lr)


def _algo(name: str, model, opt, comm: Comm, **cfg):
    algo = make_algorithm(name, model, opt, comm, ParallelConfig(algorithm=name, **cfg))
    algo.setup()
    return algo


def _inner_step(model, opt, step: int, rank: int, world: int, data=_random_batch) -> float:
    """Forward/backward on this rank's slice of global batch ``step`` and one AdamW step."""
    x, y = data(step)
    share = BATCH // world
    _, loss = model(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _train_step(model, opt, algo, step: int, rank: int, world: int, data=_random_batch) -> float:
    """One step of the training loop's protocol (``step`` counts from 0 here)."""
    x, y = data(step)
    share = BATCH // world
    _, loss = model(x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share])
    loss.backward()
    algo.sync_gradients()
    opt.step()
    opt.zero_grad(set_to_none=True)
    algo.after_step(step + 1)
    return loss.item()


@torch.no_grad()
def _eval_loss(model, data=_pattern_batch, step: int = 10_000) -> float:
    x, y = data(step)
    return model(x, y)[1].item()


def _flat(model) -> np.ndarray:
    return flat_params(trainable(model)).numpy().copy()


def _gather_flats(model, world: int) -> np.ndarray:
    """Every rank's flat parameters, gathered by the test itself (not metered)."""
    mine = flat_params(trainable(model))
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return torch.stack(out).numpy()


def _consensus_distance(model, world: int) -> float:
    flats = torch.from_numpy(_gather_flats(model, world))
    return max((flats[i] - flats[j]).abs().max().item() for i in range(world) for j in range(i))


# -- one set of processes per world size ---------------------------------------------
# Starting gloo processes costs seconds, so each world size starts once and runs every
# part it is needed for; the tests below read their part of the results.

PARTS = {
    2: ("diloco", "diloco_lossy", "gossip", "round_trip"),
    3: ("diloco", "gossip"),
    4: ("gossip",),  # a ring that is not a complete graph
}


def suite_worker(rank: int, world: int, parts: tuple[str, ...]) -> dict:
    workers = {
        "diloco": diloco_exact_worker,
        "diloco_lossy": diloco_lossy_worker,
        "gossip": gossip_worker,
        "round_trip": round_trip_worker,
    }
    return {part: workers[part](rank, world) for part in parts}


@pytest.fixture(scope="module")
def suite():
    """``suite(world)``: every rank's results for ``PARTS[world]``, run on first use."""
    cache: dict[int, list[dict]] = {}

    def run(world: int) -> list[dict]:
        if world not in cache:
            cache[world] = run_distributed(suite_worker, world, PARTS[world])
        return cache[world]

    return run


# -- DiLoCo --------------------------------------------------------------------------


def diloco_exact_worker(rank: int, world: int) -> dict:
    model, opt = _model_and_opt()
    comm = Comm()
    algo = _algo(
        "diloco",
        model,
        opt,
        comm,
        local_steps=H,
        outer_lr=OUTER_LR,
        outer_momentum=OUTER_MOMENTUM,
    )
    comm.meter.snapshot(reset=True)
    flats, sent, recv = [], [], []
    for step in range(H * ROUNDS):
        _train_step(model, opt, algo, step, rank, world)
        snap = comm.meter.snapshot(reset=True)
        dp = snap.by_kind.get("dp")
        sent.append(dp.sent if dp else 0)
        recv.append(dp.recv if dp else 0)
        flats.append(_flat(model))
    # one more inner step: eval_parameters must show the global (last synced) weights
    _inner_step(model, opt, H * ROUNDS, rank, world)
    local = _flat(model)
    with algo.eval_parameters() as m:
        inside = _flat(m)
    return {
        "flats": flats,
        "sent": sent,
        "recv": recv,
        "local": local,
        "inside": inside,
        "after": _flat(model),
    }


def diloco_reference(world: int) -> list[list[np.ndarray]]:
    """n independent models with their own AdamW; every H steps the outer Nesterov step
    on the mean pseudo-gradient, then everyone restarts from the global model.
    Returns ``flats[step][rank]``."""
    workers = [_model_and_opt() for _ in range(world)]
    params = [trainable(m) for m, _ in workers]
    global_flat = flat_params(params[0])
    outer = torch.optim.SGD([global_flat], lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
    flats = []
    for step in range(H * ROUNDS):
        for r, (m, o) in enumerate(workers):
            _inner_step(m, o, step, r, world)
        if (step + 1) % H == 0:
            local = torch.stack([flat_params(p) for p in params])
            global_flat.grad = (global_flat - local).mean(dim=0)
            outer.step()
            for p in params:
                set_params(p, global_flat)
        flats.append([_flat(m) for m, _ in workers])
    return flats


@pytest.fixture(scope="module", params=[2, 3])
def diloco_run(request, suite):
    world = request.param
    return world, [part["diloco"] for part in suite(world)]


def test_diloco_matches_simulated_workers(diloco_run):
    world, ours = diloco_run
    ref = diloco_reference(world)
    for step in range(H * ROUNDS):
        for r in range(world):
            np.testing.assert_allclose(ours[r]["flats"][step], ref[step][r], rtol=0, atol=1e-5)
    for step in range(H * ROUNDS):
        first = ours[0]["flats"][step]
        if (step + 1) % H == 0:  # right after a sync every rank holds the same weights
            for r in range(1, world):
                np.testing.assert_array_equal(ours[r]["flats"][step], first)
        else:  # between syncs they drift apart
            for r in range(1, world):
                assert np.abs(ours[r]["flats"][step] - first).max() > 1e-4
    # eval_parameters swaps the global weights in and restores the local ones
    for r in range(world):
        np.testing.assert_array_equal(ours[r]["inside"], ours[r]["flats"][-1])
        np.testing.assert_array_equal(ours[r]["after"], ours[r]["local"])
        assert np.abs(ours[r]["local"] - ours[r]["inside"]).max() > 0


def test_diloco_traffic_is_the_sharded_formula(diloco_run):
    world, ours = diloco_run
    numel = ours[0]["flats"][0].size
    sizes = chunk_sizes(numel, world)
    for r in range(world):
        # phase 1: the n-1 chunks other ranks own; phase 2: our chunk's average to n-1
        # ranks; each payload behind its status (1 byte, then a (2n+1)-bit bitmap)
        s1, s2 = 1, (2 * world + 1 + 7) // 8
        phase1 = sum(s1 + HEADER_NBYTES + 4 * sizes[j] for j in range(world) if j != r)
        phase2 = (world - 1) * (s2 + HEADER_NBYTES + 4 * sizes[r])
        phase2_in = sum(s2 + HEADER_NBYTES + 4 * sizes[j] for j in range(world) if j != r)
        phase1_in = (world - 1) * (s1 + HEADER_NBYTES + 4 * sizes[r])
        for step in range(H * ROUNDS):
            if (step + 1) % H == 0:
                assert ours[r]["sent"][step] == phase1 + phase2
                assert ours[r]["recv"][step] == phase1_in + phase2_in
            else:  # nothing crosses a link between syncs
                assert ours[r]["sent"][step] == 0 and ours[r]["recv"][step] == 0


LOSSY = ("quantize:bits=4", "cocktail")


def diloco_lossy_worker(rank: int, world: int, steps: int = 30) -> dict:
    out = {}
    for codec in LOSSY:
        model, opt = _model_and_opt(lr=FAST_LR)
        comm = Comm()
        algo = _algo("diloco", model, opt, comm, local_steps=5, codec=codec)
        start = _eval_loss(model)
        comm.meter.snapshot(reset=True)
        losses = [
            _train_step(model, opt, algo, step, rank, world, _pattern_batch)
            for step in range(steps)
        ]
        with algo.eval_parameters() as m:
            end = _eval_loss(m)
        out[codec] = {
            "losses": losses,
            "start": start,
            "end": end,
            "sent": comm.meter.snapshot().by_kind["dp"].sent,
            "numel": sum(p.numel() for p in trainable(model)),
            # after the last sync (step 30): what the codec did not carry stays local
            "residual": float((algo.global_flat - flat_params(trainable(model))).norm()),
            "global": float(algo.global_flat.norm()),
        }
    return out


@pytest.fixture(scope="module")
def diloco_lossy_run(suite):
    return [part["diloco_lossy"] for part in suite(2)]


@pytest.mark.parametrize("codec", LOSSY)
def test_diloco_with_lossy_codec_trains(diloco_lossy_run, codec):
    for r in range(2):
        out = diloco_lossy_run[r][codec]
        first, last = np.mean(out["losses"][:5]), np.mean(out["losses"][-5:])
        assert last < 0.7 * first
        # the global model (what is evaluated and checkpointed) learnt too
        assert out["end"] < 0.7 * out["start"]
        # far fewer bytes than 6 uncompressed syncs (2 ranks: 4 bytes/elt per sync)
        assert out["sent"] < 6 * 4 * out["numel"] / 4
        # the unsent part of the pseudo-gradient stays in the local model (implicit
        # error feedback) instead of being dropped or counted twice
        assert 0 < out["residual"] < out["global"]


# -- gossip --------------------------------------------------------------------------


def gossip_worker(rank: int, world: int) -> dict:
    result: dict = {}
    # identity codec, gamma 1: exact neighbour averaging, in two rounds (the second
    # checks that the public copies stay exact after training moved the weights)
    model, opt = _model_and_opt()
    comm = Comm()
    algo = _algo("gossip", model, opt, comm, gossip_every=2)
    rounds = []
    for k in range(2):
        comm.meter.snapshot(reset=True)
        # step 2k+1: no gossip; step 2k+2: train without the algorithm, gather, gossip
        _train_step(model, opt, algo, 2 * k, rank, world)
        quiet = comm.meter.snapshot(reset=True).sent
        _inner_step(model, opt, 2 * k + 1, rank, world)
        before = _gather_flats(model, world)
        algo.after_step(2 * k + 2)
        snap = comm.meter.snapshot(reset=True).by_kind["dp"]
        rounds.append({"quiet": quiet, "before": before, "after": _flat(model), "sent": snap.sent})
    result["rounds"] = rounds

    # lossy codec, no training: the ranks' models are pulled together, average kept
    model, opt = _model_and_opt()
    algo = _algo("gossip", model, opt, comm, codec="quantize:bits=4", gossip_gamma=0.5)
    g = torch.Generator().manual_seed(7 + rank)
    params = trainable(model)
    add_to_params(params, 0.05 * torch.randn(sum(p.numel() for p in params), generator=g))
    mean0 = _gather_flats(model, world).mean(axis=0)
    distances = [_consensus_distance(model, world)]
    for k in range(1, 31):
        algo.after_step(k)
        distances.append(_consensus_distance(model, world))
    result["distances"] = distances
    result["mean_drift"] = float(np.abs(_gather_flats(model, world).mean(axis=0) - mean0).max())

    # training with gossip every step: the loss falls
    model, opt = _model_and_opt(lr=FAST_LR)
    algo = _algo("gossip", model, opt, comm)
    result["losses"] = [
        _train_step(model, opt, algo, step, rank, world, _pattern_batch) for step in range(20)
    ]
    result["final_distance"] = _consensus_distance(model, world)
    return result


@pytest.fixture(scope="module", params=[2, 3, 4])
def gossip_run(request, suite):
    world = request.param
    return world, [part["gossip"] for part in suite(world)]


def test_gossip_identity_is_neighbour_averaging(gossip_run):
    world, out = gossip_run
    numel = out[0]["rounds"][0]["after"].size
    for k in range(2):
        for r in range(world):
            rnd = out[r]["rounds"][k]
            before = rnd["before"]
            peers = sorted({(r - 1) % world, (r + 1) % world, r})
            np.testing.assert_allclose(rnd["after"], before[peers].mean(axis=0), rtol=0, atol=1e-6)
            if world == 4:  # the rank across the ring is not averaged in
                assert np.abs(rnd["after"] - before.mean(axis=0)).max() > 1e-5
            assert rnd["quiet"] == 0  # no traffic on steps without a round
            # one fp32 payload to each distinct neighbour
            assert rnd["sent"] == (len(peers) - 1) * (HEADER_NBYTES + 4 * numel)
    if world == 2:  # with two ranks a round leaves both equal
        np.testing.assert_allclose(
            out[0]["rounds"][0]["after"], out[1]["rounds"][0]["after"], rtol=0, atol=1e-6
        )


def test_gossip_compressed_consensus_shrinks(gossip_run):
    world, out = gossip_run
    d = out[0]["distances"]
    assert d[0] > 0.05
    assert d[-1] < 0.02 * d[0]
    assert d[10] < d[0] and d[20] <= d[10]
    assert out[0]["mean_drift"] < 1e-5  # symmetric mixing keeps the average


def test_gossip_trains(gossip_run):
    world, out = gossip_run
    for r in range(world):
        losses = out[r]["losses"]
        assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    if world == 4:  # with a ring that is not complete, ranks are not replicas
        assert out[0]["final_distance"] > 1e-4


# -- state round trip ----------------------------------------------------------------

ROUND_TRIP = {
    "diloco": {"local_steps": 2, "codec": "quantize:bits=4"},
    "gossip": {"codec": "quantize:bits=4", "gossip_gamma": 0.5},
}


def round_trip_worker(rank: int, world: int) -> dict:
    comm = Comm()
    out = {}
    for name, cfg in ROUND_TRIP.items():
        model, opt = _model_and_opt()
        algo = _algo(name, model, opt, comm, **cfg)
        for step in range(3):
            _train_step(model, opt, algo, step, rank, world)
        buf = io.BytesIO()
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "algo": algo.state_dict()}
        torch.save(state, buf)
        for step in range(3, 6):
            _train_step(model, opt, algo, step, rank, world)
        original = _flat(model)

        # a fresh worker, as on resume: set up (broadcast), then load the saved state
        model, opt = _model_and_opt(seed=1)
        algo = _algo(name, model, opt, comm, **cfg)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        algo.load_state_dict(state["algo"])
        for step in range(3, 6):
            _train_step(model, opt, algo, step, rank, world)
        out[name] = {"original": original, "resumed": _flat(model)}
    return out


@pytest.fixture(scope="module")
def round_trip_run(suite):
    return [part["round_trip"] for part in suite(2)]


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_round_trip(round_trip_run, name):
    for r in range(2):
        out = round_trip_run[r][name]
        np.testing.assert_array_equal(out["resumed"], out["original"])
