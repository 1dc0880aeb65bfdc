"""
vLLM (engines/vllm_dope.py) against model.py on a short prompt set, greedy, plain RoPE and a DoPE plan, in one run;
and the KV cache bytes per token that vLLM allocates with and without the plan. Run it with the vLLM environment's
python (`bash .ci/vllm_env` makes it and prints it):

    $(bash .ci/vllm_env) -m bench.bench_vllm       # SmolLM2 fp32, 4 prompts x 128 tokens, 32 new, median of 3
    $(bash .ci/vllm_env) -m bench.bench_vllm --model weights/Qwen2.5-Coder-0.5B-Instruct-fp32 --new 16
    $(bash .ci/vllm_env) -m bench.bench_vllm --grid  # the experiment's short grid: eval_nih.py on each engine

model.py decodes one prompt at a time (its generate() takes one sequence); vLLM answers the prompts one at a time and
as one batch. Repeats are interleaved (model.py, vLLM one by one, vLLM batched, ...) so that machine noise hits all of
them alike, and vLLM's prefix cache is emptied before each of its runs, so that it recomputes every prompt as
model.py does. ratio = model.py seconds / vLLM seconds (above 1: vLLM is faster). --grid times whole eval_nih.py commands instead
(the short grid of tests/test_vllm_dope.py, each run into a fresh --out, so that the model loads, the calibration and
every cell are counted), --engine model against --engine vllm, interleaved, and compares their records. The DoPE heads are the k lowest
truncated entropies of model.py's queries over the first prompt (entropy.py). Both run float32 with the same number of
threads (OMP_NUM_THREADS, default: all cores; vLLM's CPU threads unbound).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))  # before torch and vLLM read it
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import entropy  # noqa: E402
from dope import DopePlan, apply_dope, remove_dope  # noqa: E402
from model import Tokenizer, Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights/SmolLM2-135M-Instruct-fp32"),
                   help="an HF folder (default: %(default)s, made by python -m tools.setup_weights smollm2 --dtype "
                        "fp32 in the project's environment: the vLLM one has no gguf)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--len", type=int, default=128, help="tokens per prompt (slices of docs/METHOD.md)")
    p.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--k", type=int, default=4, help="heads denoised in the DoPE runs")
    p.add_argument("--variant", default="parts", choices=["parts", "all", "gaussian"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grid", action="store_true",
                   help="time the experiment instead: eval_nih.py on the short grid with each engine")
    p.add_argument("--grid-args", default="--len 600 --depths 3 --variant none,all --random-sets 1 "
                   "--max-new-tokens 10", help="eval_nih.py's flags for --grid (default: %(default)s)")
    return p.parse_args(argv)


def grid(a):
    """eval_nih.py --engine model against --engine vllm on one short grid: whole commands, interleaved, a fresh --out
    each time; medians, the ratio and how far the engines' records differ."""
    argv = [sys.executable, str(ROOT / "eval_nih.py"), "--model", a.model, *a.grid_args.split()]
    times, records = {"model": [], "vllm": []}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for engine in times:
                out = Path(tmp) / f"{engine}{i}"
                t = time.perf_counter()
                done = subprocess.run([*argv, "--engine", engine, "--out", str(out)], cwd=ROOT, capture_output=True,
                                      text=True)
                times[engine].append(time.perf_counter() - t)
                if done.returncode:
                    raise SystemExit(f"eval_nih.py --engine {engine} exited with {done.returncode}:\n"
                                     f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
                lines = (out / "results.jsonl").read_text().splitlines()
                records[engine] = {(r["depth"], r["trial"], r["method"]): r for r in map(json.loads, lines)}
    mine, theirs = records["model"], records["vllm"]
    same = sum(theirs[c]["answer"] == r["answer"] for c, r in mine.items() if c in theirs)
    dlp = max((abs(theirs[c]["logprob"] - r["logprob"]) for c, r in mine.items() if c in theirs), default=float("nan"))
    med = {e: statistics.median(t) for e, t in times.items()}
    print(f"eval_nih.py {a.grid_args} on {Path(a.model).name}, {len(mine)} cells, whole commands (loading, "
          f"calibration, every cell), median of {a.repeats}, {os.environ['OMP_NUM_THREADS']} threads")
    print(f"  --engine model {med['model']:.1f} s [{min(times['model']):.1f}, {max(times['model']):.1f}], "
          f"--engine vllm {med['vllm']:.1f} s [{min(times['vllm']):.1f}, {max(times['vllm']):.1f}]: ratio "
          f"{med['model'] / med['vllm']:.2f} (model.py s / vLLM s)")
    print(f"  the same answer in {same} of {len(mine)} cells; log p within {dlp:.1e}")


def main(argv=None):
    a = parse_args(argv)
    if a.grid:
        return grid(a)
    from engines.vllm_dope import VllmDope  # vllm: only with the vLLM environment's python

    model = Transformer.from_pretrained(a.model, dtype=torch.float32)
    ids = Tokenizer(a.model).encode((ROOT / "docs/METHOD.md").read_text())
    if len(ids) < a.prompts * a.len:
        raise SystemExit(f"docs/METHOD.md has {len(ids)} tokens, fewer than {a.prompts} prompts x {a.len}")
    prompts = [ids[i * a.len:(i + 1) * a.len] for i in range(a.prompts)]
    grams = entropy.score_model(model, prompts[0], criteria=("query/post_ntk",), chunk=a.len, progress=False)
    heads = entropy.select_heads(entropy.head_scores(grams["query/post_ntk"]), a.k)
    plan = DopePlan(heads, a.variant)
    llm = dict(max_model_len=a.len + a.new, skip_tokenizer_init=True)
    engines = {"plain": VllmDope(a.model, **llm), a.variant: VllmDope(a.model, plan, **llm)}

    def run_model(setting):
        remove_dope(model)
        if setting != "plain":
            apply_dope(model, plan)
        return [model.generate(torch.tensor([p]), a.new) for p in prompts]

    def run_vllm(setting, batched):
        e = engines[setting]
        e.llm.reset_prefix_cache()
        if batched:
            return [o["tokens"] for o in e.generate(prompts, a.new)]
        return [e.generate([p], a.new)[0]["tokens"] for p in prompts]

    runs = {"model.py": run_model, "vLLM one by one": lambda s: run_vllm(s, False),
            "vLLM batched": lambda s: run_vllm(s, True)}
    for setting in engines:  # warm-up: vLLM's first request is slow
        run_vllm(setting, True)
    times = {(s, r): [] for s in engines for r in runs}
    answers = {}
    for _ in range(a.repeats):
        for s in engines:
            for r, fn in runs.items():
                t = time.perf_counter()
                answers[s, r] = fn(s)
                times[s, r].append(time.perf_counter() - t)
    remove_dope(model)

    print(f"{Path(a.model).name}, float32, {a.prompts} prompts x {a.len} tokens, {a.new} new tokens each, "
          f"{torch.get_num_threads()} threads, median of {a.repeats}; DoPE: {a.variant} on {heads}")
    print(f"{'':>10} | {'model.py s':>10} | {'vLLM one by one s':>17} {'ratio':>6} | {'vLLM batched s':>14} "
          f"{'ratio':>6} | same tokens as model.py")
    for s in engines:
        med = {r: statistics.median(times[s, r]) for r in runs}
        same = sum(answers[s, "model.py"][i] == answers[s, r][i] for r in runs if r != "model.py"
                   for i in range(a.prompts))
        print(f"{s:>10} | {med['model.py']:>10.2f} | {med['vLLM one by one']:>17.2f} "
              f"{med['model.py'] / med['vLLM one by one']:>6.2f} | {med['vLLM batched']:>14.2f} "
              f"{med['model.py'] / med['vLLM batched']:>6.2f} | {same}/{2 * a.prompts}")

    kv = {s: e.kv_bytes() for s, e in engines.items()}
    cfg = model.config
    print(f"KV cache bytes per token, measured on vLLM's tensors ({cfg.n_layer} layers, {cfg.n_head} query / "
          f"{cfg.n_kv_head} KV heads, d = {cfg.head_dim}, float32):")
    layers = sorted({layer for layer, _ in heads})
    plain, planned, first = sum(kv["plain"].values()), sum(kv[a.variant].values()), layers[0]
    print(f"  a plain layer {kv['plain'][first]:.0f}, a DoPE layer {kv[a.variant][first]:.0f} "
          f"({kv[a.variant][first] / kv['plain'][first]:.1f}x); the model: plain {plain:.0f}, with the plan "
          f"({len(layers)} DoPE layers) {planned:.0f} ({planned / plain:.3f}x)")


if __name__ == "__main__":  # vLLM's workers start with spawn and import this file: guard the entry point
    main()
