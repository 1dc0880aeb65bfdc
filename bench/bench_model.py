"""
Prefill speed and peak memory of model.py vs transformers on the same weights, side by side in one run.

    python -m bench.bench_model                       # 1K, 4K, 8K tokens; float32 and bfloat16; SmolLM2
    python -m bench.bench_model --long 64k            # also: peak memory of a chunked 64K prefill of model.py
    python -m bench.bench_model --device cuda --lens 4k,16k,64k   # on a GPU (the default where one is present): bfloat16

Each measurement runs in a fresh subprocess so that its peak memory is its own: the process's peak resident memory
(ru_maxrss) on the CPU, torch.cuda.max_memory_allocated on a GPU (weights, cache and activations in both cases).
Times are the median of --repeats runs after one warm-up (on a GPU, timed after a synchronize); the machine is noisy,
so read the ratios, not the seconds. Both sides do the same work: one forward over T tokens that fills a KV cache,
logits for the last position only.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from model import parse_len


# -----------------------------------------------------------------------------
# Devices (bench_dope.py uses these too)


def default_device() -> str:
    """cuda where a GPU is present, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device) -> str:
    """float32 on the CPU (the reference; faster than bfloat16 on this project's CPU); bfloat16 on a GPU, what a
    long-context run uses there."""
    import torch

    return "float32" if torch.device(device).type == "cpu" else "bfloat16"


def synchronize(device):
    """Wait for the device's queued work (a GPU runs asynchronously: a timer must not stop before the work does)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one device between reset() and peak(), in bytes: torch.cuda.max_memory_allocated on CUDA
    (what tensors hold, not the allocator's cache); on the CPU the process's peak resident set size, reset through
    /proc/self/clear_refs where Linux allows it (else the peak since the process started, and per_run is False)."""

    def __init__(self, device):
        import torch

        self.device = torch.device(device)
        self.per_run = True

    def reset(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: reset the peak RSS ("high water mark") to the current RSS
        except OSError:
            self.per_run = False

    def peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            self.per_run = False
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"


def measure(impl, path, T, dtype, repeats, chunk, device="cpu"):
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    cuda = torch.device(device).type == "cuda"
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, min(1000, vocab), (1, T)).to(device)
    if impl == "last-chunk":
        # The peak-memory step of a chunked T-token prefill: the last chunk, attending over a full cache of T
        # positions with a chunk x T mask. The earlier chunks' compute is skipped (the cache holds zeros), so a
        # 64K memory check takes seconds instead of the prefill's many minutes.
        from model import Transformer

        m = Transformer.from_pretrained(path, dtype=dt, device=device)
        ids = ids[:, :chunk]

        def step():
            cache = m.new_cache(1, T)
            for layer in range(m.config.n_layer):  # allocate every layer's full-length cache, as a real prefill has
                z = torch.zeros(1, m.config.n_kv_head, 1, m.config.head_dim, dtype=dt, device=device)
                cache.update(layer, z, z)
                cache.k[layer].normal_(), cache.v[layer].normal_()  # touch it: untouched pages are not resident
            cache.pos = T - chunk
            m(ids, cache=cache)
    elif impl == "model.py":
        from model import Transformer

        m = Transformer.from_pretrained(path, dtype=dt, device=device)

        def step():
            m.prefill(ids, m.new_cache(1, T), chunk=chunk or T)
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa").to(device).eval()

        def step():
            m(ids, use_cache=True, logits_to_keep=1)

    def used():  # bytes: the whole process's peak resident memory (CPU), or all tensors' peak on the GPU
        return torch.cuda.max_memory_allocated(device) if cuda else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    synchronize(device)
    base = torch.cuda.memory_allocated(device) if cuda else used()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            step()
            synchronize(device)
            if i:  # the first run is a warm-up
                times.append(time.perf_counter() - t0)
    peak = used()
    return {"seconds": statistics.median(times), "peak_mb": peak / 2**20, "delta_mb": (peak - base) / 2**20}


def run_child(impl, path, T, dtype, repeats, chunk=None, device="cpu"):
    cmd = [sys.executable, "-m", "bench.bench_model", "--child", json.dumps([impl, path, T, dtype, repeats, chunk, device])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an HF folder (default: SmolLM2 in weights/ next to this script, fetched if needed)")
    p.add_argument("--lens", default="1k,4k,8k")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when a GPU is present, else cpu)")
    p.add_argument("--dtypes", help="comma list (default: float32,bfloat16 on the CPU, bfloat16 on a GPU)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--long", type=parse_len, help="also measure the peak memory of a chunked prefill this long")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return a
    a.device = a.device or default_device()
    a.dtypes = a.dtypes or ("float32,bfloat16" if a.device == "cpu" else default_dtype(a.device))
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.child:
        print(json.dumps(measure(*json.loads(a.child))))
        return
    if a.model is None:  # the packaged default, resolved against the project (not the working directory)
        from tools.setup_weights import ensure_weights

        a.model = str(ensure_weights("smollm2"))
    import torch

    cuda = a.device.startswith("cuda")
    mem = "peak memory allocated on the GPU" if cuda else "peak resident memory of the process"
    print(f"{a.model}, torch {torch.__version__}, {device_name(a.device)}, median of {a.repeats}")
    print(f"{'tokens':>7} {'dtype':>9} | {'model.py s':>10} {'transformers s':>14} {'ratio':>6} | "
          f"{'model.py MB':>11} {'transformers MB':>15}")
    rows = []
    for T in [parse_len(s) for s in a.lens.split(",")]:
        for dtype in a.dtypes.split(","):
            ours = run_child("model.py", a.model, T, dtype, a.repeats, device=a.device)
            ref = run_child("transformers", a.model, T, dtype, a.repeats, device=a.device)
            rows.append({"tokens": T, "dtype": dtype, "model.py": ours, "transformers": ref})
            if "error" in ours or "error" in ref:
                print(f"{T:>7} {dtype:>9} | error: {ours.get('error') or ref.get('error')}")
                continue
            print(f"{T:>7} {dtype:>9} | {ours['seconds']:>10.2f} {ref['seconds']:>14.2f} "
                  f"{ours['seconds'] / ref['seconds']:>6.2f} | {ours['peak_mb']:>11.0f} {ref['peak_mb']:>15.0f}",
                  flush=True)
    print(f"ratio = model.py time / transformers time (<= 1.0: not slower); MB = {mem}")
    long = []
    if a.long:
        for dtype in a.dtypes.split(","):
            r = run_child("last-chunk", a.model, a.long, dtype, 1, 2048, device=a.device)
            long.append({"tokens": a.long, "dtype": dtype, "chunk": 2048, **r})
            print(f"model.py, {a.long}-token chunked prefill (2048-token chunks), {dtype}: the last chunk over the "
                  "full cache " + (r["error"] if "error" in r else
                                   f"takes {r['seconds']:.1f} s, {mem} {r['peak_mb'] / 1024:.2f} GiB"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "device": a.device, "device_name": device_name(a.device),
                       "torch": torch.__version__, "repeats": a.repeats, "memory": mem, "rows": rows,
                       "long": long}, f, indent=1)


if __name__ == "__main__":
    main()
