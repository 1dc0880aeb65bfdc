"""eval_nih.py: lengths, token-exact prompts, scoring, methods, and short end-to-end runs on the real default model
(records, resume, keys)."""

import argparse
import json
import re

import pytest

import eval_nih
from eval_nih import Method, PromptBuilder, parse_args, run, score
from model import Tokenizer, parse_len
from nih import budget, records
from nih.decode import answer_logprob
from nih.heads import control_heads
from tools.setup_weights import ensure_weights


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(ensure_weights("smollm2"))


def test_parse_len():
    assert parse_len("4k") == 4096 and parse_len("16K") == 16384 and parse_len("64k") == 65536
    assert parse_len("3000") == 3000
    for bad in ("abc", "4m", "-1", "100", "k", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_len(bad)


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
    monkeypatch.setattr(budget, "available_memory", lambda device: 2 * 2**30)
    args = parse_args(["--model", str(ensure_weights("smollm2")), "--len", "1000k", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs about"):
        run(args)
    assert not (tmp_path / "results.jsonl").exists()


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




@pytest.mark.parametrize("noisy", [0, 3])
def test_every_prompt_of_a_setting_is_a_slice_of_one_stream(tok, noisy):
    """The token identity the shared-prefix reuse stands on: before its needle, every prompt (any depth, any needle)
    is the setting's stream, token for token and position for position."""
    b = PromptBuilder(tok, sink_id=1)
    args = parse_args(["--depths", "6", "--trials", "3"])
    prompts = eval_nih.setting_prompts(b, 2000, noisy, args)
    stream = b.stream(max(p.needle_at for _, _, p in prompts))
    assert len(prompts) == 18 and len({p.needle_at for _, _, p in prompts}) >= 6
    for _, _, p in prompts:
        assert len(p.ids) == 2000 and p.ids[:p.needle_at] == stream[:p.needle_at]
    assert b.stream(500) == stream[:500]


class FakeSelector:
    """Heads as a pure function of the rule, so method lists can be checked without a model."""

    def heads(self, rule):
        base = [(rule["r"], h) for h in range(rule["k"])]
        return base if rule["order"] == "asc" else [(29 - layer, h) for layer, h in base]


def test_methods_both_readings_fixed_random_sets_and_sweep():
    args = parse_args(["--variant", "all,parts", "--order", "asc,desc", "--random-sets", "2", "--sweep",
                       "--sweep-k", "1,5", "--sweep-r", "1", "--sweep-criterion", "query/post_ntk"])
    methods = eval_nih.methods_for(FakeSelector(), args, 30, 9, 4096, 0)
    names = [m.name for m in methods]
    assert names[:5] == ["none", "all/asc", "all/desc", "parts/asc", "parts/desc"]
    assert methods[2].heads == [(28, h) for h in range(5)] and methods[2].rule["order"] == "desc"
    assert sum(m.role == "sweep" for m in methods) == 2 * 2 * 2 - 0  # 2 variants x k in {1, 5} x 2 orders
    assert names[-4:] == ["all/random0", "all/random1", "parts/random0", "parts/random1"]
    chosen = {h for m in methods if m.role == "rule" for h in m.heads}
    for m in methods[-4:]:
        assert len(m.heads) == 5 and not set(m.heads) & chosen  # never a rule's head
    assert len({tuple(m.heads) for m in methods[-4:]}) == 4
    again = eval_nih.methods_for(FakeSelector(), args, 30, 9, 4096, 0)
    assert [m.heads for m in again] == [m.heads for m in methods]  # fixed per setting: every prompt, every rerun
    other = eval_nih.methods_for(FakeSelector(), args, 30, 9, 8192, 0)
    assert [m.heads for m in other[-4:]] != [m.heads for m in methods[-4:]]  # drawn per setting
    per = parse_args(["--variant", "parts,gaussian", "--order", "parts:asc,parts:flat,gaussian:asc"])
    per_methods = eval_nih.methods_for(FakeSelector(), per, 30, 9, 4096, 0)
    assert [m.name for m in per_methods] == \
        ["none", "parts/asc", "parts/flat", "gaussian/asc", "parts/random0", "gaussian/random0"]
    assert per_methods[2].rule == dict(k=5, criterion="query/post_ntk", metric="spectral", r=1, order="asc")
    noisy = eval_nih.methods_for(FakeSelector(), parse_args(["--variant", "all", "--random-sets", "0"]), 30, 9, 4096, 4)
    assert [m.name for m in noisy] == ["none", "all/desc"] and noisy[1].rule == eval_nih.RULE_NOISY_ALL


def test_control_heads_are_reproducible_and_exclude_the_selection():
    sel = [(3, 1), (5, 0), (29, 8)]
    a = control_heads(30, 9, 3, sel, 42, 16384, 0, "all", 0)
    assert a == control_heads(30, 9, 3, sel, 42, 16384, 0, "all", 0) and a == sorted(a)
    assert len(set(a)) == 3 and not set(a) & set(sel)
    everything_else = [(layer, h) for layer in range(2) for h in range(4) if (layer, h) != (0, 0)]
    assert control_heads(2, 4, 7, [(0, 0)], 1) == everything_else
    with pytest.raises(ValueError, match="cannot draw"):
        control_heads(2, 4, 8, [(0, 0)], 1)


def test_the_work_estimate_counts_both_reuses():
    """In full prefills: a lone baseline prompt costs one; layer reuse saves the layers below a head set's first
    denoised layer; the shared prefix saves more the deeper the needles, and a prefix loaded from disk all of its
    own cost."""
    from model import Config

    cfg = Config()
    P = [(d, 0, eval_nih.Prompt([0] * 8192, "k", "1", d, int(d * 8000) + 10, d)) for d in (0.0, 0.5, 1.0)]
    base = [Method("none", "none", "baseline")]
    assert budget.plan_work(cfg, base, P[:1], 8192, "none", 0) == pytest.approx(1.0)
    late = base + [Method("parts/asc", "parts", "rule", heads=[(15, 0)])]
    assert budget.plan_work(cfg, late, P[:1], 8192, "layers", 0) == pytest.approx(1.5)
    assert budget.plan_work(cfg, late, P[:1], 8192, "none", 0) == pytest.approx(2.0)
    work = {r: budget.plan_work(cfg, late, P, 8192, r, 50) for r in ("prefix", "layers", "none")}
    assert work["prefix"] < work["layers"] < work["none"]
    # a shared prefix saved on disk costs nothing: the baseline's is 8010 of 8192 positions, parts' half its layers
    prefix = budget.cost(cfg, 0, 8010) / budget.cost(cfg, 0, 8192)
    stored = budget.plan_work(cfg, late, P, 8192, "prefix", 50, stored={("none", ())})
    assert work["prefix"] - stored == pytest.approx(prefix)
    both = budget.plan_work(cfg, late, P, 8192, "prefix", 50, stored={m.head_set for m in late})
    assert work["prefix"] - both == pytest.approx(1.5 * prefix)
    # the baseline runs only for what reads it: YaRN alone, or a head set from layer 0, costs one prefill, not two
    yarn = [Method("yarn", "yarn", "extension", {"factor": 2.0})]
    assert budget.plan_work(cfg, yarn, P[:1], 8192, "none", 0) == pytest.approx(1.0)
    assert budget.plan_work(cfg, [Method("p", "parts", "rule", heads=[(0, 1)])], P[:1], 8192, "layers", 0) == \
        pytest.approx(1.0)
    assert budget.plan_work(cfg, late[1:], P[:1], 8192, "layers", 0) == pytest.approx(1.5)  # it reads layers 0-14
    # a resumed run counts for each prompt only the head sets it runs (run_prompts runs no other, the baseline's
    # tail only where a method of the prompt reads it)
    se = Method("selfextend", "selfextend", "extension", {"group": 4, "window": 64})
    both_ext, need = yarn + [se], {(0.0, 0): yarn + [se], (0.5, 0): [se], (1.0, 0): [se]}
    resumed = budget.plan_work(cfg, both_ext, P, 8192, "none", 0, need=need)
    assert resumed == pytest.approx(4.0) and budget.plan_work(cfg, both_ext, P, 8192, "none", 0) == pytest.approx(6.0)
    skipped = (budget.cost(cfg, 4010, 8192 - 4010) + budget.cost(cfg, 8010, 8192 - 8010)) / budget.cost(cfg, 0, 8192)
    assert budget.plan_work(cfg, both_ext, P, 8192, "prefix", 0, need=need) == \
        pytest.approx(budget.plan_work(cfg, both_ext, P, 8192, "prefix", 0) - skipped)  # YaRN's two tails
    # in passes (memory_passes), a prompt counts in a pass only for that pass's methods, and none where it needs none
    args, model = argparse.Namespace(reuse="none", layer_reuse=True), argparse.Namespace(config=cfg)
    need[0.5, 0] = []
    todo = [x for x in P if need[x[0], x[1]]]
    assert budget.announce_work(model, [yarn, [se]], P, todo, 8192, 0, args, need=need) == pytest.approx(3.0)
    assert budget.announce_work(model, [yarn, [se]], P, P, 8192, 0, args) == pytest.approx(6.0)


def test_progress_inside_a_prefill_reaches_one_full_prefill(smol):
    import torch

    with budget.LayerProgress(smol, 600, 1.0, "test") as progress:
        smol.prefill(torch.zeros(1, 600, dtype=torch.long), smol.new_cache(1, 600), chunk=200)
        assert progress.bar.n == pytest.approx(1.0)
    assert all(not block._forward_hooks for block in smol.layers)  # the hooks are gone again


# -----------------------------------------------------------------------------
# A run end to end: records, resume, keys, damaged files


def short_argv(tmp_path, *more):
    return ["--model", str(ensure_weights("smollm2")), "--len", "600", "--depths", "3", "--variant", "none,all",
            "--out", str(tmp_path), "--max-new-tokens", "10", *more]


def test_end_to_end_short_run_retrieves_and_resumes(tmp_path, monkeypatch):
    """Baseline, by-all and its random-head control at 600 tokens, 3 depths, float32: the baseline finds every
    needle; an interrupted run resumes without redoing finished cells, and a torn last line costs only its cell."""
    argv = short_argv(tmp_path)
    rows = run(parse_args(argv))
    assert [r["method"] for r in rows] == ["none", "all/asc", "all/random0"] * 3
    assert [r["depth"] for r in rows[::3]] == [1.0, 0.5, 0.0]  # deepest needle first
    base = [r for r in rows if r["method"] == "none"]
    assert [r["score"] for r in base] == [1, 1, 1], [r["answer"] for r in base]
    assert all(r["logprob"] > -2.0 for r in base)  # it is confident of the right number, too
    rule = [r for r in rows if r["method"] == "all/asc"]
    ctrl = [r for r in rows if r["method"] == "all/random0"]
    assert all(len(r["heads"]) == 5 and r["heads"] == rule[0]["heads"] for r in rule)
    assert all(r["heads"] == ctrl[0]["heads"] for r in ctrl)  # one fixed set per setting
    assert not set(map(tuple, ctrl[0]["heads"])) & set(map(tuple, rule[0]["heads"]))
    for name in ("heatmap_noisy0.png", "heads_600_noisy0_all_asc.png", "heads_600_noisy0_all_asc.json", "summary.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "DoPE all/asc:" in (tmp_path / "summary.md").read_text()

    # an interruption after four cells, the fifth torn mid-write: the rerun warns, naming the file and line, and
    # computes exactly the five missing cells
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:37])
    calls = []
    real = eval_nih.answer_and_decode
    monkeypatch.setattr(eval_nih, "answer_and_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.warns(UserWarning, match=r"results.jsonl, line 5: a torn last line"):
        rows2 = run(parse_args(argv))
    assert len(calls) == 5
    again = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(again) == 9 and sorted(r["cell"] for r in again) == sorted(r["cell"] for r in rows)
    first = {r["cell"]: r for r in rows}
    for r in again:  # the rerun's shared prefix ends at its deepest missing needle: other shapes, float rounding
        assert r["answer"] == first[r["cell"]]["answer"]
        assert r["logprob"] == pytest.approx(first[r["cell"]]["logprob"], abs=1e-5)
    assert [r["cell"] for r in rows2] == [r["cell"] for r in rows]

    # a garbage line inside the file stops the run, naming the file and the line
    good = (tmp_path / "results.jsonl").read_text().splitlines()
    (tmp_path / "results.jsonl").write_text("\n".join(good[:2] + ["{not json"] + good[2:]) + "\n")
    with pytest.raises(SystemExit, match=r"results.jsonl, line 3: not a JSON record"):
        run(parse_args(argv))


def test_an_interrupted_run_resumes_its_shared_prefix_from_disk(tmp_path, monkeypatch, capsys):
    """A run stopped mid-prompt keeps the records of the methods that prompt already ran, and leaves each head set's
    shared prefix in OUT/prefix-cache; the same command runs only the missing methods, loads the prefixes instead
    of prefilling the haystack again, its records equal an uninterrupted run's to the last digit, and the folder is
    gone once the setting is complete. --prefix-cache none saves nothing. (The tiny model: bookkeeping, not
    retrieval.)"""
    model = tiny_folder(tmp_path / "m")
    whole = run(parse_args(tiny_grid_argv(model, tmp_path / "whole")))
    assert not (tmp_path / "whole" / "prefix-cache").exists()
    for out in ("cut", "none"):
        (tmp_path / out).mkdir()
        for calib in (tmp_path / "whole").glob("calib_*.json"):  # the same calibration: skip recomputing it
            (tmp_path / out / calib.name).write_bytes(calib.read_bytes())
    real, calls = eval_nih.answer_and_decode, []

    def stop_at_the_fifth(*a, **k):  # prompt 2 of 3 (depth 50%): the baseline is decoded, by-all is not
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(eval_nih, "answer_and_decode", stop_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(parse_args(tiny_grid_argv(model, tmp_path / "cut")))
    kept = [json.loads(line) for line in (tmp_path / "cut" / "results.jsonl").read_text().splitlines()]
    assert [(r["depth"], r["method"]) for r in kept] == \
        [(1.0, "none"), (1.0, "all/asc"), (1.0, "all/random0"), (0.5, "none")]
    assert len(list((tmp_path / "cut" / "prefix-cache").glob("prefix_300_noisy0_*.kv"))) == 3  # none, all/asc, random
    calls.clear()
    monkeypatch.setattr(eval_nih, "answer_and_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    rows = run(parse_args(tiny_grid_argv(model, tmp_path / "cut")))
    assert len(calls) == 5  # the five missing cells, nothing decoded twice
    assert capsys.readouterr().out.count("positions loaded from") == 3
    assert [(r["cell"], r["answer"], r["logprob"]) for r in rows] == \
        [(r["cell"], r["answer"], r["logprob"]) for r in whole]
    assert not (tmp_path / "cut" / "prefix-cache").exists()
    real_write, paths = records.write_atomic, []
    monkeypatch.setattr(records, "write_atomic", lambda path, w: paths.append(path) or real_write(path, w))
    run(parse_args(tiny_grid_argv(model, tmp_path / "none", "--prefix-cache", "none", "--depths", "1")))
    assert paths and not [p for p in paths if p.suffix == ".kv"] and not (tmp_path / "none" / "prefix-cache").exists()


def test_calibration_and_records_are_keyed_on_what_they_depend_on(tmp_path, monkeypatch):
    """A different seed, NTK factor, template or haystack gets its own calibration file and its own cells; a
    damaged calibration file is reported, naming it, and recomputed; the model's id is its weights'. (The tiny
    model: bookkeeping, not retrieval.)"""
    model = tiny_folder(tmp_path / "m")
    run(parse_args(tiny_grid_argv(model, tmp_path, "--depths", "1")))
    calib = sorted(tmp_path.glob("calib_300_noisy0_*.json"))
    assert len(calib) == 1
    run(parse_args(tiny_grid_argv(model, tmp_path, "--depths", "1", "--seed", "7")))
    hay = tmp_path / "hay.txt"
    hay.write_text("Rivers run to the sea. Mountains stand still. Birds fly south in winter. " * 3)
    run(parse_args(tiny_grid_argv(model, tmp_path, "--depths", "1", "--haystack-file", str(hay))))
    assert len(set(tmp_path.glob("calib_300_noisy0_*.json"))) == 3
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and len({r["cell"] for r in rows}) == 9
    hay.write_text("Rivers run to the sea. Mountains stand still. Birds fly south in winter. " * 4)  # edited
    run(parse_args(tiny_grid_argv(model, tmp_path, "--depths", "1", "--haystack-file", str(hay))))
    assert len(set(tmp_path.glob("calib_300_noisy0_*.json"))) == 4

    calib[0].write_bytes(calib[0].read_bytes()[:100])  # a crash mid-write of an older version
    (tmp_path / "results.jsonl").unlink()
    with pytest.warns(UserWarning, match=f"{calib[0].name} is damaged"):
        run(parse_args(tiny_grid_argv(model, tmp_path, "--depths", "1")))
    assert records.model_id(model) == records.model_id(model)
    copy = tmp_path / "model"
    copy.mkdir()
    (copy / "config.json").write_text((model / "config.json").read_text())
    (copy / "model.safetensors").write_bytes(b"not the same weights")
    assert records.model_id(copy) != records.model_id(model)


def test_the_two_readings_pick_opposite_ends_of_the_spectral_share():
    """asc on H^1 removes the spikiest heads; H^1 = -p1 ln p1 peaks at p1 = 1/e, so desc on H^1 would pick heads at
    p1 ~ 0.37, neither end: the high-rank reading is 'flat', the lowest p1."""
    import torch

    p1 = torch.tensor([[0.9, 0.6, 0.37, 0.2, 0.1]])  # (layers, heads)
    rest = (1 - p1)[..., None] / 63 * torch.ones(1, 5, 63)
    spectra = {"query/post_ntk": torch.cat((p1[..., None], rest), -1).double()}
    sel = eval_nih.Selector({"spectra": spectra})
    rule = dict(eval_nih.RULE_ORIGINAL, k=1)
    args = parse_args(["--variant", "parts", "--order", "asc,desc,flat", "--k", "1", "--random-sets", "0"])
    heads = {m.name: m.heads for m in eval_nih.methods_for(sel, args, 1, 5, 4096, 0)}
    assert heads == {"none": [], "parts/asc": [(0, 0)], "parts/desc": [(0, 2)], "parts/flat": [(0, 4)]}
    assert sel.heads(rule) == [(0, 0)]
    flat = dict(rule, order="flat")  # recorded as what it ranks: p1, lowest first
    assert sel.heads(flat) == sel.heads(eval_nih.as_recorded(flat)) == [(0, 4)]


def test_the_experiment_through_transformers_gives_the_same_answers(tmp_path):
    """--engine transformers (hf_dope.py, shared-prefix reuse without layer reuse) against model.py on the same
    short grid: the same heads, answers, and the answer's log-probability to 1e-4 (float32, sdpa)."""
    pytest.importorskip("transformers")
    mine = run(parse_args(short_argv(tmp_path / "model")))
    theirs = run(parse_args(short_argv(tmp_path / "hf", "--engine", "transformers")))
    assert [(r["method"], r["depth"], r["heads"], r["answer"]) for r in theirs] == \
        [(r["method"], r["depth"], r["heads"], r["answer"]) for r in mine]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(mine, theirs))
    assert all(r["first_layer"] == 0 for r in theirs) and any(r["first_layer"] > 0 for r in mine)
    assert {r["cell"] for r in mine}.isdisjoint(r["cell"] for r in theirs)  # keyed apart


def test_yarn_and_self_extend_run_as_methods_with_parameters_fixed_by_the_setting(tmp_path, capsys):
    """--variant yarn,selfextend: each is a method of its own (role extension, its parameters in the record's rule:
    YaRN's factor is the setting's NTK factor, Self-Extend's group and window the flag's), judged against the
    baseline in the summary; parameters that cannot work are usage errors naming them, before any prompt runs."""
    argv = ["--model", str(ensure_weights("smollm2")), "--len", "600", "--depths", "2", "--max-new-tokens", "6",
            "--variant", "none,yarn,selfextend", "--ntk", "2", "--self-extend", "4,64", "--out", str(tmp_path)]
    rows = run(parse_args(argv))
    assert [(r["method"], r["role"]) for r in rows[:3]] == [("none", "baseline"), ("yarn", "extension"),
                                                             ("selfextend", "extension")]
    assert rows[1]["rule"] == {"factor": 2.0} and rows[2]["rule"] == {"group": 4, "window": 64}
    assert all(r["heads"] == [] and r["first_layer"] == 0 for r in rows[1:3])
    text = (tmp_path / "summary.md").read_text()
    assert "YaRN: " in text and "Self-Extend: " in text and "| yarn | extension |" in text
    assert not list(tmp_path.glob("calib_*"))  # no DoPE variant: nothing to calibrate
    base = argv[:argv.index("--ntk")] + ["--out", str(tmp_path / "bad")]
    for more, msg in ((["--ntk", "none", "--self-extend", "4,64"], "YaRN's factor is the context multiple"),
                      (["--ntk", "2", "--self-extend", "4,600"], "window W=600 is not smaller than the 600-token"),
                      (["--ntk", "2", "--self-extend", "4,6"], "must be a multiple of its group G=4")):
        with pytest.raises(SystemExit):
            run(parse_args(base + more))
        assert msg in capsys.readouterr().err, more
    assert not (tmp_path / "bad").exists()  # refused before any prompt: nothing left behind
    for more, msg in ((["--engine", "transformers"], "runs on model.py only"),
                      (["--variant", "none,parts"], "--self-extend sets the group and window of --variant selfextend")):
        with pytest.raises(SystemExit):
            parse_args(argv + more)
        assert msg in capsys.readouterr().err, more


# -----------------------------------------------------------------------------
# Inputs and faults that can never cost a result, on a tiny random model with SmolLM2's tokenizer (a run in seconds)


def tiny_folder(path, manifest=False, vocab=49152):
    """A model folder eval_nih can run: 2 layers of width 32, random weights, SmolLM2's vocabulary and tokenizer;
    with manifest, finished as setup_weights.py finishes one (MANIFEST.json last)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from model import Config, Transformer
    from tools.setup_weights import MODELS, write_manifest

    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
          "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(0)
    m = Transformer(Config.from_hf(hf))
    save_file({f"model.{k}": v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"},
              path / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ensure_weights("smollm2") / name, path / name)
    if manifest:
        write_manifest(path, MODELS["smollm2"], "bf16")
    return path


def tiny_argv(model, out, *more):
    return ["--model", str(model), "--len", "300", "--depths", "2", "--variant", "none", "--max-new-tokens", "3",
            "--device", "cpu", "--out", str(out), *more]


def tiny_grid_argv(model, out, *more):
    """The tiny model's short grid: baseline, by-all and its random control (2 heads each of its 8), 3 depths."""
    return tiny_argv(model, out, "--depths", "3", "--variant", "none,all", "--k", "2", *more)


def overwrite_4k(folder):
    p = folder / "model.safetensors"
    with open(p, "r+b") as f:
        f.seek(p.stat().st_size - 8192)
        f.write(b"\x55" * 4096)
    return folder


def symlinked(folder):
    (folder.parent / "link").symlink_to(overwrite_4k(folder))
    return folder.parent / "link"


def edit(folder, name, old, new):
    (folder / name).write_text((folder / name).read_text().replace(old, new))
    return folder


# (id, the folder given to --model, regex of the one-line error)
BAD_MODELS = [
    ("4 KiB of the weights overwritten, manifest present", lambda t: overwrite_4k(tiny_folder(t / "m", True)),
     r"m does not match its MANIFEST\.json: model\.safetensors has sha256"),
    ("the same through a symlink", lambda t: symlinked(tiny_folder(t / "m", True)),
     r"link does not match its MANIFEST\.json: model\.safetensors"),
    ("head count edited, shapes agree (8 of 4, not 4 of 8)", lambda t: edit(tiny_folder(t / "m", True), "config.json",
                                                                             '"num_attention_heads": 4, "num_key_value_'
                                                                             'heads": 2, "head_dim": 8',
                                                                             '"num_attention_heads": 8, "num_key_value_'
                                                                             'heads": 4, "head_dim": 4'),
     r"config\.json has sha256 .* \(damaged or edited\)"),
    ("chat template edited, manifest present", lambda t: edit(tiny_folder(t / "m", True), "tokenizer_config.json",
                                                              "You are a helpful", "You are a harmful"),
     r"tokenizer_config\.json has sha256"),
    ("tensors that do not fit config.json", lambda t: edit(tiny_folder(t / "m"), "config.json",
                                                           '"intermediate_size": 64', '"intermediate_size": 48'),
     r"m does not match its config: mis-shaped: layers\.0\.mlp"),
    ("a tokenizer of a larger vocabulary", lambda t: tiny_folder(t / "m", vocab=1000),
     r"tokenizer\.json has 49152 token ids but the model's vocab_size is 1000: this tokenizer does not belong"),
]


@pytest.mark.parametrize("folder, message", [r[1:] for r in BAD_MODELS], ids=[r[0] for r in BAD_MODELS])
def test_any_model_folder_is_checked_before_model_work(tmp_path, capsys, folder, message):
    """Every --model, not only the default one, is checked against its manifest (and its tokenizer against its
    config) before any prompt runs: one line naming the file, exit 2, nothing written."""
    with pytest.raises(SystemExit) as e:
        eval_nih.main(tiny_argv(folder(tmp_path), tmp_path / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_an_edited_chat_template_reruns_every_cell(tmp_path):
    """A folder without a manifest has its tokenizer in the records' identity: the same weights with an edited chat
    template rerun into the old --out compute every cell again (not the old numbers), and the summary keeps the two
    runs apart."""
    model = tiny_folder(tmp_path / "m")
    first = run(parse_args(tiny_argv(model, tmp_path / "out")))
    edit(model, "tokenizer_config.json", "You are a helpful", "You are a harmful")
    second = run(parse_args(tiny_argv(model, tmp_path / "out")))
    assert len(first) == len(second) == 2 and not {r["cell"] for r in first} & {r["cell"] for r in second}
    assert len(records.load_done(tmp_path / "out" / "results.jsonl")) == 4
    assert "These records come from 2 runs" in (tmp_path / "out" / "summary.md").read_text()


def test_a_full_disk_ends_in_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    """ENOSPC (simulated: the flush of the second record to disk fails) ends the run in one line naming the file,
    the first record kept whole and no half of the second; the same command then computes only the second."""
    import errno
    import os

    fsync, calls = os.fsync, []

    def full_at_the_second(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("results.jsonl"):
            calls.append(fd)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", full_at_the_second)
    with pytest.raises(SystemExit) as e:
        eval_nih.main(tiny_argv(tiny_folder(tmp_path / "m"), tmp_path / "out"))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("error") == 1, err
    err = err.strip().splitlines()[-1]  # the line after the progress bar
    assert re.search(r"No space left on device: '.*results\.jsonl'; the 1 finished record in .* is kept", err), err
    assert len(records.load_done(tmp_path / "out" / "results.jsonl")) == 1
    assert (tmp_path / "out" / "results.jsonl").read_text().count("\n") == 1
    monkeypatch.undo()
    rows = run(parse_args(tiny_argv(tmp_path / "m", tmp_path / "out")))
    assert len(rows) == 2 and len(records.load_done(tmp_path / "out" / "results.jsonl")) == 2


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tmp_path):
    model = tiny_folder(tmp_path / "m")
    (tmp_path / "out").mkdir()
    with records.locked(tmp_path / "out"):
        with pytest.raises(SystemExit, match=r"out is in use by eval_nih\.py pid \d+ on .*: one run per --out"):
            eval_nih.main(tiny_argv(model, tmp_path / "out"))
    assert list((tmp_path / "out").iterdir()) == []


def test_methods_that_do_not_fit_beside_each_other_run_in_passes_with_the_same_answers(tmp_path, monkeypatch,
                                                                                         capsys):
    """With memory for the DoPE head sets or for YaRN and Self-Extend but not for all of them at once, the run
    makes two passes over the prompts (each with its own shared prefix) and records what one pass records; with
    memory for no method at all it is refused before any prompt, naming what it needs."""
    model = tiny_folder(tmp_path / "m")
    argv = tiny_argv(model, tmp_path / "one", "--variant", "none,all,yarn,selfextend", "--k", "2", "--ntk", "2",
                     "--self-extend", "2,16", "--depths", "3")
    one = run(parse_args(argv))
    assert "passes over the prompts" not in capsys.readouterr().out
    methods = list(dict.fromkeys(r["method"] for r in one))
    assert methods == ["none", "all/asc", "all/random0", "yarn", "selfextend"]

    import torch

    from model import Transformer

    args = parse_args(argv)
    ms = [Method(m, r["variant"], r["role"], r["rule"], r["heads"]) for m in methods
          for r in [next(r for r in one if r["method"] == m)]]
    weights = sum(p.numel() * p.element_size() for p in Transformer.from_pretrained(model, torch.float32).parameters())
    room = [budget.memory_needed(Transformer.from_pretrained(model).config, ms[:n], 300, 3 + 16, args) + weights
            for n in (1, 3, 4)]
    assert room[1] < room[2]  # YaRN beside the DoPE head sets needs more than the DoPE head sets alone
    monkeypatch.setattr(budget, "available_memory", lambda device: (room[1] + room[2]) / 2 / 0.9)
    two = run(parse_args([str(tmp_path / "two") if a == str(tmp_path / "one") else a for a in argv]))
    out = capsys.readouterr().out
    assert "2 passes over the prompts, as memory allows: none, all/asc, all/random0 | yarn, selfextend" in out, out
    assert "peak resident memory of this process so far:" in out  # beside the estimate, to check it against
    first = {r["cell"]: r for r in one}
    assert len(records.load_done(tmp_path / "two" / "results.jsonl")) == len(one) == 15
    for r in two:
        assert (r["answer"], r["logprob"]) == (first[r["cell"]]["answer"], first[r["cell"]]["logprob"]), r["method"]
    monkeypatch.setattr(budget, "available_memory", lambda device: (room[0] + 1) / 0.9)  # the baseline, no more
    with pytest.raises(SystemExit, match="needs about"):
        run(parse_args([str(tmp_path / "three") if a == str(tmp_path / "one") else a for a in argv]))
    assert not (tmp_path / "three" / "results.jsonl").exists()


def test_a_pass_runs_only_its_methods_on_the_prompts_that_still_need_them():
    """in_pass cuts each prompt's methods to the pass's, in the prompt's order, and drops prompts left with none."""
    asked = [((0, 0), "p0", ["none", "yarn", "all/asc"]), ((0, 1), "p1", ["yarn"]), ((1, 0), "p2", ["all/asc"])]
    assert budget.in_pass(asked, ["all/asc", "none"]) == [((0, 0), "p0", ["none", "all/asc"]),
                                                          ((1, 0), "p2", ["all/asc"])]
    assert budget.in_pass(asked, ["yarn"]) == [((0, 0), "p0", ["yarn"]), ((0, 1), "p1", ["yarn"])]
    assert budget.in_pass(asked, ["selfextend"]) == []


def test_every_setting_of_the_folder_stays_in_its_summary(tmp_path):
    """Two commands (two lengths) into one --out: summary.md holds both settings, not only the last command's."""
    model = tiny_folder(tmp_path / "m")
    run(parse_args(tiny_argv(model, tmp_path / "out")))
    run(parse_args(tiny_argv(model, tmp_path / "out", "--len", "320")))
    text = (tmp_path / "out" / "summary.md").read_text()
    assert "300 tokens" in text and "320 tokens" in text and "pooled over 2 settings" in text


def test_prompts_that_cannot_be_built_as_asked_are_refused(tmp_path, capsys, tok):
    """A haystack without sentence ends puts every needle at the same place: the run is refused (the summary would
    report depths that were not run), as a chat template that puts the key before the haystack is."""
    hay = tmp_path / "hay.txt"
    hay.write_text("grass and sky and sun and wind " * 40)
    with pytest.raises(SystemExit) as e:
        eval_nih.main(tiny_argv(tiny_folder(tmp_path / "m"), tmp_path / "out", "--haystack-file", str(hay)))
    assert e.value.code == 2 and "depths 0%, 100% all put the needle at token" in capsys.readouterr().err
    import copy

    first = copy.copy(tok)  # a template that shows the end of the message (the question) first
    first.config = dict(tok.config, chat_template="{{ messages[0]['content'][-80:] }} {{ messages[0]['content'] }}")
    with pytest.raises(ValueError, match="renders the question's key before the haystack"):
        PromptBuilder(first).build(300, 0.5, "the blue whale", "1234567")
