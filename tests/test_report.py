"""report.py: tables, the two decision rules, verdicts, pooling over settings, pictures; records on disk."""

import json

import pytest

import report


def rows_for(scores: dict, logprobs: dict | None = None, length=4096, native=8192):
    """Synthetic result rows: scores {method: [0/1 per prompt]}."""
    out = []
    for name, s in scores.items():
        variant = name.split("/")[0]
        role = "baseline" if name == "none" else ("random" if "/random" in name else "rule")
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
    lower = rows_for({"none": base, "all/asc": base}, {"none": [-1.0] * n, "all/asc": [-1.5 + i / 1000 for i in range(n)]})
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


def test_records_torn_last_line_is_dropped_and_garbage_is_named(tmp_path):
    f = tmp_path / "results.jsonl"
    good = [json.dumps({"cell": str(i), "x": i}) for i in range(3)]
    f.write_text("\n".join(good) + "\n" + good[0][:9])
    with pytest.warns(UserWarning, match=r"results.jsonl, line 4: a torn last line"):
        assert list(report.load_done(f)) == ["0", "1", "2"]
    assert f.read_text() == "\n".join(good) + "\n"  # truncated back to the last whole record
    report.append_record(f, {"cell": "3"})
    assert list(report.load_done(f)) == ["0", "1", "2", "3"]
    f.write_text(good[0] + "\n[1, 2]\n" + good[1] + "\n")
    with pytest.raises(SystemExit, match=r"line 2: not a JSON record"):
        report.load_done(f)
    f.write_bytes(b"\xff\xfe garbage\n")  # a finished line that is not a record: not a torn write
    with pytest.raises(SystemExit, match=r"line 1: not a JSON record"):
        report.load_done(f)
    f.write_text(good[0] + "\n" + good[1])  # a whole record whose newline was lost
    assert list(report.load_done(f)) == ["0", "1"] and f.read_text().endswith("\n")
