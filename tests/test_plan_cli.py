"""``farflung plan``: devices files, the placement it writes and its report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from cli import run_cli

from farflung.config import ConfigError
from farflung.plan.devices import REFERENCE_TFLOPS, devices_from_dict, load_devices
from farflung.plan.placement import StageMap

TINY = """
[model]
n_layer = 4
n_head = 2
d_model = 32
context = 16
vocab_size = 300

[train]
batch_size = 8

[pipeline]
micro_batches = 2
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def plan(*args: str) -> tuple[int, str, str]:
    return run_cli("plan", *args)


# ---- devices files -------------------------------------------------------------------------


def test_devices_defaults_and_speed() -> None:
    devs = devices_from_dict(
        {"devices": [{"name": "a0", "tflops": 50, "memory_gb": 8}, {"name": "b0", "speed": 2}]}
    )
    assert devs[0].host == "a0" and devs[0].tflops == 50 and devs[0].memory_gb == 8
    assert devs[1].tflops == 2 * REFERENCE_TFLOPS and devs[1].memory_gb is None


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"host": "a", "tflops": 1}, ["devices[0]", "'name'"]),
        ({"name": "a0"}, ["devices[0]", "'a0'", "neither", "tflops", "speed"]),
        ({"name": "a0", "tflops": 1, "speed": 1}, ["'a0'", "both", "tflops", "speed"]),
        ({"name": "a0", "tflops": "fast"}, ["'a0'", "tflops", "number"]),
        ({"name": "a0", "speed": True}, ["'a0'", "speed", "number"]),
        ({"name": "a0", "tflops": 1, "memory_gb": -1}, ["'a0'", "memory_gb"]),
        ({"name": 3, "tflops": 1}, ["devices[0]", "name", "string"]),
        ({"name": "a0", "host": 7, "tflops": 1}, ["'a0'", "host", "string"]),
        ({"name": "a0", "tflop": 1}, ["devices[0]", "unknown", "tflop"]),
        ("a0", ["devices[0]", "object"]),
    ],
)
def test_devices_errors(entry, words) -> None:
    with pytest.raises(ConfigError) as e:
        devices_from_dict({"devices": [entry]}, source="devs.json")
    msg = str(e.value)
    assert msg.startswith("devs.json")
    for w in words:
        assert w in msg, (w, msg)


def test_devices_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_devices(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_devices(bad)
    bad.write_text('{"devices": [{"name": "a", "tflops": 1}, {"name": "a", "speed": 1}]}')
    with pytest.raises(ConfigError, match="unique"):
        load_devices(bad)
    bad.write_text('{"gpus": []}')
    with pytest.raises(ConfigError, match="'devices' list"):
        load_devices(bad)


# ---- the command ---------------------------------------------------------------------------


def test_plan_fixed_shape(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "placement.json"
    code, stdout, stderr = plan(
        str(tiny),
        "--scenario",
        "regional",
        "--workers",
        "8",
        "--stages",
        "2",
        "--dp",
        "4",
        "--budget-s",
        "1",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    smap = StageMap.load(out, 8, 2)
    assert sorted(s.rank for s in smap.slots) == list(range(8))
    assert len(smap.hosts) == 8  # one device per host, each used once
    for method in ("plan", "dtfm", "rank order", "random mean", "random best"):
        assert method in stdout
    assert "vocab_size 300" in stderr and "efficiency 0.4" in stderr
    data = json.loads(out.read_text())
    pred, base = data["predicted"], data["baselines"]
    assert pred["method"] == "plan"
    assert pred["total"] == pytest.approx(pred["compute"] + pred["pp"] + pred["dp"])
    assert pred["total"] <= base["rank order"]["total"] + 1e-12
    assert pred["total"] <= base["random best"]["total"] + 1e-12
    assert base["random best"]["total"] <= base["random mean"]["total"] + 1e-12
    assert Path(data["links"]).is_file()
    # a baseline that is one placement lists its devices by stage, to be trained too
    rank = base["rank order"]["stages"]
    assert len(rank) == 2 and sorted(sum(rank, [])) == sorted(data["devices"])
    assert "stages" not in base["random mean"]


def test_plan_chooses_shape(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    code, _, stderr = plan(
        str(tiny), "--links", "100mbit,20ms", "--workers", "4", "--budget-s", "0.5",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    data = json.loads(out.read_text())
    pp = data["stages"]
    assert pp in (1, 2, 4) and 4 % pp == 0
    StageMap.load(out, 4, pp)


def test_plan_cost_models_and_overlap(tiny: Path, tmp_path: Path) -> None:
    """DT-FM's objective sums every boundary's whole-batch transfer; the schedule
    model overlaps boundaries and micro-batches, so where bandwidth dominates it
    predicts less pipeline time for the same placement. (Where delay dominates it can
    predict more: 1F1B's bounded window makes a round trip per few micro-batches.)
    cocktail (overlap on) hides its sync behind the step."""
    common = [str(tiny), "--links", "10mbit,1ms", "--workers", "8", "--stages", "4", "--dp", "2"]
    common += ["--budget-s", "0.3", "--set", "pipeline.micro_batches=4"]
    common += ["--set", "model.tie_embeddings=false"]
    figs = {}
    for model in ("schedule", "dtfm"):
        out = tmp_path / f"{model}.json"
        code, _, stderr = plan(*common, "--cost-model", model, "--out", str(out))
        assert code == 0, stderr
        assert f"cost model: {model}" in stderr
        figs[model] = json.loads(out.read_text())["baselines"]["rank order"]
    assert 0 < figs["schedule"]["pp"] < figs["dtfm"]["pp"]
    cocktail = {}
    for overlap in ("true", "false"):
        out = tmp_path / f"cocktail-{overlap}.json"
        code, _, stderr = plan(
            *common, "--set", "parallel.algorithm=cocktail",
            "--set", f"parallel.overlap={overlap}", "--out", str(out),
        )  # fmt: skip
        assert code == 0, stderr
        assert ("hidden behind the next step" in stderr) == (overlap == "true")
        cocktail[overlap] = json.loads(out.read_text())["baselines"]["rank order"]
    # the same placement: with overlap, DP counts only beyond the pipeline's step
    plain, hidden = cocktail["false"], cocktail["true"]
    step = plain["compute"] + plain["pp"]
    assert hidden["dp"] == pytest.approx(max(0.0, plain["dp"] - step), abs=1e-9)
    assert hidden["total"] == pytest.approx(max(step, plain["dp"]))


def test_plan_devices_file(tiny: Path, tmp_path: Path) -> None:
    devs = tmp_path / "devices.json"
    devs.write_text(
        json.dumps(
            {
                "devices": [
                    {"name": f"{h}{i}", "host": h, "tflops": 100 if h == "a" else 25}
                    for h in "ab"
                    for i in range(2)
                ]
            }
        )
    )
    out = tmp_path / "p.json"
    code, _, stderr = plan(
        str(tiny), "--scenario", "world", "--devices", str(devs), "--stages", "2",
        "--dp", "2", "--budget-s", "0.3", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    smap = StageMap.load(out, 4, 2)
    assert set(smap.hosts) == {"a", "b"}


def test_plan_memory_overflow(tiny: Path, tmp_path: Path) -> None:
    devs = tmp_path / "devices.json"
    devs.write_text(
        json.dumps(
            {"devices": [{"name": f"d{i}", "speed": 1, "memory_gb": 1e-6} for i in range(4)]}
        )
    )
    args = [str(tiny), "--scenario", "regional", "--devices", str(devs), "--budget-s", "0.2"]
    code, _, stderr = plan(*args, "--out", str(tmp_path / "p.json"))
    assert code == 2
    assert "memory_gb" in stderr and "no pipeline shape fits" in stderr
    code, _, stderr = plan(*args, "--stages", "2", "--dp", "2", "--out", "x.json")
    assert code == 2 and "memory_gb" in stderr and "GB" in stderr
    assert not (tmp_path / "p.json").exists()


def test_plan_memory_counts_activations(tmp_path: Path) -> None:
    """Long sequences of a narrow model: a device that holds the weights and AdamW but
    not every block's activations takes the layout only with recompute."""
    from farflung.config import load_config
    from farflung.plan.memory import layout_memory

    conf = tmp_path / "long.toml"
    long = {"context = 16": "context = 512", "= 8": "= 64", "= 32": "= 256", "= 300": "= 64"}
    text = TINY
    for a, b in long.items():
        text = text.replace(a, b)
    conf.write_text(text)
    cfg = load_config(conf)
    keep = max(r.total for r in layout_memory(cfg, 2, 2))
    redo = replace(cfg, model=replace(cfg.model, activation_checkpointing="blocks"))
    assert max(r.total for r in layout_memory(redo, 2, 2)) < keep / 2
    devs = tmp_path / "devices.json"
    gb = keep / 2 / 1e9
    devs.write_text(
        json.dumps({"devices": [{"name": f"d{i}", "speed": 1, "memory_gb": gb} for i in range(4)]})
    )
    args = [str(conf), "--scenario", "regional", "--devices", str(devs), "--budget-s", "0.2"]
    args += ["--stages", "2", "--dp", "2"]
    code, _, stderr = plan(*args, "--out", str(tmp_path / "a.json"))
    assert code == 2 and "activations" in stderr and "'none'" in stderr, stderr
    on = ["--set", "model.activation_checkpointing=blocks"]
    code, _, stderr = plan(*args, *on, "--out", str(tmp_path / "b.json"))
    assert code == 0, stderr


def test_plan_bad_shape(tiny: Path, tmp_path: Path) -> None:
    code, _, stderr = plan(
        str(tiny), "--scenario", "regional", "--workers", "8", "--stages", "3",
        "--dp", "3", "--out", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert code == 2 and "must equal the 8 devices" in stderr
