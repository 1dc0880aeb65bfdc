"""bench_rope.py's bytes model: the bytes each fused launch must move, counted by hand for known shapes, and the
time it implies at the published bandwidths, printed without a GPU."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench import bench_rope

ROOT = Path(__file__).resolve().parents[1]
# LLaMA-3-8B's attention at 4K in bf16: B = 1, 32 query / 8 KV heads, d = 128, 2 bytes an element
B, H, HKV, T, D, E = 1, 32, 8, 4096, 128, 2
HEAD = T * D * E  # one head's q or k: 1 MiB


def test_plain_rope_with_tables():
    n = bench_rope.launch_bytes(B, H, HKV, T, D, E, "tables")
    assert n["qk"] == 2 * 32 * HEAD + 2 * 8 * HEAD == 83_886_080  # q and k, each read once and written once
    assert n["tables"] == 2 * T * D * 4 == 4_194_304  # float32 cos and sin, (T, d) each
    assert n["small"] == T * 8  # int64 positions
    assert n["total"] == 83_886_080 + 4_194_304 + 32_768 == 88_113_152


def test_plain_rope_from_frequencies():
    n = bench_rope.launch_bytes(B, H, HKV, T, D, E, "freqs")
    assert n["tables"] == 64 * 4  # float32 inverse frequencies (d/2,)
    assert n["total"] == 83_886_080 + 256 + 32_768


@pytest.mark.parametrize("plan", ["parts", "all", "gaussian"])
def test_dope_writes_the_keys_once_per_query_head(plan):
    n = bench_rope.launch_bytes(B, H, HKV, T, D, E, "tables", plan)
    assert n["qk"] == 2 * 32 * HEAD + 8 * HEAD + 32 * HEAD == 109_051_904  # k read per KV head, written per q head
    assert n["small"] == T * 8 + 32 * 4 + 64  # positions, int32 mode vector, int8 band mask
    assert n["total"] == 109_051_904 + 4_194_304 + 32_768 + 192


def test_table_mode_reads_per_head_tables():
    n = bench_rope.launch_bytes(B, H, HKV, T, D, E, "tables", "table-mode", per_head_tables=True)
    assert n["tables"] == 2 * 32 * T * D * 4  # (H, T, d) float32 cos and sin
    assert n["small"] == T * 8  # no mode vector: the tables carry the plan


def test_implied_time_at_the_published_bandwidth():
    a = argparse.Namespace(dtypes="bf16", seq_lens="4096", plans="none", batch=B, heads=H, kv_heads=HKV, head_dim=D)
    rows = list(bench_rope.model_rows(a))
    (_, _, _, source, n, ms), _ = rows
    assert source == "tables" and n == 88_113_152
    assert ms["H100 SXM"] == pytest.approx(88_113_152 / 3.35e12 * 1e3)  # 0.0263 ms
    assert ms["A100 80GB SXM"] == pytest.approx(88_113_152 / 2.04e12 * 1e3)  # 0.0432 ms


@pytest.mark.skipif(bench_rope.torch.cuda.is_available(), reason="checks the output without a GPU")
def test_prints_the_model_without_a_gpu():
    r = subprocess.run([sys.executable, "-m", "bench.bench_rope", "--seq-lens", "4096", "--dtypes", "bf16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "88.1 |           0.0263 |           0.0432" in r.stdout  # plain, tables: MB, H100 ms, A100 ms
    assert r.stdout.rstrip().splitlines()[-1].startswith("no GPU measurement")
