"""``farflung train`` (the launcher) starts its workers without loading torch (about
2 CPU-seconds a launch): its config checks use the torch-free table of algorithm
names, and the table is the registry's one source of names. ``farflung report``
reads and plots runs without it too (metrics records are torch-free; gathering them
during training is farflung.train.telemetry's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from procs import end_run

from farflung.train.metrics import read_jsonl

# `farflung ARGS` in this interpreter: the modules loaded by the time it returns
# (its workers are processes of their own, which do load torch)
LAUNCHER = """
import json, sys
from farflung.cli.main import main

code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def test_a_real_launch_loads_no_torch(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    short = ("train.steps=2", "train.eval_every=0", "train.checkpoint_every=0")
    args = ["train", str(tiny / "tiny.toml"), "--workers", "2", "--out", str(out), "--quiet"]
    args += [a for item in ("parallel.algorithm=gossip", *short) for a in ("--set", item)]
    try:
        r = subprocess.run(
            [sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, timeout=180
        )
    finally:
        end_run(out)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.splitlines()[-1])
    assert found["code"] == 0, r.stderr
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert not found["torch"], "the launcher loaded torch"


def test_a_report_loads_no_torch(run_a: Path, tmp_path: Path) -> None:
    png = tmp_path / "report.png"
    r = subprocess.run(
        [sys.executable, "-c", LAUNCHER, "report", str(run_a), "--out", str(png)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout.splitlines()[-1])
    assert found["code"] == 0 and png.stat().st_size > 0
    assert not found["torch"], "farflung report loaded torch"


def test_the_name_table_is_the_registry() -> None:
    """Every module of farflung.parallel imported, whatever the table lists: an
    algorithm registered anywhere must be in the table, under its own module."""
    import importlib
    import pkgutil

    import farflung.parallel as parallel
    from farflung.parallel import ALGORITHMS, REGISTRY

    for mod in pkgutil.walk_packages(parallel.__path__, "farflung.parallel."):
        importlib.import_module(mod.name)
    assert set(REGISTRY) == set(ALGORITHMS)
    for name, cls in REGISTRY.items():
        assert cls.__module__ == ALGORITHMS[name], name


def test_an_unknown_algorithm_is_refused_with_the_names() -> None:
    from farflung.config import ConfigError, ParallelConfig
    from farflung.parallel import check_parallel_config

    with pytest.raises(ConfigError, match="allowed: allreduce, cocktail, compressed, diloco"):
        check_parallel_config(ParallelConfig(algorithm="ring"))
