"""One rank's training step at foundation-model shapes: farflung's worker beside an
independent plain PyTorch loop, in each precision mode, in the same run.

For each model and mode, ``farflung train`` runs one worker on the bundled corpus
(``model.vocab_size`` set to the model's vocabulary) and a plain loop runs
transformers' own ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` built from the same
shape (``torch.autocast``, torch's AdamW, ``gradient_checkpointing_enable`` with
``torch.utils.checkpoint`` where recompute is on, ``torch.compile`` where compile is),
on random tokens; each in a process of its own, so that peak memory is its own.
Reported per row: tokens/s of both (the median step after the warm-up steps), their
ratio, peak memory (CUDA ``max_memory_allocated``, or peak RSS on a CPU) and the
static part (16 bytes per parameter: fp32 weights, gradients, two AdamW moments);
and, with ``--demo-steps``, bf16's final validation loss on ``configs/demo.toml``
over fp32's. farflung's recompute row also chunks the loss (``model.loss_chunk = 256``);
``recompute`` holds, per model, how much that row lowers the peak above the static part
against bf16's and its step-time cost. One JSON line on stdout::

    python benchmarks/scale.py [--models gpt2-124m,llama-350m] [--context 1024]
        [--micro-batch 1] [--steps 12] [--modes fp32,bf16,bf16+recompute,bf16+compile]
        [--demo-steps 600] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import ROOT, train

MODELS = {
    "gpt2-124m": {"arch": "gpt2", "n_layer": 12, "n_head": 12, "d_model": 768, "vocab": 50257},
    "llama-350m": {
        "arch": "llama",
        "n_layer": 24,
        "n_head": 16,
        "n_kv_head": 4,
        "ffn_hidden": 2816,  # 8/3 x 1024 rounded up to 256, as Llama sizes its MLP
        "d_model": 1024,
        "vocab": 32000,
    },
}
MODES = {
    "fp32": [],
    "bf16": ["train.precision=bf16"],
    "bf16+recompute": [
        "train.precision=bf16",
        "model.activation_checkpointing=blocks",
        "model.loss_chunk=256",  # the head's logits, 256 tokens at a time
    ],
    "bf16+compile": ["train.precision=bf16", "train.compile=true"],
}
WARMUP = 2  # steps not timed: the first allocations, and compiling


def model_sets(name: str, context: int) -> list[str]:
    """The ``--set`` items of model ``name`` at ``context``."""
    m = MODELS[name]
    sets = [f"model.{k}={v}" for k, v in m.items() if k != "vocab"]
    sets += [f"model.vocab_size={m['vocab']}", f"model.context={context}"]
    sets += [f"model.max_positions={context}", "model.dropout=0.0"]
    if m["arch"] == "llama":
        sets.append("model.tie_embeddings=false")
    return sets


def farflung_row(name: str, mode: str, args: argparse.Namespace, out: Path) -> dict:
    """farflung's worker: ``farflung train`` with one worker."""
    sets = model_sets(name, args.context) + MODES[mode]
    sets += [f"train.batch_size={args.micro_batch}", "train.micro_batch_size=0"]
    sets += ["optim.warmup_steps=0", "train.log_every=1"]
    records, summary = train("configs/demo.toml", 1, args.steps, out, sets)
    walls = [r["wall_s"] for r in records[WARMUP:]]
    return {
        "tokens_per_s": args.micro_batch * args.context / statistics.median(walls),
        "peak_bytes": summary["peak_bytes_per_rank"][0],
        "params": summary["params"],
    }


def reference_row(name: str, mode: str, args: argparse.Namespace) -> dict:
    """The plain loop, in a process of its own (see :func:`reference_main`)."""
    cmd = [sys.executable, __file__, "--reference", name, "--mode", mode]
    cmd += ["--context", str(args.context), "--micro-batch", str(args.micro_batch)]
    cmd += ["--steps", str(args.steps), "--device", args.device]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_main(args: argparse.Namespace) -> None:
    """transformers' model of the same shape in a plain autocast + AdamW loop."""
    import transformers

    from farflung.config import ModelConfig, load_config
    from farflung.model import hf

    overrides = model_sets(args.reference, args.context) + MODES[args.mode]
    cfg: ModelConfig = load_config(ROOT / "configs/demo.toml", overrides).model
    cfg = replace(cfg, vocab_size=MODELS[args.reference]["vocab"])
    spec = hf.hf_config(cfg, None, None)
    spec = {k: v for k, v in spec.items() if k not in ("architectures", "model_type", "dtype")}
    config_cls = transformers.GPT2Config if cfg.arch == "gpt2" else transformers.LlamaConfig
    model_cls = (
        transformers.GPT2LMHeadModel if cfg.arch == "gpt2" else transformers.LlamaForCausalLM
    )
    device = torch.device(args.device)
    model = model_cls(config_cls(**spec, attn_implementation="sdpa")).to(device).train()
    if "recompute" in args.mode:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    step = torch.compile(model) if "compile" in args.mode else model
    dtype = torch.bfloat16 if args.mode.startswith("bf16") else None
    gen = torch.Generator().manual_seed(0)
    walls = []
    for _ in range(args.steps):
        x = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.context), generator=gen)
        x = x.to(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    tokens_per_s = args.micro_batch * args.context / statistics.median(walls[WARMUP:])
    print(json.dumps({"tokens_per_s": tokens_per_s, "peak_bytes": int(peak)}))


def demo_loss_ratio(steps: int, root: Path) -> float:
    """bf16's final validation loss on configs/demo.toml over fp32's (one worker)."""
    losses = {}
    for precision in ("fp32", "bf16"):
        _, summary = train(
            "configs/demo.toml",
            1,
            steps,
            root / f"demo_{precision}",
            [f"train.precision={precision}"],
        )
        losses[precision] = summary["final_val_loss"]
    return losses["bf16"] / losses["fp32"]


def recompute_savings(results: list[dict]) -> list[dict]:
    """Per model with both rows: how much recompute (and the chunked loss) lowers the
    peak above the static part (bf16's over bf16 + recompute's) and what it costs in
    step time (bf16's tokens/s over recompute's)."""
    rows = {(r["model"], r["mode"]): r for r in results}
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        keep, redo = rows.get((model, "bf16")), rows.get((model, "bf16+recompute"))
        if keep is None or redo is None:
            continue
        above = [r["peak_bytes"] - r["static_bytes"] for r in (keep, redo)]
        out.append(
            {
                "model": model,
                "above_static_ratio": round(above[0] / above[1], 3),
                "step_time_ratio": round(keep["tokens_per_s"] / redo["tokens_per_s"], 3),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=12, help="per run, the first 2 not timed")
    p.add_argument("--demo-steps", type=int, default=600, help="0: no bf16 loss check")
    p.add_argument(
        "--device",
        default="cpu",
        help="the reference's; farflung's worker takes cuda:0 when present",
    )
    p.add_argument("--reference", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference:
        reference_main(args)
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):  # --models "": the demo only
            for mode in args.modes.split(","):
                ours = farflung_row(name, mode, args, Path(tmp) / f"{name}_{mode}")
                ref = reference_row(name, mode, args)
                row = {
                    "model": name,
                    "mode": mode,
                    "tokens_per_s": round(ours["tokens_per_s"], 2),
                    "reference_tokens_per_s": round(ref["tokens_per_s"], 2),
                    "ratio": round(ours["tokens_per_s"] / ref["tokens_per_s"], 4),
                    "peak_bytes": ours["peak_bytes"],
                    "reference_peak_bytes": ref["peak_bytes"],
                    "static_bytes": 16 * ours["params"],
                    "params": ours["params"],
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
        ratio = demo_loss_ratio(args.demo_steps, Path(tmp)) if args.demo_steps else None
    savings = recompute_savings(results)
    print(
        json.dumps(
            {
                "benchmark": "scale",
                "device": args.device,
                "context": args.context,
                "micro_batch": args.micro_batch,
                "steps": args.steps,
                "warmup_steps": WARMUP,
                "results": results,
                "bf16_val_loss_ratio": ratio,
                "demo_steps": args.demo_steps,
                "recompute": savings,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
