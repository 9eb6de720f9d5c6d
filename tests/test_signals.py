"""Quality signals against hand-computed values, RedPajama-v2's definitions and stable DSIR.

Expected values are worked out by hand in the comments (RedPajama-v2 rounds to 8
decimals, hence ``round(..., 8)``). A small plain-Python reference of RedPajama-v2's
definitions (regexes, ``str`` methods, ``Counter``, one word at a time) then checks the
vectorised implementation on random documents of mixed scripts.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import re
import string
import subprocess
import sys
import unicodedata
from collections import Counter

import numpy as np
import pytest

from farflung.curate.signals import (
    IMPORTANCE_NAMES,
    LINE_SIGNAL_NAMES,
    SIGNAL_NAMES,
    ImportanceModel,
    SignalContext,
    compute_signals,
)
from farflung.curate.signals.hashing import string_hashes
from farflung.curate.signals.importance import token_hashes
from farflung.data.errors import DataError


def doc_scores(text: str, ctx: SignalContext | None = None) -> dict:
    """``{name: score}`` of the document-level signals, after checking their one span."""
    out = {}
    for name, spans in compute_signals(text, ctx).items():
        if name not in LINE_SIGNAL_NAMES:
            assert len(spans) == 1 and spans[0][:2] == [0, len(text)], name
            out[name] = spans[0][2]
    return out


def line_scores(text: str, name: str) -> list:
    return [score for _, _, score in compute_signals(text)[name]]


# --- a small English document, worked by hand --------------------------------------

# lines: "The cat sat.\n" [0,13)  "the cat ran!\n" [13,26)  "\n" [26,27)  "• A dog...\n" [27,38)
SMALL = "The cat sat.\nthe cat ran!\n\n• A dog...\n"
# normalised words: the cat sat the cat ran • a dog   (9; "•" is not ASCII punctuation)
# raw tokens: The cat sat . the cat ran ! • A dog ...   (12)


def test_small_document_document_level_signals():
    got = doc_scores(SMALL)
    assert got["rps_doc_word_count"] == 9
    assert got["rps_doc_mean_word_length"] == round(23 / 9, 8)  # 3*6 + 1 + 1 + 3
    assert got["rps_doc_symbol_to_word_ratio"] == round(1 / 12, 8)  # one "..."
    assert got["rps_doc_num_sentences"] == 3.0  # "The cat sat." "the cat ran!" "A dog..."
    assert got["rps_doc_frac_lines_end_with_ellipsis"] == 0.25  # 1 of 4 lines
    assert got["rps_doc_frac_no_alph_words"] == round(1.0 - 8 / 12, 8)  # . ! • ...
    assert got["rps_doc_frac_unique_words"] == round(7 / 9, 8)
    # counts: the 2, cat 2, sat ran • a dog 1 each, of 9
    entropy = 2 * (2 / 9) * math.log(9 / 2) + 5 * (1 / 9) * math.log(9)
    assert got["rps_doc_unigram_entropy"] == round(entropy, 8)
    assert got["rps_doc_frac_all_caps_words"] == round(1 / 12, 8)  # "A"
    assert got["rps_doc_stop_word_fraction"] == round(1 / 12, 8)  # "the" (not "The")
    assert got["rps_doc_curly_bracket"] == 0.0
    assert got["rps_doc_lorem_ipsum"] == 0.0
    assert got["rps_doc_ldnoobw_words"] == 0.0
    assert got["rps_doc_frac_chars_top_2gram"] == round(6 * 2 / 23, 8)  # "the cat" twice
    assert got["rps_doc_frac_chars_top_3gram"] == 0.0  # no 3-gram repeats
    assert got["rps_doc_frac_chars_dupe_5grams"] == 0.0
    assert got["rps_doc_frac_dupe_lines"] == 0.0
    assert got["rps_doc_frac_dupe_paragraphs"] == 0.0


def test_small_document_line_level_signals():
    spans = compute_signals(SMALL)["rps_lines_num_words"]
    assert [s[:2] for s in spans] == [[0, 13], [13, 26], [26, 27], [27, 38]]
    assert line_scores(SMALL, "rps_lines_num_words") == [3, 3, 0, 3]
    assert line_scores(SMALL, "rps_lines_ending_with_terminal_punctution_mark") == [
        1.0,
        1.0,
        0.0,
        1.0,
    ]
    assert line_scores(SMALL, "rps_lines_start_with_bulletpoint") == [0.0, 0.0, 0.0, 1.0]
    upper = line_scores(SMALL, "rps_lines_uppercase_letter_fraction")
    assert upper == [round(1 / 13, 8), 0.0, 0.0, round(1 / 11, 8)]  # "\n" counts
    assert line_scores(SMALL, "rps_lines_numerical_chars_fraction") == [0.0] * 4
    assert line_scores(SMALL, "rps_lines_javascript_counts") == [0.0] * 4


# --- edge cases ---------------------------------------------------------------------


def test_empty_text():
    got = compute_signals("")
    for name in LINE_SIGNAL_NAMES:
        if name != "rps_lines_start_with_bulletpoint":
            assert got[name] == [], name
    assert got["rps_lines_start_with_bulletpoint"] == [[0, 0, None]]
    scores = doc_scores("")
    assert scores["rps_doc_word_count"] == 0
    for name in (
        "rps_doc_mean_word_length",
        "rps_doc_symbol_to_word_ratio",
        "rps_doc_frac_lines_end_with_ellipsis",
        "rps_doc_frac_no_alph_words",
        "rps_doc_frac_unique_words",
        "rps_doc_unigram_entropy",
        "rps_doc_frac_all_caps_words",
        "rps_doc_frac_dupe_lines",
        "rps_doc_frac_chars_dupe_lines",
        "rps_doc_frac_chars_dupe_paragraphs",
    ):
        assert scores[name] is None, name
    for name in (
        "rps_doc_num_sentences",
        "rps_doc_curly_bracket",
        "rps_doc_lorem_ipsum",
        "rps_doc_stop_word_fraction",
        "rps_doc_ldnoobw_words",
        "rps_doc_frac_chars_top_2gram",
        "rps_doc_frac_chars_dupe_10grams",
        "rps_doc_frac_dupe_paragraphs",  # text.strip() is one empty paragraph
    ):
        assert scores[name] == 0.0, name


def test_no_words_only_punctuation():
    text = "... !!! ???\n"  # tokens: "..." "!!!" "???"; normalised: nothing
    got = doc_scores(text)
    assert got["rps_doc_word_count"] == 0
    assert got["rps_doc_mean_word_length"] is None
    assert got["rps_doc_frac_unique_words"] is None
    assert got["rps_doc_symbol_to_word_ratio"] == round(1 / 3, 8)
    assert got["rps_doc_frac_no_alph_words"] == 1.0
    assert got["rps_doc_frac_all_caps_words"] == 0.0
    assert got["rps_doc_num_sentences"] == 0.0  # no word character to start one
    assert got["rps_doc_stop_word_fraction"] == 0.0
    assert line_scores(text, "rps_lines_num_words") == [0]
    assert line_scores(text, "rps_lines_numerical_chars_fraction") == [0.0]
    assert line_scores(text, "rps_lines_ending_with_terminal_punctution_mark") == [1.0]
    assert got["rps_doc_frac_lines_end_with_ellipsis"] == 0.0  # ends with "???"


def test_single_line_without_newline():
    text = "abc 123"  # normalised line "abc 123": 7 characters, 3 numeric
    got = compute_signals(text)
    assert got["rps_lines_numerical_chars_fraction"] == [[0, 7, round(3 / 7, 8)]]
    assert got["rps_lines_num_words"] == [[0, 7, 2]]
    assert doc_scores(text)["rps_doc_frac_lines_end_with_ellipsis"] == 0.0


def test_unicode_document():
    # "Ünïcödé ΣΟΦΙΑ ①②\n" in NFC: 7 + 1 + 5 + 1 + 2 + 1 = 17 characters, one line
    text = "\u00dcn\u00efc\u00f6d\u00e9 \u03a3\u039f\u03a6\u0399\u0391 \u2460\u2461\n"
    got = doc_scores(text)
    # NFD splits ü ï ö é into two code points each: words of 11, 5 and 2 characters
    assert got["rps_doc_mean_word_length"] == 6.0
    assert got["rps_doc_frac_all_caps_words"] == round(1 / 3, 8)  # ΣΟΦΙΑ only
    assert got["rps_doc_frac_no_alph_words"] == round(1.0 - 1 / 3, 8)  # ΣΟΦΙΑ, ①②
    assert got["rps_doc_num_sentences"] == 1.0
    # uppercase: Ü and the five Greek capitals, over 17 characters
    assert line_scores(text, "rps_lines_uppercase_letter_fraction") == [round(6 / 17, 8)]
    # normalised line "ünïcödé σοφια ①②" (NFD): 11 + 1 + 5 + 1 + 2 = 20, ①② numeric
    assert line_scores(text, "rps_lines_numerical_chars_fraction") == [0.1]


def test_giant_words_take_the_exact_path():
    # words over 2048 characters are counted from the strings themselves
    text = "x" * 3000 + " y " + "x" * 3000
    got = doc_scores(text)
    assert got["rps_doc_word_count"] == 3
    assert got["rps_doc_frac_unique_words"] == round(2 / 3, 8)
    assert got["rps_doc_mean_word_length"] == round(6001 / 3, 8)
    assert got["rps_doc_frac_chars_top_2gram"] == 0.0  # "x y" and "y x" once each


def test_context_survives_pickling_for_worker_processes():
    model = ImportanceModel.fit(["a b"], ["c d"], buckets=8)
    ctx = pickle.loads(pickle.dumps(SignalContext.default(importance=model)))
    assert compute_signals(SMALL, ctx) == compute_signals(SMALL, SignalContext.default(model))


def test_line_spans_slice_the_raw_lines():
    cases = {
        "first\r\n\nthird line": ["first\r\n", "\n", "third line"],
        "a\nb\n": ["a\n", "b\n"],  # a trailing newline opens no empty line
        "abc": ["abc"],
        "\n\n": ["\n", "\n"],
        "x\u2028y\nz": ["x\u2028y\n", "z"],  # only \n ends a line
    }
    for text, lines in cases.items():
        for name in LINE_SIGNAL_NAMES:
            spans = compute_signals(text)[name]
            assert [text[s:e] for s, e, _ in spans] == lines, (text, name)


def test_ellipsis_bullets_and_terminal_marks():
    text = "Wait\u2026  \n  \u2013 dash item\nquote\u201d\nno...x\n"
    assert doc_scores(text)["rps_doc_frac_lines_end_with_ellipsis"] == 0.25
    assert line_scores(text, "rps_lines_start_with_bulletpoint") == [0.0, 1.0, 0.0, 0.0]
    terminal = line_scores(text, "rps_lines_ending_with_terminal_punctution_mark")
    assert terminal == [0.0, 0.0, 1.0, 0.0]  # "…" is not a terminal mark; "”" is


# --- content signals ----------------------------------------------------------------


def test_bad_words_count_single_and_multi_word_entries():
    # normalised: he said shit then 2 girls 1 cup and big black boots big black
    text = "He said Sh.it, then 2 girls 1 cup and big black boots; BIG   Black."
    # "shit" (1-gram), "2 girls 1 cup" (4-gram), "big black" (2-gram) twice
    assert doc_scores(text)["rps_doc_ldnoobw_words"] == 4.0
    ctx = SignalContext(bad_words=frozenset({"cat", "cat sat", "a  b"}), stop_words=frozenset())
    assert doc_scores(SMALL, ctx)["rps_doc_ldnoobw_words"] == 3.0  # cat, cat, cat sat


def test_shipped_word_lists_load():
    ctx = SignalContext.default()
    assert len(ctx.bad_words) == 377 and "2 girls 1 cup" in ctx.bad_words
    assert len(ctx.stop_words) == 570 and "the" in ctx.stop_words


def test_lorem_ipsum_and_curly_brackets():
    text = "Lorem ipsum dolor.\nlorem   IPSUM"
    # normalised: "lorem ipsum dolor lorem ipsum" (29 characters), 2 occurrences
    assert doc_scores(text)["rps_doc_lorem_ipsum"] == round(2 / 29, 8)
    assert doc_scores("{a}")["rps_doc_curly_bracket"] == round(2 / 3, 8)


def test_javascript_counts_per_normalised_line():
    text = "Enable JavaScript, please; javascript\njava-script\n"
    assert line_scores(text, "rps_lines_javascript_counts") == [2.0, 1.0]


def test_stop_words_are_matched_case_sensitively_on_raw_tokens():
    ctx = SignalContext(bad_words=frozenset(), stop_words=frozenset({"the", "don"}))
    # tokens: The the don ' t stop  -> "the" and "don" are stop words, of 6
    assert doc_scores("The the don't stop", ctx)["rps_doc_stop_word_fraction"] == round(2 / 6, 8)


# --- repetition ---------------------------------------------------------------------


def test_top_ngrams_prefer_the_first_seen_of_equal_counts():
    # words aa b c d e aa b c d e x: 13 characters; every 2-, 3-, 4-gram starting at
    # aa, b or c occurs twice, so the first one (starting at "aa") is the top one
    got = doc_scores("aa b c d e aa b c d e x")
    assert got["rps_doc_frac_chars_top_2gram"] == round(3 * 2 / 13, 8)  # "aa b"
    assert got["rps_doc_frac_chars_top_3gram"] == round(4 * 2 / 13, 8)  # "aa b c"
    assert got["rps_doc_frac_chars_top_4gram"] == round(5 * 2 / 13, 8)  # "aa b c d"
    assert got["rps_doc_frac_chars_dupe_5grams"] == round(12 / 13, 8)  # all but "x"
    assert got["rps_doc_frac_chars_dupe_6grams"] == 0.0


def test_overlapping_duplicate_ngrams_count_each_word_once():
    got = doc_scores("a a a a a a")  # two overlapping copies of "a a a a a"
    assert got["rps_doc_frac_chars_dupe_5grams"] == 1.0
    assert got["rps_doc_frac_chars_dupe_6grams"] == 0.0
    assert got["rps_doc_frac_chars_top_2gram"] == round(2 * 5 / 6, 8)  # can exceed 1


def test_gopher_duplicate_lines_and_paragraphs():
    text = "x\ny\nx\n\nx\ny\nx"  # 12 characters
    got = doc_scores(text)
    # lines x y x x y x (a blank line is no line): the 3rd to 6th repeat an earlier one
    assert got["rps_doc_frac_dupe_lines"] == round(4 / 6, 8)
    assert got["rps_doc_frac_chars_dupe_lines"] == round(4 / 12, 8)
    # distinct paragraphs between blank lines: no duplicate lines at all
    paragraphs = "".join(f"Paragraph {w} says something.\n\n" for w in ("one", "two", "three"))
    assert doc_scores(paragraphs)["rps_doc_frac_dupe_lines"] == 0.0
    # paragraphs "x\ny\nx" twice
    assert got["rps_doc_frac_dupe_paragraphs"] == 0.5
    assert got["rps_doc_frac_chars_dupe_paragraphs"] == round(5 / 12, 8)


def test_gopher_stop_words_counts_distinct_words_of_the_eight():
    # "The" and "the" are one word; "other"/"theme"/"tobe" hold no whole stop word
    got = doc_scores("The cat and the hat. Other theme, tobe.")
    assert got["rps_doc_gopher_stop_words"] == 2  # the, and
    assert doc_scores("")["rps_doc_gopher_stop_words"] == 0
    assert doc_scores("_The_ cat *and* the1")["rps_doc_gopher_stop_words"] == 2  # Markdown
    assert doc_scores("to be or not to be, that is: with HAVE of")["rps_doc_gopher_stop_words"] == 6


# --- DSIR ---------------------------------------------------------------------------


def test_dsir_hash_is_the_documented_polynomial():
    # h1(s) = sum((ord(c) + 1) * P**i) mod 2**64 with P = 0x9E3779B97F4A7C15
    p = 0x9E3779B97F4A7C15
    expected = ((ord("a") + 1) + (ord("b") + 1) * p) % 2**64
    assert int(string_hashes(["ab"])[0][0]) == expected


def test_dsir_hashes_are_stable_across_processes():
    code = (
        "from farflung.curate.signals.importance import token_hashes;"
        "print(token_hashes('Hello, wörld! hello').tolist())"
    )
    runs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        runs.append(out.stdout.strip())
    assert runs[0] == runs[1] == str(token_hashes("Hello, wörld! hello").tolist())


def test_dsir_hand_checkable_case():
    model = ImportanceModel.fit(["alpha alpha"], ["beta beta"], buckets=1 << 20)
    # target buckets: "alpha" x2, ("alpha","alpha") x1; source likewise for beta.
    assert sorted(model.target_counts[model.target_counts > 0].tolist()) == [1, 2]
    assert not np.any((model.target_counts > 0) & (model.source_counts > 0))
    assert (model.target_lambda, model.source_lambda) == (2.0, 2.0)
    # "alpha" alone: one unigram, p_t = 2/3, p_s = 0
    score = doc_scores("alpha", SignalContext.default(importance=model))
    expected = math.log(2 / 3 + 1e-8) - math.log(0 + 1e-8)
    assert score["rps_doc_importance"] == round(expected, 8)


def test_dsir_length_correction_with_one_bucket():
    # with one bucket p_t = p_s = 1, so only the Poisson length term remains
    model = ImportanceModel.fit(["a b c d"], ["a b", "c d e f g h"], buckets=1)
    assert (model.target_lambda, model.source_lambda) == (4.0, 4.0)
    model = ImportanceModel.fit(["a b c d"], ["a b"], buckets=1)  # lambdas 4 and 2
    got = doc_scores("x y z", SignalContext.default(importance=model))  # 3 tokens
    pois = [lam**3 * math.exp(-lam) / 6 for lam in (4.0, 2.0)]
    assert got["rps_doc_importance"] == 0.0
    assert got["rps_doc_importance_length_correction"] == round(
        math.log(pois[0] + 1e-8) - math.log(pois[1] + 1e-8), 8
    )


def test_dsir_save_load_and_presence(tmp_path):
    model = ImportanceModel.fit(["the cat sat", "a dog"], ["buy now, buy now"], buckets=64)
    path = tmp_path / "dsir.model"  # saved under exactly this name
    model.save(path)
    again = ImportanceModel.load(path)
    assert np.array_equal(again.target_counts, model.target_counts)
    assert again.score("the cat") == model.score("the cat")
    with_model = compute_signals("the cat", SignalContext.default(importance=again))
    assert tuple(with_model) == SIGNAL_NAMES
    without = compute_signals("the cat")
    assert not set(IMPORTANCE_NAMES) & set(without)
    assert doc_scores("", SignalContext.default(importance=model))["rps_doc_importance"] is None
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(DataError):
        ImportanceModel.load(tmp_path / "bad.npz")


# --- agreement with a plain reference of RedPajama-v2's definitions ---------------

_PUNCT = str.maketrans("", "", string.punctuation)


def _normalize(text: str) -> str:
    text = re.sub(r"\s+", " ", text.translate(_PUNCT).lower().strip())
    return unicodedata.normalize("NFD", text)


def reference(text: str) -> dict:
    """RedPajama-v2's definitions, one word at a time (a subset: the tricky ones)."""
    norm = _normalize(text).split()
    raw = re.findall(r"\w+|[^\w\s]+", text)
    lines = [(m.start(), m.end()) for m in re.finditer(r"[^\n]*\n|[^\n]+$", text)]
    top2 = Counter(zip(norm, norm[1:], strict=False)).most_common(1)
    out = {
        "rps_doc_num_sentences": float(len(re.findall(r"\b[^.!?]+[.!?]*", text))),
        "rps_doc_word_count": len(norm),
        "rps_doc_frac_unique_words": round(len(set(norm)) / len(norm), 8) if norm else None,
        "rps_doc_frac_all_caps_words": (
            round(sum(map(str.isupper, raw)) / len(raw), 8) if raw else None
        ),
        "rps_doc_frac_no_alph_words": (
            round(1.0 - sum(bool(re.search("[a-zA-Z]", w)) for w in raw) / len(raw), 8)
            if raw
            else None
        ),
        "rps_doc_frac_chars_top_2gram": (
            round(sum(map(len, top2[0][0])) * top2[0][1] / sum(map(len, norm)), 8)
            if top2 and top2[0][1] > 1
            else 0.0
        ),
        "rps_lines_uppercase_letter_fraction": [
            [s, e, round(sum(map(str.isupper, text[s:e])) / (e - s), 8)] for s, e in lines
        ],
        "rps_lines_num_words": [[s, e, len(_normalize(text[s:e]).split())] for s, e in lines],
    }
    numeric = []
    for s, e in lines:
        line = _normalize(text[s:e])
        numeric.append([s, e, round(sum(map(str.isnumeric, line)) / len(line), 8) if line else 0.0])
    out["rps_lines_numerical_chars_fraction"] = numeric
    return out


def test_agrees_with_reference_on_random_mixed_script_documents():
    rng = random.Random(7)
    pieces = list("aAzZ09 _\n\t.!?#{}'\"éÉßİΣσǅ①²٣一K\u00a0\u2028\x1c\r…•") + [
        "...",
        "the cat",
        "The Cat",
        "e\u0301",
        "\U0001f595",
    ]
    for _ in range(150):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        got = compute_signals(text)
        for name, expected in reference(text).items():
            value = got[name] if name in LINE_SIGNAL_NAMES else got[name][0][2]
            assert value == expected, (text, name)
