"""eval_nih.py: lengths, token-exact prompts, scoring, resume, and a short end-to-end run on the real default model."""

import argparse
import json

import pytest

import eval_nih
from eval_nih import (Method, PromptBuilder, answer_logprob, control_heads, parse_args, parse_len, run,
                      run_methods, score)
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
    """Baseline, by-all and its random-head control at 1K tokens, 3 depths, float32: the baseline finds every
    needle; an interrupted run resumes without redoing finished cells."""
    argv = ["--model", str(ensure_weights("smollm2")), "--len", "1000", "--depths", "3", "--variant", "none,all",
            "--dtype", "float32", "--out", str(tmp_path), "--max-new-tokens", "12"]
    rows = run(parse_args(argv))
    assert [r["method"] for r in rows] == ["none", "all", "all~random"] * 3
    base = [r for r in rows if r["method"] == "none"]
    assert [r["score"] for r in base] == [1, 1, 1], [r["answer"] for r in base]
    assert all(r["logprob"] > -2.0 for r in base)  # it is confident of the right number, too
    rule = [r for r in rows if r["method"] == "all"]
    ctrl = [r for r in rows if r["method"] == "all~random"]
    assert all(len(r["heads"]) == 5 and r["heads"] == rule[0]["heads"] for r in rule)
    assert all(len(r["heads"]) == 5 and not set(map(tuple, r["heads"])) & set(map(tuple, rule[0]["heads"]))
               for r in ctrl)
    assert len({tuple(map(tuple, r["heads"])) for r in ctrl}) == 3  # a fresh draw per prompt
    for name in ("heatmap_noisy0.png", "heads_1000_noisy0_all.png", "heads_1000_noisy0_all.json", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "DoPE-all:" in (tmp_path / "summary.md").read_text()

    # simulate an interruption after four cells: the rerun must compute exactly the five missing ones
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:4]) + "\n")
    calls = []
    real = eval_nih.Transformer.generate
    monkeypatch.setattr(eval_nih.Transformer, "generate", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    rows2 = run(parse_args(argv))
    assert len(calls) == 5
    assert sorted(r["cell"] for r in rows2) == sorted(r["cell"] for r in rows)
    again = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["score"], r["logprob"]) for r in again[:4]] == [(r["score"], r["logprob"]) for r in rows[:4]]
    assert {r["cell"]: r["logprob"] for r in again} == {r["cell"]: r["logprob"] for r in rows}  # deterministic


def test_custom_needle_question_and_answer_templates(tok):
    b = PromptBuilder(tok, needle="The vault code of {key} is {value}.", question="Which vault code has {key}?",
                      answer_prefix="The vault code of {key} is")
    p = b.build(2000, 0.5, "the iron violin", "5550123")
    text = tok.decode(p.ids)
    assert len(p.ids) == 2000 and "The vault code of the iron violin is 5550123." in text
    assert "Which vault code has the iron violin?" in text and text.endswith("The vault code of the iron violin is")
    with pytest.raises(ValueError, match="value"):
        PromptBuilder(tok, needle="no placeholder here")


@pytest.fixture(scope="module")
def smol():
    import torch
    from model import Transformer

    return Transformer.from_pretrained(ensure_weights("smollm2"), dtype=torch.float32)


def test_prefix_reuse_gives_bit_identical_answers(tok, smol):
    """Each method restarted from the baseline's hidden state at its first denoised layer gives exactly the answer
    and the log-probability that a full recomputation gives (1000 tokens, float32, chunked and one-pass prefill);
    identical (variant, heads) run once."""
    p = PromptBuilder(tok).build(1000, 0.5, "the amber compass", "2718281")
    answer = tok.encode(" 2718281")
    methods = [Method("none", "none", "baseline"), Method("all", "all", "rule", heads=[(10, 3), (21, 1)]),
               Method("gaussian", "gaussian", "rule", heads=[(12, 0)]),
               Method("parts", "parts", "rule", heads=[(10, 3), (29, 8)]),
               Method("all~random", "all", "random", heads=[(0, 4), (17, 2)]),
               Method("twin", "all", "sweep", heads=[(10, 3), (21, 1)])]
    for chunk in ("384", "0"):
        args = parse_args(["--max-new-tokens", "12", "--chunk", chunk])
        reused = run_methods(smol, p.ids, answer, methods, args, stop={tok.eos_id})
        args.reuse = False
        full = run_methods(smol, p.ids, answer, methods, args, stop={tok.eos_id})
        assert {n: (o["new"], o["logprob"]) for n, o in reused.items()} == \
            {n: (o["new"], o["logprob"]) for n, o in full.items()}
        assert [reused[m.name]["first_layer"] for m in methods] == [0, 10, 12, 10, 0, 10]
        assert len({o["logprob"] for o in full.values()}) == 5  # the methods do differ: equality means something
        assert reused["twin"]["logprob"] == reused["all"]["logprob"]


def test_answer_logprob_equals_one_forward_over_prompt_and_answer(tok, smol):
    """Teacher forcing through the cache gives the log-probability that one forward over prompt + answer gives, and
    rewinds the cache so that greedy decoding continues from the prompt."""
    import torch

    ids = tok.encode("The capital of France is")
    answer = tok.encode(" Paris, of course")
    cache = smol.new_cache(1, 64)
    logits = smol.prefill(torch.tensor([ids]), cache)
    lp = answer_logprob(smol, cache, logits, answer)
    assert cache.pos == len(ids)
    full = torch.log_softmax(smol(torch.tensor([ids + answer]), all_logits=True)[0].double(), -1)
    want = sum(full[len(ids) - 1 + i, t].item() for i, t in enumerate(answer))
    assert lp == pytest.approx(want, abs=1e-4)
    assert smol.generate(torch.tensor([ids]), 3, cache=cache, logits=logits) == smol.generate(torch.tensor([ids]), 3)


def test_control_heads_are_reproducible_and_exclude_the_selection():
    sel = [(3, 1), (5, 0), (29, 8)]
    a = control_heads(30, 9, 3, sel, 42, 16384, 0, 0.5, 1, "all")
    assert a == control_heads(30, 9, 3, sel, 42, 16384, 0, 0.5, 1, "all") and a == sorted(a)
    assert len(set(a)) == 3 and not set(a) & set(sel)
    draws = {tuple(control_heads(30, 9, 3, sel, 42, 16384, 0, d, t, "all")) for d in (0.0, 0.5, 1.0) for t in range(3)}
    assert len(draws) == 9  # each prompt draws its own set
    assert not any(set(d) & set(sel) for d in draws)
    everything_else = [(layer, h) for layer in range(2) for h in range(4) if (layer, h) != (0, 0)]
    assert control_heads(2, 4, 7, [(0, 0)], 1) == everything_else
    with pytest.raises(ValueError, match="cannot draw"):
        control_heads(2, 4, 8, [(0, 0)], 1)


class FakeSelector:
    """Heads as a pure function of the rule, so method lists can be checked without a model."""

    def heads(self, rule):
        base = [(rule["r"], h) for h in range(rule["k"])]
        return base if rule["order"] == "asc" else [(29 - layer, h) for layer, h in base]


def test_methods_rule_flip_random_and_sweep():
    from model import Config

    args = parse_args(["--variant", "all,parts", "--controls", "random,flip", "--sweep", "--sweep-k", "1,5",
                       "--sweep-r", "1", "--sweep-criterion", "query/post_ntk", "--sweep-order", "asc,desc"])
    fixed = eval_nih.fixed_methods(FakeSelector(), args, noisy=0)
    names = [m.name for m in fixed]
    assert names[:5] == ["none", "all", "all~flip", "parts", "parts~flip"]
    assert fixed[2].heads == [(28, h) for h in range(5)] and fixed[2].rule["order"] == "desc"
    assert sum(m.role == "sweep" for m in fixed) == 2 * 2 * 2  # 2 variants x k in {1, 5} x 2 orders
    assert "all[query/post_ntk trunc r=1 k=5 asc]" in names  # the rule itself, as a sweep row
    per = eval_nih.prompt_methods(fixed, Config(), args, 4096, 0, 0.3, 2)
    assert [m.name for m in per[len(fixed):]] == ["all~random", "parts~random"]
    noisy = eval_nih.fixed_methods(FakeSelector(), parse_args(["--variant", "all"]), noisy=4)
    assert noisy[1].rule == eval_nih.RULE_NOISY_ALL and len(noisy[1].heads) == 1
    with pytest.raises(SystemExit):
        parse_args(["--controls", "bogus"])
    with pytest.raises(SystemExit):
        parse_args(["--sweep-criterion", "query/nope"])


def rows_for(scores: dict, logprobs: dict | None = None):
    """Synthetic result rows: scores {method: [0/1 per prompt]}."""
    out = []
    for name, s in scores.items():
        variant = name.split("~")[0]
        role = "baseline" if name == "none" else ("random" if "~" in name else "rule")
        for i, x in enumerate(s):
            lp = (logprobs or {}).get(name, [-1.0] * len(s))[i]
            out.append(dict(cell=f"{name}/{i}", model="m", length=4096, noisy=0, depth=i / 10, trial=0, method=name, variant=variant,
                            role=role, heads=[] if name == "none" else [(1, 1)], score=x, logprob=lp, first_layer=1,
                            prefill_seconds=1.0, base_prefill_seconds=2.0))
    return out


def test_summary_verdicts_follow_the_intervals(tmp_path):
    n = 40
    base = [1] * 20 + [0] * 20
    rows = rows_for({"none": base, "all": [1] * 38 + [0] * 2, "all~random": base,
                     "parts": [1] * 21 + [0] * 19, "parts~random": base,
                     "gaussian": [1] * 2 + [0] * 38, "gaussian~random": base})
    args = parse_args(["--variant", "all,parts,gaussian"])
    args.model_name = "m"
    verdicts = eval_nih.summarize(rows, args, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| all | rule |" in text and "median saving per prompt 50%" in text
    # 40 prompts x 3 variants: a rule and its control share a head set in these synthetic rows, so each ran once
    assert "the 120 DoPE prefills" in text and "started at layer 1.0 on average" in text
    assert len(verdicts) == 3 and n == len(base)
    assert "DoPE-all: gain beyond the random-head control" in verdicts[0]
    assert "DoPE-parts: no difference" in verdicts[1]  # one prompt more is noise
    assert "DoPE-gaussian: harm" in verdicts[2]
    assert all("log p of the answer unchanged" in v for v in verdicts)  # every log p was -1.0
    lower = rows_for({"none": base, "all": base}, {"none": [-1.0] * n, "all": [-1.5 + i / 1000 for i in range(n)]})
    assert "log p of the answer lower" in eval_nih.summarize(lower, args, tmp_path)[0]

    # a gain that the random control matches is not a gain of the entropy rule
    rows = rows_for({"none": base, "all": [1] * 38 + [0] * 2, "all~random": [1] * 37 + [0] * 3})
    v = eval_nih.summarize(rows, args, tmp_path)
    assert "gain over the baseline, but not beyond the random-head control" in v[0]


def test_summarize_dirs_pools_settings_as_pairs(tmp_path):
    """--summarize rebuilds the summary from results.jsonl files alone: one table per setting and a pooled one
    whose prompts stay paired (two settings of 10 prompts, each +2 for the rule: pooled 20 prompts, +4)."""
    base = [1] * 5 + [0] * 5
    for L, d in ((4096, "a"), (8192, "b")):
        rows = rows_for({"none": base, "all": [1] * 7 + [0] * 3, "all~random": base})
        for r in rows:
            r["length"] = L
        (tmp_path / d).mkdir()
        (tmp_path / d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = parse_args(["--out", str(tmp_path / "sum")])
    verdicts = eval_nih.summarize_dirs([str(tmp_path / "a"), str(tmp_path / "b")], args)
    text = (tmp_path / "sum" / "summary.md").read_text()
    assert "pooled over 2 settings" in text and "20 prompts" in text
    assert [v.split(",")[0] for v in verdicts] == ["4096 tokens", "8192 tokens", "pooled"]
    assert "| all | rule | per setting | 14/20 |" in text and "(0/4, p=0.12)" in text
    assert (tmp_path / "sum" / "heatmap_noisy0.png").is_file()
    with pytest.raises(SystemExit, match="does not exist"):
        eval_nih.summarize_dirs([str(tmp_path / "nowhere")], args)
