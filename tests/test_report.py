"""report.py: tables, the two decision rules, verdicts, pooling over settings, pictures."""

import json
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from nih import report
from nih.stats import detectable_gain, mean_interval, median_p


def rows_for(scores: dict, logprobs: dict | None = None, length=4096, native=8192):
    """Synthetic result rows: scores {method: [0/1 per prompt]}."""
    out = []
    for name, s in scores.items():
        variant = name.split("/")[0]
        role = "baseline" if name == "none" else "extension" if name in report.EXTENSION_NAMES else \
            "random" if "/random" in name else "rule"
        for i, x in enumerate(s):
            lp = (logprobs or {}).get(name, [-1.0] * len(s))[i]
            out.append(dict(cell=f"{length}/{name}/{i}", model="m", length=length, native=native, noisy=0,
                            depth=i / 100, trial=0, method=name, variant=variant, role=role,
                            heads=[] if name == "none" else [(1, 1)], score=x, logprob=lp, first_layer=1,
                            prefill_seconds=1.0, decode_seconds=0.5, reuse="prefix"))
    return out


def test_verdicts_follow_the_declared_intervals(tmp_path):
    n = 40
    base = [1] * 20 + [0] * 20
    rows = rows_for({"none": base, "all/asc": [1] * 38 + [0] * 2, "all/random0": base,
                     "parts/asc": [1] * 21 + [0] * 19, "parts/random0": base,
                     "gaussian/asc": [1] * 2 + [0] * 38, "gaussian/random0": base})
    verdicts = report.summarize(rows, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| all/asc | rule |" in text and "Decision rules" in text
    assert len(verdicts) == 3 and n == len(base)
    assert "DoPE all/asc: gain beyond the random-head control" in verdicts[0]
    assert "DoPE parts/asc: no difference" in verdicts[1]  # one prompt more is noise
    assert "DoPE gaussian/asc: harm" in verdicts[2]
    assert all("log p of the answer unchanged" in v for v in verdicts)  # every log p was -1.0
    lower = rows_for({"none": base, "all/asc": base},
                     {"none": [-1.0] * n, "all/asc": [-1.5 + i / 1000 for i in range(n)]})
    assert "log p of the answer lower" in report.summarize(lower, tmp_path)[0]

    # a gain that the random control matches is not a gain of the entropy rule
    rows = rows_for({"none": base, "all/asc": [1] * 38 + [0] * 2, "all/random0": [1] * 37 + [0] * 3})
    assert "gain over the baseline, but not beyond the random-head control" in report.summarize(rows, tmp_path)[0]


def test_one_rule_per_measure_a_shift_and_its_interval_agree(tmp_path):
    """5 of 6 prompts lower and one higher: the sign test does not reject (p = 0.22), so the interval must include 0
    and the verdict say unchanged; 6 of 6 lower: both reject."""
    base = [1] * 6
    mixed = rows_for({"none": base, "all/asc": base}, {"none": [-1.0] * 6, "all/asc": [-1.8] * 5 + [-0.5]})
    v = report.summarize(mixed, tmp_path)[0]
    assert "log p of the answer unchanged" in v
    lo, hi = v.split("median ")[1].split("[")[1].split("]")[0].split(", ")
    assert float(lo) <= 0 <= float(hi)
    allneg = rows_for({"none": base, "all/asc": base}, {"none": [-1.0] * 6, "all/asc": [-1.8] * 6})
    assert "log p of the answer lower" in report.summarize(allneg, tmp_path)[0]


def test_spread_of_several_random_sets_is_reported(tmp_path):
    base = [1] * 10
    rows = rows_for({"none": base, "parts/asc": base, "parts/random0": [1] * 7 + [0] * 3,
                     "parts/random1": [1] * 9 + [0]})
    report.summarize(rows, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "- parts: 2 random head sets, accuracy 70% to 90%" in text


def test_summarize_dirs_pools_settings_as_pairs_and_plots_the_multiple(tmp_path):
    """--summarize rebuilds the summary from results.jsonl files alone: one table per setting and a pooled one
    whose prompts stay paired (two settings of 10 prompts, each +2 for the rule: pooled 20 prompts, +4)."""
    base = [1] * 5 + [0] * 5
    for L, d in ((24576, "a"), (65536, "b")):
        rows = rows_for({"none": base, "all/asc": [1] * 7 + [0] * 3, "all/random0": base}, length=L)
        (tmp_path / d).mkdir()
        (tmp_path / d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    verdicts = report.summarize_dirs([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "sum")
    text = (tmp_path / "sum" / "summary.md").read_text()
    assert "pooled over 2 settings" in text and "20 prompts" in text and "(3x native)" in text
    assert [v.split(",")[0] for v in verdicts] == ["24576 tokens", "65536 tokens", "pooled"]
    assert "| all/asc | rule | per setting | 14/20 |" in text and "(0/4)" in text
    for name in ("heatmap_noisy0.png", "by_multiple.png"):
        assert (tmp_path / "sum" / name).stat().st_size > 0
    with pytest.raises(SystemExit, match="does not exist"):
        report.summarize_dirs([str(tmp_path / "nowhere")], tmp_path / "sum")


def test_earlier_summary_read_back_as_counts_pools_to_its_own_pooled_row():
    """The committed 1x-2x summary (commit b671c0d's format): its four per-setting tables, read back as counts and
    pooled, give the counts of the pooled table printed in the same file (22/27 baseline; by-parts 20/27 with 2/0
    discordant pairs and 23-/4+ log-p signs; by-Gaussian 9 wins over its control)."""
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "summary.md"
    old = report.earlier_counts(path, 8192)
    assert {(c["length"], c["noisy"]) for c in old} == {(8192, 0), (8192, 4), (16384, 0), (16384, 4)}
    by = {}
    for c in old:
        by.setdefault(c["method"], []).append(c)
    pooled = {}  # that file pooled the four settings' counts as independent prompts: summed here as it did
    for m, cs in by.items():
        pooled[m] = dict(cs[0], n=sum(c["n"] for c in cs), correct=sum(c["correct"] for c in cs))
        for key in ("base", "base_signs", "ctrl"):
            if all(key in c for c in cs):
                pooled[m][key] = tuple(map(sum, zip(*(c[key] for c in cs))))
    assert (pooled["none"]["correct"], pooled["none"]["n"]) == (22, 27)
    parts = pooled["parts/asc"]
    assert parts["correct"] == 20 and parts["base"][1:3] == (2, 0) and parts["base_signs"] == (23, 4, 27)
    assert pooled["gaussian/asc"]["ctrl"][1:3] == (0, 9) and pooled["gaussian/random"]["role"] == "random"
    assert "ctrl_signs" not in parts  # that summary printed no sign counts against the control
    lo, hi = report.newcombe_paired(*parts["base"])
    assert (round(100 * lo, 1), round(100 * hi, 1)) == (-21.1, 5.6)  # the pooled row's printed interval
    with pytest.raises(SystemExit, match="no per-setting table in the format of commit b671c0d"):
        report.earlier_counts(Path(__file__), 8192)


def test_counts_judge_as_the_records_do_and_the_table_by_multiple(tmp_path):
    """The table by multiple judges from counts what the per-setting tables judge from records; a multiple with two
    settings of records gets a pooled row, in which the prompts the two share (24K original and noisy: the same
    depths and needles) count once, and the paper's Table 1 sits beside 3x."""
    base = [1] * 6 + [0] * 6
    rows, lps = [], {"none": [-2.0] * 12, "parts/asc": [-1.0] * 12, "parts/random0": [-2.0] * 11 + [-1.0]}
    for L, noisy in ((8192, 0), (24576, 0), (24576, 4)):
        for r in rows_for({"none": base, "parts/asc": [1] * 12, "parts/random0": base}, lps, length=L):
            rows.append(dict(r, noisy=noisy, cell=f"{r['cell']}/{noisy}"))
    verdicts = report.summarize(rows, tmp_path)
    assert "gain beyond the random-head control" in verdicts[0] and "log p of the answer higher" in verdicts[0]
    text = (tmp_path / "summary.md").read_text()
    assert "| 1x | 8K original | 12 | 6/12 (50%) | 12/12; + / ↑; vs random + / ↑ | - | - |" in text
    assert "| 3x | 24K noisy | 12 | 6/12 (50%) | 12/12; + / ↑; vs random + / ↑ | 75.4 | 84.4" in text
    assert "| 3x | both, each prompt once | 12 | 6/12 (50%) | 12/12; + / ↑; vs random + / ↑ |  |  |" in text
    assert (tmp_path / "by_multiple.png").stat().st_size > 0
    one = [r for r in rows if r["length"] == 8192]
    report.summarize(one, tmp_path / "one")
    assert "By context multiple" not in (tmp_path / "one" / "summary.md").read_text()


def test_the_table_by_multiple_has_a_column_per_extension_judged_against_the_baseline(tmp_path):
    """YaRN and Self-Extend get columns after the rules, named as a reader knows them, judged against the baseline
    (no random control: they have no head set); a setting where one did not run says so."""
    base = [1] * 6 + [0] * 6
    lps = {"none": [-3.0] * 12, "parts/asc": [-3.0] * 12, "yarn": [-1.0] * 12, "selfextend": [-3.0] * 12}
    rows = rows_for({"none": base, "parts/asc": base, "yarn": [1] * 12, "selfextend": base}, lps, length=65536)
    rows += rows_for({"none": base, "parts/asc": base}, length=24576)
    verdicts = report.summarize(rows, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    yarn = next(v for v in verdicts if v.startswith("65536 tokens, noisy=0, YaRN"))
    assert yarn.startswith("65536 tokens, noisy=0, YaRN: gain over the baseline (accuracy +50.0 pts")
    assert "accuracy gain" not in yarn.split("; ")[-1]  # no power to find what was found
    assert "| 65536 tokens, noisy=0 | yarn | 12 | 6 | 0 | +50.0 [+15.4, +74.6] | gain detected | - |" in text
    assert "| multiple | setting | prompts | baseline | parts/asc | YaRN | Self-Extend | paper: Dynamic NTK |" in text
    assert "| 8x | 64K original | 12 | 6/12 (50%) | 6/12; = / = | 12/12; + / ↑ | 6/12; = / = | 60.9 |" in text
    assert "| 3x | 24K original | 12 | 6/12 (50%) | 6/12; = / = | not run | not run | 91.9 | - |" in text
    assert "| pooled | parts/asc |" in text and "| pooled | yarn |" not in text  # run in one setting: not pooled
    # Holm across the summary corrects DoPE's comparisons; the extensions' are another question, within their table
    assert "judges 6 comparisons of DoPE in all (and 4 of YaRN and Self-Extend against the baseline" in text
    assert "| 65536 tokens, noisy=0 | yarn | accuracy vs baseline | +50.0 [+15.4, +74.6] pts | 0.0056 | kept (m = 6) | - |" \
        in text


def test_earlier_settings_of_another_model_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    rows = rows_for({"none": [1, 0], "parts/asc": [1, 1]}, length=24576)  # model "m"
    (tmp_path / "a" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    earlier = Path(__file__).resolve().parents[1] / "docs" / "results" / "summary.md"
    with pytest.raises(SystemExit, match="is about SmolLM2-135M-Instruct, the results about m"):
        report.summarize_dirs([str(tmp_path / "a")], tmp_path / "sum", earlier)


def test_a_summary_of_this_version_is_not_read_as_an_earlier_one(tmp_path):
    rows = rows_for({"none": [1, 0], "parts/asc": [1, 1]}, length=24576)
    report.summarize(rows, tmp_path)
    with pytest.raises(SystemExit, match="give their folder to --summarize"):
        report.earlier_counts(tmp_path / "summary.md", 8192)


def test_strict_match_is_the_first_number_exactly():
    """RULER's string match counts the needle inside a longer number; the strict match does not."""
    assert report.strict(" 8247727.", "8247727") == 1 and report.strict("It is 8247727, I think", "8247727") == 1
    assert report.strict(": 824772727", "8247727") == 0  # the string match counts this one
    assert report.strict("1. 8247727", "8247727") == 0 and report.strict("blue.", "8247727") == 0
    assert report.strict("08247727", "8247727") == 0


@given(st.text(alphabet="0123456789 .,:ab", max_size=20), st.from_regex(r"[1-9][0-9]{6}", fullmatch=True))
def test_strict_match_is_right_only_where_the_string_match_is(answer, expected):
    assert report.strict(answer, expected) <= int(expected in answer)
    assert report.strict(expected + answer, expected) == (not answer[:1].isdigit())


def test_strict_changes_are_listed_and_counted(tmp_path):
    rows = rows_for({"none": [1, 1, 0], "parts/asc": [1, 1, 1]})
    answers = {"none": ["1234567.", " 7654321", "no"], "parts/asc": ["1234567.", "7654321", ": 11112222"]}
    for r in rows:
        i = int(r["cell"].rsplit("/", 1)[1])
        r.update(answer=answers[r["method"]][i], expected=["1234567", "7654321", "1111222"][i])
    report.summarize(rows, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "| parts/asc | rule | [(1, 1)] | 3/3 | 2/3 |" in text
    assert "1 answer right by the string match only: parts/asc at depth 2% (': 11112222' for 1111222)" in text


def test_settings_that_share_prompts_pool_each_prompt_once():
    """The committed 24K original and noisy records share depths and needles: pooled by prompt, parts/flat's log-p
    shift is the median of 11 per-depth means, +0.127 [-0.022, +0.636] with 9 of 11 higher (not 22 independent
    prompts), and its accuracy table averages the two settings' pairs."""
    root = Path(__file__).resolve().parents[1] / "docs" / "results" / "regime"
    rows = [r for d in ("24k", "24k-noisy") for r in report.load_done(root / d / "results.jsonl").values()]
    by = {n: {report._prompt(r): r for r in rows if r["method"] == n} for n in {r["method"] for r in rows}}
    acc, lp = report.compare(by["none"], by["parts/flat"])
    assert len(lp["diffs"]) == 11 and (lp["neg"], lp["pos"]) == (2, 9)
    assert (round(lp["diff"], 3), round(lp["lo"], 3), round(lp["hi"], 3)) == (0.127, -0.022, 0.636)
    assert acc["table"] == (8.0, 0, 0.5, 2.5) and acc["lo"] < 0 < acc["hi"]
    pooled = {c["method"]: c for c in report.counts(rows)}
    assert pooled["parts/flat"]["n"] == 11 and pooled["parts/flat"]["correct"] == 8.5
    assert report.median_shift(*pooled["parts/flat"]["base_signs"]) == "unchanged"
    noisy = [r for r in rows if r["noisy"]]  # one setting alone is the plain paired table
    one = {n: {report._prompt(r): r for r in noisy if r["method"] == n} for n in ("none", "parts/flat")}
    assert report.compare(one["none"], one["parts/flat"])[0]["table"] == (8, 0, 1, 2)


def test_verdicts_say_what_the_prompts_could_detect(tmp_path):
    base = [1] * 6 + [0] * 6
    rows = rows_for({"none": base, "parts/asc": base})
    v = report.summarize(rows, tmp_path)[0]
    gain = detectable_gain((6, 0, 0, 6))
    assert f"with 80% power these 12 prompts detect an accuracy gain of at least +{100 * gain:.1f} points" in v
    text = (tmp_path / "summary.md").read_text()
    assert "### What these prompts could detect" in text
    assert f"| 4096 tokens, noisy=0 | parts/asc | 12 | 0 | 6 | +0.0 [-14.2, +14.2] | +{100 * gain:.1f} |" in text
    full = rows_for({"none": [1] * 11 + [0], "parts/asc": [1] * 11 + [0]})
    assert "no accuracy gain (winning all 8.3 points the baseline leaves has" in report.summarize(full, tmp_path)[0]


def test_a_rule_must_beat_each_random_set_and_passing_comparisons_face_holm(tmp_path):
    """Against two random sets a gain counts beyond the control only if it beats both; a comparison that passes
    its 95% rule but not Holm's correction over its table is listed as a lead."""
    base = [1] * 10 + [0] * 10
    rows = rows_for({"none": base, "parts/asc": [1] * 18 + [0] * 2, "parts/random0": base,
                     "parts/random1": [1] * 17 + [0] * 3})
    v = report.summarize(rows, tmp_path)[0]
    assert "gain over the baseline, but not beyond the random-head controls" in v
    assert "against its 2 random controls: accuracy gain beyond 1 of them" in v
    rows = rows_for({"none": base, "parts/asc": [1] * 18 + [0] * 2, "parts/random0": base, "parts/random1": base})
    assert "gain beyond the random-head controls (all 2)" in report.summarize(rows, tmp_path)[0]
    lps = {"none": [-1.0] * 20, "parts/asc": [-0.5] * 15 + [-1.5] * 5, "parts/random0": [-1.0] * 20}
    rows = rows_for({"none": base, "parts/asc": base, "parts/random0": base}, lps)
    report.summarize(rows, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    p = median_p(5, 15, 20)
    assert 0.0125 < p <= 0.05  # passes at 95%, not at 0.05 / 4
    assert (f"| 4096 tokens, noisy=0 | parts/asc | log p vs baseline | +0.500 [+0.500, +0.500] nats | {p:.2g} | "
            "lead (m = 4) | lead (M = 4) |") in text


def test_the_declared_4x_design_is_judged_over_its_sixteen_comparisons(tmp_path):
    """The 4x run's family, as declared: three rules x two measures x {the baseline, their variant's three random
    sets (one comparison per measure, the weakest)} plus YaRN and Self-Extend x two measures, 16 in Holm's table."""
    base = [1] * 20 + [0] * 35
    scores = {m: base for m in ("none", "parts/asc", "parts/flat", "gaussian/asc", "yarn")}
    scores |= {f"{v}/random{i}": base for v in ("parts", "gaussian") for i in range(3)}
    scores["selfextend"] = [1] * 50 + [0] * 5
    report.summarize(rows_for(scores), tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "this summary judges 12 comparisons of DoPE in all (and 4 of YaRN and Self-Extend" in text
    assert "| selfextend | accuracy vs baseline |" in text and "kept (m = 16) | - |" in text


def test_a_setting_whose_methods_have_not_all_answered_every_prompt_says_it_is_incomplete(tmp_path):
    """A run still going (its second pass not yet begun, say) is summarized as what it is, naming who is behind."""
    rows = rows_for({"none": [1, 0, 1, 1], "parts/asc": [1, 1, 1, 1], "yarn": [1, 0]})
    report.summarize(rows, tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "**Incomplete**: not every method has answered every prompt (yarn 2 of 4" in text
    report.summarize(rows_for({"none": [1, 0, 1, 1], "parts/asc": [1, 1, 1, 1]}), tmp_path)
    assert "Incomplete" not in (tmp_path / "summary.md").read_text()


def test_counts_carry_the_mean_log_p_interval_for_the_plot():
    rows = rows_for({"none": [1, 0, 1], "parts/asc": [1, 1, 1]}, {"none": [-1.0, -2.0, -3.0],
                                                                   "parts/asc": [-1.0, -1.0, -1.0]})
    c = {x["method"]: x for x in report.counts(rows)}
    assert c["none"]["logprob_ci"] == pytest.approx(mean_interval([-1.0, -2.0, -3.0]))


def test_power_projection_at_more_prompts_uses_the_observed_rates():
    base = [1] * 5 + [0] * 6
    rows = rows_for({"none": base, "parts/asc": [1] * 7 + [0] * 4, "parts/random0": base},
                    {"none": [-2.0] * 11, "parts/asc": [-1.5] * 9 + [-2.5] * 2, "parts/random0": [-2.0] * 11})
    lines = report.power_projection(rows, [11, 55])
    gain = detectable_gain((5, 0, 2, 4), 55)
    assert f"| parts/asc | 55 | +{100 * gain:.1f} |" in "\n".join(lines)
    assert "| parts/asc | 11 | none |" in "\n".join(lines) and not any("random0" in x for x in lines)
    with pytest.raises(SystemExit, match="of one setting"):
        report.power_projection(rows + rows_for({"none": [1]}, length=8192), [11])


# --------------------------------------------------------------------------
# --summarize reports what was run: never pairs or pools records of different identities, never modifies its input

COMMITTED_24K = Path(__file__).resolve().parents[1] / "docs" / "results" / "regime" / "24k" / "results.jsonl"


def committed(n=None):
    rows = [json.loads(line) for line in COMMITTED_24K.read_text().splitlines()]
    return [r for r in rows if r["method"] == "none"][:n]


def with_ident(r, **change):
    """The record as the same run with other flags would have written it (its cell names them)."""
    ident, *key = json.loads(r["cell"])
    fields = {"ntk_factor": change["ntk"]} if "ntk" in change else {}
    return r | fields | {"cell": json.dumps([ident | change, *key], sort_keys=True)}


def titles(folder):
    return [line for line in (folder / "summary.md").read_text().splitlines() if line.startswith("#")]


def test_records_of_different_identities_are_summarized_apart_and_say_so(tmp_path):
    """Two runs at one length in one folder (--ntk 3 and --ntk 2; float32 and bfloat16): each is its own run with
    its own tables and pictures, said in the summary, and a table counts its own prompts (not the pairs of both)."""
    base = committed(4)
    for name, other in (("ntk", [with_ident(r, ntk=2.0) | {"logprob": r["logprob"] - 1} for r in base]),
                        ("dtype", [with_ident(r, dtype="bfloat16") | {"dtype": "bfloat16"} for r in base])):
        d = tmp_path / name
        d.mkdir()
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base + other))
        report.summarize_dirs([d], d / "sum")
        text = (d / "sum" / "summary.md").read_text()
        assert "These records come from 2 runs that differ in what moves a token or a logit" in text
        heads = titles(d / "sum")
        assert heads[0].startswith("## Run 1: ") and heads[2].startswith("## Run 2: ") and name in heads[0], heads
        assert [h.split(": ")[-1] for h in heads if h.startswith("###")] == ["4 prompts (4 depths x 1 needles)"] * 2
        assert "pooled over" not in text
        assert sorted(p.name for p in (d / "sum").glob("*.png")) == ["heatmap_noisy0_run1.png",
                                                                     "heatmap_noisy0_run2.png"]


def test_one_identity_keeps_its_summary_and_a_folder_given_twice_counts_once(tmp_path):
    base = committed(4)
    d = tmp_path / "a"
    d.mkdir()
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base))
    report.summarize_dirs([d, d], tmp_path / "sum")
    assert titles(tmp_path / "sum") == [
        "### SmolLM2-135M-Instruct, 24576 tokens (3x native), noisy=0: 4 prompts (4 depths x 1 needles)"]


def test_summarize_reads_without_modifying_what_it_reads(tmp_path):
    """A torn last line is skipped with a warning, not cut off, and a last line without its newline is not
    completed: the files --summarize reads keep every byte and their mtime (a read-only folder would work)."""
    import os

    rows = committed(3)
    torn, whole = tmp_path / "torn", tmp_path / "whole"
    for d, tail in ((torn, '{"cell": "x", "trunc'), (whole, json.dumps(rows[2]))):
        d.mkdir()
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + tail)
    before = {d: ((d / "results.jsonl").read_bytes(), os.stat(d / "results.jsonl").st_mtime_ns) for d in (torn, whole)}
    with pytest.warns(UserWarning, match=r"torn/results\.jsonl, line 3: a torn last line"):
        report.summarize_dirs([torn, whole], tmp_path / "sum")
    assert {d: ((d / "results.jsonl").read_bytes(), os.stat(d / "results.jsonl").st_mtime_ns)
            for d in (torn, whole)} == before


def test_a_record_whose_model_name_differs_shows_both_names(tmp_path):
    """The model name is not in a cell (the same weights in a renamed folder are the same model), so an edited name
    cannot be told from a rename: the title names every name the records give, never only the edited one."""
    rows = committed(2)
    d = tmp_path / "a"
    d.mkdir()
    (d / "results.jsonl").write_text(json.dumps(rows[0] | {"model": "GPT-5"}) + "\n" + json.dumps(rows[1]) + "\n")
    report.summarize_dirs([d], tmp_path / "sum")
    assert titles(tmp_path / "sum")[0].startswith("### GPT-5 / SmolLM2-135M-Instruct, 24576 tokens")


def test_a_picture_that_cannot_be_written_leaves_no_empty_file(tmp_path, monkeypatch):
    """A full disk while the heatmap is drawn (simulated: savefig writes a little, then ENOSPC): the error names
    the picture and no 0-byte or partial picture is left."""
    import errno

    from matplotlib.figure import Figure

    def full(self, f, **kw):
        f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*heatmap_noisy0\.png'"):
        report.summarize(committed(2), tmp_path)
    assert list(tmp_path.iterdir()) == []
