"""eval_nih.py: lengths, token-exact prompts, scoring, resume, and a short end-to-end run on the real default model."""

import argparse
import json

import pytest

import eval_nih
from eval_nih import PromptBuilder, parse_args, parse_len, run, score
from model import Tokenizer
from setup_weights import ensure_weights


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(ensure_weights("smollm2"))


def test_parse_len():
    assert parse_len("4k") == 4096 and parse_len("16K") == 16384 and parse_len("64k") == 65536
    assert parse_len("3000") == 3000
    for bad in ("abc", "4m", "-1", "100", "k", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_len(bad)


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--variant", "none,bogus"])
    assert "unknown variant" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--len", "12x"])
    assert "not a token count" in capsys.readouterr().err
    a = parse_args(["--variant", "gaussian,none,all"])
    assert a.variant == ["none", "gaussian", "all"]  # the baseline always runs first


def find(seq, sub):
    return [i for i in range(len(seq) - len(sub) + 1) if seq[i:i + len(sub)] == sub]


@pytest.mark.parametrize("length", [1000, 3001, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_has_exact_length_and_one_needle_at_the_depth(tok, length, depth):
    b = PromptBuilder(tok, sink_id=1)
    p = b.build(length, depth, "the blue whale", "4729163", noisy=3)
    assert len(p.ids) == length
    needle = tok.encode(" " + eval_nih.NEEDLE.format(key="the blue whale", value="4729163") + " ")
    assert find(p.ids, needle) == [p.needle_at]
    assert p.ids[p.needle_at + len(needle):p.needle_at + len(needle) + 3] == [1, 1, 1]  # sinks right after it
    assert abs(p.actual_depth - depth) < 0.01
    text = tok.decode(p.ids)
    assert text.count("4729163") == 1 and text.endswith(eval_nih.ANSWER_PREFIX.format(key="the blue whale"))


def test_prompt_too_short_for_a_haystack(tok):
    with pytest.raises(ValueError, match="no room"):
        PromptBuilder(tok).build(80, 0.5, "the blue whale", "1234567")


def test_score_is_an_exact_substring_match():
    assert score(" 4729163.", "4729163") == 1
    assert score(" 472916.", "4729163") == 0 and score("", "4729163") == 0


def test_needle_values_are_deterministic_and_distinct():
    a = [eval_nih.needle_value(42, 4096, d, 0) for d in (0.0, 0.5, 1.0)]
    assert a == [eval_nih.needle_value(42, 4096, d, 0) for d in (0.0, 0.5, 1.0)] and len(set(a)) == 3
    assert eval_nih.CALIB_KEY not in eval_nih.KEYS


def test_a_length_that_cannot_fit_is_refused_before_running(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_nih, "_available_memory", lambda: 2 * 2**30)
    args = parse_args(["--model", str(ensure_weights("smollm2")), "--len", "1000k", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs about"):
        run(args)
    assert not (tmp_path / "results.jsonl").exists()


def test_end_to_end_short_run_retrieves_and_resumes(tmp_path, monkeypatch):
    """Baseline and by-all at 1K tokens, 3 depths, float32: the baseline finds every needle; an interrupted run
    resumes without redoing finished cells."""
    argv = ["--model", str(ensure_weights("smollm2")), "--len", "1000", "--depths", "3", "--variant", "none,all",
            "--dtype", "float32", "--out", str(tmp_path), "--max-new-tokens", "12"]
    rows = run(parse_args(argv))
    assert len(rows) == 6
    base = [r for r in rows if r["variant"] == "none"]
    assert [r["score"] for r in base] == [1, 1, 1], [r["answer"] for r in base]
    assert all(len(r["heads"]) == 5 for r in rows if r["variant"] == "all")
    assert (tmp_path / "heatmap_noisy0.png").stat().st_size > 0
    assert (tmp_path / "heads_1000_all.png").stat().st_size > 0

    # simulate an interruption after four cells: the rerun must compute exactly the two missing ones
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:4]) + "\n")
    calls = []
    real = eval_nih.Transformer.generate
    monkeypatch.setattr(eval_nih.Transformer, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    rows2 = run(parse_args(argv))
    assert len(calls) == 2
    assert sorted(r["cell"] for r in rows2) == sorted(r["cell"] for r in rows)
    assert [json.loads(line)["score"] for line in (tmp_path / "results.jsonl").read_text().splitlines()][:4] == \
        [r["score"] for r in rows[:4]]


def test_custom_needle_question_and_answer_templates(tok):
    b = PromptBuilder(tok, needle="The vault code of {key} is {value}.", question="Which vault code has {key}?",
                      answer_prefix="The vault code of {key} is")
    p = b.build(2000, 0.5, "the iron violin", "5550123")
    text = tok.decode(p.ids)
    assert len(p.ids) == 2000 and "The vault code of the iron violin is 5550123." in text
    assert "Which vault code has the iron violin?" in text and text.endswith("The vault code of the iron violin is")
    with pytest.raises(ValueError, match="value"):
        PromptBuilder(tok, needle="no placeholder here")
