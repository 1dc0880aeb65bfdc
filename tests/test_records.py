"""nih/records.py: the records file, and the committed records' cell ids, calibration files and head sets, rebuilt
from their own fields by today's code (a change that would orphan them fails here)."""

import json
import warnings
from pathlib import Path

import pytest

import eval_nih
from eval_nih import Method, Selector, methods_for, parse_args
from nih import records
from nih.records import cell_id, identity

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
COMMITTED = sorted(RESULTS.glob("**/results.jsonl"))


def test_records_torn_last_line_is_dropped_and_garbage_is_named(tmp_path):
    f = tmp_path / "results.jsonl"
    good = [json.dumps({"cell": str(i), "x": i}) for i in range(3)]
    f.write_text("\n".join(good) + "\n" + good[0][:9])
    with pytest.warns(UserWarning, match=r"results.jsonl, line 4: a torn last line"):
        assert list(records.load_done(f)) == ["0", "1", "2"]
    assert f.read_text() == "\n".join(good) + "\n"  # truncated back to the last whole record
    records.append_record(f, {"cell": "3"})
    assert list(records.load_done(f)) == ["0", "1", "2", "3"]
    f.write_text(good[0] + "\n[1, 2]\n" + good[1] + "\n")
    with pytest.raises(SystemExit, match=r"line 2: not a JSON record"):
        records.load_done(f)
    f.write_bytes(b"\xff\xfe garbage\n")  # a finished line that is not a record: not a torn write
    with pytest.raises(SystemExit, match=r"line 1: not a JSON record"):
        records.load_done(f)
    f.write_text(good[0] + "\n" + good[1])  # a whole record whose newline was lost
    assert list(records.load_done(f)) == ["0", "1"] and f.read_text().endswith("\n")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_args(rows):
    """The command line that wrote these records, as far as the records say it: variants and orders from the method
    names, the rest from the fields; every other flag at its default (the cell ids say whether that holds)."""
    r = rows[0]
    rules = list(dict.fromkeys(x["method"] for x in rows if x["role"] == "rule"))  # e.g. parts/asc, parts/flat
    variants = list(dict.fromkeys(m.split("/")[0] for m in rules))
    controls = len({x["method"] for x in rows if x["role"] == "random"}) // max(1, len(variants))
    args = parse_args(["--variant", ",".join(variants) or "none", "--order", ",".join(rules).replace("/", ":"),
                       "--seed", str(r["seed"]), "--dtype", r["dtype"], "--random-sets", str(controls)])
    args.device = r["device"]  # a record from a GPU is checked here on a CPU: identity() keeps only the kind
    return args


def test_the_committed_records_are_found():
    assert len(COMMITTED) >= 5, COMMITTED  # docs/results/regime/{24k,24k-noisy,32k,64k}, docs/results/gpu/nih-64k


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.parent.relative_to(RESULTS)))
def test_committed_cell_ids_rebuild_from_their_records(path):
    """Each committed record's cell (the key load_done resumes on) is what cell_id(identity(...)) gives for its own
    fields with the default templates and haystack; its needle's key and number are what the prompts give."""
    rows = read(path)
    args = run_args(rows)
    for r in rows:
        ident = identity(args, r["model_id"], eval_nih.FILLER, r["ntk_factor"])
        m = Method(r["method"], r["variant"], r["role"], r["rule"], [tuple(h) for h in r["heads"]])
        assert cell_id(ident, r["length"], r["noisy"], r["depth"], r["trial"], m) == r["cell"], (path, r["method"])
        assert r["expected"] == eval_nih.needle_value(r["seed"], r["length"], r["depth"], r["trial"])
        assert r["key"] == eval_nih.KEYS[r["trial"] % len(eval_nih.KEYS)]
    assert set(records.load_done(path)) == {r["cell"] for r in rows}


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.parent.relative_to(RESULTS)))
def test_committed_head_sets_are_what_todays_rules_pick(path):
    """Every method's heads in the committed records are today's: each rule's from the committed calibration file,
    which calibrate() finds under the name it computes and accepts without recomputing (no model is given, so a
    recomputation would fail), and each random control from its seed. A folder without its calibration file (the
    GPU run's) checks the controls against the rules' recorded heads."""
    rows = read(path)
    args = run_args(rows)
    r = rows[0]
    ident = identity(args, r["model_id"], eval_nih.FILLER, r["ntk_factor"])
    recorded = {x["method"]: (x["rule"], [tuple(h) for h in x["heads"]]) for x in rows}
    if list(path.parent.glob("calib_*.json")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "computed for other settings" or "damaged" would be a failure
            calib = eval_nih.calibrate(None, None, r["length"], r["noisy"], args, path.parent, ident)
        sel = Selector(calib)
    else:
        sel = RecordedHeads(recorded)
    methods = methods_for(sel, args, 30, 9, r["length"], r["noisy"])  # SmolLM2: 30 layers x 9 heads
    assert {m.name: (m.rule, [tuple(h) for h in m.heads]) for m in methods} == recorded


class RecordedHeads:
    """A selector that gives each rule the heads its records hold."""

    def __init__(self, recorded):
        self.by_rule = {json.dumps(rule, sort_keys=True): heads for rule, heads in recorded.values() if rule}

    def heads(self, rule):
        return self.by_rule[json.dumps(eval_nih.as_recorded(rule), sort_keys=True)]
