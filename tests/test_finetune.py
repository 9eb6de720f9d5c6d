"""Fine-tuning end to end through the CLI: a tiny model saved by transformers, data
prepared with its tokenizer (prompt/response: the loss counts responses only), trained
from ``model.init_from = "hf:..."`` on 2 workers and on 1, in a pipeline, and exported
back to a folder transformers loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from cli import run_cli
from safetensors.torch import load_file
from tiny_runs import farflung, losses
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from farflung.config import load_config
from farflung.model import GPT
from farflung.train import init
from farflung.train.metrics import read_jsonl
from farflung.train.sample import load_for_inference

transformers = pytest.importorskip("transformers")  # a dev dependency, never needed at run time

WORDS = (
    "the quick brown fox jumps over lazy dogs while seven wizards quietly judge boxing "
    "matches near old river banks and answer every question"
).split()


def _pairs(n: int) -> list[dict]:
    """Prompt/response records of uneven lengths, so micro-batches count uneven
    numbers of response tokens (which the 2-worker == 1-worker test needs)."""
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(3 + (i * 7) % 23))
        response = " ".join(WORDS[(i * 3 + 2 * j) % len(WORDS)] for j in range(2 + (i * 5) % 17))
        out.append({"prompt": f"Q: {prompt}\nA:", "response": f" {response}."})
    return out


def _tokenizer(folder: Path) -> int:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([r["prompt"] + r["response"] for r in _pairs(50)], trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    return tok.get_vocab_size()


def _save(model: torch.nn.Module, folder: Path) -> None:
    """Save with norms and biases moved off their initial ones and zeros (farflung's
    own initial values too): a tensor left unimported then shows."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama (grouped-query attention, untied head) and a GPT-2, each with the
    tokenizer; prompt/response data prepared with it; a config."""
    root = tmp_path_factory.mktemp("finetune")
    vocab = _tokenizer(root / "llama")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    _save(llama, root / "llama")
    (root / "gpt2").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "gpt2" / name).write_bytes((root / "llama" / name).read_bytes())
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    )
    _save(gpt2, root / "gpt2")
    with (root / "pairs.jsonl").open("w") as f:
        for record in _pairs(120):
            f.write(json.dumps(record) + "\n")
    code, _, err = run_cli(
        "prepare", "--source", str(root / "pairs.jsonl"), "--tokenizer", str(root / "llama"),
        "--out", str(root / "data"),
    )  # fmt: skip
    assert code == 0, err
    (root / "ft.toml").write_text(f"""
[model]
init_from = "hf:{root / "llama"}"
context = 16
[data]
dir = "{root / "data"}"
[optim]
lr = 3e-3
warmup_steps = 2
[train]
steps = 6
batch_size = 8
micro_batch_size = 2
eval_every = 3
eval_batches = 2
checkpoint_every = 0
threads = 1
""")
    return root


def _train(base: Path, out: Path, workers: int, *sets: str):
    args = [f"--set={s}" for s in sets]
    return farflung(
        "train", str(base / "ft.toml"), "--workers", str(workers), "--out", str(out), "--quiet",
        *args,
    )  # fmt: skip


def _val(run: Path) -> list[float]:
    return [e["val_loss"] for e in read_jsonl(run / "eval.jsonl")]


@pytest.fixture(scope="module")
def single(base) -> Path:
    out = base / "single"
    r = _train(base, out, 1)
    assert r.returncode == 0, r.stderr
    return out


# where each Hugging Face tensor goes in farflung's model (GPT-2's Conv1D weights are
# stored [in, out], transposed against farflung's nn.Linear); written out here rather
# than taken from farflung.model.hf, whose table is what this checks
_LLAMA_NAMES = {
    "model.embed_tokens.weight": "wte.weight",
    "model.norm.weight": "ln_f.weight",
    "lm_head.weight": "head.weight",
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.proj.weight",
}
_GPT2_NAMES = {
    "transformer.wte.weight": "wte.weight",
    "transformer.wpe.weight": "wpe.weight",
    "transformer.ln_f.weight": "ln_f.weight",
    "transformer.ln_f.bias": "ln_f.bias",
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "attn.c_attn.weight": "attn.qkv.weight",
    "attn.c_attn.bias": "attn.qkv.bias",
    "attn.c_proj.weight": "attn.proj.weight",
    "attn.c_proj.bias": "attn.proj.bias",
    "mlp.c_fc.weight": "mlp.fc.weight",
    "mlp.c_fc.bias": "mlp.fc.bias",
    "mlp.c_proj.weight": "mlp.proj.weight",
    "mlp.c_proj.bias": "mlp.proj.bias",
}


def _ours(arch: str, theirs: str) -> tuple[str, bool]:
    """(farflung's name, stored transposed?) of a Hugging Face tensor name."""
    names, prefix = (
        (_LLAMA_NAMES, "model.layers.") if arch == "llama" else (_GPT2_NAMES, "transformer.h.")
    )
    if theirs in names:
        return names[theirs], False
    assert theirs.startswith(prefix), theirs
    layer, _, rest = theirs.removeprefix(prefix).partition(".")
    conv1d = arch == "gpt2" and rest.endswith(".weight") and rest.startswith(("attn.", "mlp."))
    return f"blocks.{layer}.{names[rest]}", conv1d


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_imports_every_tensor(base, arch):
    """What ``model.init_from`` loads into a fresh model (as the training loop does)
    is the source file's tensors, one by one; nothing is left at its initial value."""
    cfg = init.resolve(load_config(base / "ft.toml", [f"model.init_from=hf:{base / arch}"]))
    torch.manual_seed(1)
    model = GPT(cfg.model)
    init.load_weights(model, cfg)
    state = model.state_dict()
    loaded = set()
    for theirs, tensor in load_file(base / arch / "model.safetensors").items():
        ours, transposed = _ours(arch, theirs)
        assert torch.equal(state[ours], tensor.t() if transposed else tensor), theirs
        loaded.add(ours)
    tied = {"head.weight"} if cfg.model.tie_embeddings else set()
    assert set(state) - loaded == tied
    if tied:
        assert model.head.weight is model.wte.weight


def _first_loss(base: Path, arch: str) -> float:
    """The loss of the Hugging Face model ``arch`` on step 1's batch (response tokens
    only), computed with transformers."""
    from farflung.data import SampleSet, ShardIndex, TokenStream, batch_ids

    index = ShardIndex.load(base / "data")
    samples = SampleSet(TokenStream(index, "train"), 16)
    assert samples.has_mask
    x, y = samples.batch(batch_ids(0, 8, len(samples), 1234))
    ref = transformers.AutoModelForCausalLM.from_pretrained(base / arch).eval()
    with torch.no_grad():
        logits = ref(x).logits
    counted = y != -100
    assert 0 < counted.sum() < y.numel()  # prompts are left out, responses counted
    return torch.nn.functional.cross_entropy(logits[counted], y[counted]).item()


def test_starts_from_the_imported_weights(base, single):
    """Step 1's loss is the imported model's loss on that batch (not a random model's
    ~ln(vocab)): recomputed with transformers on the same samples' response tokens."""
    assert losses(single)[0] == pytest.approx(_first_loss(base, "llama"), rel=1e-5)


def test_two_workers_equal_one_process(base, single):
    """Each worker takes one micro-batch of 4 where the single process accumulates four
    of 2: equal only if every micro-batch is weighted by its counted tokens' share of
    the global batch (a mean per micro-batch would weight prompts' leftovers unevenly)."""
    out = base / "two"
    r = _train(base, out, 2, "train.micro_batch_size=4")
    assert r.returncode == 0, r.stderr
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert _val(out) == pytest.approx(_val(single), rel=1e-5)


def test_pipeline_stages_carry_the_mask(base, single):
    out = base / "pipe"
    r = _train(
        base, out, 2, "pipeline.stages=2", "pipeline.micro_batches=2", "train.micro_batch_size=0"
    )
    assert r.returncode == 0, r.stderr
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert _val(out) == pytest.approx(_val(single), rel=1e-5)


def test_export_loads_with_from_pretrained(base, single, tmp_path):
    code, _, err = run_cli("export-hf", str(single), str(tmp_path / "out"))  # launches nothing
    assert code == 0, err
    ours, _ = load_for_inference(single)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = torch.tensor([tok("Q: the quick brown fox\nA:")["input_ids"]])
    with torch.no_grad():
        assert (ours(ids)[0] - back(ids).logits).abs().max().item() <= 1e-5
    assert tok.eos_token == "<|endoftext|>"
    # the imported tokenizer's own settings travelled through the run's checkpoint
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (base / "llama" / name).read_bytes()
    code, _, err = run_cli("export-hf", str(single), str(tmp_path / "out"))
    assert code == 2 and "--force" in err


def test_run_init_starts_from_another_runs_weights(base, single):
    """``run:PATH`` loads the run's newest checkpoint: with a learning rate of 0 the
    model evaluates exactly as that run's final one."""
    out = base / "from_run"
    r = _train(
        base, out, 1, f"model.init_from=run:{single}", "optim.lr=0", "optim.min_lr=0",
        "train.steps=1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert _val(out) == pytest.approx(_val(single)[-1:], rel=1e-6)
    assert f'init_from = "run:{single}"' in (out / "config.toml").read_text()


@pytest.mark.parametrize("algorithm", ["cocktail", "diloco"])
def test_gpt2_import_trains_with_other_algorithms(base, algorithm):
    out = base / f"gpt2_{algorithm}"
    r = _train(
        base, out, 2, f"model.init_from=hf:{base / 'gpt2'}", f"parallel.algorithm={algorithm}",
        "parallel.local_steps=2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    saved = (out / "config.toml").read_text()
    assert 'arch = "gpt2"' in saved and "max_positions = 64" in saved
    # the workers start from the imported GPT-2 and stay finite
    assert losses(out)[0] == pytest.approx(_first_loss(base, "gpt2"), rel=1e-5)
    assert all(math.isfinite(v) for v in losses(out) + _val(out))


def test_init_errors_are_clear(base, tmp_path):
    # refused before anything is launched: in this process
    code, _, err = run_cli(
        "train", str(base / "ft.toml"), "--out", str(tmp_path / "a"),
        f"--set=model.init_from=hf:{tmp_path / 'missing'}",
    )  # fmt: skip
    assert code == 2 and "config.json: not found" in err
    code, _, err = run_cli(
        "train", str(base / "ft.toml"), "--out", str(tmp_path / "c"), "--set=model.context=100"
    )
    assert code == 2 and "model.context = 100 exceeds model.max_positions = 64" in err
    # the workers compare the tokenizers: a real run
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text((base / "llama" / "tokenizer.json").read_text() + " ")
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((base / "llama" / name).read_bytes())
    r = _train(base, tmp_path / "b", 1, f"model.init_from=hf:{other}")
    assert r.returncode == 2 and "encoded with another tokenizer" in r.stderr
