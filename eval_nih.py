"""
Needle in a haystack with DoPE (Xiong et al., arXiv 2511.09146, Sec. 5 / Table 1), from calibration to a heatmap.

    python eval_nih.py --len 64k --variant parts
    python eval_nih.py --len 8k,16k --variant none,parts,all,gaussian --noisy 4 --depths 5

For each length: (1) calibrate: score every (layer, head) on a calibration prompt of the target length with its own
needle (never a test prompt) and pick the heads each variant denoises; (2) for each depth, build a prompt of exactly
that many tokens, run the baseline and each DoPE variant (greedy, stop at a newline), score by exact match of the
needle's number (RULER's string match: no judge model); (3) append one JSON record per cell to results.jsonl as it
finishes, so an interrupted run resumes where it stopped; (4) print a table and save a depth x variant heatmap.

Defaults follow shared/DOPE_METHOD.md Sec. 6 (the paper's best 64K rows of Table 1): query, post_ntk, truncated
entropy r = 1, 5 heads, ascending (original 64K row), and with --noisy, by-all uses key, post_ntk, r = 8, 1 head,
descending (noisy 64K row). Every one is a flag. Beyond the native context the paper's Dynamic NTK is on by default.
"""

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import entropy
from dope import DopePlan, apply_dope, remove_dope
from model import Tokenizer, Transformer
from stats import paired, wilson

DEFAULT_MODEL = "weights/SmolLM2-135M-Instruct"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "  # RULER's noise
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
KEYS = ["the blue whale", "the silent harbor", "the copper kettle", "the northern orchard", "the paper lantern",
        "the winter falcon", "the velvet staircase", "the amber compass", "the hidden meadow", "the iron violin"]
CALIB_KEY = "the calibration lighthouse"  # never used by a test prompt
VARIANTS = ("none", "parts", "all", "gaussian")

# Head-selection rule per variant: the paper's best 64K rows (Table 1; DOPE_METHOD.md Sec. 6).
RULE_ORIGINAL = dict(k=5, criterion="query/post_ntk", metric="trunc", r=1, order="asc")
RULE_NOISY_ALL = dict(k=1, criterion="key/post_ntk", metric="trunc", r=8, order="desc")


# -----------------------------------------------------------------------------
# Lengths and prompts


def parse_len(s: str) -> int:
    """'4k' -> 4096, '16K' -> 16384, '3000' -> 3000 (k = 1024)."""
    t = s.strip().lower()
    try:
        n = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"length {s!r} is not a token count like 4k, 16k, 64k or 3000") from None
    if n < 256:
        raise argparse.ArgumentTypeError(f"length {s!r} is too short for a haystack (at least 256 tokens)")
    return n


@dataclass
class Prompt:
    ids: list
    key: str
    value: str
    depth: float  # requested, in [0, 1]
    needle_at: int  # token index where the needle starts
    actual_depth: float  # where it landed within the haystack, after snapping to a sentence boundary


class PromptBuilder:
    """Token-exact prompts: chat template + haystack with a needle + question + answer prefix = exactly `length`
    tokens. The pieces are tokenized separately and the haystack is cut at the token level, which makes the length
    exact without RULER's binary search over the filler text."""

    def __init__(self, tok: Tokenizer, haystack_text: str = FILLER, sink_id: int | None = None, needle: str = NEEDLE,
                 question: str = QUESTION, answer_prefix: str = ANSWER_PREFIX):
        if "{value}" not in needle:
            raise ValueError(f"the needle template {needle!r} must contain {{value}} (and usually {{key}})")
        self.tok, self.sink_id = tok, sink_id
        self.needle, self.question, self.answer_prefix = needle, question, answer_prefix
        self.unit = tok.encode(haystack_text)
        if len(self.unit) < 8:
            raise ValueError("the haystack text is too short")
        # sentence boundaries: positions right after a token that ends a sentence
        self.unit_bounds = [i + 1 for i, t in enumerate(self.unit) if tok.decode([t]).rstrip().endswith((".", "!", "?"))]

    def haystack(self, n: int):
        reps = n // len(self.unit) + 1
        bounds = [0] + [r * len(self.unit) + b for r in range(reps) for b in self.unit_bounds]
        return (self.unit * reps)[:n], [b for b in bounds if b <= n]

    def build(self, length: int, depth: float, key: str, value: str, noisy: int = 0) -> Prompt:
        """noisy: that many sink tokens (the model's BOS) right after the needle, the paper's noisy setup."""
        marker = "\x00HAYSTACK\x00"
        chat = self.tok.chat([{"role": "user", "content": marker + "\n\n" + self.question.format(key=key)}])
        before, after = chat.split(marker)
        head = self.tok.encode(before)
        tail = self.tok.encode(after + self.answer_prefix.format(key=key))
        needle = self.tok.encode(" " + self.needle.format(key=key, value=value) + " ")
        if noisy and self.sink_id is None:
            raise ValueError("--noisy needs a BOS token id in config.json")
        sinks = [self.sink_id] * noisy
        n = length - len(head) - len(tail) - len(needle) - len(sinks)
        if n < 16:
            raise ValueError(f"length {length} leaves no room for a haystack (template, question and needle take "
                             f"{length - n} tokens)")
        hay, bounds = self.haystack(n)
        at = min(bounds, key=lambda b: (abs(b - depth * n), b))  # nearest sentence boundary to the depth
        ids = head + hay[:at] + needle + sinks + hay[at:] + tail
        assert len(ids) == length, (len(ids), length)
        return Prompt(ids, key, value, depth, len(head) + at, at / n)


def needle_value(seed: int, *parts) -> str:
    """A 7-digit number, deterministic per (seed, length, depth, trial)."""
    return str(random.Random(f"{seed}|" + "|".join(map(str, parts))).randint(1_000_000, 9_999_999))


def score(answer: str, expected: str) -> int:
    """RULER's string match: 1 if the expected number appears in the answer."""
    return int(expected in answer)


# -----------------------------------------------------------------------------
# Calibration and head selection


def rule_for(variant: str, args) -> dict:
    """The head-selection rule of a variant: the paper's default, overridden by any flag the user gave."""
    base = dict(RULE_NOISY_ALL if (variant == "all" and args.noisy) else RULE_ORIGINAL)
    for k in base:
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    return base


def calibrate(model, builder, length, args, out: Path):
    """Scores of every criterion's Grams on the calibration prompt, cached in out/calib_<length>.pt."""
    path = out / f"calib_{length}_noisy{args.noisy}.pt"
    if path.exists():
        return torch.load(path)
    p = builder.build(length, 0.5, CALIB_KEY, needle_value(args.seed, "calib", length), args.noisy)
    t0 = time.time()
    # float32 per-chunk Gram products summed in float64: within 1e-6 of all-float64 scores, about half the cost
    grams = entropy.score_model(model, torch.tensor([p.ids]), chunk=min(args.chunk, length), gram_dtype=torch.float32)
    saved = {"grams": grams, "seconds": time.time() - t0}
    torch.save(saved, path)
    return saved


def plan_for(variant, calib, args, length, out: Path):
    if variant == "none":
        return None, None
    rule = rule_for(variant, args)
    scores = entropy.head_scores(calib["grams"][rule["criterion"]], rule["metric"], rule["r"])
    heads = entropy.select_heads(scores, rule["k"], rule["order"])
    label = f"{rule['metric']} r={rule['r']} ({rule['criterion']})"
    entropy.plot_scores(scores, heads, out / f"heads_{length}_{variant}.png",
                        title=f"{args.model_name} at {length} tokens: heads for DoPE-{variant}", label=label)
    (out / f"heads_{length}_{variant}.json").write_text(json.dumps(
        {"rule": rule, "heads": heads, "scores": [scores[h].item() for h in heads]}, indent=1) + "\n")
    return DopePlan(heads, variant, seed=args.seed), rule


# -----------------------------------------------------------------------------
# The run


def estimate(model, length, args):
    """Bytes the KV cache, the chunk's mask and activations need, and whether they fit in available memory."""
    c, b = model.config, torch.finfo(model.embed_tokens.weight.dtype).bits // 8
    # keys and values; a layer with DoPE heads stores them per query head (at most k such layers)
    k = max([rule_for(v, args)["k"] for v in args.variant if v != "none"] or [0])
    kv = 2 * c.head_dim * length * b * (c.n_layer * c.n_kv_head + min(k, c.n_layer) * (c.n_head - c.n_kv_head))
    chunk = min(args.chunk, length)
    act = chunk * length * b + 8 * chunk * max(c.n_hidden, c.n_embd) * 4  # mask + MLP activations
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    need = kv + act + weights
    avail = _available_memory()
    return need, avail


def _available_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def load_done(results: Path) -> dict:
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[r["cell"]] = r
    return done


def run(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(args.model)
    dtype = getattr(torch, args.dtype)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    native = cfg.get("max_position_embeddings", 2048)
    sink_id = cfg.get("bos_token_id")
    haystack = Path(args.haystack_file).read_text() if args.haystack_file else FILLER
    builder = PromptBuilder(tok, haystack, sink_id, args.needle, args.question, args.answer_prefix)
    results = out / "results.jsonl"
    done = load_done(results)
    stop = {tok.eos_id, *(cfg.get("eos_token_id") if isinstance(cfg.get("eos_token_id"), list)
                          else [cfg.get("eos_token_id")])} - {None}
    # The paper stops at a newline: every token whose text holds one is a stop token.
    stop |= {i for t, i in tok.tok.get_vocab().items() if "\n" in tok.decode([i])}

    all_rows = []
    for length in args.len:
        factor = None
        if args.ntk == "auto":
            factor = length / native if length > native else None
        elif args.ntk != "none":
            factor = float(args.ntk)
        scaling = {"rope_type": "ntk", "factor": factor} if factor else {}
        model = Transformer.from_pretrained(args.model, dtype=dtype, rope_scaling=scaling)
        args.model_name = Path(args.model).name
        need, avail = estimate(model, length, args)
        if need > 0.9 * avail:
            raise SystemExit(f"error: a {length}-token run needs about {need / 2**30:.1f} GiB but only "
                             f"{avail / 2**30:.1f} GiB is available; use a shorter --len or a smaller --chunk")
        ntk = f"Dynamic NTK x{factor:.3g} (static, base {model.config.rope_theta:g} -> " \
              f"{model.config.rope_theta * (factor * factor - factor + 1) ** (model.config.head_dim / (model.config.head_dim - 2)):.4g})" \
            if factor else "no scaling"
        print(f"== {args.model_name} at {length} tokens ({length / native:.2f}x native {native}), {ntk}, "
              f"~{need / 2**30:.1f} GiB")
        calib = calibrate(model, builder, length, args, out) if set(args.variant) - {"none"} or args.report_heads \
            else None
        if args.report_heads:
            report_heads(calib, length, args, out)
            continue
        plans = {v: plan_for(v, calib, args, length, out) for v in args.variant}
        for v, (plan, rule) in plans.items():
            if plan is not None:
                print(f"   DoPE-{v}: {rule} -> heads {plan.heads}")
        cells = [(d, t, v) for d in depths(args.depths) for t in range(args.trials) for v in args.variant]
        todo = [c for c in cells if cell_id(args, length, *c) not in done]
        if calib is not None and todo:
            per = calib["seconds"] * len(todo)
            print(f"   {len(todo)} of {len(cells)} cells to run; each about one calibration pass "
                  f"({calib['seconds']:.0f} s): ~{per / 60:.0f} min")
        from tqdm.auto import tqdm

        for depth, trial, variant in tqdm(cells, desc=f"{length} tokens", unit="cell"):
            cid = cell_id(args, length, depth, trial, variant)
            if cid in done:
                all_rows.append(done[cid])
                continue
            key = KEYS[trial % len(KEYS)]
            p = builder.build(length, depth, key, needle_value(args.seed, length, depth, trial), args.noisy)
            plan, rule = plans[variant]
            t0 = time.time()
            if plan is not None:
                apply_dope(model, plan)
            try:
                new = model.generate(torch.tensor([p.ids]), args.max_new_tokens, stop_tokens=stop, chunk=args.chunk)
            finally:
                remove_dope(model)
            answer = tok.decode(new).split("\n")[0]  # stop at a newline, as the paper does
            rec = dict(cell=cid, model=args.model_name, length=length, depth=depth, actual_depth=round(p.actual_depth, 4),
                       trial=trial, key=key, expected=p.value, variant=variant, noisy=args.noisy,
                       ntk_factor=factor, rule=rule, heads=plan.heads if plan else [], answer=answer,
                       score=score(answer, p.value), seconds=round(time.time() - t0, 2), seed=args.seed)
            with results.open("a") as f:  # one line per finished cell: nothing is lost on interruption
                f.write(json.dumps(rec) + "\n")
            done[cid] = rec
            all_rows.append(rec)
    summarize(all_rows, args, out)
    return all_rows


def report_heads(calib, length, args, out: Path):
    """The spectral share p1 per layer (min / median / max over heads) for each criterion, and the heads each
    variant's rule picks: what the detector sees on this model (DOPE_METHOD.md Sec. 2)."""
    print(f"   calibration pass: {calib['seconds']:.0f} s")
    for crit in ("query/post_ntk", "key/post_ntk", "query/pre_ntk"):
        p1 = entropy.head_scores(calib["grams"][crit], "spectral")  # (L, H)
        spike = (p1 >= 1 / math.e).float().mean().item()
        print(f"   p1 = ||S||_2 / tr S, {crit}: {100 * spike:.0f}% of heads in the spike regime p1 >= 1/e")
        print("   layer " + " ".join(f"{i:>4}" for i in range(p1.shape[0])))
        for name, f in (("min", lambda x: x.min(-1).values), ("median", lambda x: x.median(-1).values),
                        ("max", lambda x: x.max(-1).values)):
            print(f"   {name:>5} " + " ".join(f"{v:4.2f}" for v in f(p1).tolist()))
        entropy.plot_scores(p1, [], out / f"p1_{length}_{crit.replace('/', '_')}.png",
                            title=f"{args.model_name} at {length} tokens", label=f"spectral share p1 ({crit})")
    for v in ("parts", "all", "gaussian"):
        plan, rule = plan_for(v, calib, args, length, out)
        print(f"   DoPE-{v}: {rule} -> heads {plan.heads}")
    print(f"   plots: {out}/p1_{length}_*.png, {out}/heads_{length}_*.png")


def depths(n: int):
    return [round(i / (n - 1), 4) for i in range(n)] if n > 1 else [0.5]


def cell_id(args, length, depth, trial, variant):
    rule = rule_for(variant, args) if variant != "none" else {}
    templates = [t for t, d in ((args.needle, NEEDLE), (args.question, QUESTION), (args.answer_prefix, ANSWER_PREFIX))
                 if t != d]  # only non-default templates enter the id, so older results stay valid
    return json.dumps([Path(args.model).name, length, depth, trial, variant, args.noisy, args.ntk, rule, args.seed,
                       args.haystack_file or "filler"] + templates)


# -----------------------------------------------------------------------------
# Output: table and heatmap


def summarize(rows, args, out: Path):
    """Accuracy with a 95% Wilson interval per (length, variant), and each variant against the baseline on the same
    prompts: the difference, the discordant prompts (baseline only / variant only) and the exact sign-test p-value.
    With a handful of yes/no cells per row, most differences are noise: read the intervals."""
    if not rows:
        return
    lengths = sorted({r["length"] for r in rows})
    variants = [v for v in args.variant if any(r["variant"] == v for r in rows)]
    print(f"\naccuracy over {len(depths(args.depths))} depths x {args.trials} trial(s), noisy={args.noisy}; "
          "95% Wilson interval; vs baseline: difference, discordant prompts (baseline-only/variant-only), sign-test p")
    for L in lengths:
        by = {v: {(r["depth"], r["trial"]): r["score"] for r in rows if r["length"] == L and r["variant"] == v}
              for v in variants}
        for v in variants:
            s = list(by[v].values())
            if not s:
                continue
            lo, hi = wilson(sum(s), len(s))
            line = f"{L:>7} {v:>9}: {sum(s):>3}/{len(s):<3} = {100 * sum(s) / len(s):5.1f}% [{100 * lo:4.0f}, {100 * hi:4.0f}]"
            common = sorted(set(by[v]) & set(by.get("none", {})))
            if v != "none" and common:
                c = paired([by["none"][i] for i in common], [by[v][i] for i in common])
                line += f"   {100 * c['diff']:+6.1f} pts, {c['b']}/{c['c']}, p = {c['p']:.2f}"
            print(line)
    plot_heatmap(rows, lengths, variants, args, out / f"heatmap_noisy{args.noisy}.png")


def plot_heatmap(rows, lengths, variants, args, path):
    """gkamradt-style: depth on the y axis, one column per variant (and a panel per length), red = miss."""
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    ds = depths(args.depths)
    cmap = LinearSegmentedColormap.from_list("nih", ["#F0496E", "#EBB839", "#0CD79F"])
    fig = Figure(figsize=(2.2 + 1.3 * len(variants) * len(lengths), 1.5 + 0.35 * len(ds)), layout="constrained")
    axes = fig.subplots(1, len(lengths), squeeze=False)[0]
    for ax, L in zip(axes, lengths):
        grid = [[_mean([r["score"] for r in rows if r["length"] == L and r["variant"] == v and r["depth"] == d])
                 for v in variants] for d in ds]
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                if not math.isnan(val):
                    ax.text(j, i, f"{val:.2g}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(variants)), [("baseline" if v == "none" else v) for v in variants])
        ax.set_yticks(range(len(ds)), [f"{100 * d:.0f}%" for d in ds])
        ax.set_title(f"{L} tokens")
        ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, label="retrieval score")
    fig.suptitle(f"{args.model_name}: needle in a haystack{' (noisy: %d sinks)' % args.noisy if args.noisy else ''}")
    fig.savefig(path, dpi=110)
    print(f"heatmap: {path}")


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=lambda s: [parse_len(x) for x in s.split(",")], default=[parse_len("8k")],
                   help="token length(s), e.g. 4k, 16k, 64k or 3000; comma-separated for several (default 8k)")
    p.add_argument("--variant", type=lambda s: s.split(","), default=["none", "parts"],
                   help="comma-separated from none,parts,all,gaussian; the baseline 'none' always runs first "
                        "(default none,parts)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="an HF Llama/Qwen2 folder (default: packaged SmolLM2)")
    p.add_argument("--depths", type=int, default=11, help="needle depths from 0%% to 100%% (default 11)")
    p.add_argument("--trials", type=int, default=1, help="needles (different keys and numbers) per depth")
    p.add_argument("--noisy", type=int, default=0, help="sink tokens (BOS) right after the needle (default 0)")
    p.add_argument("--ntk", default="auto",
                   help="'auto' (Dynamic NTK to the length when it exceeds the native context), 'none', or a factor")
    p.add_argument("--k", type=int, help="heads to denoise (default: per variant, see module docstring)")
    p.add_argument("--r", type=int, help="truncation rank r of the entropy")
    p.add_argument("--criterion", choices=entropy.CRITERIA, help="where the Grams are taken")
    p.add_argument("--metric", choices=entropy.METRICS, help="head score")
    p.add_argument("--order", choices=entropy.ORDERS, help="asc: lowest scores denoised; desc: highest")
    p.add_argument("--haystack-file", help="a text file of real prose (e.g. Paul Graham essays) instead of filler")
    p.add_argument("--needle", default=NEEDLE, help="needle template with {key} and {value} (a 7-digit number)")
    p.add_argument("--question", default=QUESTION, help="question template with {key}")
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX, help="start of the answer, with {key} (RULER style)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--chunk", type=int, default=2048, help="prefill chunk (memory grows with chunk x length)")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                   help="float32 (default: on CPUs without bf16 matmul units it is the faster one) or bfloat16")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--report-heads", action="store_true",
                   help="only calibrate: print p1 per layer and the heads each rule picks, save the heatmaps")
    p.add_argument("--out", default="results/nih", help="folder for results.jsonl, plots and calibration")
    a = p.parse_args(argv)
    bad = [v for v in a.variant if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    a.variant = ["none"] * ("none" in a.variant) + [v for v in dict.fromkeys(a.variant) if v != "none"]
    if a.depths < 1 or a.trials < 1 or a.noisy < 0:
        p.error("--depths and --trials must be >= 1 and --noisy >= 0")
    return a


if __name__ == "__main__":
    args = parse_args()
    if args.model == DEFAULT_MODEL:
        from setup_weights import ensure_weights

        ensure_weights("smollm2")
    run(args)
