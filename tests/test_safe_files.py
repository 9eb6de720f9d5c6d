"""Nothing deleted by mistake: ``--force`` removes only farflung run folders, an elastic
coordinator resumed on its own host keeps the logs up to the workers' checkpoint,
``export-hf --force`` leaves no stale shard index, checkpoints are fsynced and a
crashed save's ``step_*.tmp`` is cleared at the next start. Real commands, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli import run_cli
from safetensors.torch import load_file, save_file
from tiny_runs import train_tiny

from farflung.comm import free_port
from farflung.config import load_config
from farflung.data import SampleSet, ShardIndex, TokenStream
from farflung.model import GPT, hf
from farflung.train import checkpoint as ckpt
from farflung.train.elastic_run import check_samples
from farflung.train.metrics import read_jsonl
from farflung.train.options import check_out_dir
from farflung.train.runfolder import RUN_MARKER, RunFolderError


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what "nothing deleted" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -------------------------------------------------------------------------- --force


def test_force_refuses_a_folder_that_is_not_a_run(tiny, tmp_path):  # noqa: F811
    """train / coordinator / demo --force on a folder with the user's files: refused,
    the message names what is there, nothing is deleted."""
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(7):
        (folder / f"notes{i}.txt").write_text(f"my notes {i}")
    (folder / "metrics.jsonl").write_text("{}\n")  # looks used: --force is needed at all
    before = tree(folder)
    cfg = str(tiny / "tiny.toml")
    for argv in (
        ["train", cfg, "--out", str(folder), "--force"],
        ["coordinator", cfg, "--workers", "1", "--out", str(folder), "--force"],
    ):
        code, _, err = run_cli(*argv)
        assert code == 2
        assert "notes0.txt" in err and "7 entries" in err and "nothing was deleted" in err
        assert tree(folder) == before
    (tmp_path / "demo" / "allreduce").mkdir(parents=True)
    (tmp_path / "demo" / "allreduce" / "thesis.tex").write_text("years of work")
    argv = ["demo", "--out", str(tmp_path / "demo"), "--algorithms", "allreduce"]
    code, _, err = run_cli(*argv, "--network", "off")
    assert code == 2 and "thesis.tex" in err
    assert (tmp_path / "demo" / "allreduce" / "thesis.tex").read_text() == "years of work"


def test_force_refuses_the_working_directory_home_and_a_data_folder(
    tiny,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    cfg = str(tiny / "tiny.toml")
    work = tmp_path / "work"
    (work / "checkpoints").mkdir(parents=True)  # even a folder that looks like a run
    (work / "config.toml").write_text("")
    (work / RUN_MARKER).write_text("{}")
    monkeypatch.chdir(work)
    before = tree(work)
    code, _, err = run_cli("train", cfg, "--out", ".", "--force")
    assert code == 2 and "working directory" in err
    assert tree(work) == before
    home = tmp_path / "home"
    (home / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(RunFolderError, match="is " + str(home)):
        check_out_dir(home, resume=False, force=True)
    data = tiny / "data"  # the prepared corpus: index, shards, tokenizer
    with pytest.raises(RunFolderError, match="did not write"):
        check_out_dir(data, resume=False, force=True)
    assert (data / "index.json").is_file()


def test_force_accepts_runs_old_and_new(tiny, run_a, tmp_path):  # noqa: F811
    """A run folder with its marker, and one from before the marker (recognised by its
    layout: only farflung's entries, config.toml plus metrics or checkpoints)."""
    assert (run_a / RUN_MARKER).is_file()
    check_out_dir(run_a, resume=False, force=True)
    old = tmp_path / "old_run"
    shutil.copytree(run_a, old)
    (old / RUN_MARKER).unlink()
    check_out_dir(old, resume=False, force=True)
    (old / "my_plot.png").write_bytes(b"png")
    with pytest.raises(RunFolderError, match="my_plot.png"):
        check_out_dir(old, resume=False, force=True)
    link = tmp_path / "link"
    link.symlink_to(run_a)
    with pytest.raises(RunFolderError, match="symbolic link"):
        check_out_dir(link, resume=False, force=True)


def test_force_replaces_a_real_run(tiny, run_a, tmp_path):  # noqa: F811
    out = tmp_path / "again"
    shutil.copytree(run_a, out)
    (out / "checkpoints" / "step_00000099").mkdir()  # an old run's leftover
    r = train_tiny(tiny, out, "--force", "--quiet", "--set", "train.steps=4", workers=1)
    assert r.returncode == 0, r.stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004"]
    marker = json.loads((out / RUN_MARKER).read_text())
    assert set(marker) == {"farflung", "created"}


# ------------------------------------------------------------------------ checkpoints


def test_stale_tmp_is_removed_at_resume_and_checkpoints_stay(tiny, run_a, tmp_path):  # noqa: F811
    """A save that crashed at step 16 of a 3-worker run left step_00000016.tmp (marks
    of ranks 0-2, half a state); the 2-worker run resumed from step 12 removes it
    before its own save of step 16, which then succeeds."""
    out = tmp_path / "crashed"
    shutil.copytree(run_a, out)
    root = out / "checkpoints"
    intact = {p.name: tree(p) for p in ckpt.list_checkpoints(root)}
    for step in (16, 20):
        stale = ckpt.tmp_dir(root, step)
        for rank in range(3):
            ckpt.mark_present(stale, rank)
        (stale / "rank0.pt").write_bytes(b"half a sta")
    r = train_tiny(tiny, out, "--resume", "--quiet", "--set", "train.steps=16")
    assert r.returncode == 0, r.stderr
    assert not list(root.glob("*.tmp"))
    valid, problems = ckpt.verified(root)
    assert sorted(valid) == [12, 16] and problems == []
    assert tree(root / "step_00000012") == intact["step_00000012"]
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(1, 17))


def _tiny_checkpoint(tmp: Path) -> None:
    model = torch.nn.Linear(3, 2)
    ckpt.mark_present(tmp, 0)
    ckpt.write_rank_state(tmp, 0, {"step": 1})
    ckpt.write_model(tmp, model)
    (tmp / "config.toml").write_text("[train]\n")
    (tmp / "tokenizer.json").write_text("{}")


def test_commit_fsyncs_files_and_folders_before_publishing(tmp_path, monkeypatch):
    """Every file and the step folder are fsynced before the rename; the parent after
    it and before the oldest checkpoint is pruned; another crashed tmp goes too."""
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        tmp = ckpt.tmp_dir(root, step)
        _tiny_checkpoint(tmp)
        ckpt.commit(tmp, step, 1, [0], {}, keep=2)
    crashed = ckpt.tmp_dir(root, 7)
    ckpt.mark_present(crashed, 0)
    synced: list[tuple[str, bool]] = []  # (path, does step 1 still exist)
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), ckpt.step_dir(root, 1).exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    tmp = ckpt.tmp_dir(root, 3)
    _tiny_checkpoint(tmp)
    final = ckpt.commit(tmp, 3, 1, [0], {}, keep=2)
    paths = [p for p, _ in synced]
    manifest = json.loads((final / ckpt.MANIFEST).read_text())
    for name in [*manifest["files"], ckpt.MANIFEST]:
        assert str(tmp / name) in paths, name
    assert paths.index(str(tmp)) > max(paths.index(str(tmp / n)) for n in manifest["files"])
    assert paths.index(str(root)) > paths.index(str(tmp))  # the rename came in between
    assert all(alive for _, alive in synced)  # all before step 1 was pruned
    assert not ckpt.step_dir(root, 1).exists() and not crashed.exists()
    assert sorted(ckpt.verified(root)[0]) == [2, 3]


# -------------------------------------------------------------------------- export-hf


def test_export_force_removes_a_stale_sharded_model(run_a, tmp_path):  # noqa: F811
    """OUT held a sharded model (index + 2 shards); export-hf --force replaces it and
    farflung's own loader reads the exported weights, not the old shards. A file of the
    user's own stays."""
    out = tmp_path / "hf"
    assert run_cli("export-hf", str(run_a), str(out))[0] == 0
    new = load_file(out / hf.WEIGHTS_FILE)
    names = sorted(new)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    for file, part in shards.items():
        save_file({n: new[n] + 1 for n in part}, out / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (out / hf.INDEX_FILE).write_text(json.dumps(index))
    (out / hf.WEIGHTS_FILE).unlink()
    (out / "README.md").write_text("my model card")
    code, _, err = run_cli("export-hf", str(run_a), str(out))
    assert code == 2 and "--force" in err  # without --force: refused
    assert run_cli("export-hf", str(run_a), str(out), "--force")[0] == 0
    assert not (out / hf.INDEX_FILE).exists() and not any(out.glob("model-0000*"))
    assert (out / "README.md").read_text() == "my model card"
    found = ckpt.newest(run_a)
    cfg = load_config(found / "config.toml").model
    want, got = GPT(cfg), GPT(cfg)
    ckpt.load_model_weights(found, want)
    hf.load_weights(got, out, cfg)
    for (name, a), b in zip(want.state_dict().items(), got.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ------------------------------------------------------------- coordinator --resume


STEPS = 12
KEYED = {**os.environ, "FARFLUNG_RUN_KEY": "5e" * 32}  # the run key, as an operator passes it
SETS = ["elastic.heartbeat_s=2", "train.batch_size=12", f"train.steps={STEPS}"]
SETS += ["train.checkpoint_every=4", "train.eval_every=8"]


def _coordinator(tiny: Path, out: Path, port: str, *flags: str, log: Path) -> subprocess.Popen:  # noqa: F811
    cmd = [sys.executable, "-m", "farflung.cli.main", "coordinator", str(tiny / "tiny.toml")]
    cmd += ["--workers", "2", "--out", str(out), "--port", port, "--host", "127.0.0.1"]
    cmd += [*flags, "--quiet", *[a for s in SETS for a in ("--set", s)]]
    with open(log, "a") as f:
        return subprocess.Popen(cmd, stderr=f, env=KEYED)


def _workers(tiny: Path, out: Path, port: str, *flags: str) -> list[subprocess.Popen]:  # noqa: F811
    """Two workers on "another host": their own --out, joined by address."""
    cmd = [sys.executable, "-m", "farflung.train", str(tiny / "tiny.toml")]
    cmd += ["--out", str(out), "--join", f"127.0.0.1:{port}", "--quiet", *flags]
    cmd += [a for s in ["elastic.enabled=true", *SETS] for a in ("--set", s)]
    return [subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=KEYED) for _ in range(2)]


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_coordinator_resume_keeps_logs_to_the_workers_checkpoint(tiny, tmp_path):  # noqa: F811
    """The documented cross-machine layout: the coordinator's folder holds no
    checkpoint. It dies mid-run; `coordinator --resume` and the workers' `--resume`
    continue from the workers' checkpoint: the logs keep every step up to it (the very
    same lines), the steps after it appear once, the sample log is exact. Then
    `coordinator --force` starts clean logs."""
    logs, workers_out = tmp_path / "coordinator", tmp_path / "workers"
    port = str(free_port())
    coord = _coordinator(tiny, logs, port, log=tmp_path / "c.log")
    procs = _workers(tiny, workers_out, port)
    try:
        deadline = time.monotonic() + 180
        while len(read_jsonl(logs / "metrics.jsonl")) < 7:
            assert time.monotonic() < deadline and coord.poll() is None, "no progress"
            time.sleep(0.05)
        coord.send_signal(signal.SIGKILL)
        coord.wait()
        for p in procs:
            p.wait(timeout=60)  # the workers see the coordinator gone and stop
    finally:
        _stop(coord, *procs)
    assert not (logs / "checkpoints").exists()
    held = max(ckpt.verified(workers_out / "checkpoints", rank=0)[0])
    assert held >= 4
    before = (logs / "metrics.jsonl").read_text().splitlines()
    port = str(free_port())  # the dead coordinator's may linger in TIME_WAIT
    coord = _coordinator(tiny, logs, port, "--resume", log=tmp_path / "c.log")
    procs = _workers(tiny, workers_out, port, "--resume")
    try:
        assert coord.wait(timeout=240) == 0, (tmp_path / "c.log").read_text()[-3000:]
        assert all(p.wait(timeout=60) == 0 for p in procs)
    finally:
        _stop(coord, *procs)
    after = (logs / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == list(range(1, STEPS + 1))
    assert after[:held] == before[:held]  # kept, not recomputed
    cfg = load_config(logs / "config.toml")
    n = len(SampleSet(TokenStream(ShardIndex.load(cfg.data.dir), "train"), cfg.model.context))
    assert check_samples(logs / "samples.jsonl", cfg, n) == []
    # --force: the old logs are gone before any worker arrives (none will)
    started = (logs / "coordinator.json").stat().st_mtime_ns
    coord = _coordinator(tiny, logs, str(free_port()), "--force", log=tmp_path / "c.log")
    try:
        deadline = time.monotonic() + 60
        while not (logs / "coordinator.json").is_file() or (
            (logs / "coordinator.json").stat().st_mtime_ns == started
        ):
            assert time.monotonic() < deadline and coord.poll() is None
            time.sleep(0.05)
        left = {p.name for p in logs.iterdir()}
        assert {"config.toml", "coordinator.json", RUN_MARKER} <= left
        assert not left & {"metrics.jsonl", "samples.jsonl", "events.jsonl", "summary.json"}
    finally:
        _stop(coord)
