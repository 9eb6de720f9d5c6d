"""A Llama-style model trained on this machine as a real decentralized run: 2 pipeline
stages x 2 replicas (4 processes), bf16, activation recompute, AQ-SGD boundaries (fw4 /
bw8) and CocktailSGD between the replicas, every rank on its own netlab host behind
a 100 Mbit + 20 ms link; a checkpoint at step 5 and ``--resume`` from it to step 10,
held against the uninterrupted run bit for bit.

The model is issue 24's Llama 350 M (24 blocks of width 1024, 16 heads, 4 key/value
heads, SwiGLU width 2816, vocabulary 32,000, head untied: 336 M parameters). With
``--n-layer auto`` (the default) it takes the deepest of 24, 20, 16, 12, 8 blocks whose
predicted peaks (:mod:`farflung.plan.memory`, the planner's memory model, CPU runtime
included) fit in 92% of this machine's available memory, and says which; the 24-block
prediction is reported either way.

Per rank: measured peak memory (peak RSS: ``peak_bytes_per_rank`` of the summary) next
to the prediction for the same layout, and their ratio (target: within 25%). Also the
run's tokens/s and the bytes per step by kind (``metrics.jsonl``: all ranks' sent
bytes). The samples are the first ``--max-samples`` of the bundled corpus, revisited
every ``max_samples / batch`` steps, so AQ-SGD sends deltas, as in fine-tuning.

JSON on the last line::

    {"results": [{"rank": 0, "peak_bytes": ..., "predicted_bytes": ...,
                  "peak_over_predicted": ...}, ...],
     "resume_exact": true, "peak_bytes": [...], "predicted_bytes": [...],
     "tokens_per_s": ..., "bytes_per_step_by_kind": {...}, ...}

    python benchmarks/rehearsal.py [--n-layer auto|24|...] [--link 100mbit,20ms]
        [--mode netlab|link-model] [--out results/rehearsal.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from common import ROOT, train
from safetensors.torch import load_file

from farflung.config import load_config
from farflung.plan.memory import rank_memory

CONFIG = "configs/demo.toml"
MODEL = [
    "model.arch=llama",
    "model.d_model=1024",
    "model.n_head=16",
    "model.n_kv_head=4",
    "model.ffn_hidden=2816",
    "model.vocab_size=32000",
    "model.tie_embeddings=false",  # a tied head would cross the boundary every step
    "model.activation_checkpointing=blocks",
    "train.precision=bf16",
    "pipeline.stages=2",
    "pipeline.compression=aqsgd",
    "pipeline.fwd_bits=4",
    "pipeline.bwd_bits=8",
    "parallel.algorithm=cocktail",
]
DEPTHS = (24, 20, 16, 12, 8)
WORKERS = 4
MEMORY_SHARE = 0.92  # peaks of different ranks come at different moments


def overrides(args: argparse.Namespace, n_layer: int) -> list[str]:
    return MODEL + [
        f"model.n_layer={n_layer}",
        f"model.context={args.context}",
        f"train.batch_size={args.batch_size}",
        f"pipeline.micro_batches={args.micro_batches}",
        f"data.max_samples={args.max_samples}",
        f"optim.warmup_steps={args.steps // 2}",
        f"optim.decay_steps={args.steps}",
        f"train.checkpoint_every={args.checkpoint_at}",
        "train.keep_checkpoints=2",
    ]


def predicted(args: argparse.Namespace, n_layer: int) -> list[int]:
    """Every rank's predicted peak (rank = stage x 2 + replica)."""
    cfg = load_config(str(ROOT / CONFIG), overrides(args, n_layer))
    return [rank_memory(cfg, 2, WORKERS // 2, r, device="cpu").total for r in range(WORKERS)]


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def choose_depth(args: argparse.Namespace) -> int:
    budget = MEMORY_SHARE * available_bytes()
    if args.n_layer != "auto":
        return int(args.n_layer)
    for n in DEPTHS:
        if sum(predicted(args, n)) <= budget:
            return n
    raise SystemExit(f"rehearsal: not even {DEPTHS[-1]} blocks fit in {budget / 1e9:.3g} GB")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors by dotted name (safetensors or a rank's torch file,
    written by this machine's own run)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    walk("", torch.load(path, map_location="cpu", weights_only=True))
    return out


def same_checkpoint(a: Path, b: Path) -> list[str]:
    """The files and tensors in which two checkpoints differ (bit for bit)."""
    diffs = []
    for f in sorted(a.iterdir()):
        if f.suffix not in (".safetensors", ".pt"):
            continue
        ta, tb = tensors(f), tensors(b / f.name)
        if ta.keys() != tb.keys():
            diffs.append(f"{f.name}: different tensors")
            continue
        diffs += [f"{f.name}:{k}" for k in ta if not torch.equal(ta[k], tb[k])]
    return diffs


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def rehearse(args: argparse.Namespace, sets: list[str]) -> tuple[list, dict, dict, list]:
    """The uninterrupted run, and its copy resumed from ``--checkpoint-at``: (the
    first's metrics records and summary, the resume's summary, where the two differ)."""
    net = [f"--{args.mode}", args.link]
    with tempfile.TemporaryDirectory() as tmp:
        whole, cut = Path(tmp) / "whole", Path(tmp) / "cut"
        print("[rehearsal] uninterrupted run", file=sys.stderr, flush=True)
        records, summary = train(CONFIG, WORKERS, args.steps, whole, sets, net)
        shutil.copytree(whole, cut)
        last = f"step_{args.steps:08d}"
        shutil.rmtree(cut / "checkpoints" / last)
        print(f"[rehearsal] resumed from step {args.checkpoint_at}", file=sys.stderr, flush=True)
        _, resumed = train(CONFIG, WORKERS, args.steps, cut, sets, [*net, "--resume"])
        diffs = same_checkpoint(whole / "checkpoints" / last, cut / "checkpoints" / last)
        a, b = losses(whole), losses(cut)
        tail = range(args.checkpoint_at + 1, args.steps + 1)
        diffs += [f"loss at step {s}" for s in tail if a[s] != b[s]]
    return records, summary, resumed, diffs


def rank_rows(measured: list[int], expect: list[int]) -> list[dict]:
    """Each rank's measured peak beside its prediction (rank = stage x 2 + replica)."""
    return [
        {
            "rank": r,
            "stage": r // 2,
            "replica": r % 2,
            "peak_bytes": m,
            "predicted_bytes": e,
            "peak_over_predicted": m / e,
        }
        for r, (m, e) in enumerate(zip(measured, expect, strict=True))
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", default="auto", help="blocks, or auto (see above)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="global sequences per step")
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--checkpoint-at", type=int, default=5)
    p.add_argument("--link", default="100mbit,20ms")
    p.add_argument("--mode", choices=["netlab", "link-model"], default="netlab")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    full, available = predicted(args, DEPTHS[0]), available_bytes()
    n_layer = choose_depth(args)
    expect = predicted(args, n_layer)
    print(
        f"[rehearsal] {n_layer} blocks; predicted peaks (GB): "
        f"{[round(b / 1e9, 2) for b in expect]}; 24 blocks would need "
        f"{sum(full) / 1e9:.3g} GB of {available / 1e9:.3g} GB available",
        file=sys.stderr,
        flush=True,
    )
    sets = overrides(args, n_layer)
    records, summary, resumed, diffs = rehearse(args, sets)
    measured = summary["peak_bytes_per_rank"]
    rows = rank_rows(measured, expect)
    kinds = records[0]["bytes_by_kind"].keys()
    out = {
        "benchmark": "rehearsal",
        "results": rows,
        "n_layer": n_layer,
        "params": summary["params"],
        "workers": WORKERS,
        "settings": sets,
        "link": args.link,
        "network": summary.get("network"),
        "steps": args.steps,
        "checkpoint_at": args.checkpoint_at,
        "resume_exact": not diffs,
        "resume_diffs": diffs[:20],
        "peak_bytes": measured,
        "predicted_bytes": expect,
        "worst_peak_over_predicted": max(r["peak_over_predicted"] for r in rows),
        "resumed_peak_bytes": resumed["peak_bytes_per_rank"],
        "predicted_bytes_24_blocks": full,
        "available_bytes": available,
        "tokens_per_s": summary["tokens_per_s"],
        "step_s": statistics.median(r["wall_s"] for r in records[1:]),
        "bytes_per_step_by_kind": {
            k: statistics.mean(r["bytes_by_kind"][k] for r in records) for k in kinds
        },
        "final_val_loss": summary["final_val_loss"],
    }
    text = json.dumps(out)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
