"""nih/records.py: the records file, and the committed records' cell ids, calibration files and head sets, rebuilt
from their own fields by today's code (a change that would orphan them fails here)."""

import json
import os
import re
import warnings
from pathlib import Path

import pytest

import eval_nih
from eval_nih import Method, Selector, methods_for, parse_args
from nih import records
from nih.records import cell_id, identity

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
COMMITTED = sorted(RESULTS.glob("**/results.jsonl"))


def record(cell, **fields):
    """A record as run_setting writes one, the fields report.py and a resumed run read (its cell: any name)."""
    return dict(cell=cell, model="m", model_id="0123456789abcdef", length=512, noisy=0, depth=0.5, trial=0,
                method="none", variant="none", role="baseline", rule=None, heads=[], expected="1234567",
                answer=" 1234567.", score=1, logprob=-0.25, prefill_seconds=1.0) | fields


def test_records_torn_last_line_is_dropped_and_garbage_is_named(tmp_path):
    f = tmp_path / "results.jsonl"
    good = [json.dumps(record(str(i))) for i in range(3)]
    f.write_text("\n".join(good) + "\n" + good[0][:9])
    with pytest.warns(UserWarning, match=r"results.jsonl, line 4: a torn last line"):
        assert list(records.load_done(f)) == ["0", "1", "2"]
    assert f.read_text() == "\n".join(good) + "\n"  # truncated back to the last whole record
    records.append_record(f, record("3"))
    assert list(records.load_done(f)) == ["0", "1", "2", "3"]
    f.write_text(good[0] + "\n[1, 2]\n" + good[1] + "\n")
    with pytest.raises(SystemExit, match=r"line 2: not a record of this experiment \(a JSON list, not an object\)"):
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
    variants += list(dict.fromkeys(x["variant"] for x in rows if x["role"] == "extension"))  # yarn, selfextend
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
    GPU run's) checks the controls against the rules' recorded heads. YaRN's and Self-Extend's parameters are what
    extension_methods fixes for the setting (SmolLM2's native context: 8192)."""
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
    methods += eval_nih.extension_methods(args, r["length"], 8192, r["ntk_factor"], args.max_new_tokens + 16)
    assert {m.name: (m.rule, [tuple(h) for h in m.heads]) for m in methods} == recorded


class RecordedHeads:
    """A selector that gives each rule the heads its records hold."""

    def __init__(self, recorded):
        self.by_rule = {json.dumps(rule, sort_keys=True): heads for rule, heads in recorded.values() if rule}

    def heads(self, rule):
        return self.by_rule[json.dumps(eval_nih.as_recorded(rule), sort_keys=True)]


# --------------------------------------------------------------------------
# A record means what it says: bad ones are named by file and line, never used


def real_record(**fields):
    """The first committed record (a real cell), with fields changed."""
    return read(COMMITTED[0])[0] | fields


def without(name):
    r = real_record()
    del r[name]
    return r


# (id, the bad line, regex of the message: the fault, after "results.jsonl, line 2: not a record ...")
BAD_RECORDS = [
    ("logprob a string", real_record(logprob="-0.5"), r"'logprob' is '-0\.5', not int or float"),
    ("no score", without("score"), r"no 'score' field"),
    ("cell a list", real_record(cell=[1, 2]), r"'cell' is \[1, 2\], not str"),
    ("score a bool", real_record(score=True), r"'score' is True, not int"),
    ("score 2", real_record(score=2), r"'score' is 2, not 0 or 1"),
    ("score its answer contradicts", real_record(score=1 - real_record()["score"]),
     r"'score' is [01] but the answer .* (holds|lacks) the expected"),
    ("logprob above 0", real_record(logprob=0.5), r"'logprob' is 0\.5, not a log-probability"),
    ("logprob nan", real_record(logprob=float("nan")), r"'logprob' is nan"),
    ("unknown role", real_record(role="judge"), r"'role' is 'judge', not one of baseline"),
    ("model_id edited", real_record(model_id="0000000000000000"), r"'model_id' is '0000000000000000' but its cell "
                                                                  r"says 'ea2f04aebc6416e8' \(edited\?\)"),
    ("depth edited", real_record(depth=0.3), r"'depth' is 0\.3 but its cell says 1\.0"),
    ("method edited", real_record(method="parts/asc"), r"'method' is 'parts/asc' but its cell says 'none'"),
    ("a JSON list", [1, 2], r"a JSON list, not an object"),
]


@pytest.mark.parametrize("bad, message", [r[1:] for r in BAD_RECORDS], ids=[r[0] for r in BAD_RECORDS])
def test_a_bad_record_is_named_by_file_and_line_by_a_run_and_by_summarize(tmp_path, capsys, bad, message):
    """load_done (a run's resume) and --summarize refuse a folder holding a record that is not what run_setting
    writes, naming the file, the line and the fault, not with a bare TypeError/KeyError; nothing is modified."""
    f = tmp_path / "results.jsonl"
    f.write_text(json.dumps(real_record()) + "\n" + json.dumps(bad) + "\n")
    before = f.read_bytes()
    for read_it in (lambda: records.load_done(f), lambda: eval_nih.main(["--summarize", str(tmp_path), "--out",
                                                                        str(tmp_path / "sum")])):
        with pytest.raises(SystemExit) as e:
            read_it()
        assert re.search(r"results\.jsonl, line 2: not a record of this experiment \(" + message, str(e.value.code)), \
            e.value.code
    assert f.read_bytes() == before and not (tmp_path / "sum").exists()


def test_every_committed_record_passes_the_check():
    for path in COMMITTED:
        for i, r in enumerate(read(path), start=1):
            assert records.check_record(r) is None, (path, i, records.check_record(r))


def test_the_packaged_models_identity_is_unchanged_and_a_foreign_tokenizer_enters_it(tmp_path):
    """A folder whose manifest vouches for its tokenizer adds nothing to the identity (the packaged SmolLM2: the
    committed records keep their cells); the same files without a manifest add their tokenizer's digest, and an
    edited chat template gives another digest, hence other cells."""
    import shutil

    from tools.setup_weights import ensure_weights

    smol = ensure_weights("smollm2")
    assert records.model_id(smol) == "ea2f04aebc6416e8" and records.tokenizer_id(smol) is None
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smol / name, copy / name)
    t1 = records.tokenizer_id(copy)
    tc = copy / "tokenizer_config.json"
    tc.write_text(tc.read_text().replace("You are a helpful", "You are a harmful"))
    t2 = records.tokenizer_id(copy)
    assert t1 and t2 and t1 != t2
    args = parse_args([])
    assert "tokenizer" not in identity(args, "m", "hay", None) and identity(args, "m", "hay", None, t1)["tokenizer"] == t1


def test_a_write_that_fails_leaves_no_half_record_and_names_the_file(tmp_path, monkeypatch):
    """append_record on a full disk (ENOSPC from the flush to disk, simulated): the line is cut off again, the error
    names the file, and the records before it are intact (a file it created is not left empty)."""
    import errno
    import os

    f = tmp_path / "results.jsonl"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device: '.*results\.jsonl'"):
        records.append_record(f, record("0"))
    assert not f.exists()
    monkeypatch.undo()
    records.append_record(f, record("0"))
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="results.jsonl"):
        records.append_record(f, record("1"))
    monkeypatch.undo()
    assert list(records.load_done(f)) == ["0"] and f.read_text().count("\n") == 1


def test_one_run_per_out_folder(tmp_path):
    """records.locked: a second holder is refused naming the first (here a process that holds the lock as a run
    does); once that process is killed (SIGKILL: no cleanup) the folder is free again, and a finished run leaves no
    lock file behind."""
    import signal
    import subprocess
    import sys

    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'eval_nih.py pid 4242 on elsewhere'); print('locked', "
            "flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=r"in use by eval_nih\.py pid 4242 on elsewhere: one run per --out"):
            with records.locked(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with records.locked(tmp_path):
        with pytest.raises(SystemExit, match=rf"in use by eval_nih\.py pid {os.getpid()} "):
            with records.locked(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    """write_atomic's .<name>.<pid>.tmp of a process that no longer runs is deleted; a live writer's is kept."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, live = tmp_path / f".calib.json.{dead.stdout.strip()}.tmp", tmp_path / f".calib.json.{os.getpid()}.tmp"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    records.remove_stale_temporaries(tmp_path)
    assert not stale.exists() and live.exists()


def test_a_killed_run_leaves_no_lock_and_no_folder_it_made(tmp_path):
    """SIGTERM (kill, timeout) unwinds eval_nih.py's command line as Ctrl-C does: the lock file is removed, and the
    --out folder it made, still empty, with it; in a folder that holds records, the records stay."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from nih import cli, records; cli.unwind_on_sigterm(); "
            "out = Path(sys.argv[1]); keep = out / 'results.jsonl'\n"
            "with records.run_folder(out, keep):\n    print('running', flush=True); time.sleep(60)")
    for out, held in ((tmp_path / "new" / "out", False), (tmp_path / "old", True)):
        if held:
            out.mkdir()
            records.append_record(out / "results.jsonl", record("0"))
        run = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=RESULTS.parent.parent, stdout=subprocess.PIPE,
                               text=True)
        assert run.stdout.readline().strip() == "running"
        assert (out / ".lock").exists()
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 128 + signal.SIGTERM
        assert not (out / ".lock").exists()
        assert out.exists() == held and (not held or list(records.load_done(out / "results.jsonl")) == ["0"])
