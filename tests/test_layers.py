"""Imports point one way only, down the layer list of DESIGN.md."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "farflung"
# each layer may import only the layers listed after it
ORDER = [
    "cli",
    "train",
    "membership",
    "parallel",
    "plan",
    "netlab",
    "comm",
    "compress",
    "model",
    "curate",
    "data",
    "config",
]
# pure layers must not touch torch.distributed either
NO_DIST = {"compress", "model", "curate", "data", "config"}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layer_imports_point_down():
    problems = []
    for layer in ORDER:
        allowed = set(ORDER[ORDER.index(layer) :])
        for path in (PKG / layer).rglob("*.py"):
            for name in imports_of(path):
                parts = name.split(".")
                if parts[0] == "farflung" and len(parts) > 1 and parts[1] in ORDER:
                    if parts[1] not in allowed:
                        problems.append(f"{path.relative_to(PKG)} imports {name}")
                if layer in NO_DIST and name.startswith("torch.distributed"):
                    problems.append(f"{path.relative_to(PKG)} imports {name}")
    assert not problems, "\n".join(problems)


def test_every_layer_is_checked():
    present = {p.name for p in PKG.iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert present <= set(ORDER), present - set(ORDER)
