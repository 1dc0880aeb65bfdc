"""
What exact reuse saves in the needle-in-a-haystack grid: the same prompts and methods run three ways, side by side in
one process, and their answers compared.

    python -m bench.bench_reuse                      # 4K tokens, 6 depths, baseline + by-parts and by-Gaussian, both readings
    python -m bench.bench_reuse --len 8k --depths 11

- none:   every method prefills every prompt from scratch;
- layers: a DoPE head set starts at its first denoised layer from the baseline's hidden state (per prompt);
- prefix: on top of that, each head set prefills the shared haystack once and every prompt only its tail.

For each it prints the work in full prefills (budget.plan_work's cost model: matmuls + causal attention) and the
wall-clock seconds, and checks every answer against the from-scratch one: the greedy tokens (any that differ are
printed) and the largest log p difference.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from nih import budget
import eval_nih
from eval_nih import PromptBuilder, Selector, answer_and_decode, calibrate, methods_for
from model import Config, Tokenizer, read_json
from nih.models import load_model
from nih.records import identity, model_id
from nih.reuse import MODES, run_prompts
from tools.setup_weights import ensure_weights


def run_grid(model, tok, prompts, methods, reuse, args, stop):
    def decode(p, head_set, cache, logits):
        return answer_and_decode(model, head_set, cache, logits, tok.encode(" " + p.value),
                                 torch.tensor([p.ids], device=args.device), args.max_new_tokens, stop, args.seed)

    t0 = time.time()
    out = {(d, t, m.name): o for (d, t), m, o in
           run_prompts(model, [((d, t), p, methods) for d, t, p in prompts], decode, extra=args.max_new_tokens + 16,
                       chunk=args.chunk, reuse=reuse, device=args.device, seed=args.seed)}
    return out, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", default="4k")
    p.add_argument("--depths", type=int, default=6)
    p.add_argument("--variant", default="parts,gaussian")
    p.add_argument("--order", default="asc,flat")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the modes, interleaved (median reported)")
    p.add_argument("--reuse", default="none,layers,prefix", help="the modes to run (none always runs: the reference)")
    a = p.parse_args()
    args = eval_nih.parse_args(["--len", a.len, "--depths", str(a.depths), "--variant", a.variant, "--order", a.order])
    length = args.len[0]
    path = ensure_weights()  # the packaged default model
    tok = Tokenizer(path)
    model, factor = load_model(path, length, Config.from_hf(read_json(path / "config.json")).max_pos, args)
    builder = PromptBuilder(tok, eval_nih.FILLER, model.config.bos_token_id)
    stop = eval_nih.stop_tokens(tok, model.config)
    out = Path(__file__).resolve().parent.parent / "results" / "bench_reuse"
    out.mkdir(parents=True, exist_ok=True)
    calib = calibrate(model, builder, length, 0, args, out, identity(args, model_id(path), eval_nih.FILLER,
                                                                      factor))
    methods = methods_for(Selector(calib), args, model.config.n_layer, model.config.n_head, length, 0)
    prompts = sorted(eval_nih.setting_prompts(builder, length, 0, args), key=lambda x: -x[2].needle_at)
    print(f"{length} tokens, {len(prompts)} prompts x {len(methods)} methods "
          f"({', '.join(m.name for m in methods)}), {args.dtype} on {args.device}")
    modes = ["none"] + [r for r in a.reuse.split(",") if r != "none"]
    if not set(modes) <= set(MODES):
        p.error(f"--reuse {a.reuse!r}: expected a comma-separated subset of {','.join(MODES[::-1])}")
    times, results = {r: [] for r in modes}, {}
    for _ in range(a.repeats):
        for reuse in times:
            results[reuse], secs = run_grid(model, tok, prompts, methods, reuse, args, stop)
            times[reuse].append(secs)
    ref = results["none"]
    print("| reuse | work (full prefills) | wall-clock s | vs none | answers equal | max abs log p diff |\n"
          "|---|---|---|---|---|---|")
    base, notes = statistics.median(times["none"]), []
    for reuse, ts in times.items():
        work = budget.plan_work(model.config, methods, prompts, length, reuse, args.max_new_tokens + 16)
        diff = max(abs(results[reuse][c]["logprob"] - o["logprob"]) for c, o in ref.items())
        other = [c for c, o in ref.items() if results[reuse][c]["new"] != o["new"]]
        for c in other:  # name every answer that differs, with both token lists: a tie broken the other way or a bug
            notes.append(f"{reuse}: depth {c[0]:.0%}, {c[2]}: {results[reuse][c]['new']} against {ref[c]['new']} "
                         f"from scratch (log p {results[reuse][c]['logprob']:.6f} against {ref[c]['logprob']:.6f})")
        print(f"| {reuse} | {work:.1f} | {statistics.median(ts):.0f} | {statistics.median(ts) / base:.2f} | "
              f"{'yes' if not other else f'NO ({len(other)} of {len(ref)})'} | {diff:.1e} |")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
