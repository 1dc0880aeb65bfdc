"""
Prefill speed and peak memory of model.py vs transformers on the same weights, side by side in one run.

    python bench_model.py                       # 1K, 4K, 8K tokens; float32 and bfloat16; SmolLM2
    python bench_model.py --long 64k            # also: peak memory of a chunked 64K prefill of model.py

Each measurement runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own. Times are the
median of --repeats runs after one warm-up; the machine is noisy, so read the ratios, not the seconds.
Both sides do the same work: one forward over T tokens that fills a KV cache, logits for the last position only.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from eval_nih import parse_len


def measure(impl, path, T, dtype, repeats, chunk):
    import torch

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    ids = torch.randint(0, 1000, (1, T))
    if impl == "last-chunk":
        # The peak-memory step of a chunked T-token prefill: the last chunk, attending over a full cache of T
        # positions with a chunk x T mask. The earlier chunks' compute is skipped (the cache holds zeros), so a
        # 64K memory check takes seconds instead of the prefill's many minutes.
        from model import Transformer

        m = Transformer.from_pretrained(path, dtype=dt)
        ids = ids[:, :chunk]

        def step():
            cache = m.new_cache(1, T)
            for layer in range(m.config.n_layer):  # allocate every layer's full-length cache, as a real prefill has
                z = torch.zeros(1, m.config.n_kv_head, 1, m.config.head_dim, dtype=dt)
                cache.update(layer, z, z)
                cache.k[layer].normal_(), cache.v[layer].normal_()  # touch it: untouched pages are not resident
            cache.pos = T - chunk
            m(ids, cache=cache)
    elif impl == "model.py":
        from model import Transformer

        m = Transformer.from_pretrained(path, dtype=dt)

        def step():
            m.prefill(ids, m.new_cache(1, T), chunk=chunk or T)
    else:
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation="sdpa").eval()

        def step():
            m(ids, use_cache=True, logits_to_keep=1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            step()
            if i:  # the first run is a warm-up
                times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": statistics.median(times), "peak_mb": peak / 1024, "delta_mb": (peak - base) / 1024}


def run_child(impl, path, T, dtype, repeats, chunk=None):
    cmd = [sys.executable, __file__, "--child", json.dumps([impl, path, T, dtype, repeats, chunk])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an HF folder (default: SmolLM2 in weights/ next to this script, fetched if needed)")
    p.add_argument("--lens", default="1k,4k,8k")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--long", type=parse_len, help="also measure the peak memory of a chunked prefill this long")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(*json.loads(a.child))))
        return
    if a.model is None:  # the packaged default, resolved against the project (not the working directory)
        from setup_weights import ensure_weights

        a.model = str(ensure_weights("smollm2"))
    import torch

    print(f"{a.model}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"{'tokens':>7} {'dtype':>9} | {'model.py s':>10} {'transformers s':>14} {'ratio':>6} | "
          f"{'model.py MB':>11} {'transformers MB':>15}")
    for T in [parse_len(s) for s in a.lens.split(",")]:
        for dtype in a.dtypes.split(","):
            ours = run_child("model.py", a.model, T, dtype, a.repeats)
            ref = run_child("transformers", a.model, T, dtype, a.repeats)
            if "error" in ours or "error" in ref:
                print(f"{T:>7} {dtype:>9} | error: {ours.get('error') or ref.get('error')}")
                continue
            print(f"{T:>7} {dtype:>9} | {ours['seconds']:>10.2f} {ref['seconds']:>14.2f} "
                  f"{ours['seconds'] / ref['seconds']:>6.2f} | {ours['peak_mb']:>11.0f} {ref['peak_mb']:>15.0f}",
                  flush=True)
    print("ratio = model.py time / transformers time (<= 1.0: not slower); MB = peak resident memory of the process")
    if a.long:
        for dtype in a.dtypes.split(","):
            r = run_child("last-chunk", a.model, a.long, dtype, 1, 2048)
            print(f"model.py, {a.long}-token chunked prefill (2048-token chunks), {dtype}: the last chunk over the "
                  "full cache " + (r["error"] if "error" in r else
                                   f"takes {r['seconds']:.1f} s, peak resident memory {r['peak_mb'] / 1024:.2f} GiB"))


if __name__ == "__main__":
    main()
