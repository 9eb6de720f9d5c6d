"""Pipeline placement files, ranks sharing hosts in the link model, and the network
lab with several ranks per host namespace.

The lab tests need root, ``ip`` and ``tc`` and are skipped with the reason
otherwise. Run as ``python -m test_placement OUT`` (with tests/ on PYTHONPATH) this
file is the worker those tests launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from farflung.config import ConfigError
from farflung.netlab import available
from farflung.netlab.link import LinkMatrix, LinkModel
from farflung.parallel.pipeline import Slot, StageMap

TESTS = Path(__file__).resolve().parent
LAB_OK, LAB_REASON = available()


def placement(hosts: list[str], stages: int = 2, **extra) -> dict:
    """A stage-major placement dict with the given host of every rank."""
    world = len(hosts)
    dp = world // stages
    ranks = [
        {"rank": r, "stage": r // dp, "replica": r % dp, "host": h} for r, h in enumerate(hosts)
    ]
    return {"stages": stages, "ranks": ranks, **extra}


# ---- StageMap -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "world, stages, stage_ranks, pipelines",
    [
        (4, 2, [[0, 1], [2, 3]], [[0, 2], [1, 3]]),
        (6, 3, [[0, 1], [2, 3], [4, 5]], [[0, 2, 4], [1, 3, 5]]),
        (3, 1, [[0, 1, 2]], [[0], [1], [2]]),
    ],
)
def test_default_is_stage_major(world, stages, stage_ranks, pipelines):
    m = StageMap.default(world, stages)
    assert (m.stages, m.dp, m.world) == (stages, world // stages, world)
    dp = world // stages
    for r in range(world):
        assert m.slots[r] == Slot(r, r // dp, r % dp, f"rank{r}")
        assert (m.stage_of(r), m.replica_of(r)) == (r // dp, r % dp)
        assert m.rank_of(r // dp, r % dp) == r
        assert m.host_index(r) == r  # each rank its own host
    assert [m.stage_ranks(s) for s in range(stages)] == stage_ranks
    assert [m.pipeline_ranks(k) for k in range(dp)] == pipelines
    assert m.hosts == [f"rank{r}" for r in range(world)]


def test_default_rejects_a_world_that_does_not_divide():
    with pytest.raises(ConfigError, match="pipeline.stages = 2"):
        StageMap.default(3, 2)


def test_file_round_trip_and_hosts(tmp_path):
    # not stage-major: pipelines are 0-3 and 1-2; hosts by first appearance
    d = {
        "stages": 2,
        "predicted": {"step_s": 1.5},  # the planner's annotations are ignored
        "ranks": [
            {"rank": 2, "stage": 1, "replica": 1, "host": "b"},
            {"rank": 0, "stage": 0, "replica": 0, "host": "b"},
            {"rank": 1, "stage": 0, "replica": 1, "host": "a"},
            {"rank": 3, "stage": 1, "replica": 0},  # host defaults to rank3
        ],
    }
    (tmp_path / "p.json").write_text(json.dumps(d))
    m = StageMap.load(tmp_path / "p.json", world=4, stages=2)
    assert m.pipeline_ranks(0) == [0, 3] and m.pipeline_ranks(1) == [1, 2]
    assert m.stage_ranks(1) == [3, 2]
    assert m.hosts == ["b", "a", "rank3"]
    assert [m.host_index(r) for r in range(4)] == m.rank_hosts() == [0, 1, 0, 2]
    again = StageMap.load(m.to_file(tmp_path / "q.json"), world=4, stages=2)
    assert again == m
    assert again.to_dict() == m.to_dict()
    # "stages" may be left out: the config's pipeline.stages counts
    del d["stages"]
    assert StageMap.from_dict(d, 4, 2) == m


def test_a_placement_over_shared_hosts():
    m = StageMap.from_dict(placement(["x", "x", "y", "y"]), 4, 2)
    assert m.hosts == ["x", "y"] and m.rank_hosts() == [0, 0, 1, 1]


def _invalid(hosts=("a", "a", "b", "b"), edit=None, stages=2):
    d = placement(list(hosts), stages=2)
    if edit:
        edit(d)
    return d, stages


def _set(r: int, key: str, value):
    def edit(d):
        d["ranks"][r][key] = value

    return edit


INVALID = {
    "missing rank": (lambda d: d["ranks"].pop(3), r"missing rank\(s\) 3"),
    "duplicate rank": (_set(3, "rank", 1), r"duplicate rank\(s\) 1 \(entries 1, 3\).*missing.* 3"),
    "rank out of range": (_set(3, "rank", 7), r"rank 7; allowed: 0\.\.3"),
    "stage out of range": (_set(3, "stage", 2), r"rank 3 has stage 2; allowed: 0\.\.1"),
    "unequal replicas": (
        _set(2, "stage", 0),
        r"same number of replicas.*dp = 4 workers / 2 stages = 2.*stage 0: 3 \(ranks 0, 1, 2\)"
        r".*stage 1: 1 \(ranks 3\)",
    ),
    "duplicate pair": (_set(1, "replica", 0), r"ranks 0 and 1 both hold stage 0, replica 0"),
    "replica out of range": (_set(1, "replica", 2), r"rank 1 has replica 2; allowed: 0\.\.1"),
    "stages mismatch": (
        lambda d: d.update(stages=4),
        r'"stages": 4 but the config has pipeline.stages = 2',
    ),
    "unknown rank key": (_set(0, "hots", "a"), r"ranks\[0\] has unknown key\(s\) \['hots'\]"),
    "stage not an integer": (_set(0, "stage", "0"), r"ranks\[0\]\.stage must be an integer"),
    "missing stage": (lambda d: d["ranks"][0].pop("stage"), r"ranks\[0\] has no 'stage'"),
    "empty host": (_set(0, "host", ""), r"ranks\[0\]\.host must be a non-empty string"),
    "no ranks list": (lambda d: d.pop("ranks"), r"'ranks' must be a list of 4 entries"),
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_files_name_the_problem(tmp_path, case):
    edit, pattern = INVALID[case]
    d, stages = _invalid(edit=edit)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=pattern) as e:
        StageMap.load(path, world=4, stages=stages)
    assert str(path) in str(e.value)


def test_not_json_and_not_an_object(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{ranks: oops")
    with pytest.raises(ConfigError, match=r"bad.json: not valid JSON"):
        StageMap.load(path, 4, 2)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        StageMap.load(path, 4, 2)
    with pytest.raises(ConfigError, match="placement file not found"):
        StageMap.load(tmp_path / "nope.json", 4, 2)


def test_world_that_does_not_divide_into_stages(tmp_path):
    with pytest.raises(ConfigError, match="5 workers do not divide into pipeline.stages = 2"):
        StageMap.from_dict(placement(["a"] * 4), 5, 2)


# ---- the in-process link model with shared hosts ---------------------------------------


def test_link_model_same_host_is_free_and_queues_nothing():
    lm = LinkModel(LinkMatrix.uniform(2, "8mbit", "10ms"))  # 1 MB = 1 s on the wire
    assert lm.transfer_time(0, 0, 10**9) == 0.0
    assert lm.matrix.delay(1, 1) == 0.0
    # a large same-host message does not occupy host 0's egress or host 1's ingress
    assert lm.egress(0, 0, 10**9, not_before=5.0) == 5.0
    assert lm.ingress(1, 1, 10**9, not_before=5.0) == 5.0
    assert lm.egress(0, 1, 1_000_000, not_before=5.0) == pytest.approx(6.0)
    assert lm.ingress(0, 1, 1_000_000, not_before=5.0) == pytest.approx(6.0)


def shared_host_legs(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    from farflung.comm import Comm
    from farflung.comm.collectives import set_link_model, set_rank_hosts

    set_rank_hosts([0, 0, 1, 1])
    set_link_model(LinkModel(LinkMatrix.uniform(2, "8mbit", "100ms")))
    try:
        comm = Comm()
        pair = dist.new_group([1, 2])  # every rank must create it
        sub = Comm(pair) if rank in (1, 2) else None
        out: dict = {"hosts": comm.hosts, "sub_hosts": sub.hosts if sub else None}
        if rank == 0:
            # to the same host: no time; to the other host: 1 s + 100 ms, not held up
            out["legs"] = comm._p2p_legs({1: 10**6, 2: 10**6}, {}, 0.0)
        # a real exchange within the host takes no modelled time
        peer = rank ^ 1
        t0 = time.perf_counter()
        comm.exchange(
            {peer: torch.zeros(10**6, dtype=torch.uint8)},
            {peer: torch.empty(10**6, dtype=torch.uint8)},
            "pp",
        )
        out["same_host_s"] = time.perf_counter() - t0
        return out
    finally:
        set_link_model(None)
        set_rank_hosts(None)


def test_comm_maps_ranks_to_shared_hosts():
    from distributed import run_distributed

    res = run_distributed(shared_host_legs, 4)
    assert all(r["hosts"] == [0, 0, 1, 1] for r in res)
    assert res[1]["sub_hosts"] == res[2]["sub_hosts"] == [0, 1]  # group ranks -> global
    legs = res[0]["legs"]
    assert legs[0] == (0.0, 0.0)
    assert legs[1] == pytest.approx((1.0, 0.1))
    # 1 MB over an 8 Mbit/s, 100 ms link would take 1.1 s
    assert all(r["same_host_s"] < 0.5 for r in res)


def test_rank_hosts_from_the_environment(tmp_path, monkeypatch):
    from farflung.comm import collectives
    from farflung.netlab.emulation import (
        ENV,
        RANK_HOSTS_ENV,
        install_link_model_from_env,
        link_env,
        rank_hosts_env,
    )

    link_env(LinkMatrix.uniform(2, "8mbit", "10ms"), tmp_path / "links.json")
    monkeypatch.setenv(ENV, str(tmp_path / "links.json"))
    try:
        monkeypatch.setenv(RANK_HOSTS_ENV, rank_hosts_env([0, 0, 1, 1])[RANK_HOSTS_ENV])
        model = install_link_model_from_env()
        assert model is not None and model.matrix.n == 2
        assert [collectives.host_of(r) for r in range(4)] == [0, 0, 1, 1]
        with pytest.raises(ValueError, match="global rank 4 has no host"):
            collectives.host_of(4)
        monkeypatch.setenv(RANK_HOSTS_ENV, "0,0,2,2")
        with pytest.raises(ValueError, match="names host 2, but the link matrix"):
            install_link_model_from_env()
        monkeypatch.setenv(RANK_HOSTS_ENV, "0,a")
        with pytest.raises(ValueError, match="host index of every rank"):
            install_link_model_from_env()
    finally:
        collectives.set_link_model(None)
        collectives.set_rank_hosts(None)
    assert collectives.host_of(3) == 3


# ---- network(): the hosts of a placement -------------------------------------------------


def test_in_process_network_gets_the_hosts(tmp_path):
    from farflung.netlab.emulation import RANK_HOSTS_ENV
    from farflung.train.network import network

    m = StageMap.from_dict(placement(["x", "x", "y", "y"]), 4, 2)
    with network(None, "100mbit,20ms", 4, tmp_path, stage_map=m) as place:
        assert [e[RANK_HOSTS_ENV] for e in place.envs] == ["0,0,1,1"] * 4
        assert "over 2 hosts" in place.description
        links = LinkMatrix.from_file(tmp_path / "links.json")
        assert links.n == 2 and links.hosts == ["x", "y"]
    # each rank on its own host: today's environment, no map
    with network(None, "100mbit", 4, tmp_path, stage_map=StageMap.default(4, 2)) as place:
        assert all(RANK_HOSTS_ENV not in e for e in place.envs)
        assert LinkMatrix.from_file(tmp_path / "links.json").n == 4
    with pytest.raises(ConfigError, match="placement has 4 ranks but 2 workers"):
        with network(None, "100mbit", 2, tmp_path, stage_map=m):
            pass


def test_matrix_file_rows_follow_the_placement_hosts(tmp_path):
    from farflung.train.network import hosts_matrix

    bw = [[0, "10mbit", "20mbit"], ["30mbit", 0, "40mbit"], ["50mbit", "60mbit", 0]]
    f = LinkMatrix(bw, hosts=["a", "b", "c"]).to_file(tmp_path / "m.json")
    # by name, in the placement's order, unused hosts left out
    sub = hosts_matrix(str(f), ["c", "a"])
    assert sub.hosts == ["c", "a"]
    assert sub.bandwidth(0, 1) == 50e6 and sub.bandwidth(1, 0) == 20e6
    # no name in common: by position, the count must match
    same = hosts_matrix(str(f), ["x", "y", "z"])
    assert same.bandwidth_bps == LinkMatrix.from_file(f).bandwidth_bps
    with pytest.raises(ConfigError, match=r"not in the matrix: \['x'\].*exactly 2 hosts"):
        hosts_matrix(str(f), ["a", "x"])
    with pytest.raises(ConfigError, match="exactly 2 hosts"):
        hosts_matrix(str(f), ["x", "y"])
    # uniform links and scenarios are built over the placement's hosts
    assert hosts_matrix("regional", ["p", "q", "r", "s"]).hosts == ["p", "q", "r", "s"]
    with pytest.raises(ConfigError, match="10 parsecs"):
        hosts_matrix("10 parsecs", ["p", "q"])


# ---- farflung train --placement ---------------------------------------------------------


def test_cli_rejects_a_bad_placement_before_launching(tmp_path):
    cfg = tmp_path / "pp.toml"
    cfg.write_text(
        f'[data]\ndir = "{tmp_path / "no-data"}"\n[train]\nbatch_size = 8\n'
        "micro_batch_size = 0\n[pipeline]\nstages = 2\nmicro_batches = 2\n"
    )
    bad = tmp_path / "bad.json"
    d = placement(["a", "a", "b", "b"], stages=4)  # the file disagrees with the config
    d["stages"] = 4
    bad.write_text(json.dumps(d))
    from cli import run_cli  # in-process: nothing is launched

    code, _, err = run_cli(
        "train", str(cfg), "--workers", "4", "--out", str(tmp_path / "run"),
        "--placement", str(bad), "--quiet",
    )  # fmt: skip
    assert code == 2, err
    assert str(bad) in err and "pipeline.stages = 2" in err
    assert not (tmp_path / "no-data").exists()  # refused before preparing anything
    assert not (tmp_path / "run").exists()


# ---- the network lab: ranks in their hosts' namespaces --------------------------------------

LAB_BYTES = 1_250_000  # 0.2 s at 50 Mbit/s


@pytest.mark.skipif(not LAB_OK, reason=f"network lab unavailable: {LAB_REASON}")
def test_lab_puts_ranks_in_their_hosts_namespaces(tmp_path):
    from farflung.train.launch import launch_local
    from farflung.train.network import network

    before = set(_netns())
    m = StageMap.from_dict(placement(["a", "a", "b", "b"]), 4, 2)
    out = tmp_path / "reports"
    out.mkdir()
    with network("50mbit,5ms", None, 4, tmp_path / "run", stage_map=m) as place:
        assert len(set(_netns()) - before) == 3  # two hosts and the bridge
        path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
        for env in place.envs:
            env["PYTHONPATH"] = path  # the worker is this file
        code = launch_local([str(out)], 4, module="test_placement", placement=place)
        assert code == 0
        iface = [e["GLOO_SOCKET_IFNAME"] for e in place.envs]
        lab_ns = [prefix[-1] for prefix in place.prefixes]  # ip netns exec NS
    assert set(_netns()) == before  # torn down
    rep = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    ns = [r["netns_inode"] for r in rep]
    assert ns[0] == ns[1] != ns[2] == ns[3]
    assert ns[0] != os.stat("/proc/self/ns/net").st_ino  # not this (the root) namespace
    assert [r["netns"] for r in rep] == lab_ns
    assert lab_ns[0] == lab_ns[1] != lab_ns[2] == lab_ns[3]
    assert iface[0] == iface[1] != iface[2] == iface[3]
    assert all(r["sum"] == 1 + 2 + 3 + 4 for r in rep)
    # the in-process delay model knows the hosts too
    assert all(r["comm_hosts"] == [0, 0, 1, 1] and r["model_hosts"] == 2 for r in rep)
    # within a host: loopback speed; across: the shaped 50 Mbit/s uplink
    across = 8 * LAB_BYTES / 50e6
    assert rep[1]["recv_s"] < across / 4, rep[1]
    assert rep[2]["recv_s"] > across * 0.7, rep[2]


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _worker(out: Path) -> None:
    """One rank of the lab test: where it runs, an all-reduce, a timed receive."""
    import torch
    import torch.distributed as dist

    from farflung.comm import Comm
    from farflung.netlab.emulation import install_link_model_from_env

    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    model = install_link_model_from_env()
    comm = Comm()
    x = torch.tensor([float(rank + 1)])
    comm.all_reduce(x, kind="dp")
    who = subprocess.run(["ip", "netns", "identify"], capture_output=True, text=True)
    report = {
        "rank": rank,
        "netns_inode": os.stat("/proc/self/ns/net").st_ino,
        "netns": who.stdout.strip() or None,
        "sum": x.item(),
        "comm_hosts": comm.hosts,
        "model_hosts": model.matrix.n if model else None,
    }
    payload = torch.zeros(LAB_BYTES, dtype=torch.uint8)
    for peer in (1, 2):  # rank 0 sends to its host-mate, then across the link
        dist.barrier()
        if rank == 0:
            dist.send(payload, peer)
        elif rank == peer:
            t0 = time.perf_counter()
            dist.recv(payload, 0)
            report["recv_s"] = time.perf_counter() - t0
    dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
