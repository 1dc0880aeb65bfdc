"""
What DoPE costs: the head-scoring pass and a DoPE forward, each against a plain forward, side by side in one run.

    python bench_dope.py                 # SmolLM2, 8K and 16K tokens, float32, one-pass prefill, median of 3
    python bench_dope.py --lens 4k --repeats 5 --dtype bfloat16 --chunk 2048

Runs are interleaved (plain, scoring, DoPE variants, plain, ...) so that machine noise hits all of them alike; read
the ratios. Targets (issue 3): scoring overhead <= 10% over a plain prefill, a DoPE prefill <= 3% over a plain one.
"""

import argparse
import statistics
import time

import torch

import entropy
from dope import DopePlan, apply_dope, remove_dope
from eval_nih import parse_len
from model import Transformer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an HF folder (default: SmolLM2 in weights/ next to this script, fetched if needed)")
    p.add_argument("--lens", default="8k,16k")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"], help="as eval_nih (default float32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=0, help="prefill chunk; 0 = the whole prompt in one pass, as eval_nih")
    p.add_argument("--k", type=int, default=5, help="heads denoised in the DoPE runs")
    a = p.parse_args()
    if a.model is None:  # the packaged default, resolved against the project (not the working directory)
        from setup_weights import ensure_weights

        a.model = str(ensure_weights("smollm2"))
    print(f"{a.model}, {a.dtype}, chunk {a.chunk or 'one pass'}, {torch.get_num_threads()} threads, median of {a.repeats}")
    print(f"{'tokens':>7} {'plain s':>8} | {'scoring s':>9} {'ratio':>6} | " +
          " | ".join(f"{'DoPE-' + v + ' s':>15} {'ratio':>6}" for v in ("parts", "all", "gaussian")))
    for T in [parse_len(s) for s in a.lens.split(",")]:
        native = 8192
        model = Transformer.from_pretrained(a.model, dtype=getattr(torch, a.dtype),
                                            rope_scaling={"rope_type": "ntk", "factor": T / native} if T > native
                                            else None)
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
        chunk = a.chunk or T
        g = torch.Generator().manual_seed(1)
        heads = sorted({(int(torch.randint(model.config.n_layer, (1,), generator=g)),
                         int(torch.randint(model.config.n_head, (1,), generator=g))) for _ in range(a.k)})

        def plain():
            model.prefill(ids, model.new_cache(1, T), chunk=chunk)

        def scoring():
            entropy.score_model(model, ids, chunk=chunk, progress=False, gram_dtype=torch.float32)  # as eval_nih

        def dope(variant):
            def f():
                apply_dope(model, DopePlan(heads, variant))
                try:
                    plain()
                finally:
                    remove_dope(model)
            return f

        runs = {"plain": plain, "scoring": scoring, **{v: dope(v) for v in ("parts", "all", "gaussian")}}
        times = {name: [] for name in runs}
        with torch.inference_mode():
            plain()  # warm-up
            for _ in range(a.repeats):
                for name, f in runs.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"{T:>7} {med['plain']:>8.1f} | {med['scoring']:>9.1f} {med['scoring'] / med['plain']:>6.3f} | " +
              " | ".join(f"{med[v]:>15.1f} {med[v] / med['plain']:>6.3f}" for v in ("parts", "all", "gaussian")),
              flush=True)
    print(f"ratio = time / plain prefill time. DoPE heads (random, k = {a.k}): the cost does not depend on which.")


if __name__ == "__main__":
    main()
