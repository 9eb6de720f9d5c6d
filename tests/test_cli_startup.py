"""``farflung``'s parser, every verb's ``--help`` and a config error import no torch
(seconds of start-up): each verb imports its machinery only when it runs. A fresh
interpreter, since this test process has imported torch long ago."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import contextlib, io, json, sys
from farflung.cli.main import build_parser, main

verbs = sorted(build_parser()._subparsers._group_actions[0].choices)
helps = {}
for verb in verbs:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([verb, "--help"])
        except SystemExit as e:
            helps[verb] = (e.code, "usage: farflung " + verb in out.getvalue())
with contextlib.redirect_stderr(io.StringIO()) as err:
    codes = {
        verb: main([verb, sys.argv[1], *extra])
        for verb, extra in (("train", []), ("coordinator", ["--workers", "1"]),
                            ("plan", ["--links", "1gbit"]), ("prepare", []))
    }
heavy = sorted(m for m in ("torch", "numpy") if m in sys.modules)
print(json.dumps({"helps": helps, "codes": codes, "err": err.getvalue(), "heavy": heavy}))
"""


def test_help_and_config_errors_import_no_torch(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(bad)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert {"train", "coordinator", "plan", "probe", "data", "sample"} <= set(found["helps"])
    assert all(h == [0, True] for h in found["helps"].values()), found["helps"]
    assert found["codes"] == {"train": 2, "coordinator": 2, "plan": 2, "prepare": 2}
    assert found["err"].count("farflung: config error: unknown key train.stepz") == 4
    assert found["heavy"] == [], f"imported by the parser or a config error: {found['heavy']}"
