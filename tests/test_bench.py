"""bench_model.py and bench_dope.py: device and dtype defaults, peak memory, and a tiny run on the CPU."""

import json

import pytest
import torch

from bench import bench_dope
from bench import bench_model
from tiny import hf_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bench")
    hf_tiny("llama", n_kv=2).save_pretrained(path)
    return str(path)


def test_device_and_dtype_defaults():
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert bench_model.default_device() == here
    assert bench_dope.parse_args([]).device == bench_model.parse_args([]).device == here
    cpu_d, cpu_m = bench_dope.parse_args(["--device", "cpu"]), bench_model.parse_args(["--device", "cpu"])
    assert cpu_d.dtype == "float32" and cpu_m.dtypes == "float32,bfloat16"  # the CPU defaults, unchanged
    gpu_d, gpu_m = bench_dope.parse_args(["--device", "cuda"]), bench_model.parse_args(["--device", "cuda"])
    assert gpu_d.dtype == "bfloat16" and gpu_m.dtypes == "bfloat16"
    assert bench_dope.parse_args(["--device", "cuda", "--dtype", "float32"]).dtype == "float32"


PEAK_CHECK = """
import torch
from bench import bench_model
mem = bench_model.PeakMemory("cpu")
mem.reset()
before = mem.peak()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
grown = mem.peak() - before
del x
if mem.per_run:
    assert grown >= 48 * 2**20, grown
    mem.reset()
    assert mem.peak() < before + grown  # the reset forgot the freed tensor
print("per_run" if mem.per_run else "whole process")
"""


def test_peak_memory_on_the_cpu():
    """In a fresh process, as bench_model measures: in a long one, memory freed by earlier work and still resident
    can serve the allocation without any growth of the resident set."""
    import subprocess
    import sys
    from pathlib import Path

    project = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", PEAK_CHECK], cwd=project, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_bench_dope_runs_on_the_cpu(tiny_dir, tmp_path, capsys):
    out = tmp_path / "dope.json"
    bench_dope.main(["--model", tiny_dir, "--lens", "256", "--repeats", "1", "--device", "cpu", "--json", str(out),
                     "--self-extend", "16,16"])  # the tiny model's native 32 tokens: (32 - 16) 16 + 16 = 272 fit
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["dtype"] == "float32" and len(r["rows"]) == 1
    row = r["rows"][0]
    kinds = {"plain", "scoring", "probe", "parts", "all", "gaussian", "yarn", "selfextend"}
    assert row["self_extend"] == [16, 16]
    assert set(row["median_s"]) == kinds and set(row["peak_mb"]) == kinds
    assert all(v > 0 for v in row["peak_mb"].values())
    assert "peak MB" in capsys.readouterr().out


def test_bench_dope_times_the_gram_sums_alone(tiny_dir, tmp_path, capsys):
    """--gram reads only the config, and times one product per head against gram_sum's blocks on the same q and k
    (T = 2.5 blocks: whole blocks and a tail), whose Grams agree to float32 rounding."""
    out = tmp_path / "gram.json"
    import entropy

    T = entropy.GRAM_ROWS * 5 // 2
    bench_dope.main(["--model", tiny_dir, "--gram", "--lens", str(T), "--repeats", "1", "--device", "cpu",
                     "--json", str(out)])
    r = json.loads(out.read_text())
    row = r["rows"][0]
    assert r["gram_rows"] == entropy.GRAM_ROWS and row["tokens"] == T and set(row["median_s"]) == {"per_head", "blocks"}
    assert 0 < row["max_rel_diff"] < 1e-5 and row["ratio"] > 0
    assert "blocks of" in capsys.readouterr().out


def test_bench_model_measures_on_the_cpu(tiny_dir):
    r = bench_model.measure("model.py", tiny_dir, 256, "float32", 1, None, "cpu")
    assert r["seconds"] > 0 and r["peak_mb"] > 0
    r = bench_model.measure("last-chunk", tiny_dir, 4096, "float32", 1, 2048, "cpu")
    assert r["seconds"] > 0
