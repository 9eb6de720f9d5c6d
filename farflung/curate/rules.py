"""Rules over quality signals: the paper presets, user rules from TOML, and their verdicts.

A rule set is data, a small TOML file (the presets live in ``farflung/curate/presets``)::

    name = "mine"                      # optional; default: the file name
    description = "why these rules"    # optional
    include = ["gopher"]               # optional: rules of presets / files (relative to
                                       # this one) that come before this file's rules
    max_dropped_word_fraction = 0.05   # optional: reject a document when the lines that
                                       # drop_lines rules removed held more of its words

    [[rule]]
    signal = "rps_doc_word_count"      # a RedPajama-v2 signal name
    keep = ">= 50"                     # keep a document when <value> <op> <number>
    name = "too_few_words"             # optional; default: "<signal> <keep>"
    aggregate = "mean"                 # line-level signals: mean | sum | min | max
    action = "reject"                  # reject (default) | drop_lines
    missing = "reject"                 # no value for a document: reject (default) | keep
    optional = false                   # true: skip the rule if the signals lack it
    source = "Rae et al. 2021, A.1.1"  # optional: where the threshold comes from

A rule's value is the score of the signal's one span for a document-level signal, or
an ``aggregate`` of its line spans' scores (``mean`` of a 0/1 line signal is the
fraction of lines where it holds; an empty document aggregates to 0). A
``drop_lines`` rule tests every line span instead and removes the lines that fail
from the kept text, as C4 and RefinedWeb edit documents line by line; the spans'
character offsets say which text to cut.

A document is rejected by the first ``reject`` rule it fails, in file order; all
the rules it fails are recorded, so a table can show what each rule would remove
alone and what it removed given the rules before it.
"""

from __future__ import annotations

import operator
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from farflung.data.errors import DataError

PRESETS = ("gopher", "c4", "rpv1", "refinedweb")
"""Rule sets that ship with farflung (``--rules NAME``)."""

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
AGGREGATES = ("mean", "sum", "min", "max")
ACTIONS = ("reject", "drop_lines")
MISSING = ("reject", "keep")
LINE_PREFIX = "rps_lines_"
"""RedPajama-v2 names its line-level signals (one span per line) with this prefix."""
LINE_WORDS = "rps_lines_num_words"
"""The signal ``max_dropped_word_fraction`` counts words with."""

ALL_LINES_DROPPED = "all_lines_dropped"
DROPPED_WORDS = "dropped_word_fraction"

_RULE_KEYS = ("signal", "keep", "name", "aggregate", "action", "missing", "optional", "source")
_TOP_KEYS = ("name", "description", "source", "include", "max_dropped_word_fraction", "rule")
_MAX_INCLUDE_DEPTH = 8
_KEEP = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")

Spans = list[list[Any]]


@dataclass(frozen=True)
class Rule:
    """One condition a document (or a line, for ``drop_lines``) must meet to be kept."""

    name: str
    signal: str
    op: str
    threshold: float
    aggregate: str | None = None
    action: str = "reject"
    missing: str = "reject"
    optional: bool = False
    source: str = ""

    @property
    def keep(self) -> str:
        """The condition as written: ``>= 50``."""
        return f"{self.op} {self.threshold:g}"

    def passes(self, value: float) -> bool:
        """Whether ``value`` meets the condition."""
        return OPS[self.op](value, self.threshold)

    def value(self, spans: Spans | None) -> float | None:
        """The document's value for this rule, None where it has none."""
        if not spans:
            return 0.0 if spans is not None and self.aggregate else None
        if self.aggregate is None:
            return _score(spans[0]) if len(spans) == 1 else None
        scores = span_array(spans)[:, 2]
        scores = scores[~np.isnan(scores)]
        if not scores.size:
            return 0.0
        return float(getattr(np, self.aggregate)(scores))


@dataclass(frozen=True)
class RuleSet:
    """Rules applied together, in order, with where they come from."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    source: str = ""
    max_dropped_word_fraction: float | None = None

    @property
    def signals(self) -> set[str]:
        """Every signal the rules read."""
        names = {r.signal for r in self.rules}
        if self.max_dropped_word_fraction is not None:
            names.add(LINE_WORDS)
        return names

    def without(self, signals: Iterable[str]) -> RuleSet:
        """The rule set minus optional rules on ``signals`` (ones a run did not compute)."""
        missing = set(signals)
        rules = tuple(r for r in self.rules if not (r.optional and r.signal in missing))
        return RuleSet(
            self.name, rules, self.description, self.source, self.max_dropped_word_fraction
        )


@dataclass
class Verdict:
    """What the rules decided for one document."""

    rejected_by: str | None = None
    failed: list[str] = field(default_factory=list)
    dropped: list[tuple[int, int]] = field(default_factory=list)
    """Character ranges of the lines that drop_lines rules removed."""
    lines: dict[str, int] = field(default_factory=dict)
    """Lines each drop_lines rule removed (a line failing two rules counts for both)."""


# ---------------------------------------------------------------------------- loading


def load_rules(spec: str, base: Path | None = None, depth: int = 0) -> RuleSet:
    """A preset by name (``gopher``, ``c4``, ``rpv1``, ``refinedweb``) or a TOML file
    (relative to ``base``, the folder of a file that includes it)."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise DataError(f"rules {spec}: includes nest deeper than {_MAX_INCLUDE_DEPTH} (a cycle?)")
    if spec in PRESETS:
        text = resources.files("farflung.curate").joinpath(f"presets/{spec}.toml").read_text()
        data, where, name, folder = tomllib.loads(text), f"preset {spec}", spec, None
    else:
        path = (base / spec) if base is not None else Path(spec)
        if not path.is_file():
            raise DataError(
                f"rules {spec}: not a preset ({', '.join(PRESETS)}) and no such rule file"
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid TOML: {exc}") from None
        where, name, folder = str(path), path.stem, path.parent
    included = _included(data, where, folder, depth)
    return parse_rules(data, where, default_name=name, included=included)


def _included(data: dict[str, Any], where: str, folder: Path | None, depth: int) -> list[Rule]:
    """The rules of the rule sets named by ``include``, in order."""
    specs = data.get("include", [])
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise DataError(f"{where}: include must be a list of preset names or rule files")
    return [rule for spec in specs for rule in load_rules(spec, folder, depth + 1).rules]


def parse_rules(
    data: dict[str, Any],
    where: str,
    default_name: str = "rules",
    included: list[Rule] | None = None,
) -> RuleSet:
    """Validate a parsed rule file; errors name the file, the rule and the key.
    ``included`` rules (from ``include``) come first."""
    _check_keys(data, _TOP_KEYS, where)
    rules_data = data.get("rule", [])
    if not isinstance(rules_data, list) or not (rules_data or included):
        raise DataError(f'{where}: no rules: add at least one [[rule]] table with "signal"')
    own = [_parse_rule(r, f"{where}: rule {i + 1}") for i, r in enumerate(rules_data)]
    rules = (*(included or []), *own)
    names = [r.name for r in rules]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise DataError(f"{where}: rule names must be unique; repeated: {', '.join(dup)}")
    cap = data.get("max_dropped_word_fraction")
    if cap is not None and (not _is_number(cap) or not 0 <= cap <= 1):
        raise DataError(f"{where}: max_dropped_word_fraction must be a number in [0, 1]")
    return RuleSet(
        name=_string(data, "name", where, default_name),
        rules=rules,
        description=_string(data, "description", where, ""),
        source=_string(data, "source", where, ""),
        max_dropped_word_fraction=None if cap is None else float(cap),
    )


def _parse_rule(data: Any, where: str) -> Rule:
    if not isinstance(data, dict):
        raise DataError(f"{where}: must be a table ([[rule]])")
    _check_keys(data, _RULE_KEYS, where)
    signal = _string(data, "signal", where, None)
    if "name" in data:
        where = f"{where} ({data['name']})"
    keep = _string(data, "keep", where, None)
    match = _KEEP.match(keep)
    if match is None:
        raise DataError(
            f'{where}: keep must be "<op> <number>" with op one of {", ".join(OPS)} '
            f"(for example '>= 50'), got {keep!r}"
        )
    aggregate = _choice(data, "aggregate", where, (*AGGREGATES, None), None)
    action = _choice(data, "action", where, ACTIONS, "reject")
    if signal.startswith(LINE_PREFIX) and action == "reject" and aggregate is None:
        raise DataError(
            f"{where}: {signal} is a line-level signal (one span per line): set aggregate "
            f'to one of {", ".join(AGGREGATES)}, or action = "drop_lines"'
        )
    if action == "drop_lines" and aggregate is not None:
        raise DataError(f"{where}: aggregate does not apply to drop_lines rules (each line)")
    optional = data.get("optional", False)
    if not isinstance(optional, bool):
        raise DataError(f"{where}: optional must be true or false, got {optional!r}")
    return Rule(
        name=_string(data, "name", where, f"{signal} {match[1]} {match[2]}"),
        signal=signal,
        op=match[1],
        threshold=float(match[2]),
        aggregate=aggregate,
        action=action,
        missing=_choice(data, "missing", where, MISSING, "reject"),
        optional=optional,
        source=_string(data, "source", where, ""),
    )


def _check_keys(data: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    if unknown := sorted(set(data) - set(allowed)):
        raise DataError(
            f"{where}: unknown key {', '.join(unknown)}; allowed keys: {', '.join(allowed)}"
        )


def _string(data: dict[str, Any], key: str, where: str, default: str | None) -> str:
    if key not in data:
        if default is None:
            raise DataError(f"{where}: missing required key {key!r}")
        return default
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _choice(data: dict[str, Any], key: str, where: str, allowed: tuple, default: Any) -> Any:
    value = data.get(key, default)
    if value not in allowed:
        names = ", ".join(a for a in allowed if a is not None)
        raise DataError(f"{where}: {key} must be one of {names}, got {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _score(span: list[Any]) -> float | None:
    """The score of a ``[start, end, score]`` span as a float (None stays None)."""
    score = span[2] if len(span) > 2 else None
    return None if score is None else float(score)


# ---------------------------------------------------------------------------- verdicts


def check_signals(rules: RuleSet, available: Iterable[str], where: str) -> RuleSet:
    """The rules runnable on signals ``available``: optional rules on missing signals
    are dropped, a required one is an error naming the closest known signal."""
    have = set(available)
    missing = rules.signals - have
    runnable = rules.without(missing)
    if still := sorted(runnable.signals - have):
        import difflib

        hints = [
            f"{name} (did you mean {close[0]}?)"
            if (close := difflib.get_close_matches(name, have, n=1))
            else name
            for name in still
        ]
        raise DataError(
            f"rules {rules.name}: {where} has no signal {', '.join(hints)}; "
            "compute it with `farflung data signals`, or mark its rule optional = true"
        )
    return runnable


def evaluate(rules: RuleSet, signals: dict[str, Spans]) -> Verdict:
    """Apply ``rules`` to one document's quality signals."""
    verdict = Verdict()
    failing_lines = []
    for rule in rules.rules:
        if rule.action == "drop_lines":
            failing = _failing_lines(rule, signals.get(rule.signal) or [])
            if len(failing):
                failing_lines.append(failing)
                verdict.lines[rule.name] = len(failing)
            continue
        value = rule.value(signals.get(rule.signal))
        ok = rule.missing == "keep" if value is None else rule.passes(value)
        if not ok:
            verdict.failed.append(rule.name)
    if failing_lines:
        verdict.dropped = _merge(failing_lines)
        cap = rules.max_dropped_word_fraction
        if cap is not None and _dropped_words(signals, verdict.dropped) > cap:
            verdict.failed.append(DROPPED_WORDS)
    if verdict.failed:
        verdict.rejected_by = verdict.failed[0]
    return verdict


def span_array(spans: Spans) -> np.ndarray:
    """Spans as an ``(n, 3)`` float array, a None score as NaN: one C call where a
    document has thousands of lines, instead of a Python step per line."""
    try:
        return np.array(spans, dtype=float).reshape(-1, 3)
    except (TypeError, ValueError):  # a malformed span: read it leniently
        rows = [[s[0], s[1], s[2] if len(s) > 2 else None] for s in spans]
        return np.array(rows, dtype=float).reshape(-1, 3)


def _failing_lines(rule: Rule, spans: Spans) -> np.ndarray:
    """``(k, 2)`` character ranges of the line spans that fail a drop_lines rule."""
    array = span_array(spans)
    scores = array[:, 2]
    missing = np.isnan(scores)
    with np.errstate(invalid="ignore"):
        ok = np.where(missing, rule.missing == "keep", OPS[rule.op](scores, rule.threshold))
    return array[~ok, :2].astype(np.int64)


def _merge(ranges: list[np.ndarray]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ranges (several rules may drop the same line)."""
    r = np.concatenate(ranges)
    r = r[np.lexsort((r[:, 1], r[:, 0]))]
    reach = np.maximum.accumulate(r[:, 1])
    first = np.ones(len(r), dtype=bool)
    first[1:] = r[1:, 0] > reach[:-1]  # a range touching the one before joins it
    starts = np.flatnonzero(first)
    ends = np.maximum.reduceat(r[:, 1], starts)
    return list(zip(r[starts, 0].tolist(), ends.tolist(), strict=True))


def _dropped_words(signals: dict[str, Spans], dropped: list[tuple[int, int]]) -> float:
    """Fraction of the document's words (``rps_lines_num_words``) in dropped lines."""
    array = span_array(signals.get(LINE_WORDS) or [])
    words = np.nan_to_num(array[:, 2])
    total = words.sum()
    if total == 0:
        return 0.0
    starts = np.array([start for start, _ in dropped])
    ends = np.array([end for _, end in dropped])
    k = np.searchsorted(starts, array[:, 0], side="right") - 1
    inside = (k >= 0) & (array[:, 1] <= ends[np.maximum(k, 0)])  # lies in a dropped range
    return float(words[inside].sum() / total)


def cut_lines(text: str, dropped: list[tuple[int, int]]) -> str:
    """``text`` without the character ranges ``dropped`` (sorted, non-overlapping)."""
    parts, pos = [], 0
    for start, end in dropped:
        parts.append(text[pos:start])
        pos = max(pos, end)
    parts.append(text[pos:])
    return "".join(parts)
