"""Real faults, real processes: a frozen worker (SIGSTOP), a cut link (veth down in the
network lab), a slow first data preparation, and how failures are classified.

Every test kills what it started in a ``finally`` block, whatever the outcome."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from procs import end_run
from tiny_runs import selected

from farflung.comm.errors import NonFiniteError, is_comm_failure
from farflung.comm.watchdog import EXIT_PEER_LOST, StoreInfo, Watchdog
from farflung.config import load_config
from farflung.data import prepare
from farflung.netlab import available
from farflung.netlab.housekeeping import delete_netns
from farflung.train import contract, entry
from farflung.train.launch import explain, most_telling, read_reports
from farflung.train.metrics import read_jsonl

START_S = 120  # generous: the machine may be busy; the fault clock starts later
# parallel.timeout_s of the fault runs: the heartbeat's silence limit, and also the
# rendezvous' and every collective's. On 2 cores under a load of 25-40 (other test
# runs, ten times CI's), 60-step runs of these configurations trained without a false
# alarm with timeout_s = 1 (the minimum; the network lab's needed 2, its start-up
# tripped 1 once): 5 s leaves 2.5-5x that, and the tests wait 5 s rather than 10-15.
FAULT_TIMEOUT_S = 5.0

# ---------------------------------------------------------------- helpers


def start_training(tiny: Path, out: Path, *sets: str, netlab: str | None = None):  # noqa: F811
    """``farflung train`` with 2 workers and endless steps, in the background."""
    cmd = [sys.executable, "-m", "farflung.cli.main", "train", str(tiny / "tiny.toml")]
    cmd += ["--workers", "2", "--out", str(out), "--quiet"]
    cmd += ["--netlab", netlab] if netlab else []
    # no checkpoints: rank 0 writing one while rank 1 waits in the next collective is a
    # pause that the short fault timeout should not have to cover
    defaults = ["train.steps=100000", "train.eval_every=0", "train.checkpoint_every=0"]
    for item in [*defaults, *sets]:
        cmd += ["--set", item]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_until_training(cli: subprocess.Popen, out: Path) -> None:
    """Until a step has been recorded (metrics may be written every few steps, or per
    rank)."""
    deadline = time.monotonic() + START_S
    while True:
        if [p for p in out.glob("metrics*.jsonl") if p.stat().st_size > 0]:
            return
        if cli.poll() is not None:
            pytest.fail(f"training ended before it started:\n{cli.stderr.read()}")
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def worker_pids(cli: subprocess.Popen) -> dict[int, int]:
    """The CLI's worker processes by RANK, from the name a worker gives its process
    (a forked worker's environment block is its template's; the template, while it
    is still exiting, is a child too)."""
    out = subprocess.run(["pgrep", "-P", str(cli.pid)], capture_output=True, text=True).stdout
    pids = {}
    for pid in map(int, out.split()):
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        if name.startswith("farflung-rank"):
            pids[int(name.removeprefix("farflung-rank"))] = pid
    assert sorted(pids) == [0, 1], pids
    return pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_all(cli: subprocess.Popen, pids: dict[int, int], out: Path) -> None:
    """Workers first (SIGKILL works on a stopped process too), then the CLI with
    SIGTERM, so that it still tears its network lab down, then whatever else still
    names ``out`` (workers whose pids were never read)."""
    for pid in pids.values():
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    end_run(out, cli)


def freeze_and_wait(tiny: Path, out: Path, *sets: str) -> tuple[float, str]:  # noqa: F811
    """Train with ``FAULT_TIMEOUT_S``, SIGSTOP rank 1 once training is under way, and
    return how long after the freeze the CLI ended and its stderr; asserts no worker
    is left."""
    timeout_s = FAULT_TIMEOUT_S
    cli = start_training(tiny, out, f"parallel.timeout_s={timeout_s}", *sets)
    pids: dict[int, int] = {}
    try:
        wait_until_training(cli, out)
        pids = worker_pids(cli)
        os.kill(pids[1], signal.SIGSTOP)
        frozen = time.monotonic()
        _, err = cli.communicate(timeout=timeout_s + 45)
        took = time.monotonic() - frozen
        assert cli.returncode != 0, err
        assert not [r for r, pid in pids.items() if alive(pid)], "a worker was left behind"
        return took, err
    finally:
        kill_all(cli, pids, out)


# ---------------------------------------------------------------- a frozen worker


def assert_named_after_the_timeout(took: float, err: str, via_heartbeat: bool = True) -> None:
    """Rank 1 is named, and not before the silence could have lasted the timeout (its
    last beat may precede the freeze by one period, 1 s); the upper bound only
    catches a hang."""
    heard = r" \(no heartbeat for \d+\.\d s" if via_heartbeat else ""
    assert re.search(r"rank 1 stopped responding" + heard, err), err
    t = FAULT_TIMEOUT_S
    assert t - 2 <= took <= t + 30, f"ended {took:.1f} s after the fault (timeout {t} s)"


# name: the run's settings, and whether the heartbeat (not a collective) names rank 1
FROZEN = {
    "cocktail": (("parallel.algorithm=cocktail",), True),
    # with 1000 local steps no outer sync runs: only the heartbeat can see the freeze
    "diloco": (("parallel.algorithm=diloco", "parallel.local_steps=1000"), True),
    # rank 1 holds the last stage: rank 0 waits on its gradients, point to point
    "stage": (("pipeline.stages=2", "pipeline.compression=aqsgd"), False),
}


@pytest.fixture(scope="module")
def frozen(tiny, request) -> dict[str, Future]:  # noqa: F811
    """The freeze runs the selected tests read, all started at once: each spends most
    of its time waiting out the timeout, which they can do side by side."""
    wanted = selected(request, "frozen", "name")
    with ThreadPoolExecutor(max(1, len(wanted))) as pool:
        yield {
            name: pool.submit(freeze_and_wait, tiny, tiny / f"frozen_{name}", *FROZEN[name][0])
            for name in wanted
        }


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_a_frozen_worker_is_named(frozen, name):
    took, err = frozen[name].result()
    assert_named_after_the_timeout(took, err, via_heartbeat=FROZEN[name][1])
    # the frozen rank is blamed, not the survivor that stopped because of it
    assert "worker rank 0 exited with code 1" not in err


# ---------------------------------------------------------------- a cut link

LAB_OK, LAB_WHY = available()


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.skipif(not LAB_OK, reason=f"network lab unavailable: {LAB_WHY}")
def test_cut_link_is_named_and_the_lab_torn_down(tiny):  # noqa: F811
    timeout_s = FAULT_TIMEOUT_S
    before = namespaces()
    out = tiny / "cut_link"
    cli = start_training(tiny, out, f"parallel.timeout_s={timeout_s}", netlab="100mbit")
    pids: dict[int, int] = {}
    prefix = ""  # this run's lab, once known for sure
    try:
        wait_until_training(cli, out)
        pids = worker_pids(cli)
        # the namespace rank 1 runs in (other runs may have labs up): host 1 of this
        # run's lab, <prefix>h1, whose veth has the same name
        ns = subprocess.run(
            ["ip", "netns", "identify", str(pids[1])], capture_output=True, text=True
        ).stdout.strip()
        assert re.fullmatch(r"ffl[0-9a-f]{6}h1", ns) and ns not in before, ns
        prefix = ns[:9]
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", ns, "down"], check=True)
        cut = time.monotonic()
        _, err = cli.communicate(timeout=timeout_s + 45)
        took = time.monotonic() - cut
        assert cli.returncode != 0
        assert_named_after_the_timeout(took, err, via_heartbeat=False)
        assert not [n for n in namespaces() if n.startswith(prefix)], "the lab was left up"
        assert not [r for r, pid in pids.items() if alive(pid)], "a worker was left behind"
    finally:
        kill_all(cli, pids, out)
        if prefix:  # only this run's lab, should the CLI have failed to remove it
            delete_netns([n for n in namespaces() if n.startswith(prefix)])


# ---------------------------------------------------------------- the watchdog itself


def _watchdog(store: dist.Store, rank: int, timeout_s: float, fired: list) -> Watchdog:
    return Watchdog(store, rank, 2, timeout_s, store_info=StoreInfo("127.0.0.1:0", 0),
                    on_lost=fired.append, exit=fired.append)  # fmt: skip


def _client(port: int, prefix: str) -> dist.Store:
    c = dist.TCPStore("127.0.0.1", port, None, is_master=False, timeout=timedelta(seconds=5),
                      wait_for_workers=False)  # fmt: skip
    return dist.PrefixStore(prefix, c)


def test_watchdog_names_a_silent_peer_but_not_a_finished_one():
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    fired: list = []
    a = _watchdog(_client(server.port, "finished/"), 0, 1.5, fired).start()
    b = _watchdog(_client(server.port, "finished/"), 1, 1.5, []).start()
    try:
        time.sleep(2.5)  # longer than the timeout: both beat, nobody is lost
        assert fired == []
        b.stop()  # finished: says done, then goes quiet
        time.sleep(2.5)
        assert fired == []
    finally:
        a.stop(wait_s=1)
    # rank 1 beats by hand a few times, then stops without saying done: frozen
    store = _client(server.port, "frozen/")
    a = _watchdog(_client(server.port, "frozen/"), 0, 1.5, fired).start()
    try:
        for _ in range(5):
            store.add("hb/1", 1)
            time.sleep(0.2)
        t0 = time.monotonic()
        while len(fired) < 2 and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        took = time.monotonic() - t0
        assert len(fired) == 2, fired  # the report, then the exit code
        lost, code = fired
        assert code == EXIT_PEER_LOST and lost.ranks == [1] and lost.via == "heartbeat"
        assert lost.message.startswith("rank 1 stopped responding (no heartbeat for 1.")
        assert 1.0 <= took <= 2.5
    finally:
        a.stop(wait_s=1)


_STORE_HOST = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
s = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
p = dist.PrefixStore("x/", s)
print(s.port, flush=True)
while True:  # rank 0's heartbeat, from the process that hosts the store
    p.add("hb/0", 1)
    time.sleep(0.2)
"""


def test_watchdog_names_a_frozen_store_host():
    """Reads from a frozen store never return: the watch thread must decide anyway."""
    host = subprocess.Popen([sys.executable, "-c", _STORE_HOST], stdout=subprocess.PIPE, text=True)
    try:
        port = int(host.stdout.readline())
        fired: list = []
        dog = _watchdog(_client(port, "x/"), 1, 1.5, fired).start()
        time.sleep(1.0)
        os.kill(host.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        while len(fired) < 2 and time.monotonic() - t0 < 6:
            time.sleep(0.05)
        assert len(fired) == 2, fired
        lost, code = fired
        assert code == EXIT_PEER_LOST and lost.ranks == [0] and lost.via == "store"
        assert "rank 0 stopped responding (rank 0's rendezvous store" in lost.message
        assert 1.0 <= time.monotonic() - t0 <= 3.5
        dog.stop(wait_s=0.5)  # its beat thread hangs in the read: stop must not
    finally:
        os.kill(host.pid, signal.SIGCONT)
        host.kill()
        host.wait()


# ---------------------------------------------------------------- classification


def _gloo_errors(rank: int, world: int) -> list[tuple[str, bool]]:
    """Real gloo failures: a timeout (peer too late), then a peer that has gone."""
    seen = []
    # the group's creation waits for both ranks under the same timeout: leave together
    # (under load one may reach it seconds after the other)
    dist.barrier()
    group = dist.new_group(timeout=timedelta(seconds=2))
    x = torch.ones(4)
    if rank == 1:
        time.sleep(2.5)  # misses rank 0's all_reduce on ``group``
        return seen
    try:
        dist.all_reduce(x, group=group)
    except Exception as e:
        seen.append((f"{type(e).__name__}: {e}", is_comm_failure(e)))
    time.sleep(2)  # rank 1 has returned and left the group by now
    try:
        dist.all_reduce(x)
    except Exception as e:
        seen.append((f"{type(e).__name__}: {e}", is_comm_failure(e)))
    return seen


def test_real_gloo_failures_are_comm_failures():
    seen, _ = run_distributed(_gloo_errors, 2, fresh=True)
    assert len(seen) == 2, seen
    assert "Timed out" in seen[0][0] and "closed" in seen[1][0].lower(), seen
    assert all(ok for _, ok in seen), seen


def test_classification_by_type_first():
    assert is_comm_failure(dist.DistStoreError("wait timeout after 3000ms"))
    assert is_comm_failure(dist.DistNetworkError("anything at all"))
    assert is_comm_failure(TimeoutError("cocktail: sync 3 did not finish within 15 s"))
    # a subclass of RuntimeError that mentions a timeout is still not a comm failure
    assert not is_comm_failure(NonFiniteError("loss timed out at step 3", 3, [1]))
    assert not is_comm_failure(ValueError("connection closed by peer"))
    assert not is_comm_failure(RuntimeError("shape mismatch"))


def test_launcher_explains_the_most_telling_failure():
    lost0 = {"rank": 0, "kind": "lost_peer", "code": 3, "via": "heartbeat", "lost": [1],
             "message": "rank 1 stopped responding (no heartbeat for 15.3 s)"}  # fmt: skip
    lost1 = {"rank": 1, "kind": "lost_peer", "code": 3, "via": "store", "lost": [0],
             "message": "rank 0 stopped responding (...)"}  # fmt: skip
    line = explain(0, 3, {0: lost0})
    # a crash outranks the lost-peer exits it causes; bad input outranks a crash
    assert most_telling({0: 3, 1: 17}, {0: lost0}) == 1
    assert most_telling({0: 2, 1: 17}, {}) == 0
    # both ends of a cut link: the one that still read the store is the better witness
    assert most_telling({0: 3, 1: 3}, {0: lost0, 1: lost1}) == 0
    swapped = {0: {**lost0, "via": "store"}, 1: {**lost1, "via": "heartbeat"}}
    assert most_telling({0: 3, 1: 3}, swapped) == 1
    assert line == "rank 1 stopped responding (no heartbeat for 15.3 s), noticed by rank 0"
    assert "the link between them may be down" in explain(0, 3, {0: lost0, 1: lost1})
    assert explain(1, -9, {}) == "worker rank 1 was killed by SIGKILL"
    assert explain(1, 17, {}) == "worker rank 1 exited with code 17"


def test_nonfinite_has_its_own_exit_code_and_is_said_once(monkeypatch, tmp_path, capsys):
    def raise_nonfinite(args):
        raise NonFiniteError("non-finite loss at step 7 on rank 1", 7, [1])

    monkeypatch.setattr(entry, "_run", raise_nonfinite)
    monkeypatch.setenv(contract.REPORT_ENV, str(tmp_path))
    assert [entry._guarded(None, r) for r in (0, 1)] == [contract.EXIT_NONFINITE] * 2
    assert capsys.readouterr().err.count("non-finite loss at step 7 on rank 1") == 1
    reports = read_reports(tmp_path)
    assert sorted(reports) == [0, 1] and reports[1]["kind"] == "nonfinite"
    # it explains the run better than the lost-peer exits it may cause elsewhere
    lost = {"rank": 2, "kind": "lost_peer", "code": 3, "via": "heartbeat", "lost": [0],
            "message": "rank 0 stopped responding (no heartbeat for 3.0 s)"}  # fmt: skip
    failed = {0: contract.EXIT_NONFINITE, 2: contract.EXIT_PEER_LOST}
    assert most_telling(failed, {**reports, 2: lost}) == 0
    line = explain(0, 4, reports)
    assert line == "worker rank 0 exited with code 4 (non-finite numbers, see above)"


# ---------------------------------------------------------------- slow data preparation


def test_slow_first_preparation_does_not_time_out_peers(tiny, tmp_path):  # noqa: F811
    """Under torchrun each worker gets the data itself: LOCAL_RANK 0 prepares it while
    rank 1 waits far longer than parallel.timeout_s, and training still runs. The
    corpus is sized from one small probe (preparation time grows about linearly with
    it: 0.85, 1.7 and 3.9 s for 150, 300 and 600 documents here), and the run's own
    preparation is timed from outside, from its data folder to its index."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [f"w{i}{chr(97 + i % 26)}" for i in range(3000)]

    def write_docs(start: int, stop: int) -> None:
        for i in range(start, stop):
            text = " ".join(words[(i * 7919 + j * 104729) % len(words)] for j in range(2000))
            (corpus / f"d{i}.txt").write_text(text + "\n")

    config = (tiny / "tiny.toml").read_text().replace(str(tiny / "data"), str(tmp_path / "data"))
    config = config.replace("[data]\n", f'[data]\nsources = ["{corpus}"]\nvocab_size = 300\n')
    timeout_s = 1.0  # the smallest allowed
    (tmp_path / "slow.toml").write_text(config + f"\n[parallel]\ntimeout_s = {timeout_s}\n")
    d = load_config(tmp_path / "slow.toml").data
    write_docs(0, 150)
    t0 = time.monotonic()  # the same preparation, elsewhere
    prepare(d.sources, tmp_path / "probe", d.vocab_size, d.val_fraction, d.shard_tokens,
            progress=False)  # fmt: skip
    per_doc_s = (time.monotonic() - t0) / 150
    # about 8 s to prepare: the probe's pace is a guess (the run's own pace varied by
    # half either way on a busy 2-core machine), so aim well above what is asserted
    write_docs(150, max(150, math.ceil(8 * timeout_s / per_doc_s)))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
           "--rdzv-endpoint=127.0.0.1:0", "-m", "farflung.train",
           str(tmp_path / "slow.toml"), "--out", str(tmp_path / "run"), "--quiet",
           "--set", "train.steps=4"]  # fmt: skip
    data = tmp_path / "data"
    run = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = indexed = None  # when rank 0 made the data folder, and wrote its index
    try:
        deadline = time.monotonic() + 240
        while run.poll() is None and indexed is None:
            assert time.monotonic() < deadline, "the preparation never ended"
            if started is None and data.is_dir():
                started = time.monotonic()
            if (data / "index.json").is_file():
                indexed = time.monotonic()
            time.sleep(0.02)
        _, err = run.communicate(timeout=240)
    finally:
        end_run(tmp_path / "run", run)
    assert run.returncode == 0, err[-3000:]
    assert started is not None and indexed is not None
    # rank 1 waited at least this long: a run that prepared too fast tests nothing
    assert indexed - started > 2 * timeout_s, f"prepared in {indexed - started:.1f} s"
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["step"] == 4


def test_launcher_and_watchdog_agree_on_the_lost_peer_exit_code():
    # the contract restates the watchdog's code so that the CLI can read it without torch
    assert contract.EXIT_PEER_LOST == EXIT_PEER_LOST
