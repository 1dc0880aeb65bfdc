"""kernels.py: the fused Triton RoPE against model.rope_qk, the eager reference (Liger-Kernel's test matrix: odd shapes,
GQA, per-dtype tolerances), every DoPE plan, and a whole tiny model with the kernel on and off; then what a GPU
compiler makes of it (bench/kernel_registers.py): every launch compiled ahead of time for sm_80 and sm_90, no spills,
at most 128 registers.

On a machine without CUDA the kernel runs in Triton's interpreter (numpy, slow: shapes stay small). Triton reads
TRITON_INTERPRET when @triton.jit runs, i.e. when kernels.py is imported, not when triton is imported; so it is set
here before `import kernels`, and if another test module imported kernels first (compiled mode), it is reloaded.
"""

import os

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: kernels.py is optional (pip install triton)")
import triton.language as tl  # noqa: E402

import dope  # noqa: E402
import kernels  # noqa: E402
import model  # noqa: E402
from dope import DopePlan, HeadRope, apply_dope, low_freq_bands, remove_dope  # noqa: E402
from tiny import hf_tiny, ours  # noqa: E402

if DEVICE == "cpu" and not kernels.interpreted():  # imported by an earlier test module without the variable
    kernels = importlib.reload(kernels)
from bench import kernel_registers  # noqa: E402  (after the reload: it reads the kernel from the kernels module)

ROOT = Path(__file__).resolve().parents[1]
# Liger-Kernel's tolerances on values (atol); rtol covers the larger values of the Gaussian tables
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-1, 1e-2)}
LAYER = 3


def qk(B, H, Hkv, T, d, dtype, seed=0):
    """q (B, H, T, d), k (B, Hkv, T, d) laid out as model.py makes them: (B, T, H, d) memory, transposed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, d, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, d, generator=g).transpose(1, 2)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype)


def tables(d, pos, scale=1.0):
    inv_freq = model.inv_freq_default(10000.0, d).to(DEVICE)
    return inv_freq, *model.rope_cos_sin(inv_freq, pos, scale)


def fused(source, q, k, inv_freq, cos, sin, pos, scale, head_rope=None):
    if source == "tables":
        return kernels.rope_qk(q, k, cos, sin, pos, head_rope)
    return kernels.rope_qk_from_freqs(q, k, inv_freq, pos, scale, head_rope)


def assert_same(got, ref, dtype):
    atol, rtol = TOL[dtype]
    for g, r, name in zip(got, ref, "qk"):
        assert g.shape == r.shape and g.dtype == r.dtype, f"{name}: {g.shape} {g.dtype} vs {r.shape} {r.dtype}"
        torch.testing.assert_close(g, r, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def test_available_under_the_interpreter_or_cuda():
    assert kernels.available()
    assert kernels.interpreted() == (os.environ.get("TRITON_INTERPRET") == "1")


# -----------------------------------------------------------------------------
# The kernel against model.rope_qk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("H, Hkv", [(4, 2), (2, 2), (4, 1)], ids=["gqa", "mha", "one_kv"])
@pytest.mark.parametrize("T", [1, 7, 33, 100])
@pytest.mark.parametrize("source", ["tables", "freqs"])
def test_plain_rope_matches_eager(source, T, H, Hkv, d, dtype):
    q, k = qk(2, H, Hkv, T, d, dtype)
    pos = torch.arange(T, device=DEVICE)
    inv_freq, cos, sin = tables(d, pos, 1.25)  # a YaRN-like attention scale inside the tables
    got = fused(source, q, k, inv_freq, cos, sin, pos, 1.25)
    assert_same(got, model.rope_qk(q, k, cos, sin, pos), dtype)


@pytest.mark.parametrize("source", ["tables", "freqs"])
@pytest.mark.parametrize("start", [1000, 2**20 + 3])
@pytest.mark.parametrize("T", [1, 7])
def test_cached_decode_positions(source, T, start):
    """A chunk continuing a cache: tables row t is position pos[t] = start + t, not t."""
    q, k = qk(1, 4, 2, T, 64, torch.float32, seed=1)
    pos = torch.arange(start, start + T, device=DEVICE)
    inv_freq, cos, sin = tables(64, pos)
    got = fused(source, q, k, inv_freq, cos, sin, pos, 1.0)
    assert_same(got, model.rope_qk(q, k, cos, sin, pos), torch.float32)


def test_contiguous_inputs_and_batch():
    q, k = (x.contiguous() for x in qk(3, 4, 2, 9, 64, torch.float32, seed=2))
    pos = torch.arange(9, device=DEVICE)
    _, cos, sin = tables(64, pos)
    assert_same(kernels.rope_qk(q, k, cos, sin, pos), model.rope_qk(q, k, cos, sin, pos), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_rounds_once(dtype):
    """The kernel computes in float32 and rounds once on the store: within half a unit in the last place of the dtype
    of the exact result, which the eager path (tables cast to the dtype, a rounding after each op) is not; hence
    the looser tolerances of the comparisons with eager in fp16/bf16."""
    q, k = qk(1, 4, 2, 33, 64, dtype, seed=3)
    pos = torch.arange(100, 133, device=DEVICE)
    _, cos, sin = tables(64, pos)
    exact = model.rope_qk(q.float(), k.float(), cos, sin, pos)
    got = kernels.rope_qk(q, k, cos, sin, pos)
    # Triton's interpreter converts float32 -> bfloat16 by truncation (triton/runtime/interpreter.py, _convert_float
    # without a rounding mode): one ulp there; a GPU rounds to nearest, half an ulp.
    ulp = 1.0 if dtype == torch.bfloat16 and kernels.interpreted() else 0.5
    for g, e in zip(got, exact):
        torch.testing.assert_close(g.float(), e, atol=1e-6, rtol=ulp * torch.finfo(dtype).eps + 1e-6)


def test_grad_is_refused_and_the_model_runs_eager(monkeypatch):
    """The kernel is forward only and has no eager fallback of its own: it refuses inputs that need gradients, and
    model.use_kernel (the one place that chooses) says no to them, so the model's eager path runs, with a graph."""
    q, k = (x.requires_grad_() for x in qk(1, 4, 2, 7, 64, torch.float32, seed=4))
    pos = torch.arange(7, device=DEVICE)
    _, cos, sin = tables(64, pos)
    with pytest.raises(RuntimeError, match="forward only"):
        kernels.rope_qk(q, k, cos, sin, pos)
    monkeypatch.setattr(model, "USE_KERNEL", True)
    assert not model.use_kernel(q)
    with torch.no_grad():
        assert model.use_kernel(q)
    assert model.use_kernel(q.detach())


def test_kernels_does_not_import_model():
    r = run_python("""
        import sys
        import kernels
        assert "model" not in sys.modules, "kernels.py imported model.py"
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_own_tables_equal_models():
    """Table mode from frequencies builds its tables with kernels.cos_sin_tables: model.rope_cos_sin, bit for bit."""
    pos = torch.arange(2**20, 2**20 + 9, device=DEVICE)
    inv_freq = model.inv_freq_default(10000.0, 64).to(DEVICE)
    for got, ref in zip(kernels.cos_sin_tables(inv_freq, pos, 1.25), model.rope_cos_sin(inv_freq, pos, 1.25)):
        assert torch.equal(got, ref)


# -----------------------------------------------------------------------------
# DoPE inside the kernel (modes) and in table mode (the other options)

# heads 1 and 2 of 4 with 2 KV heads: each KV group has one selected head and one plain head
PLANS = {
    "parts": dict(variant="parts"),
    "all": dict(variant="all"),
    "gaussian": dict(variant="gaussian"),
    "gaussian_sigma": dict(variant="gaussian", sigma=0.5, seed=2**32 - 5),  # seed >= 2^31 after masking
    "parts_zero": dict(variant="parts", zero=True),  # table mode
    "all_zero": dict(variant="all", zero=True),  # table mode
    "gaussian_v2": dict(variant="gaussian", gaussian_form="v2"),  # table mode
    "gaussian_v1": dict(variant="gaussian", gaussian_form="v1"),  # table mode, plus the additive draws
}


def head_rope(name, inv_freq, heads=(1, 2), n_head=4):
    plan = DopePlan([(LAYER, h) for h in heads], **PLANS[name])
    plan.bands = low_freq_bands(inv_freq.cpu(), native_len=64)
    assert plan.bands.any() and not plan.bands.all(), "a real band mask: some bands denoised, some not"
    return HeadRope(plan, LAYER, list(heads), n_head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T, start, d", [(1, 1000, 64), (7, 1000, 128), (33, 0, 64)])
@pytest.mark.parametrize("source", ["tables", "freqs"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_dope_matches_eager(plan, source, T, start, d, dtype):
    q, k = qk(2, 4, 2, T, d, dtype, seed=5)
    pos = torch.arange(start, start + T, device=DEVICE)
    inv_freq, cos, sin = tables(d, pos)
    hr = head_rope(plan, inv_freq)
    in_kernel = kernels.dope_args(hr, 4, d, q.device) is not None
    assert in_kernel == (plan in ("parts", "all", "gaussian", "gaussian_sigma"))
    got = fused(source, q, k, inv_freq, cos, sin, pos, 1.0, hr)
    assert got[1].shape == (2, 4, T, d), "keys come back per query head"
    assert_same(got, model.rope_qk(q, k, cos, sin, pos, hr), dtype)


def test_custom_head_rope_runs_in_table_mode():
    """Any callable (cos, sin, pos) -> (cos, sin, add) works: its per-head tables are read by the kernel."""
    def scaled_heads(cos, sin, pos):  # arbitrary per-head tables: head h scales cos by h + 1 and sin by 1 / (h + 1)
        return (torch.stack([cos * (h + 1) for h in range(4)]), torch.stack([sin / (h + 1) for h in range(4)]), None)

    q, k = qk(1, 4, 1, 7, 64, torch.float32, seed=6)
    pos = torch.arange(7, device=DEVICE)
    _, cos, sin = tables(64, pos)
    assert_same(kernels.rope_qk(q, k, cos, sin, pos, scaled_heads),
                model.rope_qk(q, k, cos, sin, pos, scaled_heads), torch.float32)


def launch_kind(plan, source):
    """The kernel_registers.LAUNCHES row a plan runs as."""
    if plan is None:
        return f"plain, {source}"
    if plan in ("parts", "all"):
        return f"DoPE parts/all, {source}"
    if plan in ("gaussian", "gaussian_sigma"):
        return f"DoPE gaussian, {source}"
    return "per-head tables"


@pytest.mark.parametrize("tile", ["interpreter", "cuda"])
@pytest.mark.parametrize("plan", [None, "parts", "all", "parts_zero", "all_zero", "gaussian_v2", "gaussian_v1"])
def test_fp32_tables_bit_for_bit(plan, tile):
    """fp32 with tables: the kernel does eager's operations in eager's order without FMA, so the results are equal
    bit for bit: plain RoPE, by-parts and by-all inside the kernel, and table mode. (By-Gaussian inside the kernel
    draws in float32, eager in float64; from frequencies, sin/cos may differ in the last bit: those are compared
    within tolerances above.) With the tile a GPU launch uses, T = 37 spans several programs."""
    T, d = 37, 64
    q, k = qk(2, 4, 2, T, d, torch.float32, seed=9)
    pos = torch.arange(500, 500 + T, device=DEVICE)
    inv_freq, cos, sin = tables(d, pos, 1.25)
    hr = plan and head_rope(plan, inv_freq)
    block_t = None
    if tile == "cuda":
        block_t = kernel_registers.example_launch(launch_kind(plan, "tables"), torch.float32, d, 4, 2)[1]["BLOCK_T"]
        assert block_t < T
    got = kernels.rope_qk(q, k, cos, sin, pos, hr, block_t=block_t)
    for g, r in zip(got, model.rope_qk(q, k, cos, sin, pos, hr)):
        assert torch.equal(g, r)


@pytest.mark.parametrize("source", ["tables", "freqs"])
@pytest.mark.parametrize("plan", [None, "parts", "gaussian_sigma", "gaussian_v1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_tiles_match_eager(plan, source, dtype):
    """The tiles a GPU launch uses (smaller than the interpreter's), run under the interpreter: several programs
    along T, d = 128, 3 query heads per KV head."""
    T, d = 37, 128
    q, k = qk(1, 6, 2, T, d, dtype, seed=10)
    pos = torch.arange(1000, 1000 + T, device=DEVICE)
    inv_freq, cos, sin = tables(d, pos)
    hr = plan and head_rope(plan, inv_freq, heads=(1, 3), n_head=6)
    block_t = kernel_registers.example_launch(launch_kind(plan, source), dtype, d, 6, 2)[1]["BLOCK_T"]
    assert block_t < T
    if source == "tables":
        got = kernels.rope_qk(q, k, cos, sin, pos, hr, block_t=block_t)
    else:
        got = kernels.rope_qk_from_freqs(q, k, inv_freq, pos, 1.0, hr, block_t=block_t)
    assert_same(got, model.rope_qk(q, k, cos, sin, pos, hr), dtype)


@pytest.mark.parametrize("plan", [None, "parts", "gaussian"])
def test_head_dim_not_a_power_of_two(plan):
    """d = 80: d/2 = 40 bands in a block of 64, the rest masked."""
    q, k = qk(1, 4, 2, 7, 80, torch.float32, seed=8)
    pos = torch.arange(50, 57, device=DEVICE)
    inv_freq, cos, sin = tables(80, pos)
    hr = plan and head_rope(plan, inv_freq)
    assert_same(kernels.rope_qk(q, k, cos, sin, pos, hr), model.rope_qk(q, k, cos, sin, pos, hr), torch.float32)


@pytest.mark.parametrize("start", [0, 2**26 + 12345])
def test_gaussian_draws_match_dope_within_float32_ulps(start):
    """The in-kernel hash + Box-Muller (float32) gives dope.gaussian's float64 draws to within 3 float32 ulps, also
    past 2^32 / (2 d) positions, where the uint32 counter wraps as dope's masked int64 one does. Reading the tables
    back: q = [1, 0] gives (cos[:d/2], sin[d/2:]), k = [0, 1] gives (-sin[:d/2], cos[d/2:])."""
    T, d = 256, 128
    pos = torch.arange(start, start + T, device=DEVICE)
    plan = DopePlan([(LAYER, 0)], "gaussian", seed=1234)
    one, zero = torch.ones(1, 1, T, d // 2, device=DEVICE), torch.zeros(1, 1, T, d // 2, device=DEVICE)
    qo, ko = kernels.rope_qk(torch.cat((one, zero), -1), torch.cat((zero, one), -1), pos.new_zeros(T, d).float(),
                             pos.new_zeros(T, d).float(), pos, HeadRope(plan, LAYER, [0], 1))
    h = d // 2
    got = {0: torch.cat((qo[0, 0, :, :h], ko[0, 0, :, h:]), -1), 1: torch.cat((-ko[0, 0, :, :h], qo[0, 0, :, h:]), -1)}
    for stream in (0, 1):
        ref = dope.gaussian(1234, LAYER, 0, stream, pos, d).to(DEVICE)
        ulps = (got[stream] - ref).abs() / (torch.finfo(torch.float32).eps * ref.abs().clamp_min(1e-6))
        assert ulps.max() <= 3, f"stream {stream}: {ulps.max():.1f} ulps"


@triton.jit
def _sin_cos_probe(a_ptr, s_ptr, c_ptr, N, BLOCK: tl.constexpr, WHOLE_RANGE: tl.constexpr):
    """kernels._sin_cos (any float32 angle) or kernels._sin_cos_small (|a| <= pi/4) on N angles."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < N, other=0.0)
    if WHOLE_RANGE:
        s, c = kernels._sin_cos(a)
    else:
        s, c = kernels._sin_cos_small(a)
    tl.store(s_ptr + i, s, mask=i < N)
    tl.store(c_ptr + i, c, mask=i < N)


def test_small_angle_sin_cos_within_one_ulp():
    """The polynomials behind the Gaussian draws' cos(2 pi u): sin and cos of the reduced angle a = (w + 0.5) pi/4 /
    2^29, w < 2^29, within 1 float32 ulp of the exact values of the float32 a (2^18 values of w, both ends)."""
    ends = torch.arange(2048)
    w = torch.cat((ends, torch.linspace(0, 2**29 - 1, 2**18 - 4096).long(), 2**29 - 1 - ends))
    a = (w.to(torch.float32) + 0.5) * 1.4629180792671596e-09
    a = a.to(DEVICE)
    s, c = torch.empty_like(a), torch.empty_like(a)
    _sin_cos_probe[(triton.cdiv(a.numel(), 4096),)](a, s, c, a.numel(), BLOCK=4096, WHOLE_RANGE=False)
    for got, ref in ((s, torch.sin(a.double())), (c, torch.cos(a.double()))):
        ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(ref.abs()))  # spacing of floats at ref
        assert ((got.double() - ref).abs() / ulp).max() <= 1.0


def test_rope_angle_sin_cos_over_the_whole_float32_position_range():
    """The from-frequencies launch's sin/cos of m theta_f: within 1.5 float32 ulps of sin, cos of the float32 angle
    (float64 reference) from 0 to 2^24 rad, the largest angle a float32 position can make with theta_f <= 1; among
    them the angles that long contexts reach (10^4-10^6 rad), every float32 just below and above 2^k, angles next to
    multiples of pi/2 (where sin or cos cancels) and the float32 angles closest to them, and negative angles."""
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 2**24, (2**16,), generator=g).to(torch.float32)
    freq = 10000.0 ** (-torch.rand(2**16, generator=g, dtype=torch.float64)).to(torch.float32)
    powers = 2.0 ** torch.arange(-20, 24, dtype=torch.float64)
    near_half_pi = (torch.arange(1, 2**14, dtype=torch.float64) * 1021) * (torch.pi / 2)  # k pi/2, k every 1021
    near_half_pi = near_half_pi[near_half_pi < 2**24].to(torch.float32)
    x = torch.cat((pos * freq, torch.linspace(0, 2**20, 2**15), powers.to(torch.float32),
                   torch.nextafter(powers.to(torch.float32), torch.tensor(0.0)), near_half_pi,
                   torch.nextafter(near_half_pi, torch.tensor(0.0)), torch.nextafter(near_half_pi, torch.tensor(3e7)),
                   -(pos * freq)[:4096], torch.tensor([0.0, 105615.0, 105616.0, 2.0**24 - 1])))
    x = x.to(DEVICE)
    s, c = torch.empty_like(x), torch.empty_like(x)
    _sin_cos_probe[(triton.cdiv(x.numel(), 4096),)](x, s, c, x.numel(), BLOCK=4096, WHOLE_RANGE=True)
    for got, ref, name in ((s, torch.sin(x.double()), "sin"), (c, torch.cos(x.double()), "cos")):
        tiny = torch.finfo(torch.float32).tiny
        ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(ref.abs().clamp_min(tiny)))
        err = (got.double() - ref).abs() / ulp
        assert err.max() <= 1.5, f"{name}: {err.max():.2f} ulps at x = {x[err.argmax()].item()!r}"


# -----------------------------------------------------------------------------
# The whole model with the kernel on and off


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ours(hf_tiny("llama", n_kv=2), tmp_path_factory.mktemp("tiny_kernels")).to(DEVICE)


def forward_steps(net, idx):
    """Logits of a full forward, then of a chunked prefill (two chunks) and two cached decode steps."""
    with torch.no_grad():  # the kernel is forward only: with gradients the eager path would run
        out = [net(idx, all_logits=True)]
        cache = net.new_cache(1, idx.shape[1] + 2)
        out += [net(idx[:, :11], cache=cache, all_logits=True), net(idx[:, 11:], cache=cache, all_logits=True)]
        for tok in (5, 17):
            out.append(net(torch.tensor([[tok]], device=DEVICE), cache=cache))
    return out


@pytest.mark.parametrize("plan", [None, "parts", "all", "gaussian", "gaussian_v1"])
def test_model_with_kernel_equals_without(tiny, plan, monkeypatch):
    idx = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    if plan is not None:
        apply_dope(tiny, DopePlan([(0, 1), (1, 2), (1, 3)], **PLANS[plan]))
    try:
        monkeypatch.setattr(model, "USE_KERNEL", False)
        eager = forward_steps(tiny, idx)
        launches = []
        launch = kernels.launch
        monkeypatch.setattr(kernels, "launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
        monkeypatch.setattr(model, "USE_KERNEL", True)
        fused = forward_steps(tiny, idx)
    finally:
        remove_dope(tiny)
    assert len(launches) == 2 * 5, "the kernel ran in both layers of each of the 5 forwards"
    for f, e in zip(fused, eager):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# Packaging: the CPU path never needs triton; the GPU path compiles without spilling


def run_python(code, **env):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_imports_without_triton():
    r = run_python("""
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch, kernels, model
        assert not kernels.available()
        model.USE_KERNEL = True  # asked for, but not there: the eager path (the same math) runs
        assert not model.use_kernel(torch.zeros(1))
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_cuda_tile_is_the_same_for_every_length():
    """On a GPU the launch picks one tile per kind of launch and head width, whatever T is (a long prompt, a short
    chunk, a decode step): the compile test below, which builds its launches at T = 16, covers every launch."""
    for name in kernel_registers.LAUNCHES:
        for d in (64, 128):
            tiles = {kernel_registers.example_launch(name, torch.bfloat16, d, 32, 8, T=T, device="meta")[1]["BLOCK_T"]
                     for T in (1, 7, 16, 100, 4096, 65536)}
            assert len(tiles) == 1, (name, d, tiles)


@pytest.fixture(scope="module")
def compiled():
    """`python -m bench.kernel_registers --json` once for the module: every launch compiled ahead of time for sm_80 and
    sm_90 with triton's ptxas (no GPU needed), registers and stack read from each cubin with cuobjdump."""
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "bench.kernel_registers", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 3:  # kernel_registers.nvidia_tools(): no NVIDIA backend, ptxas or cuobjdump in this triton
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout)
    print(f"\n{kernel_registers.format_resources(rows)}\n{len(rows)} compiled launches x 2 targets in "
          f"{time.perf_counter() - t0:.0f} s")
    return rows


def test_compile_covers_every_launch(compiled):
    """9 kinds of launch x 3 dtypes x d in {64, 128}; the group sizes of SmolLM2-135M (9 / 3 heads), Qwen2.5-0.5B
    (14 / 2) and LLaMA-3-8B (32 / 8) compile to one kernel each (G is a runtime argument)."""
    got = {(r["launch"], r["dtype"], r["d"]) for r in compiled}
    assert got == {(n, dt, d) for n in kernel_registers.LAUNCHES for dt in ("fp32", "fp16", "bf16") for d in (64, 128)}
    assert len(compiled) == len(got), "one compiled kernel per launch, dtype and d"
    assert all(r["groups"] == [3, 7, 4] for r in compiled)


def test_compiled_kernel_does_not_spill(compiled):
    """No launch spills to local memory (stack 0) or needs more than 128 registers per thread, on sm_80 and sm_90.
    Interpreter tests cannot see this: it is what a GPU compiler makes of the kernel."""
    bad = [r for r in compiled for a in ("sm80", "sm90") if r[a]["stack"] != 0 or r[a]["registers"] > 128]
    assert not bad, "spills or > 128 registers:\n" + kernel_registers.format_resources(bad)
