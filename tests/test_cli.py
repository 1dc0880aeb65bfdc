"""nih/cli.py: every flag checked before any model work; a bad command line exits 2 naming the flag or file and
leaves nothing behind."""

import os
import re
from pathlib import Path

import pytest

import eval_nih
from eval_nih import parse_args
from nih import cli
from tools.setup_weights import DEFAULT_MODEL_DIR, ensure_weights


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--variant", "none,bogus"])
    assert "unknown variant" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--len", "12x"])
    assert "not a token count" in capsys.readouterr().err
    a = parse_args(["--variant", "gaussian,none,all"])
    assert a.variant == ["none", "gaussian", "all"]  # the baseline always runs first
    assert a.device == "cpu" and a.dtype == "float32"  # no GPU here: the CPU reference


@pytest.mark.parametrize("argv, message", [
    (["--ntk", "nan"], "finite number > 1"), (["--ntk", "inf"], "finite number > 1"),
    (["--ntk", "-1"], "finite number > 1"), (["--ntk", "0"], "finite number > 1"),
    (["--ntk", "bogus"], "--ntk 'bogus'"), (["--order", "up"], "--order up"),
    (["--variant", "parts", "--order", "all:asc"], "VARIANT:ORDER"),
    (["--needle", "{key} {x} {value}"], "unknown field"), (["--question", "What number?"], "must contain"),
    (["--needle", "no value {key}"], "must contain"), (["--device", "cuda"], "no CUDA device"),
    (["--device", "potato"], "not a torch device"), (["--random-sets", "-1"], "--random-sets"),
    (["--device-map", "auto"], "goes with --engine transformers"),
])
def test_bad_flags_are_refused_before_any_model_work(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Bad input on the command line: a clear message naming the flag or file, exit code 2, nothing left behind


def _bad_inputs(tmp_path):
    model = str(ensure_weights("smollm2"))
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_si')
    binary = tmp_path / "hay.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # would block whoever opened it
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "results.jsonl").write_text('{"cell": "1"}\nnot json\n{"cell": "2"}\n')
    m = ["--model", model, "--len", "600"]
    return [  # argv, exit code, message
        (m + ["--ntk=nan"], 2, "--ntk 'nan'"), (m + ["--ntk", "inf"], 2, "--ntk 'inf'"),
        (m + ["--ntk", "-1"], 2, "finite number > 1"), (m + ["--ntk", "0"], 2, "finite number > 1"),
        (m + ["--ntk", "bogus"], 2, "--ntk 'bogus'"),
        (m + ["--k", "0"], 2, r"--k 0: must be between 1 and 270 \(30 layers x 9 heads\)"),
        (m + ["--k", "10000"], 2, "--k 10000: must be between 1 and 270"),
        (m + ["--r", "0"], 2, r"--r 0: must be between 1 and 64 \(head width d = 64\)"),
        (m + ["--r", "100"], 2, "--r 100: must be between 1 and 64"),
        (m + ["--sweep", "--sweep-r", "1,65"], 2, "--sweep-r 65"),
        (m + ["--needle", "{key} is {x}: {value}"], 2, r"unknown field\(s\) \['x'\]"),
        (m + ["--question", "Which number?"], 2, r"question template .* must contain \{key\}"),
        (["--model", str(broken)], 2, "config.json is not a usable model config"),
        (["--model", str(tmp_path / "nowhere")], 2, "no config.json there"),
        (m + ["--haystack-file", str(binary)], 2, "hay.bin is not UTF-8 text"),
        (m + ["--haystack-file", str(tmp_path / "missing.txt")], 2, "missing.txt: no such file"),
        (m + ["--haystack-file", str(tmp_path)], 2, "is a folder, not a text file"),
        (m + ["--variant", "none,bogus"], 2, "unknown variant"), (m + ["--len", "12x"], 2, "not a token count"),
        (m + ["--depths", "0"], 2, "--depths"), (m + ["--device", "cuda"], 2, "no CUDA device"),
        (m + ["--out", str(a_file)], 2, "a-file is a file, not a folder"),
        (m + ["--prefix-cache", str(a_file)], 2, "--prefix-cache .*a-file is a file, not a folder"),
        (m + ["--prefix-cache", str(fifo)], 2, "--prefix-cache .*fifo is a FIFO or a socket, not a folder"),
        (m + ["--out", str(fifo)], 2, "--out .*fifo is a FIFO or a socket, not a folder"),
        (["--summarize", str(garbage)], "error", r"garbage/results.jsonl, line 1: not a record of this experiment "
                                                 r"\(no 'model' field\)"),
        (m + ["--earlier", str(binary)], 2, "--earlier only adds to a --summarize"),
        (["--summarize", str(garbage.parent), "--earlier", str(tmp_path / "no.md")], 2, "no.md: no such file"),
    ]


def test_bad_command_lines_are_clear_early_errors_and_leave_nothing_behind(tmp_path, capsys):
    for argv, code, message in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        argv = argv + (["--out", str(out)] if "--out" not in argv else [])
        with pytest.raises(SystemExit) as e:
            eval_nih.main(argv)
        text = capsys.readouterr().err + str(e.value.code)
        assert (e.value.code == code) if code == 2 else str(e.value.code).startswith(code), (argv, e.value.code)
        assert re.search(message, text), (argv, text)
        assert not out.exists(), argv  # no empty --out folder left behind


def test_an_unwritable_out_folder_is_refused_before_model_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.os, "access", lambda path, mode: False)  # root writes anywhere: simulate it
    with pytest.raises(SystemExit) as e:
        eval_nih.main(["--model", str(ensure_weights("smollm2")), "--out", str(tmp_path / "ro" / "out")])
    assert e.value.code == 2 and "is not writable" in capsys.readouterr().err


def test_the_default_model_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = parse_args([])
    assert Path(a.model).is_absolute() and Path(a.model) == DEFAULT_MODEL_DIR
