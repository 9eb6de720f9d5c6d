"""Rule presets keep and reject hand-made signal records; user rule files fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from farflung.curate.rules import (
    DROPPED_WORDS,
    PRESETS,
    check_signals,
    cut_lines,
    evaluate,
    load_rules,
)
from farflung.data.errors import DataError


def doc(value: float | None, n: int = 1000) -> list[list]:
    """A document-level signal: one span over the whole text."""
    return [[0, n, value]]


def lines(text: str, scores: list[float]) -> list[list]:
    """A line-level signal: one ``[start, end, score]`` span per line of ``text``."""
    spans, pos = [], 0
    for line, score in zip(text.splitlines(keepends=True), scores, strict=True):
        spans.append([pos, pos + len(line), score])
        pos += len(line)
    return spans


GOOD = {
    "rps_doc_word_count": doc(500),
    "rps_doc_mean_word_length": doc(5.0),
    "rps_doc_symbol_to_word_ratio": doc(0.0),
    "rps_lines_start_with_bulletpoint": [[0, 10, 0], [10, 20, 0]],
    "rps_doc_frac_lines_end_with_ellipsis": doc(0.0),
    "rps_doc_frac_no_alph_words": doc(0.05),
    "rps_doc_stop_word_fraction": doc(0.4),
    "rps_doc_gopher_stop_words": doc(8),
    **{name: doc(0.0) for name in ("rps_doc_frac_dupe_lines", "rps_doc_frac_dupe_paragraphs")},
    **{
        n: doc(0.0) for n in ("rps_doc_frac_chars_dupe_lines", "rps_doc_frac_chars_dupe_paragraphs")
    },
    **{f"rps_doc_frac_chars_top_{k}gram": doc(0.05) for k in (2, 3, 4)},
    **{f"rps_doc_frac_chars_dupe_{k}grams": doc(0.0) for k in range(5, 11)},
    "rps_doc_num_sentences": doc(20),
    "rps_doc_ldnoobw_words": doc(0),
    "rps_doc_lorem_ipsum": doc(0.0),
    "rps_doc_curly_bracket": doc(0.0),
    "rps_doc_ml_wikiref_score": doc(0.9),
}

BULLETS_9_OF_10 = [[i, i + 1, float(i < 9)] for i in range(10)]
BULLETS_ALL = [[i, i + 1, 1.0] for i in range(10)]

# Every reject rule of each preset: its signal, a value just kept, a value just rejected.
GOPHER = {
    "too_few_words": ("rps_doc_word_count", doc(50), doc(49)),
    "too_many_words": ("rps_doc_word_count", doc(100_000), doc(100_001)),
    "mean_word_length_short": ("rps_doc_mean_word_length", doc(3.0), doc(2.99)),
    "mean_word_length_long": ("rps_doc_mean_word_length", doc(10.0), doc(10.01)),
    "symbol_word_ratio": ("rps_doc_symbol_to_word_ratio", doc(0.1), doc(0.11)),
    "bullet_lines": ("rps_lines_start_with_bulletpoint", BULLETS_9_OF_10, BULLETS_ALL),
    "ellipsis_lines": ("rps_doc_frac_lines_end_with_ellipsis", doc(0.3), doc(0.31)),
    "no_alpha_words": ("rps_doc_frac_no_alph_words", doc(0.2), doc(0.21)),
    "stop_words": ("rps_doc_gopher_stop_words", doc(2), doc(1)),
    "dup_line_fraction": ("rps_doc_frac_dupe_lines", doc(0.3), doc(0.31)),
    "dup_paragraph_fraction": ("rps_doc_frac_dupe_paragraphs", doc(0.3), doc(0.31)),
    "dup_line_chars": ("rps_doc_frac_chars_dupe_lines", doc(0.2), doc(0.21)),
    "dup_paragraph_chars": ("rps_doc_frac_chars_dupe_paragraphs", doc(0.2), doc(0.21)),
    "top_2gram": ("rps_doc_frac_chars_top_2gram", doc(0.2), doc(0.21)),
    "top_3gram": ("rps_doc_frac_chars_top_3gram", doc(0.18), doc(0.19)),
    "top_4gram": ("rps_doc_frac_chars_top_4gram", doc(0.16), doc(0.17)),
    "dup_5grams": ("rps_doc_frac_chars_dupe_5grams", doc(0.15), doc(0.16)),
    "dup_6grams": ("rps_doc_frac_chars_dupe_6grams", doc(0.14), doc(0.15)),
    "dup_7grams": ("rps_doc_frac_chars_dupe_7grams", doc(0.13), doc(0.14)),
    "dup_8grams": ("rps_doc_frac_chars_dupe_8grams", doc(0.12), doc(0.13)),
    "dup_9grams": ("rps_doc_frac_chars_dupe_9grams", doc(0.11), doc(0.12)),
    "dup_10grams": ("rps_doc_frac_chars_dupe_10grams", doc(0.10), doc(0.11)),
}
C4 = {
    "few_sentences": ("rps_doc_num_sentences", doc(3), doc(2)),
    "bad_words": ("rps_doc_ldnoobw_words", doc(0), doc(1)),
    "lorem_ipsum": ("rps_doc_lorem_ipsum", doc(0.0), doc(0.002)),
    "curly_bracket": ("rps_doc_curly_bracket", doc(0.0), doc(0.0005)),
}
RPV1 = {
    "wikiref_score": ("rps_doc_ml_wikiref_score", doc(0.25), doc(0.2499)),
    "bad_words": ("rps_doc_ldnoobw_words", doc(0), doc(3)),
    "lorem_ipsum": ("rps_doc_lorem_ipsum", doc(0.0), doc(0.01)),
}
CASES = {"gopher": GOPHER, "c4": C4, "rpv1": RPV1, "refinedweb": GOPHER}


def c4_lines(text: str) -> dict:
    """C4's three line signals for ``text`` whose lines are all good."""
    n = len(text.splitlines())
    return {
        "rps_lines_ending_with_terminal_punctution_mark": lines(text, [1.0] * n),
        "rps_lines_num_words": lines(text, [6.0] * n),
        "rps_lines_javascript_counts": lines(text, [0.0] * n),
    }


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_rule_keeps_and_rejects_either_side_of_its_threshold(preset: str) -> None:
    rules = load_rules(preset)
    cases = CASES[preset]
    assert {r.name for r in rules.rules if r.action == "reject"} == set(cases)
    base = {**GOOD, **c4_lines("A fine line of text here.\n")}
    if rules.max_dropped_word_fraction is not None:  # refinedweb's line signals
        base["rps_lines_uppercase_letter_fraction"] = lines("A fine line\n", [0.1])
        base["rps_lines_numerical_chars_fraction"] = lines("A fine line\n", [0.0])
    assert evaluate(rules, base).rejected_by is None
    for name, (signal, kept, rejected) in cases.items():
        assert evaluate(rules, {**base, signal: kept}).rejected_by is None, (name, kept)
        verdict = evaluate(rules, {**base, signal: rejected})
        assert verdict.rejected_by == name, (name, rejected, verdict)


def test_first_failing_rule_rejects_and_all_failures_are_listed() -> None:
    rules = load_rules("gopher")
    verdict = evaluate(
        rules, {**GOOD, "rps_doc_word_count": doc(10), "rps_doc_frac_chars_top_2gram": doc(0.5)}
    )
    assert verdict.rejected_by == "too_few_words"
    assert verdict.failed == ["too_few_words", "top_2gram"]


def test_missing_values_reject_unless_the_rule_says_keep(tmp_path: Path) -> None:
    rules = load_rules("gopher")
    assert evaluate(rules, {**GOOD, "rps_doc_mean_word_length": doc(None)}).rejected_by == (
        "mean_word_length_short"
    )
    path = tmp_path / "r.toml"
    path.write_text(
        '[[rule]]\nsignal = "rps_doc_mean_word_length"\nkeep = ">= 3"\nmissing = "keep"\n'
    )
    assert (
        evaluate(load_rules(str(path)), {"rps_doc_mean_word_length": doc(None)}).rejected_by is None
    )


def test_c4_drops_lines_then_judges_the_page() -> None:
    text = (
        "This is a good first line.\n"
        "this line has no final punctuation\n"
        "Too short.\n"
        "Please enable javascript in your browser.\n"
        "And this is the last good line!"
    )
    signals = {
        **GOOD,
        "rps_lines_ending_with_terminal_punctution_mark": lines(text, [1, 0, 1, 1, 1]),
        "rps_lines_num_words": lines(text, [6, 6, 2, 6, 7]),
        "rps_lines_javascript_counts": lines(text, [0, 0, 0, 1, 0]),
    }
    verdict = evaluate(load_rules("c4"), signals)
    assert verdict.rejected_by is None
    assert verdict.lines == {
        "line_terminal_punctuation": 1,
        "line_min_words": 1,
        "line_javascript": 1,
    }
    kept = cut_lines(text, verdict.dropped)
    assert kept == "This is a good first line.\nAnd this is the last good line!"


def test_refinedweb_rejects_when_dropped_lines_hold_over_5_percent_of_words() -> None:
    rules = load_rules("refinedweb")
    assert [r.name for r in rules.rules[:22]] == [r.name for r in load_rules("gopher").rules]
    text = "Header\n" + "word " * 94 + "end.\n" + "SHOUTING IN CAPITALS HERE NOW\n"
    words = [1, 95, 5]  # 101 words: the one-word line is 1%, the capitals line 5%
    base = {
        **GOOD,
        "rps_lines_num_words": lines(text, words),
        "rps_lines_numerical_chars_fraction": lines(text, [0, 0, 0]),
    }
    one_word_only = {**base, "rps_lines_uppercase_letter_fraction": lines(text, [0.1, 0, 0.1])}
    verdict = evaluate(rules, one_word_only)
    assert verdict.rejected_by is None and verdict.lines == {"line_one_word": 1}
    assert cut_lines(text, verdict.dropped) == text[len("Header\n") :]
    shouting = {**base, "rps_lines_uppercase_letter_fraction": lines(text, [0.1, 0, 0.9])}
    verdict = evaluate(rules, shouting)  # 6 of 101 words dropped: 5.9% > 5%
    assert verdict.rejected_by == DROPPED_WORDS


def test_optional_rules_are_skipped_when_their_signal_was_not_computed() -> None:
    rules = load_rules("rpv1")
    available = set(GOOD) - {"rps_doc_ml_wikiref_score"}
    runnable = check_signals(rules, available, "signals/")
    assert [r.name for r in runnable.rules] == ["bad_words", "lorem_ipsum"]
    assert check_signals(rules, GOOD, "signals/").rules == rules.rules
    with pytest.raises(DataError, match=r"no signal rps_doc_word_count .*mark its rule optional"):
        check_signals(load_rules("gopher"), available - {"rps_doc_word_count"}, "signals/")


# ---------------------------------------------------------------------------- user files


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return str(path)


def test_user_rule_file_with_include_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text(
        '[[rule]]\nsignal = "rps_doc_ldnoobw_words"\nkeep = "== 0"\n'
    )
    spec = write(
        tmp_path,
        'description = "c4 plus mine"\ninclude = ["c4", "base.toml"]\n'
        '[[rule]]\nname = "long"\nsignal = "rps_doc_word_count"\nkeep = ">= 200"\n'
        '[[rule]]\nsignal = "rps_lines_num_words"\naggregate = "max"\nkeep = "< 1000"\n',
    )
    rules = load_rules(spec)
    assert rules.name == "mine"
    names = [r.name for r in rules.rules]
    assert names[-3:] == ["rps_doc_ldnoobw_words == 0", "long", "rps_lines_num_words < 1000"]
    assert evaluate(rules, {**GOOD, **c4_lines("A b c d e f.\n")}).rejected_by is None
    assert (
        evaluate(rules, {**GOOD, **c4_lines("A b.\n"), "rps_doc_word_count": doc(100)}).rejected_by
        == "long"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[rule]]\nsignal = "x"\nkep = ">= 1"\n',
            r"rule 1: unknown key kep; allowed keys: signal, keep",
        ),
        ('[[rule]]\nkeep = ">= 1"\n', r"rule 1: missing required key 'signal'"),
        (
            '[[rule]]\nsignal = "x"\nkeep = "=> 1"\n',
            r'keep must be "<op> <number>" with op one of <=, >=',
        ),
        ('[[rule]]\nsignal = "x"\nkeep = 5\n', r"keep must be a non-empty string, got 5"),
        (
            '[[rule]]\nname = "b"\nsignal = "x"\nkeep = "> 1"\naggregate = "avg"\n',
            r"rule 1 \(b\): aggregate must be one of mean, sum, min, max, got 'avg'",
        ),
        (
            '[[rule]]\nsignal = "rps_lines_num_words"\nkeep = "> 1"\n',
            r"line-level signal .* set aggregate to one of mean, sum, min, max",
        ),
        (
            '[[rule]]\nsignal = "x"\nkeep = "> 1"\naction = "drop"\n',
            r"action must be one of reject, drop_lines",
        ),
        (
            '[[rule]]\nsignal = "x"\nkeep = "> 1"\nmissing = "skip"\n',
            r"missing must be one of reject, keep",
        ),
        (
            '[[rule]]\nsignal = "x"\nkeep = "> 1"\noptional = "yes"\n',
            r"optional must be true or false",
        ),
        ('name = "empty"\n', r"no rules: add at least one \[\[rule\]\]"),
        (
            'colour = "red"\n[[rule]]\nsignal = "x"\nkeep = "> 1"\n',
            r"unknown key colour; allowed keys: name",
        ),
        (
            '[[rule]]\nname = "a"\nsignal = "x"\nkeep = "> 1"\n'
            '[[rule]]\nname = "a"\nsignal = "y"\nkeep = "> 1"\n',
            r"rule names must be unique; repeated: a",
        ),
        (
            'max_dropped_word_fraction = 2\n[[rule]]\nsignal = "x"\nkeep = "> 1"\n',
            r"max_dropped_word_fraction must be a number in \[0, 1\]",
        ),
        ('include = ["nope.toml"]\n', r"rules nope.toml: not a preset"),
        ("[[rule]\n", r"not valid TOML"),
    ],
)
def test_bad_user_rule_files_name_the_key_and_the_allowed_values(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        load_rules(write(tmp_path, text))


def test_unknown_rules_and_signals_are_explained(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gopherr: not a preset \(gopher, c4, rpv1, refinedweb\)"):
        load_rules("gopherr")
    rules = load_rules(write(tmp_path, '[[rule]]\nsignal = "rps_doc_wordcount"\nkeep = "> 1"\n'))
    with pytest.raises(DataError, match=r"rps_doc_wordcount \(did you mean rps_doc_word_count\?\)"):
        check_signals(rules, GOOD, "out/signals")
