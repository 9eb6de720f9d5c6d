"""Config loading, overrides and validation errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from farflung.config import (
    SECTIONS,
    ConfigError,
    check_batch,
    config_from_dict,
    config_to_toml,
    field_docs,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for name in ("demo", "small"):
        cfg = load_config(ROOT / "configs" / f"{name}.toml")
        assert cfg.parallel.algorithm == "allreduce"


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "demo.toml",
        [
            "train.steps=7",
            "optim.lr=0.5",
            "model.dropout=0.1",
            "data.sources=a.txt,b.txt",
            "parallel.algorithm=allreduce",
        ],
    )
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 0.5 and cfg.model.dropout == 0.1
    assert cfg.data.sources == ["a.txt", "b.txt"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.stepz=3"], "unknown key train.stepz (allowed: batch_size"),
        (["trian.steps=3"], "unknown section [trian]"),
        (["train.steps=abc"], "train.steps = 'abc' must be an integer"),
        (["train.steps=0"], "train.steps = 0 is out of range"),
        (["model.dropout=1.5"], "model.dropout = 1.5 is out of range"),
        (["parallel.backend=mpi"], "parallel.backend = 'mpi' is not allowed; allowed: auto, gloo"),
        (["model.n_head=3"], "model.n_head = 3 must divide model.d_model = 128"),
        (["optim.min_lr=1.0"], "optim.min_lr = 1.0 must not exceed optim.lr"),
        (["train.steps"], "expected section.key=value"),
    ],
)
def test_bad_values_name_key_and_allowed(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert fragment in str(e.value)


def test_choices_from_higher_layers():
    with pytest.raises(
        ConfigError, match="parallel.algorithm = 'nope' is not allowed; allowed: a, b"
    ):
        load_config(None, ["parallel.algorithm=nope"], choices={"parallel.algorithm": ["a", "b"]})


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_toml_round_trips():
    cfg = load_config(ROOT / "configs" / "small.toml", ["train.steps=11"])
    raw = tomllib.loads(config_to_toml(cfg))
    # every field written out, so the round trip does not lean on the defaults
    for name, cls in SECTIONS.items():
        assert set(raw[name]) == {f.name for f in dataclasses.fields(cls)}, name
    again = config_from_dict(raw)
    assert again == cfg


def test_every_field_is_documented():
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"


def test_batch_split():
    cfg = load_config(None, ["train.batch_size=12", "train.micro_batch_size=2"])
    assert check_batch(cfg, 3) == (4, 2, 2)
    with pytest.raises(ConfigError, match="divisible by the 5 data-parallel workers"):
        check_batch(cfg, 5)
    cfg = load_config(None, ["train.batch_size=12", "train.micro_batch_size=5"])
    with pytest.raises(ConfigError, match="must divide the local batch 6"):
        check_batch(cfg, 2)


def test_docs_page_is_current():
    from farflung.config.docs import render_markdown

    page = (ROOT / "docs" / "configs.md").read_text()
    assert page == render_markdown(), "regenerate: python -m farflung.config.docs > docs/configs.md"


@pytest.mark.parametrize(
    "override", ["optim.lr=nan", "parallel.timeout_s=inf", "optim.grad_clip=-inf"]
)
def test_non_finite_numbers_are_refused(override):
    """NaN passes every bound check (all comparisons with NaN are false)."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key} = .* a finite number"):
        load_config(ROOT / "configs" / "demo.toml", [override])


def test_nonfinite_policy_is_a_choice():
    with pytest.raises(ConfigError, match="train.on_nonfinite = 'ignore' is not allowed"):
        load_config(ROOT / "configs" / "demo.toml", ["train.on_nonfinite=ignore"])
