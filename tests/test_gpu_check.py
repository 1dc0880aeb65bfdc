"""gpu_check.py on a CPU: it refuses to run without CUDA, lists what it would run, and its runner, report, parity step
and estimates work (the steps themselves need a GPU: here they are replaced by small commands)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import ARCHS, Step, estimate

ROOT = Path(__file__).resolve().parents[1]


def test_refuses_without_cuda(tmp_path):
    out = tmp_path / "report.json"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # hides a GPU where there is one
    r = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--work", str(tmp_path / "work")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device" in r.stderr and "nothing was run" in r.stderr
    assert not out.exists() and not (tmp_path / "work").exists()


def test_dry_run_lists_every_step(capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    for s in gpu_check.steps():
        assert s.name in text and " ".join(s.command) in text
    assert "eval_nih.py --len 64k --variant parts --device cuda --out" in text  # the card's command
    assert "tests/test_kernels.py" in text and "bench.bench_rope" in text and "bench.bench_dope --device cuda" in text
    assert "not run unless asked (--only nih_4x" in text  # the 4x run: listed, never part of a plain run


def test_the_4x_run_is_the_declared_command_in_bf16_on_request_only():
    step = next(s for s in gpu_check.steps() if s.name == "nih_4x")
    declared = (ROOT / "docs/RESULTS.md").read_text().split("The 4x run with more needles")[1]
    command = declared.split("```bash")[1].split("```")[0].replace("\\\n", " ").strip().splitlines()[0].split()
    assert command[:2] == ["python", "eval_nih.py"] and command[-2] == "--out"
    assert step.command[2:-6] == command[2:-2]  # the declared flags, in order
    assert step.command[-6:-2] == ["--device", "cuda", "--dtype", "bfloat16"] and step.on_request


def test_unknown_step_is_an_error(capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "kernel_tests,bogus"])
    assert "bogus" in capsys.readouterr().err


def test_runner_writes_one_report(tmp_path, monkeypatch):
    """ok, failing, timed-out and skipped steps, each recorded with its output and the numbers it wrote."""
    monkeypatch.setattr(gpu_check, "cuda_ready", lambda: (True, "a pretend GPU"))
    monkeypatch.setattr("tools.setup_weights.ensure_weights", lambda name: None)
    numbers = tmp_path / "numbers.json"
    py = sys.executable
    plan = [
        Step("ok", "writes numbers", [py, "-c", f"import json; json.dump({{'x': 1}}, open({str(numbers)!r}, 'w')); "
                                            "print('progress 1\\rprogress 2\\rdone')"], 30,
             files={"numbers": str(numbers)}),
        Step("fails", "exits 3", [py, "-c", "import sys; print('boom'); sys.exit(3)"], 30),
        Step("slow", "sleeps past its limit", [py, "-c", "import time; print('start', flush=True); time.sleep(60)"], 2),
        Step("extra", "optional, no time left", [py, "-c", "print('never')"], 30, optional=True),
    ]
    out = tmp_path / "report.json"
    rc = gpu_check.main(["--out", str(out), "--work", str(tmp_path / "work"), "--budget", "50"], plan=plan)
    assert rc == 1
    r = json.loads(out.read_text())
    s = {x["name"]: x for x in r["steps"]}
    assert s["ok"]["ok"] and s["ok"]["data"] == {"numbers": {"x": 1}} and "done" in s["ok"]["output"]
    assert "progress 1" not in s["ok"]["output"], "a progress bar keeps its last state only"
    assert not s["fails"]["ok"] and s["fails"]["rc"] == 3 and "boom" in s["fails"]["output"]
    assert s["slow"]["timed_out"] and not s["slow"]["ok"] and s["slow"]["seconds"] < 30
    assert "start" in s["slow"]["output"]
    assert "skipped" in s["extra"]
    assert r["all_ok"] is False and r["gpu"] == "a pretend GPU" and "torch" in r["environment"]
    assert r["environment"]["sources_sha256"] == gpu_check.sources_digest()
    assert set(r["estimates"]) == set(ARCHS)


def test_parity_step_on_the_cpu():
    """The parity step's plumbing, with the CPU standing in for the GPU: everything must agree exactly."""
    r = gpu_check.parity("cpu", T=64, new_tokens=2, k=3, draws=64)
    assert r["gaussian_equal_fraction"] == 1.0 and r["gaussian_max_abs_diff"] == 0.0
    assert r["logits_max_abs_diff_eager"] == 0.0 and r["head_scores_max_abs_diff"] == 0.0
    assert r["same_heads"] and len(r["heads_cpu"]) == 3 and not r["kernel_used"]
    assert r["generate_parts_same"] and r["generate_gaussian_same"] and len(r["generate_parts_cpu"]) <= 2


def test_estimates_count_the_parameters():
    """The estimate's parameter count: SmolLM2's from model.py (built on meta, no weights), LLaMA-3-8B's published
    8,030,261,248; both differ only by the RMSNorm weights the estimate leaves out."""
    from model import Config, Transformer

    cfg = Config(vocab_size=49152, n_embd=576, n_hidden=1536, n_layer=30, n_head=9, n_kv_head=3, head_dim=64)
    with torch.device("meta"):
        m = Transformer(cfg)
    smol = estimate(ARCHS["SmolLM2-135M"], 65536)
    assert smol["params_total"] == pytest.approx(sum(p.numel() for p in m.parameters()), rel=1e-3)
    llama = estimate(ARCHS["LLaMA-3-8B"], 65536)
    assert llama["params_total"] == pytest.approx(8_030_261_248, rel=1e-4)
    # the arithmetic of docs/PERFORMANCE.md
    assert smol["prefill_flops"] == pytest.approx(1.62e14, rel=0.01)
    assert llama["prefill_flops"] == pytest.approx(2.04e15, rel=0.01)
    assert llama["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 65536 * 2


def test_sources_digest_names_the_code_by_content(tmp_path):
    """The report's sources_sha256: one digest per .py file (top level and tests/) and one over all; it changes when
    any of them changes, and not when other files do."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "model.py").write_text("x = 1\n")
    (tmp_path / "tests" / "test_x.py").write_text("def test(): pass\n")
    (tmp_path / "notes.md").write_text("a")
    a = gpu_check.sources_digest(tmp_path)
    assert set(a["files"]) == {"model.py", "tests/test_x.py"} and len(a["all"]) == 64
    (tmp_path / "notes.md").write_text("b")
    assert gpu_check.sources_digest(tmp_path) == a
    (tmp_path / "tests" / "test_x.py").write_text("def test(): assert 1\n")
    b = gpu_check.sources_digest(tmp_path)
    assert b["all"] != a["all"] and b["files"]["model.py"] == a["files"]["model.py"]
    kernels_py = hashlib.sha256((ROOT / "kernels.py").read_bytes()).hexdigest()
    assert gpu_check.sources_digest()["files"]["kernels.py"] == kernels_py
