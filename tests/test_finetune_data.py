"""Fine-tuning data: existing Hugging Face tokenizers, chat templates, prompt/response
JSON lines, loss masks beside the shards, and response-only targets in batches."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from farflung.cli.main import main
from farflung.data import (
    IGNORE_INDEX,
    DataError,
    SampleSet,
    ShardIndex,
    Tokenizer,
    TokenStream,
    assign_val,
    iter_documents,
    prepare,
)
from farflung.data.chat import ChatTemplate

SPECIAL = ["</s>", "<s>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Puts eos_token after the assistant's turn itself, so no second one may be added.
TEMPLATE_WITH_EOS = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A:{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
WORDS = "apple banana cherry delta echo foxtrot golf hotel india juliet kilo lima".split()


def _prose(seed: int, n: int = 12) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def _train_hf(corpus: list[str], special: list[str]) -> HFTokenizer:
    """A small byte-level BPE like a published checkpoint's (its own special tokens)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(corpus, trainer=trainer)
    return hf


def _hf_folder(root: Path, config: dict | None, special: list[str] = SPECIAL) -> Path:
    """A Hugging Face tokenizer folder: tokenizer.json and (unless None) the config."""
    root.mkdir(parents=True)
    _train_hf([_prose(i, 40) for i in range(30)], special).save(str(root / "tokenizer.json"))
    if config is not None:
        (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


CHAT_CONFIG = {
    "eos_token": {"content": "</s>", "special": True},
    "bos_token": "<s>",
    "chat_template": TEMPLATE,
}


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"question {i}: {_prose(i)}", "response": _prose(100 + i)} for i in range(n)]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _library(folder: Path) -> tuple[HFTokenizer, HFTokenizer]:
    """The library's own tokenizers (plain text: special text stays text; rendered
    template: special text is the special id), to compute expected ids independently."""
    plain = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    plain.encode_special_tokens = True
    special = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    return plain, special


def _ids(hf: HFTokenizer, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


def _expected_streams(
    records: list[dict], file_id: str, val_fraction: float, doc: callable
) -> dict[str, tuple[list[int], list[int]]]:
    """Tokens and mask each split should hold: every record's ``doc(record)`` (prompt
    ids, target ids) in file order, routed to its split by id."""
    ids = [f"{file_id}:{k + 1}" for k in range(len(records))]
    val = assign_val(ids, val_fraction, 0)
    out: dict[str, tuple[list[int], list[int]]] = {"train": ([], []), "val": ([], [])}
    for doc_id, record in zip(ids, records, strict=True):
        tokens, mask = out["val" if doc_id in val else "train"]
        prompt, target = doc(record)
        tokens += prompt + target
        mask += [0] * len(prompt) + [1] * len(target)
    return out


def _stream(index: ShardIndex, split: str) -> tuple[list[int], list[int]]:
    s = TokenStream(index, split)
    return s.slice(0, len(s)).tolist(), s.mask_slice(0, len(s)).tolist()


# ---------------------------------------------------------------------------- tokenizer


def test_hf_folder_gives_eos_template_and_special_tokens(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "chat", CHAT_CONFIG)
    plain, special = _library(folder)
    tok = Tokenizer.load(folder)
    assert tok.eot_token == "</s>" and tok.eot_id == plain.token_to_id("</s>")
    assert tok.bos_token == "<s>" and tok.chat_template == TEMPLATE
    assert tok.vocab_size == plain.get_vocab_size(with_added_tokens=True)
    # The bare tokenizer.json finds its config beside it.
    assert Tokenizer.load(folder / "tokenizer.json").eot_id == tok.eot_id
    # Plain text keeps special-token text as characters; template text does not.
    text = "<|im_start|>user\nhi</s>"
    assert tok.encode(text) == _ids(plain, text)
    assert plain.token_to_id("<|im_start|>") not in tok.encode(text)
    assert tok.encode(text, special=True) == _ids(special, text)
    assert tok.encode(text, special=True)[0] == plain.token_to_id("<|im_start|>")
    assert tok.encode_batch([text, "x"], special=True) == [_ids(special, text), _ids(special, "x")]


def test_eos_and_template_config_forms(tmp_path: Path) -> None:
    listed = {
        "eos_token": "<s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": TEMPLATE},
        ],
    }
    tok = Tokenizer.load(_hf_folder(tmp_path / "listed", listed))
    assert tok.eot_token == "<s>" and tok.chat_template == TEMPLATE

    # No config: <|endoftext|> when the vocabulary has it (GPT-2's folders)...
    gpt2 = Tokenizer.load(_hf_folder(tmp_path / "gpt2", None, ["<|endoftext|>"]))
    assert gpt2.eot_token == "<|endoftext|>" and gpt2.chat_template is None
    # ...else an error that says what is missing.
    with pytest.raises(DataError, match="no tokenizer_config.json.*no <\\|endoftext\\|>"):
        Tokenizer.load(_hf_folder(tmp_path / "bare", None))
    with pytest.raises(DataError, match="has no eos_token"):
        Tokenizer.load(_hf_folder(tmp_path / "noeos", {"bos_token": "<s>"}))
    with pytest.raises(DataError, match="'<eos>' .* not in the vocabulary"):
        Tokenizer.load(_hf_folder(tmp_path / "wrong", {"eos_token": "<eos>"}))
    with pytest.raises(DataError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_chat_template_renders_and_splits(tmp_path: Path) -> None:
    tmpl = ChatTemplate(TEMPLATE, bos_token="<s>", eos_token="</s>")
    user = [{"role": "user", "content": "2+2?"}]
    assert tmpl.render(user, True) == "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tmpl.split("2+2?", "4") == (
        "<s><|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        "4<|im_end|>\n",
    )
    eos = ChatTemplate(TEMPLATE_WITH_EOS, eos_token="</s>")
    assert eos.split("hi", "hello") == ("Q: hi\nA:", "hello</s>")
    with pytest.raises(DataError, match="unknown role system"):
        eos.render([{"role": "system", "content": "x"}], False)
    # A generation prompt that the full rendering does not start with: no boundary.
    with pytest.raises(DataError, match="not a prefix"):
        ChatTemplate(TEMPLATE_WITH_EOS.replace("prompt %}A:", "prompt %}B:")).split("hi", "hello")
    # Helpers published templates use: tojson without HTML escaping, {% generation %}.
    extra = ChatTemplate(
        "{{ messages[0] | tojson }}{% generation %}<{{ messages[0]['content'] }}>"
        "{% endgeneration %}"
    )
    assert extra.render(user, False) == '{"role": "user", "content": "2+2?"}<2+2?>'
    # The sandbox refuses what a template must not do.
    with pytest.raises(DataError):
        ChatTemplate("{{ messages.append(1) }}").render(user, False)
    with pytest.raises(DataError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_save_pretrained_folder_loads_like_transformers(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = _train_hf([_prose(i, 40) for i in range(30)], SPECIAL)
    ref = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="</s>", bos_token="<s>")
    ref.chat_template = TEMPLATE
    ref.save_pretrained(str(tmp_path / "model"))
    tok = Tokenizer.load(tmp_path / "model")
    assert tok.eot_token == "</s>" and tok.eot_id == ref.eos_token_id
    assert tok.chat_template == TEMPLATE  # from chat_template.jinja or the config

    chat = [{"role": "user", "content": "apple?"}, {"role": "assistant", "content": "banana"}]
    head = ref.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    full = ref.apply_chat_template(chat, tokenize=False)
    prompt_text, response_text = tok.template().split("apple?", "banana")
    assert (prompt_text, prompt_text + response_text) == (head, full)
    assert tok.encode(full, special=True) == ref(full, add_special_tokens=False)["input_ids"]

    records = [{"prompt": "apple?", "response": "banana"}] * 3
    data = tmp_path / "data"
    index = prepare(
        [str(_write_jsonl(tmp_path / "c.jsonl", records))], data, 0, 0.0, 64, progress=False,
        tokenizer=str(tmp_path / "model"),
    )  # fmt: skip
    for path in (tmp_path / "model").iterdir():
        if path.name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            assert (data / path.name).read_bytes() == path.read_bytes()
    assert index.tokenizer().chat_template == TEMPLATE


# ---------------------------------------------------------------------------- prepare


@pytest.mark.parametrize("template", [TEMPLATE, TEMPLATE_WITH_EOS])
def test_prepare_with_chat_template_masks_exactly_the_prompt(tmp_path: Path, template) -> None:
    folder = _hf_folder(tmp_path / "chat", {**CHAT_CONFIG, "chat_template": template})
    plain, special = _library(folder)
    eos = plain.token_to_id("</s>")
    records = _pairs(12) + [{"text": "plain <|im_start|> text " + _prose(7)}]
    src = _write_jsonl(tmp_path / "chat.jsonl", records)

    index = prepare([str(src)], tmp_path / "data", 0, 0.25, 50, progress=False, tokenizer=folder)

    def doc(record: dict) -> tuple[list[int], list[int]]:
        if "text" in record:
            return [], _ids(plain, record["text"]) + [eos]
        p, r = record["prompt"], record["response"]
        if template == TEMPLATE:
            prompt = f"<s><|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
            return _ids(special, prompt), _ids(special, f"{r}<|im_end|>\n") + [eos]
        return _ids(special, f"Q: {p}\nA:"), _ids(special, f"{r}</s>")  # eos once

    expected = _expected_streams(records, "chat.jsonl", 0.25, doc)
    assert index.has_masks and index.eot_id == eos
    for split in ("train", "val"):
        assert _stream(index, split) == expected[split]
        tokens = [m.tokens for m in index.masks(split)]
        assert tokens == [s.tokens for s in index.shards(split)] and len(tokens) > 1
        for m in index.masks(split):
            assert np.load(index.shard_path(m)).dtype == np.uint8
    assert sum(expected["val"][1]) > 0 and 0 in expected["val"][1]


def test_tokenizer_is_copied_byte_for_byte_and_listed(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "chat", CHAT_CONFIG)
    # Reformat the file: a copy must keep these bytes, not the library's re-serialization.
    raw = json.dumps(json.loads((folder / "tokenizer.json").read_text()), indent=3)
    (folder / "tokenizer.json").write_text(raw + "\n\n", encoding="utf-8")
    src = _write_jsonl(tmp_path / "c.jsonl", _pairs(4))
    index = prepare([str(src)], tmp_path / "data", 0, 0.25, 1000, progress=False, tokenizer=folder)

    meta = json.loads((tmp_path / "data" / "index.json").read_text())
    for key, name in (
        ("tokenizer", "tokenizer.json"),
        ("tokenizer_config", "tokenizer_config.json"),
    ):
        copied = (tmp_path / "data" / name).read_bytes()
        assert copied == (folder / name).read_bytes()
        assert meta[key] == {"file": name, "sha256": hashlib.sha256(copied).hexdigest()}
    assert index.tokenizer().chat_template == TEMPLATE

    (tmp_path / "data" / "tokenizer_config.json").write_text("{}")
    with pytest.raises(DataError, match="tokenizer_config.json is corrupt"):
        ShardIndex.load(tmp_path / "data")


def test_prompt_response_without_template_and_trained_tokenizer(tmp_path: Path) -> None:
    # "zyxwvut" is only ever in prompts: the trained vocabulary must still learn it.
    records = [{"prompt": f"zyxwvut {i} zyxwvut", "response": _prose(i)} for i in range(20)]
    src = _write_jsonl(tmp_path / "c.jsonl", records)
    index = prepare([str(src)], tmp_path / "data", 320, 0.2, 100, progress=False)
    tok = index.tokenizer()
    assert len(tok.encode("zyxwvut")) == 1

    def doc(record: dict) -> tuple[list[int], list[int]]:
        p, r = tok.encode(record["prompt"]), tok.encode(record["response"])
        return p, r + [tok.eot_id]

    expected = _expected_streams(records, "c.jsonl", 0.2, doc)
    for split in ("train", "val"):
        assert _stream(index, split) == expected[split]


def test_text_only_folder_has_no_masks_and_stale_masks_go(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "chat", CHAT_CONFIG)
    data = tmp_path / "data"
    prepare(
        [str(_write_jsonl(tmp_path / "p.jsonl", _pairs(10)))], data, 0, 0.2, 40,
        progress=False, tokenizer=folder,
    )  # fmt: skip
    assert list(data.glob("*_mask_*.npy")) and (data / "tokenizer_config.json").exists()

    texts = [{"text": _prose(i, 30)} for i in range(10)]
    index = prepare([str(_write_jsonl(tmp_path / "t.jsonl", texts))], data, 300, 0.2, 40, False)
    assert not list(data.glob("*_mask_*.npy")) and not (data / "tokenizer_config.json").exists()
    meta = json.loads((data / "index.json").read_text())
    assert set(meta) == {
        "format", "vocab_size", "dtype", "eot_id", "sources", "seed", "val_fraction",
        "tokenizer", "splits",
    }  # fmt: skip
    assert all(set(s) == {"tokens", "documents", "shards"} for s in meta["splits"].values())
    assert not index.has_masks and not TokenStream(index, "train").has_mask

    samples = SampleSet(TokenStream(index, "train"), context=16)
    ids = np.arange(len(samples))
    x, y = samples.batch(ids)
    stream = TokenStream(index, "train")
    for row, i in enumerate(ids):
        window = stream.slice(i * 16, i * 16 + 17).astype(np.int64)
        assert x[row].tolist() == window[:-1].tolist() and y[row].tolist() == window[1:].tolist()
    assert not samples.has_mask
    assert samples.target_counts(ids).tolist() == [16] * len(ids)
    with pytest.raises(DataError, match="no loss mask"):
        stream.mask_slice(0, 1)


def test_corrupt_or_missing_mask_shard_is_reported(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "chat", CHAT_CONFIG)
    src = _write_jsonl(tmp_path / "p.jsonl", _pairs(10))
    data = tmp_path / "data"
    prepare([str(src)], data, 0, 0.2, 40, progress=False, tokenizer=folder)
    mask = data / "train_mask_0001.npy"
    raw = bytearray(mask.read_bytes())
    raw[-1] ^= 1
    mask.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train_mask_0001.npy is corrupt"):
        ShardIndex.load(data)
    mask.unlink()
    with pytest.raises(DataError, match="train_mask_0001.npy is missing"):
        ShardIndex.load(data)


def test_bad_prompt_response_lines_name_file_and_line(tmp_path: Path) -> None:
    cases = [
        ({"prompt": "q"}, r'bad\.jsonl:2: "prompt" without "response"'),
        ({"response": "a"}, r'bad\.jsonl:2: "response" without "prompt"'),
        ({"prompt": 3, "response": "a"}, r'bad\.jsonl:2: "prompt" is int, not a string'),
        ({"prompt": "q", "response": ["a"]}, r'bad\.jsonl:2: "response" is list, not a string'),
        ({"prompt": "q", "response": "a", "text": "t"}, r'bad\.jsonl:2: has both "text"'),
        (["q", "a"], r"bad\.jsonl:2: not a JSON object"),
    ]
    for record, message in cases:
        src = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, record])
        with pytest.raises(DataError, match=message):
            list(iter_documents([str(src)]))
        with pytest.raises(DataError, match=message):
            prepare([str(src)], tmp_path / "data", 300, 0.0, 100, progress=False)
    docs = list(iter_documents([str(_write_jsonl(tmp_path / "ok.jsonl", _pairs(1)))]))
    assert docs[0].prompt == _pairs(1)[0]["prompt"] and docs[0].text == _pairs(1)[0]["response"]


# ---------------------------------------------------------------------------- batches


@pytest.fixture
def masked(tmp_path: Path) -> ShardIndex:
    """Instruction data with long prompts, so some samples have no target that counts."""
    folder = _hf_folder(tmp_path / "chat", CHAT_CONFIG)
    records = [{"prompt": _prose(i, 30), "response": _prose(50 + i, 3)} for i in range(8)]
    records.append({"text": _prose(99, 10)})
    src = _write_jsonl(tmp_path / "p.jsonl", records)
    return prepare([str(src)], tmp_path / "data", 0, 0.0, 37, progress=False, tokenizer=folder)


def test_batch_ignores_exactly_the_prompt_targets(masked: ShardIndex) -> None:
    stream = TokenStream(masked, "train")
    samples = SampleSet(stream, context=8)
    assert samples.has_mask
    ids = np.arange(len(samples))[::-1].copy()
    x, y = samples.batch(ids)
    counts = samples.target_counts(ids)
    for row, i in enumerate(ids):
        window = stream.slice(i * 8, i * 8 + 9).astype(np.int64)
        mask = stream.mask_slice(i * 8, i * 8 + 9)
        assert x[row].tolist() == window[:-1].tolist()
        want = [t if m else IGNORE_INDEX for t, m in zip(window[1:], mask[1:], strict=True)]
        assert y[row].tolist() == want
        assert counts[row] == sum(mask[1:])
    assert counts.dtype == np.int64
    assert counts.tolist() == (y != IGNORE_INDEX).sum(dim=1).tolist()
    assert 0 in counts and 8 in counts and ((counts > 0) & (counts < 8)).any()
    # One row at a time too (numpy calls a single row contiguous: no shared buffers).
    for i in np.flatnonzero(counts < 8)[:3]:
        x1, y1 = samples.batch([int(ids[i])])
        assert x1.tolist() == x[i : i + 1].tolist() and y1.tolist() == y[i : i + 1].tolist()


def test_response_only_loss_equals_hand_computed_value(masked: ShardIndex) -> None:
    from farflung.config import ModelConfig
    from farflung.model import GPT

    samples = SampleSet(TokenStream(masked, "train"), context=8)
    counts = samples.target_counts(np.arange(len(samples)))
    partial = [int(i) for i in np.flatnonzero((counts > 0) & (counts < 8))[:3]]
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, context=8, vocab_size=masked.vocab_size)
    model = GPT(cfg).eval()
    x, y = samples.batch(partial)
    with torch.no_grad():
        logits, loss = model(x, y)
    total, n = 0.0, 0
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            target = int(y[b, t])
            if target == IGNORE_INDEX:
                continue
            row = logits[b, t].double()
            total += float(torch.logsumexp(row, dim=0) - row[target])
            n += 1
    assert n == int(samples.target_counts(partial).sum()) and 0 < n < 8 * len(partial)
    assert float(loss) == pytest.approx(total / n, rel=1e-5)

    # A sample whose targets are all prompt tokens: loss 0, not NaN.
    none = [int(np.flatnonzero(counts == 0)[0])]
    x, y = samples.batch(none)
    assert (y == IGNORE_INDEX).all()
    with torch.no_grad():
        _, loss = model(x, y)
    assert float(loss) == 0.0


# ---------------------------------------------------------------------------- CLI


def test_prepare_cli_takes_a_tokenizer_and_refuses_recipe_on_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = _hf_folder(tmp_path / "chat", CHAT_CONFIG)
    src = _write_jsonl(tmp_path / "c.jsonl", _pairs(6))
    out = tmp_path / "data"
    args = ["prepare", "--source", str(src), "--out", str(out), "--tokenizer", str(folder)]
    assert main(args) == 0
    assert "loss masks" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert ShardIndex.load(out).has_masks

    tokenized = tmp_path / "tok"
    code = main(["data", "tokenize", str(src), "--out", str(tokenized), "--tokenizer", str(folder)])
    assert code == 0
    assert ShardIndex.load(tokenized).tokenizer().eot_token == "</s>"

    assert main([*args, "--filter", "gopher", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "prompt/response record" in err and "c.jsonl:1" in err


def test_config_names_the_tokenizer_and_the_flag_overrides_it(tmp_path: Path) -> None:
    folder = _hf_folder(tmp_path / "chat", CHAT_CONFIG)
    src = _write_jsonl(tmp_path / "c.jsonl", _pairs(6))
    base = ["prepare", "--source", str(src), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a"), "--set", f"data.tokenizer={folder}"]) == 0
    assert ShardIndex.load(tmp_path / "a").tokenizer().eot_token == "</s>"
    wrong = f"data.tokenizer={tmp_path / 'nowhere'}"
    args = [*base, "--out", str(tmp_path / "b"), "--set", wrong, "--tokenizer", str(folder)]
    assert main(args) == 0
    assert ShardIndex.load(tmp_path / "b").tokenizer().eot_token == "</s>"
