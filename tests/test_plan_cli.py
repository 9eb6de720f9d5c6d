"""``farflung plan``: devices files, the placement it writes and its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farflung.cli.main import main
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


def plan(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


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


def test_plan_fixed_shape(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "placement.json"
    code, stdout, stderr = plan(
        capsys,
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


def test_plan_chooses_shape(tiny: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.json"
    code, _, stderr = plan(
        capsys, str(tiny), "--links", "100mbit,20ms", "--workers", "4", "--budget-s", "0.5",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    data = json.loads(out.read_text())
    pp = data["stages"]
    assert pp in (1, 2, 4) and 4 % pp == 0
    StageMap.load(out, 4, pp)


def test_plan_devices_file(tiny: Path, tmp_path: Path, capsys) -> None:
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
        capsys, str(tiny), "--scenario", "world", "--devices", str(devs), "--stages", "2",
        "--dp", "2", "--budget-s", "0.3", "--out", str(out),
    )  # fmt: skip
    assert code == 0, stderr
    smap = StageMap.load(out, 4, 2)
    assert set(smap.hosts) == {"a", "b"}


def test_plan_memory_overflow(tiny: Path, tmp_path: Path, capsys) -> None:
    devs = tmp_path / "devices.json"
    devs.write_text(
        json.dumps(
            {"devices": [{"name": f"d{i}", "speed": 1, "memory_gb": 1e-6} for i in range(4)]}
        )
    )
    args = [str(tiny), "--scenario", "regional", "--devices", str(devs), "--budget-s", "0.2"]
    code, _, stderr = plan(capsys, *args, "--out", str(tmp_path / "p.json"))
    assert code == 2
    assert "memory_gb" in stderr and "no pipeline shape fits" in stderr
    code, _, stderr = plan(capsys, *args, "--stages", "2", "--dp", "2", "--out", "x.json")
    assert code == 2 and "memory_gb" in stderr and "GB" in stderr
    assert not (tmp_path / "p.json").exists()


def test_plan_bad_shape(tiny: Path, tmp_path: Path, capsys) -> None:
    code, _, stderr = plan(
        capsys, str(tiny), "--scenario", "regional", "--workers", "8", "--stages", "3",
        "--dp", "3", "--out", str(tmp_path / "p.json"),
    )  # fmt: skip
    assert code == 2 and "must equal the 8 devices" in stderr
