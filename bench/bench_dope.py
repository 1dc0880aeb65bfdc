"""
What DoPE costs: the head-scoring pass, the attention probe and a DoPE forward, each against a plain forward, side by
side in one run; and the two baselines the experiment sets beside DoPE, YaRN (a RoPE scaling: the same forward) and
Self-Extend (grouped attention past a neighbour window: keys rotated and cached twice, the window's scores explicit),
against the same plain forward.

    python -m bench.bench_dope                 # SmolLM2, 8K and 16K tokens, float32, one-pass prefill, median of 3
    python -m bench.bench_dope --lens 4k --repeats 5 --dtype bfloat16 --chunk 2048
    python -m bench.bench_dope --device cuda --lens 64k   # on a GPU (the default where one is present): bfloat16
    python -m bench.bench_dope --gram --lens 64k         # the scoring pass's Gram sums alone, per-head vs blocks

Runs are interleaved (plain, scoring, DoPE variants, plain, ...) so that machine noise hits all of them alike; read
the ratios. Targets set for this project: scoring overhead <= 10% over a plain prefill, the attention probe (the
last 32 query rows of every head, entropy.attention_probe) <= 10%, a DoPE prefill <= 3% over a plain one. Peak memory is measured per kind of run, where the data is: torch.cuda.max_memory_allocated on a GPU,
the process's peak resident memory on the CPU (reset before each run where Linux allows it). Both include the
weights.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import entropy
from bench.bench_model import PeakMemory, default_device, default_dtype, device_name, synchronize
from dope import VARIANTS, DopePlan, apply_dope, remove_dope
from model import Config, SelfExtend, Transformer, inv_freq_default, parse_len, read_json


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an HF folder (default: SmolLM2 in weights/ next to this script, fetched if needed)")
    p.add_argument("--lens", default="8k,16k")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when a GPU is present, else cpu)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="default: float32 on the CPU (as eval_nih), bfloat16 on a GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk; 0 = the whole prompt in one pass, as eval_nih")
    p.add_argument("--k", type=int, default=5, help="heads denoised in the DoPE runs")
    p.add_argument("--self-extend", default=None, metavar="G,W",
                   help="Self-Extend's group and window (default: SelfExtend.for_length at each length)")
    p.add_argument("--json", help="also write the measurements to this JSON file")
    p.add_argument("--gram", action="store_true",
                   help="time only the scoring pass's Gram sums (GramAccumulator over every layer, every criterion, "
                        "random q and k of the model's shapes; only --model's config.json is read): one product per "
                        "head against entropy.gram_sum's blocks of GRAM_ROWS tokens")
    a = p.parse_args(argv)
    a.device = a.device or default_device()
    a.dtype = a.dtype or default_dtype(a.device)
    return a


def gram_bench(a):
    """Seconds of GramAccumulator for one whole forward (every layer and criterion, float32 Grams as eval_nih scores),
    the Gram of each head as one product against entropy.gram_sum's blocks, interleaved, median of a.repeats."""
    cfg = Config.from_hf(read_json(Path(a.model) / "config.json"))
    L, H, Hkv, d = cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    dtype, rows = getattr(torch, a.dtype), entropy.GRAM_ROWS
    print(f"{Path(a.model).name}'s shapes ({L} layers, {H} query / {Hkv} KV heads, d = {d}), q and k in {a.dtype}, "
          f"Grams in float32, {len(entropy.CRITERIA)} criteria, {device_name(a.device)}, median of {a.repeats}")
    print(f"{'tokens':>7} | {'one product per head s':>22} | {f'blocks of {rows} s':>16} {'ratio':>6} | max rel diff")
    inv = inv_freq_default(cfg.rope_theta, d)
    rows_out = []
    for T in [parse_len(s) for s in a.lens.split(",")]:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, T, H, d, generator=g).to(a.device, dtype).transpose(1, 2)  # laid out as model.py's
        k = torch.randn(1, T, Hkv, d, generator=g).to(a.device, dtype).transpose(1, 2)
        pos = torch.arange(T, device=a.device)

        def run(block_rows):
            acc = entropy.GramAccumulator(L, H, Hkv, d, inv, inv, gram_dtype=torch.float32, device=a.device,
                                          gram_rows=block_rows)
            synchronize(a.device)
            t0 = time.perf_counter()
            for layer in range(L):
                acc(layer, q, k, pos)
            synchronize(a.device)
            return time.perf_counter() - t0, acc.grams()

        with torch.inference_mode():
            run(T), run(rows)  # warm-up
            times, grams = {"per_head": [], "blocks": []}, {}
            for _ in range(a.repeats):
                for name, r in (("per_head", T), ("blocks", rows)):
                    t, grams[name] = run(r)
                    times[name].append(t)
            ref, got = grams["per_head"], grams["blocks"]
            diff = max(((got[c] - ref[c]).abs().max() / ref[c].abs().max()).item() for c in ref)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{T:>7} | {med['per_head']:>22.4f} | {med['blocks']:>16.4f} {med['blocks'] / med['per_head']:>6.3f} | "
              f"{diff:.1e}", flush=True)
        rows_out.append({"tokens": T, "median_s": med, "times_s": times, "ratio": med["blocks"] / med["per_head"],
                         "max_rel_diff": diff})
    print("ratio = blocks time / one-product time; max rel diff: the largest |difference| of a Gram's entries over its "
          "largest entry")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "device": a.device, "device_name": device_name(a.device), "dtype": a.dtype,
                       "gram_rows": rows, "repeats": a.repeats, "rows": rows_out}, f, indent=1)


def main(argv=None):
    a = parse_args(argv)
    if a.model is None:  # the packaged default, resolved against the project (not the working directory)
        from tools.setup_weights import ensure_weights

        a.model = str(ensure_weights("smollm2"))
    if a.gram:
        return gram_bench(a)
    mem = PeakMemory(a.device)
    print(f"{a.model}, {a.dtype}, chunk {a.chunk or 'one pass'}, {device_name(a.device)}, median of {a.repeats}")
    print(f"{'tokens':>7} {'plain s':>8} | {'scoring s':>9} {'ratio':>6} | {'probe s':>8} {'ratio':>6} | " +
          " | ".join(f"{'DoPE-' + v + ' s':>15} {'ratio':>6}" for v in VARIANTS) +
          f" | {'YaRN s':>8} {'ratio':>6} | {'Self-Extend s':>13} {'ratio':>6}")
    rows = []
    for T in [parse_len(s) for s in a.lens.split(",")]:
        native = read_json(Path(a.model) / "config.json").get("max_position_embeddings", 2048)  # the model's own
        model = Transformer.from_pretrained(a.model, dtype=getattr(torch, a.dtype), device=a.device,
                                            rope_scaling={"rope_type": "ntk", "factor": T / native} if T > native
                                            else None)
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
        ids = ids.to(a.device)
        chunk = a.chunk or T
        g = torch.Generator().manual_seed(1)
        heads = sorted({(int(torch.randint(model.config.n_layer, (1,), generator=g)),
                         int(torch.randint(model.config.n_head, (1,), generator=g))) for _ in range(a.k)})

        def plain():
            model.prefill(ids, model.new_cache(1, T), chunk=chunk)

        def scoring():
            entropy.score_model(model, ids, chunk=chunk, progress=False, gram_dtype=torch.float32)  # as eval_nih

        def probe():
            entropy.attention_probe(model, ids, chunk=chunk)  # the last 32 rows, as nih/sinks.py reads them

        def dope(variant):
            def f():
                apply_dope(model, DopePlan(heads, variant))
                try:
                    plain()
                finally:
                    remove_dope(model)
            return f

        def yarn():  # the experiment's YaRN: factor = the context multiple, no fine-tuning
            ntk = model.config.rope_scaling
            model.config.rope_scaling = {"rope_type": "yarn", "factor": max(1.0, T / native)}
            try:
                plain()
            finally:
                model.config.rope_scaling = ntk

        se = SelfExtend(*map(int, a.self_extend.split(","))) if a.self_extend else SelfExtend.for_length(T, native)

        def self_extend():  # on plain RoPE, its own setting
            ntk, model.config.rope_scaling = model.config.rope_scaling, None
            model.use_self_extend(se)
            try:
                plain()
            finally:
                model.use_self_extend(None)
                model.config.rope_scaling = ntk

        runs = {"plain": plain, "scoring": scoring, "probe": probe, **{v: dope(v) for v in VARIANTS}, "yarn": yarn,
                "selfextend": self_extend}
        times = {name: [] for name in runs}
        peaks = {name: 0 for name in runs}
        with torch.inference_mode():
            plain()  # warm-up
            synchronize(a.device)
            for _ in range(a.repeats):
                for name, f in runs.items():
                    mem.reset()
                    t0 = time.perf_counter()
                    f()
                    synchronize(a.device)
                    times[name].append(time.perf_counter() - t0)
                    peaks[name] = max(peaks[name], mem.peak())
        med = {k: statistics.median(v) for k, v in times.items()}
        digits = 1 if med["plain"] >= 10 else 3
        print(f"{T:>7} {med['plain']:>8.{digits}f} | {med['scoring']:>9.{digits}f} "
              f"{med['scoring'] / med['plain']:>6.3f} | {med['probe']:>8.{digits}f} {med['probe'] / med['plain']:>6.3f} | " +
              " | ".join(f"{med[v]:>15.{digits}f} {med[v] / med['plain']:>6.3f}" for v in VARIANTS) +
              f" | {med['yarn']:>8.{digits}f} {med['yarn'] / med['plain']:>6.3f} | "
              f"{med['selfextend']:>13.{digits}f} {med['selfextend'] / med['plain']:>6.3f}", flush=True)
        print(f"{'':>7} peak MB: " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in peaks.items()), flush=True)
        rows.append({"tokens": T, "heads": heads, "self_extend": [se.group, se.window], "median_s": med,
                     "times_s": times,
                     "ratio": {k: v / med["plain"] for k, v in med.items()},
                     "peak_mb": {k: v / 2**20 for k, v in peaks.items()}})
        model = runs = None  # free the weights (the closures hold them) before the next length's
    groups = ", ".join(f"{r['tokens']}: {tuple(r['self_extend'])}" for r in rows)
    print(f"ratio = time / plain prefill time. DoPE heads (random, k = {a.k}): the cost does not depend on which. "
          f"YaRN: factor = tokens / native. Self-Extend on plain RoPE, (G, W) per length: {groups}")
    where = "allocated on the GPU" if mem.device.type == "cuda" else \
        "resident, of the process" + ("" if mem.per_run else " (since it started: this system cannot reset it)")
    print(f"peak MB: memory {where} during each kind of run (the worst of its repeats), weights included")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "device": a.device, "device_name": device_name(a.device), "dtype": a.dtype,
                       "chunk": a.chunk, "repeats": a.repeats, "k": a.k, "memory": where, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
