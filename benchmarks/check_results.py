"""Every published figure is backed: check benchmarks/results against the docs.

Three checks, each problem reported with the file, key or line it is about:

1. every ``*.json`` under ``benchmarks/results`` parses and is an object with a
   top-level ``"results"`` (a failed run's output, e.g. a file holding ``rc=0``, fails);
2. every results file that README.md or ``docs/*.md`` names exists (``results/NAME.json``,
   or a bare ``NAME.json`` whose name starts with a benchmark script's, e.g.
   ``dp_convergence_demo_seeds.json``);
3. every marked figure matches its file. A marker is an HTML comment (invisible when
   rendered) placed after the figure, on its line or below it (a table's markers go
   under the table)::

       cocktail 0.995x the loss <!-- figure: finetune_parity_lr2e-4.json
           results/algorithm=cocktail/val_loss_ratio = 0.995 -->

   (on one line). The pointer's parts are separated by ``/``: an object's key, a
   list's index, or ``KEY=VALUE`` (``&`` between several) for the first list item
   that has them.
   The figure must appear in the text at most ``NEAR_LINES`` lines above the marker,
   and the file's value must round to it at the figure's decimals.

    python benchmarks/check_results.py [--root DIR]     # exit 1 and a list if not
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NEAR_LINES = 40  # a marker's figure is quoted within this many lines above it
MARKER = re.compile(r"<!-- figure: (\S+) (.+) = ([-+]?[\d,]*\.?\d+) -->")
NAMED = re.compile(r"(?<![\w/.+-])((?:benchmarks/)?results/)?([\w.+-]+\.json)")


def docs_of(root: Path) -> list[Path]:
    """The pages whose figures must be backed: README.md and docs/*.md."""
    pages = [root / "README.md"] if (root / "README.md").is_file() else []
    return pages + sorted((root / "docs").glob("*.md"))


def named_results(line: str, scripts: list[str]) -> list[str]:
    """The results files ``line`` names: ``results/NAME.json``, or a bare ``NAME.json``
    that starts with the name of a benchmark script (run files such as summary.json
    do not)."""
    return [
        name
        for prefix, name in NAMED.findall(line)
        if prefix or any(name.startswith(s + ".") or name.startswith(s + "_") for s in scripts)
    ]


def load_result(path: Path) -> tuple[Any, str | None]:
    """A results file's content, or why it is not a valid one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"does not parse as JSON ({e})"
    if not isinstance(data, dict):
        return None, f"holds a {type(data).__name__}, not an object with a 'results' key"
    if "results" not in data:
        return None, f"has no top-level 'results' key (keys: {', '.join(sorted(data)[:12])})"
    return data, None


def resolve(data: Any, pointer: str) -> Any:
    """The value at ``pointer`` (``a/0/name=x&link=y/b``); KeyError naming what failed."""
    node = data
    for part in pointer.split("/"):
        if isinstance(node, list) and "=" in part:
            want = dict(cond.split("=", 1) for cond in part.split("&"))
            hits = [
                x
                for x in node
                if isinstance(x, dict) and all(str(x.get(k)) == v for k, v in want.items())
            ]
            if not hits:
                conds = " and ".join(f"{k} = {v!r}" for k, v in want.items())
                raise KeyError(f"no item with {conds}")
            node = hits[0]
        elif isinstance(node, list) and part.lstrip("-").isdigit():
            if not -len(node) <= int(part) < len(node):
                raise KeyError(f"index {part} out of range ({len(node)} items)")
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(f"no key {part!r}")
    return node


def matches(value: Any, figure: str) -> bool:
    """Whether ``value`` rounds to ``figure`` at the figure's decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    digits = figure.replace(",", "")
    decimals = len(digits.split(".", 1)[1]) if "." in digits else 0
    return abs(value - float(digits)) <= 0.5 * 10**-decimals + 1e-12


def check_marker(page: Path, lines: list[str], i: int, m: re.Match, results: Path) -> str | None:
    """One marker on line ``i`` of ``page``: its file, its value and its quoted figure."""
    name, pointer, figure = m.group(1), m.group(2).strip(), m.group(3)
    where = f"{page.name}:{i + 1}"
    data, why = load_result(results / name)
    if why:
        return f"{where}: marker names {name}, which {why}"
    try:
        value = resolve(data, pointer)
    except KeyError as e:
        return f"{where}: {name} has nothing at {pointer!r}: {e.args[0]}"
    if not matches(value, figure):
        return f"{where}: {name} {pointer} is {value!r}, the page quotes {figure}"
    above = "\n".join([*lines[max(0, i - NEAR_LINES) : i], lines[i][: m.start()]])
    if figure not in re.sub(r"<!--.*?-->", "", above):
        return f"{where}: the figure {figure} ({name} {pointer}) is not quoted above its marker"
    return None


def check(root: Path) -> list[str]:
    """Every problem found under ``root`` (a checkout: benchmarks/results, README, docs)."""
    results = root / "benchmarks" / "results"
    scripts = sorted(f.stem for f in (root / "benchmarks").glob("*.py") if f.stem != "common")
    problems = []
    for path in sorted(results.rglob("*.json")):
        _, why = load_result(path)
        if why:
            problems.append(f"{path.relative_to(root)}: {why}")
    for page in docs_of(root):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            for name in named_results(line, scripts):
                if not (results / name).is_file():
                    problems.append(f"{page.name}:{i + 1}: names results/{name}, which is missing")
            for m in MARKER.finditer(line):
                problem = check_marker(page, lines, i, m, results)
                if problem:
                    problems.append(problem)
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout to check")
    args = p.parse_args()
    problems = check(args.root.resolve())
    for line in problems:
        print(line, file=sys.stderr)
    n = len(list((args.root / "benchmarks" / "results").rglob("*.json")))
    print(f"check_results: {n} results files, {len(problems)} problems")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
