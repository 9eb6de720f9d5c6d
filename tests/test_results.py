"""Every published figure is backed: benchmarks/check_results.py on this checkout, on
trees with the faults it must catch, and chaos.py's classification of faults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "check_results.py"


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_this_checkout_is_backed() -> None:
    r = run_check(ROOT)
    assert r.returncode == 0, r.stderr


def tree(tmp_path: Path, results: dict[str, str], page: str) -> Path:
    """A checkout with these results files (name -> text) and one docs page."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "pp_wan.py").write_text("")
    for name, text in results.items():
        (tmp_path / "benchmarks" / "results" / name).write_text(text)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text(page)
    return tmp_path


GOOD = json.dumps({"benchmark": "pp_wan", "results": [{"mode": "aqsgd", "speedup": 4.1245}]})
MARK = "<!-- figure: pp_wan.json results/mode=aqsgd/speedup = {} -->"


def test_a_marked_figure_that_matches_passes(tmp_path: Path) -> None:
    page = f"AQ-SGD is an estimated 4.12x faster.\n{MARK.format('4.12')}\n"
    r = run_check(tree(tmp_path, {"pp_wan.json": GOOD}, page))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("results", "page", "says"),
    [
        ({"pp_wan.json": "rc=0\n"}, "", "pp_wan.json: does not parse as JSON"),
        ({"pp_wan.json": '{"benchmark": "x"}'}, "", "no top-level 'results' key"),
        ({"pp_wan.json": "[1, 2]"}, "", "holds a list"),
        ({"pp_wan.json": GOOD}, "see `pp_wan_old.json`\n", "names results/pp_wan_old.json"),
        ({}, "(`benchmarks/results/gone.json`)\n", "names results/gone.json, which is missing"),
        ({"pp_wan.json": GOOD}, f"4.13x faster {MARK.format('4.13')}\n", "the page quotes 4.13"),
        ({"pp_wan.json": GOOD}, f"faster {MARK.format('4.12')}\n", "is not quoted above"),
        (
            {"pp_wan.json": GOOD},
            "4.12x <!-- figure: pp_wan.json results/mode=fp16/speedup = 4.12 -->\n",
            "no item with mode = 'fp16'",
        ),
    ],
)
def test_what_is_not_backed_fails(tmp_path: Path, results: dict, page: str, says: str) -> None:
    r = run_check(tree(tmp_path, results, page))
    assert r.returncode == 1
    assert says in r.stderr


@pytest.fixture
def chaos():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import chaos as module

        yield module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def left(at: float, wid: int, why: str) -> dict:
    return {"event": "left", "at": at, "id": wid, "why": why, "recovery_s": 9.9}


def test_chaos_counts_a_freeze_only_when_its_silence_was_detected(chaos) -> None:
    faults = [
        {"kind": "kill", "t": 100.0, "pid": 1, "id": 1},
        {"kind": "freeze", "t": 110.0, "pid": 2, "id": 2, "hold_s": 3.5},  # exits on waking
        {"kind": "freeze", "t": 120.0, "pid": 3, "id": 3, "hold_s": 8.0},
        {"kind": "flap", "t": 140.0, "pid": 4, "id": 4, "hold_s": 2.0},  # never noticed
    ]
    events = [left(100.05, 1, "crash"), left(113.6, 2, "crash"), left(122.0, 3, "silent")]
    commits = [99.0, 100.5, 125.0]
    rows = chaos.match(faults, events, 2.0, commits)
    by_kind = [(r["kind"], r["detection_s"], r.get("ended_as")) for r in rows]
    assert by_kind == [
        ("kill", 0.05, None),
        ("freeze", None, "crash"),
        ("freeze", 2.0, None),
        ("flap", None, None),
    ]
    # recovery: the first commit the benchmark saw after each departure
    assert [r.get("recovery_s") for r in rows] == [0.45, 11.4, 3.0, None]
    assert rows[0]["coordinator_recovery_s"] == 9.9
    summary = chaos.summarize(rows, ["kill", "freeze", "flap", "join"])
    assert summary["undetected"] == {"kill": 0, "freeze": 1, "flap": 1}
    assert summary["ended_as_crash"] == {"kill": 0, "freeze": 1, "flap": 0}
    assert summary["detection_p50_s"] == pytest.approx((0.05 + 2.0) / 2)
    assert chaos.commits_between(commits, faults) == 2
