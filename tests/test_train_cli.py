"""End-to-end: `farflung train` with real local worker processes on a tiny corpus."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from cli import run_cli
from tiny_runs import farflung, losses, train_tiny

from farflung.train.metrics import read_jsonl

STEP_FIELDS = {
    "step",
    "loss",
    "lr",
    "tokens",
    "wall_s",
    "compute_s",
    "comm_s",
    "bytes_sent",
    "bytes_recv",
}
SUMMARY_FIELDS = {
    "steps",
    "tokens",
    "final_val_loss",
    "tokens_per_s",
    "wall_s",
    "bytes_sent_total",
    "algorithm",
    "world_size",
}


def test_run_folder_contents(run_a):
    records = read_jsonl(run_a / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(STEP_FIELDS <= set(r) for r in records)
    assert [r["tokens"] for r in records] == [8 * 16 * s for s in range(1, 13)]  # cumulative
    assert all(r["bytes_sent"] > 0 and r["bytes_by_kind"]["dp"] > 0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    summary = json.loads((run_a / "summary.json").read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["bytes_sent_total"] == sum(r["bytes_sent"] for r in records)
    assert "steps = 12" in (run_a / "config.toml").read_text()
    evals = read_jsonl(run_a / "eval.jsonl")
    assert [e["step"] for e in evals] == [4, 8, 12]
    kept = sorted(p.name for p in (run_a / "checkpoints").iterdir())
    assert kept == ["step_00000008", "step_00000012"]


def test_one_worker_sees_the_same_batches(tiny, run_a):
    out = tiny / "run_one"
    r = train_tiny(tiny, out, "--quiet", workers=1)
    assert r.returncode == 0, r.stderr
    assert losses(out) == pytest.approx(losses(run_a), rel=1e-5)


def test_killed_worker_is_named_and_resume_is_exact(tiny, run_a):
    out = tiny / "run_b"
    r = train_tiny(tiny, out, "--quiet", env={"FARFLUNG_FAULTS": "1:7:EXIT"})
    assert r.returncode != 0
    assert "worker rank 1 exited" in r.stderr
    # telemetry is gathered in the background and written at the step-4 checkpoint;
    # steps 5 and 6 were never gathered
    assert len(losses(out)) == 4
    r = train_tiny(tiny, out, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    # restarted from the step-4 checkpoint: steps 5-12 recomputed, bit for bit
    assert losses(out) == losses(run_a)
    assert read_jsonl(out / "eval.jsonl") == read_jsonl(run_a / "eval.jsonl")


def test_resume_with_another_algorithm_names_the_key(tiny, run_a):
    out = tiny / "run_changed"
    shutil.copytree(run_a, out)
    before = (out / "metrics.jsonl").read_text()
    r = train_tiny(
        tiny, out, "--resume", "--set", "parallel.algorithm=cocktail", "--set", "train.steps=16"
    )
    assert r.returncode == 2
    assert "parallel.algorithm = 'allreduce' in the checkpoint, 'cocktail' now" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing lost


def test_new_run_refuses_to_overwrite(tiny, run_a):
    before = (run_a / "metrics.jsonl").read_text()
    code, _, err = run_cli("train", str(tiny / "tiny.toml"), "--out", str(run_a))
    assert code == 2
    assert "already holds a run" in err
    assert (run_a / "metrics.jsonl").read_text() == before


def test_config_error_is_one_line(tiny):
    code, out, err = run_cli(
        "train",
        str(tiny / "tiny.toml"),
        "--set",
        "train.batch_size=7",
        "--workers",
        "2",
        "--out",
        str(tiny / "bad"),
    )
    assert code == 2 and out == ""
    assert not (tiny / "bad").exists()
    assert err.strip() == (
        "farflung: config error: train.batch_size = 7 must be divisible by the 2 "
        "data-parallel workers; allowed: a multiple of 2"
    )


def test_corrupt_newest_checkpoint_falls_back(tiny, run_a):
    """`sample` and `--resume` pass over a corrupt newest checkpoint with a warning and
    use the previous one; a corrupt checkpoint named explicitly is an error."""
    code, out, err = run_cli("sample", str(run_a), "--prompt", "the quick", "--tokens", "10")
    assert code == 0, err
    assert out.startswith("the quick") and len(out) > len("the quick\n")
    copy = tiny / "corrupt"
    subprocess.run(["cp", "-r", str(run_a), str(copy)], check=True)
    newest = copy / "checkpoints" / "step_00000012"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, _, err = run_cli("sample", str(newest))
    assert code == 2
    assert err.startswith("farflung: error: ") and "model.safetensors: corrupt" in err
    code, _, err = run_cli("sample", str(copy), "--tokens", "5")
    assert code == 0, err
    assert "model.safetensors: corrupt" in err and "using step_00000008" in err
    r = train_tiny(tiny, copy, "--resume", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "model.safetensors: corrupt" in r.stderr and "resuming from step 8" in r.stderr
    assert losses(copy) == losses(run_a)  # steps 9-12 again, bit for bit


def test_checkpoint_errors_are_clear(tiny, run_a):
    """A manifest missing a key and a resave of the same step."""
    from farflung.train import checkpoint as ckpt

    copy = tiny / "manifest_missing_key"
    subprocess.run(["cp", "-r", str(run_a), str(copy)], check=True)
    manifest = copy / "checkpoints" / "step_00000012" / "manifest.json"
    d = json.loads(manifest.read_text())
    del d["files"]
    manifest.write_text(json.dumps(d))
    with pytest.raises(ckpt.CheckpointError, match="missing files"):
        ckpt.read_manifest(manifest.parent)
    # saving a step that exists already swaps folders; a leftover .old still counts
    root = copy / "checkpoints"
    (root / "step_00000008").rename(root / "step_00000008.old")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000008.old", "step_00000012"]


def test_cocktail_lr_scale_scales_the_workers_learning_rate(tiny):
    """parallel.lr_scale = 2 runs exactly as optim.lr and optim.min_lr doubled (the
    schedule's shape is unchanged), and the metrics show the rate applied."""
    common = ["--quiet", "--set", "parallel.algorithm=cocktail", "--set", "train.steps=4"]
    common += ["--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"]
    scaled, doubled = tiny / "lr_scale", tiny / "lr_doubled"
    r = train_tiny(tiny, scaled, *common, "--set", "parallel.lr_scale=2")
    assert r.returncode == 0, r.stderr
    r = train_tiny(
        tiny,
        doubled,
        *common,
        *("--set", "optim.lr=6e-3", "--set", "optim.min_lr=2e-4"),
        *("--set", "parallel.lr_scale=1"),
    )  # tiny.toml: lr 3e-3, min_lr the default 1e-4
    assert r.returncode == 0, r.stderr
    assert losses(scaled) == losses(doubled)
    rates = [r["lr"] for r in read_jsonl(scaled / "metrics.jsonl")]
    assert rates == [r["lr"] for r in read_jsonl(doubled / "metrics.jsonl")]
    assert rates[0] == pytest.approx(6e-3 / 2)  # warm-up step 1 of 2
    # the default (0) is sqrt(workers): 2 workers here
    auto = tiny / "lr_auto"
    assert train_tiny(tiny, auto, *common).returncode == 0
    rates = [r["lr"] for r in read_jsonl(auto / "metrics.jsonl")]
    assert rates[0] == pytest.approx(3e-3 / 2 * 2**0.5)


def test_demo_trains_both_algorithms_and_compares_them(tiny, tmp_path):
    """The README's Quick start runs `farflung demo`: here on the tiny data and model,
    without the lab (`--network off`), the same code path end to end."""
    small = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.context=16"]
    small += [
        "train.steps=4",
        "train.batch_size=4",
        "train.eval_every=2",
        f"data.dir={tiny / 'data'}",
    ]
    sets = [a for item in small for a in ("--set", item)]
    r = farflung("demo", "--out", str(tmp_path), "--network", "off", *sets)
    assert r.returncode == 0, r.stderr
    for algorithm in ("allreduce", "cocktail"):
        summary = json.loads((tmp_path / algorithm / "summary.json").read_text())
        assert summary["algorithm"] == algorithm and summary["steps"] == 4
    assert (tmp_path / "report.png").stat().st_size > 0
