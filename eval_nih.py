"""
Needle in a haystack with DoPE (Xiong et al., arXiv 2511.09146, Sec. 5 / Table 1), from calibration to a heatmap,
with the controls and statistics that tell a DoPE gain from noise.

    python eval_nih.py --len 64k --variant parts
    python eval_nih.py --len 8k,16k --variant none,parts,all,gaussian --noisy 0,4 --depths 11 --trials 5

For each length and noise setting: (1) calibrate: score every (layer, head) on a calibration prompt of the target
length with its own needle (never a test prompt) and pick the heads each variant denoises; (2) for each depth and
needle, build a prompt of exactly that many tokens and run every method on it: the baseline, each DoPE variant with
its rule's heads, and a matched control per variant (the same variant on as many heads drawn at random); greedy,
stop at a newline, score by exact match of the needle's number (RULER's string match: no judge model), and record
the teacher-forced log-probability of the right answer, a continuous measure that moves before a greedy answer
flips; (3) append one JSON record per (prompt, method) to results.jsonl as it finishes, so an interrupted run
resumes where it stopped; (4) print (and save as summary.md) a table with 95% intervals, each method against the
baseline and each DoPE variant against its control on the same prompts, a verdict per variant, and heatmaps.

Defaults follow shared/DOPE_METHOD.md Sec. 6 (the paper's best 64K rows of Table 1): query, post_ntk, truncated
entropy r = 1, 5 heads, ascending (original 64K row), and with --noisy, by-all uses key, post_ntk, r = 8, 1 head,
descending (noisy 64K row). Every one is a flag; --sweep runs a grid of rules and labels the best row for what it is,
the best of a sweep on the test prompts (as the paper's Table 1 rows are). Beyond the native context the paper's
Dynamic NTK is on by default.

Exact reuse of work: a denoised head changes nothing below its layer, so every method starts from the baseline's
hidden state at its first denoised layer and reads the baseline's KV cache below it (bit-identical answers; --no-reuse
recomputes everything).
"""

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import entropy
from dope import DopePlan, apply_dope, remove_dope
from model import Tokenizer, Transformer
from stats import paired, paired_mean, wilson

DEFAULT_MODEL = "weights/SmolLM2-135M-Instruct"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "  # RULER's noise
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
KEYS = ["the blue whale", "the silent harbor", "the copper kettle", "the northern orchard", "the paper lantern",
        "the winter falcon", "the velvet staircase", "the amber compass", "the hidden meadow", "the iron violin"]
CALIB_KEY = "the calibration lighthouse"  # never used by a test prompt
VARIANTS = ("none", "parts", "all", "gaussian")
CONTROLS = ("random", "flip")

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
# Methods: the baseline, DoPE with a rule's heads, and the controls


@dataclass
class Method:
    """One row of the results. role: baseline | rule (the documented default) | random (control: the same variant
    on k heads drawn at random, a fresh draw per prompt) | flip (control: the k heads at the other end of the
    ranking) | sweep (one point of --sweep)."""
    name: str  # "none", "parts", "parts~random", "parts~flip", "parts[key/post_ntk trunc r=8 k=1 desc]"
    variant: str  # none | parts | all | gaussian
    role: str
    rule: dict | None = None
    heads: list = field(default_factory=list)


def rule_for(variant: str, args, noisy: int) -> dict:
    """The head-selection rule of a variant: the paper's default, overridden by any flag the user gave."""
    base = dict(RULE_NOISY_ALL if (variant == "all" and noisy) else RULE_ORIGINAL)
    for k in base:
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    return base


def rule_name(variant: str, rule: dict) -> str:
    return f"{variant}[{rule['criterion']} {rule['metric']} r={rule['r']} k={rule['k']} {rule['order']}]"


def control_heads(n_layer: int, n_head: int, k: int, exclude, seed, *parts) -> list:
    """k (layer, head) pairs drawn uniformly at random among the heads not in `exclude`, reproducible from
    (seed, *parts): each prompt gets its own draw, so a control row averages over as many random head sets as it
    has prompts."""
    exclude = {tuple(h) for h in exclude}
    pool = [(layer, h) for layer in range(n_layer) for h in range(n_head) if (layer, h) not in exclude]
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} control heads from the {len(pool)} heads outside the selection")
    return sorted(random.Random("|".join(map(str, (seed, "control", *parts)))).sample(pool, k))


class Selector:
    """Scores of one calibration (cached per criterion, metric and r) -> the heads of a rule."""

    def __init__(self, calib):
        self.grams, self.cache = calib["grams"], {}

    def scores(self, rule):
        key = (rule["criterion"], rule["metric"], rule["r"])
        if key not in self.cache:
            self.cache[key] = entropy.head_scores(self.grams[rule["criterion"]], rule["metric"], rule["r"])
        return self.cache[key]

    def heads(self, rule):
        return entropy.select_heads(self.scores(rule), rule["k"], rule["order"])


def sweep_rules(args):
    return [dict(k=k, criterion=c, metric=m, r=r, order=o) for c in args.sweep_criterion for m in args.sweep_metric
            for r in (args.sweep_r if m in ("trunc", "renorm") else [1]) for k in args.sweep_k for o in args.sweep_order]


def fixed_methods(sel: Selector, args, noisy: int) -> list:
    """The methods whose heads come from the calibration alone: the same for every test prompt."""
    methods = [Method("none", "none", "baseline")]
    for v in args.variant[1:]:
        rule = rule_for(v, args, noisy)
        methods.append(Method(v, v, "rule", rule, sel.heads(rule)))
        if "flip" in args.controls:
            flip = dict(rule, order="desc" if rule["order"] == "asc" else "asc")
            methods.append(Method(f"{v}~flip", v, "flip", flip, sel.heads(flip)))
    if args.sweep:
        seen = {m.name for m in methods}
        for v in args.variant[1:]:
            for rule in sweep_rules(args):
                name = rule_name(v, rule)
                if name not in seen:
                    seen.add(name)
                    methods.append(Method(name, v, "sweep", rule, sel.heads(rule)))
    return methods


def prompt_methods(fixed: list, cfg, args, length, noisy, depth, trial) -> list:
    """fixed + a random-head control for each rule method, drawn for this prompt."""
    out = list(fixed)
    if "random" in args.controls:
        for m in fixed:
            if m.role == "rule":
                heads = control_heads(cfg.n_layer, cfg.n_head, len(m.heads), m.heads, args.seed, length, noisy,
                                      depth, trial, m.variant)
                out.append(Method(f"{m.variant}~random", m.variant, "random", m.rule, heads))
    return out


# -----------------------------------------------------------------------------
# One prompt, every method


@torch.inference_mode()
def answer_logprob(model, cache, logits, answer: list) -> float:
    """log p(answer tokens | prompt), teacher-forced: logits (1, 1, vocab) are the prompt's last position; one
    forward over answer[:-1] continues the cache, which is then rewound, so greedy decoding can follow."""
    start = cache.pos
    lp = torch.log_softmax(logits[0, -1].double(), -1)[answer[0]]
    if len(answer) > 1:
        more = model(torch.tensor([answer[:-1]], device=logits.device), cache=cache, all_logits=True)  # (1, n-1, V)
        tgt = torch.tensor(answer[1:], device=logits.device)[:, None]
        lp = lp + torch.log_softmax(more[0].double(), -1).gather(-1, tgt).sum()
    cache.rewind(start)
    return float(lp)


def run_methods(model, ids, answer, methods, args, stop) -> dict:
    """Every method on one prompt: {name: dict(new=token ids, logprob=float, seconds, prefill_seconds,
    first_layer, base_prefill_seconds)}. The baseline's prefill always runs (the others start from it); methods
    with the same variant and heads run once.

    Exact reuse of work: a DoPE head changes nothing below its layer, so with args.reuse the baseline's prefill keeps
    the hidden state entering each method's first denoised layer, and the method starts there, reading the
    baseline's KV cache for the layers below (shared, not copied: a method's decode writes each position past the
    prompt before reading it). The answers are bit-identical to a full recomputation (tests/test_eval_nih.py)."""
    T, extra = len(ids), max(args.max_new_tokens, len(answer))
    idx = torch.tensor([ids])
    chunk = args.chunk or T

    def first(m):
        return min(layer for layer, _ in m.heads) if m.heads and args.reuse else 0

    taps = {f: [] for f in {first(m) for m in methods} if f > 0}
    t0 = time.time()
    base = model.new_cache(1, T + extra)
    base_logits = model.prefill(idx, base, chunk, taps=taps or None)
    base_prefill = time.time() - t0
    outs, done = {}, {}
    for m in methods:
        key = (m.variant, tuple(m.heads))
        if key in done:  # e.g. a sweep point that picks the rule's heads
            outs[m.name] = dict(done[key])
            continue
        t0 = time.time()
        if not m.heads:
            cache, logits, f, prefill = base, base_logits, 0, base_prefill
        else:
            f = first(m)
            apply_dope(model, DopePlan(m.heads, m.variant, seed=args.seed))
            cache = model.new_cache(1, T + extra)
            for layer in range(f):
                cache.k[layer], cache.v[layer] = base.k[layer], base.v[layer]
            logits = model.prefill(idx, cache, chunk, from_layer=f, hidden=taps.get(f))
            prefill = time.time() - t0
        try:
            lp = answer_logprob(model, cache, logits, answer)
            new = model.generate(idx, args.max_new_tokens, stop, cache=cache, logits=logits)
        finally:
            remove_dope(model)
        seconds = time.time() - t0 + (base_prefill if not m.heads else 0)
        done[key] = dict(new=new, logprob=lp, seconds=seconds, prefill_seconds=prefill, first_layer=f,
                         base_prefill_seconds=base_prefill)
        outs[m.name] = dict(done[key])
    return outs


# -----------------------------------------------------------------------------
# Calibration


def calibrate(model, builder, length, noisy, args, out: Path):
    """Grams of every criterion on the calibration prompt (its own needle and key), cached in out/."""
    path = out / f"calib_{length}_noisy{noisy}.pt"
    if path.exists():
        return torch.load(path)
    p = builder.build(length, 0.5, CALIB_KEY, needle_value(args.seed, "calib", length), noisy)
    t0 = time.time()
    # float32 per-chunk Gram products summed in float64: within 1e-6 of all-float64 scores, about half the cost
    grams = entropy.score_model(model, torch.tensor([p.ids]), chunk=min(args.chunk or length, length),
                                gram_dtype=torch.float32)
    saved = {"grams": grams, "seconds": time.time() - t0}
    torch.save(saved, path)
    return saved


def save_heads(sel: Selector, methods, length, noisy, args, out: Path):
    """Each rule's heads as JSON and on the layers x heads heatmap of its score."""
    for m in methods:
        if m.role != "rule":
            continue
        scores = sel.scores(m.rule)
        stem = out / f"heads_{length}_noisy{noisy}_{m.variant}"
        entropy.plot_scores(scores, m.heads, stem.with_suffix(".png"),
                            title=f"{args.model_name} at {length} tokens: heads for DoPE-{m.variant}",
                            label=f"{m.rule['metric']} r={m.rule['r']} ({m.rule['criterion']})")
        stem.with_suffix(".json").write_text(json.dumps(
            {"rule": m.rule, "heads": m.heads, "scores": [scores[h].item() for h in m.heads]}, indent=1) + "\n")


def report_heads(calib, length, noisy, args, out: Path):
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
        entropy.plot_scores(p1, [], out / f"p1_{length}_noisy{noisy}_{crit.replace('/', '_')}.png",
                            title=f"{args.model_name} at {length} tokens", label=f"spectral share p1 ({crit})")
    sel = Selector(calib)
    methods = [Method(v, v, "rule", rule_for(v, args, noisy)) for v in ("parts", "all", "gaussian")]
    for m in methods:
        m.heads = sel.heads(m.rule)
        print(f"   DoPE-{m.variant}: {m.rule} -> heads {m.heads}")
    save_heads(sel, methods, length, noisy, args, out)
    print(f"   plots: {out}/p1_{length}_noisy{noisy}_*.png, {out}/heads_{length}_noisy{noisy}_*.png")


# -----------------------------------------------------------------------------
# The run


def estimate(model, length, args):
    """Bytes the run needs at most (two KV caches, taps, activations, weights) and the bytes available."""
    c, b = model.config, torch.finfo(model.embed_tokens.weight.dtype).bits // 8
    k = max([rule_for(v, args, n)["k"] for v in args.variant[1:] for n in args.noisy] +
            ([max(args.sweep_k)] if args.sweep else []) + [0])
    T = length + args.max_new_tokens
    # the baseline's cache and one method's (a layer with DoPE heads stores keys/values per query head)
    kv = 2 * 2 * c.head_dim * T * b * (c.n_layer * c.n_kv_head + min(k, c.n_layer) * (c.n_head - c.n_kv_head))
    chunk = min(args.chunk or length, length)
    mask = chunk * length * b if chunk < length else 0  # the chunked-prefill mask; one pass needs none
    act = chunk * (3 * c.n_hidden + 8 * c.n_embd + 4 * c.n_head * c.head_dim) * 4  # MLP, residual, q/k/v, tables
    taps = min(k + 6, c.n_layer) * length * c.n_embd * b  # hidden states kept for reuse (rule + control layers)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return kv + mask + act + taps + weights, _available_memory()


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


def cell_id(args, length, noisy, depth, trial, m: Method):
    templates = [t for t, d in ((args.needle, NEEDLE), (args.question, QUESTION), (args.answer_prefix, ANSWER_PREFIX))
                 if t != d]  # only non-default templates enter the id
    return json.dumps([Path(args.model).name, length, noisy, depth, trial, m.name, m.rule, args.ntk, args.seed,
                       args.dtype, args.chunk, args.max_new_tokens, args.haystack_file or "filler"] + templates)


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
    eos = cfg.get("eos_token_id")
    stop = {tok.eos_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    # The paper stops at a newline: every token whose text holds one is a stop token.
    stop |= {i for t, i in tok.tok.get_vocab().items() if "\n" in tok.decode([i])}
    args.model_name = Path(args.model).name
    from tqdm.auto import tqdm

    all_rows = []
    for length in args.len:
        factor = None
        if args.ntk == "auto":
            factor = length / native if length > native else None
        elif args.ntk != "none":
            factor = float(args.ntk)
        model = Transformer.from_pretrained(args.model, dtype=dtype,
                                            rope_scaling={"rope_type": "ntk", "factor": factor} if factor else {})
        need, avail = estimate(model, length, args)
        if need > 0.9 * avail:
            raise SystemExit(f"error: a {length}-token run needs about {need / 2**30:.1f} GiB but only "
                             f"{avail / 2**30:.1f} GiB is available; use a shorter --len or a smaller --chunk")
        c = model.config
        ntk = f"Dynamic NTK x{factor:.3g} (static, base {c.rope_theta:g} -> " \
              f"{c.rope_theta * (factor * factor - factor + 1) ** (c.head_dim / (c.head_dim - 2)):.4g})" \
            if factor else "no scaling"
        print(f"== {args.model_name} at {length} tokens ({length / native:.2f}x native {native}), {ntk}, "
              f"~{need / 2**30:.1f} GiB")
        for noisy in args.noisy:
            calib = calibrate(model, builder, length, noisy, args, out) if len(args.variant) > 1 or args.report_heads \
                else None
            if args.report_heads:
                print(f"-- noisy={noisy}")
                report_heads(calib, length, noisy, args, out)
                continue
            sel = Selector(calib) if calib else None
            fixed = fixed_methods(sel, args, noisy)
            save_heads(sel, fixed, length, noisy, args, out)
            for m in fixed:
                if m.role in ("rule", "flip"):
                    print(f"   noisy={noisy} {m.name}: {m.rule} -> heads {m.heads}")
            if args.sweep:
                print(f"   noisy={noisy} sweep: {sum(m.role == 'sweep' for m in fixed)} rules")
            prompts = [(d, t) for d in depths(args.depths) for t in range(args.trials)]
            per_prompt = len(prompt_methods(fixed, c, args, length, noisy, 0.0, 0))
            todo, work = 0, 0.0  # work: in full prefills; a method that starts at layer l costs 1 - l / n_layer
            for d, t in prompts:
                missing = [m for m in prompt_methods(fixed, c, args, length, noisy, d, t)
                           if cell_id(args, length, noisy, d, t, m) not in done]
                todo += len(missing)
                starts = {(m.variant, tuple(m.heads)): min(h[0] for h in m.heads) if m.heads and args.reuse else 0
                          for m in missing}
                work += (1.0 if missing else 0.0) + sum(1 - f / c.n_layer for (_, heads), f in starts.items() if heads)
            if todo and calib is not None:
                print(f"   {todo} of {len(prompts) * per_prompt} cells to run ({len(prompts)} prompts x "
                      f"{per_prompt} methods): about {work:.1f} full prefills of ~{calib['seconds']:.0f} s each "
                      f"(the calibration pass), ~{work * calib['seconds'] / 3600:.1f} h")
            bar = tqdm(total=len(prompts) * per_prompt, desc=f"{length} tokens, noisy={noisy}", unit="cell")
            for depth, trial in prompts:
                methods = prompt_methods(fixed, c, args, length, noisy, depth, trial)
                ids = {m.name: cell_id(args, length, noisy, depth, trial, m) for m in methods}
                missing = [m for m in methods if ids[m.name] not in done]
                if missing:
                    key = KEYS[trial % len(KEYS)]
                    p = builder.build(length, depth, key, needle_value(args.seed, length, depth, trial), noisy)
                    answer = tok.encode(" " + p.value)
                    outs = run_methods(model, p.ids, answer, missing, args, stop)
                    for m in missing:
                        o = outs[m.name]
                        text = tok.decode(o["new"]).split("\n")[0]  # stop at a newline, as the paper does
                        rec = dict(cell=ids[m.name], model=args.model_name, length=length, noisy=noisy, depth=depth,
                                   actual_depth=round(p.actual_depth, 4), trial=trial, key=key, expected=p.value,
                                   method=m.name, variant=m.variant, role=m.role, rule=m.rule, heads=m.heads,
                                   ntk_factor=factor, answer=text, score=score(text, p.value),
                                   logprob=round(o["logprob"], 6), seconds=round(o["seconds"], 2),
                                   prefill_seconds=round(o["prefill_seconds"], 2), first_layer=o["first_layer"],
                                   base_prefill_seconds=round(o["base_prefill_seconds"], 2), seed=args.seed,
                                   dtype=args.dtype)
                        with results.open("a") as f:  # one line per finished cell: nothing is lost on interruption
                            f.write(json.dumps(rec) + "\n")
                        done[ids[m.name]] = rec
                all_rows.extend(done[ids[m.name]] for m in methods)
                bar.update(len(methods))
            bar.close()
    summarize(all_rows, args, out)
    return all_rows


# -----------------------------------------------------------------------------
# Output: table, verdicts, heatmap


def shift(lp: dict) -> str:
    """A log-probability shift counts when its bootstrap interval excludes zero and the sign test agrees (p < 0.05):
    the bootstrap alone is unreliable over a handful of prompts."""
    if lp["p"] < 0.05 and (lp["lo"] > 0 or lp["hi"] < 0):
        return "higher" if lp["lo"] > 0 else "lower"
    return "unchanged"


def verdict(vs_base: dict, vs_ctrl: dict | None) -> str:
    """A difference counts only when its 95% interval excludes zero."""
    if vs_base["lo"] > 0:
        if vs_ctrl is None:
            return "gain over the baseline (no control run)"
        return "gain beyond the random-head control" if vs_ctrl["lo"] > 0 else \
            "gain over the baseline, but not beyond the random-head control"
    if vs_base["hi"] < 0:
        return "harm"
    return "no difference"


def _pct(x):
    return f"{100 * x:+.1f}"


def summarize(rows, args, out: Path) -> list:
    """Per (length, noise): accuracy with a 95% Wilson interval and the mean log-probability of the right answer for
    every method; each method against the baseline on the same prompts (difference with Newcombe's paired 95%
    interval, discordant prompts baseline-only/method-only, exact sign test; the log-probability difference with a
    bootstrap interval), each DoPE variant against its random-head control, and a verdict. With several settings,
    one more table pools their prompts (each prompt is still a pair; a method name then means each setting's own
    rule). Printed and written to out/summary.md. Returns the verdict lines."""
    if not rows:
        return []
    lines, verdicts = [], []
    groups = sorted({(r["length"], r["noisy"]) for r in rows})
    for L, noisy in groups:
        grp = [r for r in rows if r["length"] == L and r["noisy"] == noisy]
        n_prompts = len({(r["depth"], r["trial"]) for r in grp})
        title = (f"{grp[0]['model']}, {L} tokens, noisy={noisy}: {n_prompts} prompts "
                 f"({len({r['depth'] for r in grp})} depths x {len({r['trial'] for r in grp})} needles)")
        lines += _table(grp, title, f"{L} tokens, noisy={noisy}", verdicts)
    if len(groups) > 1:
        title = (f"{rows[0]['model']}, pooled over {len(groups)} settings "
                 f"({', '.join(f'{L}/noisy={n}' for L, n in groups)}): "
                 f"{len({_prompt(r) for r in rows})} prompts; each method is each setting's own rule")
        lines += _table(rows, title, "pooled", verdicts)
    lines += ["", "Verdicts (a difference counts only when its 95% interval excludes zero):", ""]
    lines += [f"- {v}" for v in verdicts]
    text = "\n".join(lines)
    print(text)
    (out / "summary.md").write_text(text.lstrip() + "\n")
    for noisy in sorted({r["noisy"] for r in rows}):
        plot_heatmap([r for r in rows if r["noisy"] == noisy and r["role"] != "sweep"], args,
                     out / f"heatmap_noisy{noisy}.png", noisy)
    return verdicts


def _prompt(r):
    return r["length"], r["noisy"], r["depth"], r["trial"]


def _table(grp, title, label, verdicts) -> list:
    """The markdown table of one group of rows (see summarize); appends its verdicts."""
    lines = ["", f"### {title}", "",
             "| method | role | heads | correct | accuracy [95% CI] | mean log p | vs baseline: diff [95% CI] "
             "(b/c, p) | vs baseline: log p diff [95% CI] | vs its random control: diff [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["method"] for r in grp))
    by = {n: {_prompt(r): r for r in grp if r["method"] == n} for n in names}
    sweep = [n for n in names if by[n] and next(iter(by[n].values()))["role"] == "sweep"]
    best = max(sweep, key=lambda n: (sum(r["score"] for r in by[n].values()),
                                     sum(r["logprob"] for r in by[n].values()))) if sweep else None
    for n in names:
        cells = by[n]
        first = next(iter(cells.values()))
        s = [r["score"] for r in cells.values()]
        lo, hi = wilson(sum(s), len(s))
        role = first["role"] + (" (best of sweep on the test prompts)" if n == best else "")
        heads = str([tuple(h) for h in first["heads"]]) if first["heads"] else "-"
        if len(heads) > 40:
            heads = f"{len(first['heads'])} heads"
        if first["role"] == "random":
            heads = "per prompt"
        elif label == "pooled" and first["heads"]:
            heads = "per setting"
        row = [n, role, heads, f"{sum(s)}/{len(s)}", f"{100 * sum(s) / len(s):.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]",
               f"{sum(r['logprob'] for r in cells.values()) / len(s):.2f}"]
        vs_base = vs_ctrl = None
        common = sorted(set(cells) & set(by.get("none", {})))
        if n != "none" and common:
            vs_base = paired([by["none"][i]["score"] for i in common], [cells[i]["score"] for i in common])
            lp = paired_mean([by["none"][i]["logprob"] for i in common], [cells[i]["logprob"] for i in common])
            row += [f"{_pct(vs_base['diff'])} [{_pct(vs_base['lo'])}, {_pct(vs_base['hi'])}] "
                    f"({vs_base['b']}/{vs_base['c']}, p={vs_base['p']:.2f})",
                    f"{lp['diff']:+.3f} [{lp['lo']:+.3f}, {lp['hi']:+.3f}] ({lp['neg']}-/{lp['pos']}+, "
                    f"p={lp['p']:.2g})"]
        else:
            row += ["", ""]
        ctrl = by.get(f"{first['variant']}~random")
        if first["role"] in ("rule", "sweep") and ctrl:
            both = sorted(set(cells) & set(ctrl))
            vs_ctrl = paired([ctrl[i]["score"] for i in both], [cells[i]["score"] for i in both])
            row.append(f"{_pct(vs_ctrl['diff'])} [{_pct(vs_ctrl['lo'])}, {_pct(vs_ctrl['hi'])}] "
                       f"({vs_ctrl['b']}/{vs_ctrl['c']}, p={vs_ctrl['p']:.2f})")
        else:
            row.append("")
        lines.append("| " + " | ".join(row) + " |")
        if first["role"] == "rule" and vs_base is not None:
            verdicts.append(f"{label}, DoPE-{n}: {verdict(vs_base, vs_ctrl)} "
                            f"(accuracy {_pct(vs_base['diff'])} pts [{_pct(vs_base['lo'])}, {_pct(vs_base['hi'])}]"
                            f"; log p of the answer {shift(lp)}: {lp['diff']:+.3f} [{lp['lo']:+.3f}, "
                            f"{lp['hi']:+.3f}], sign test p = {lp['p']:.2g})")
    # each distinct (prompt, variant, heads) was computed once, whatever its number of rows
    runs = {(*_prompt(r), r["variant"], json.dumps(r["heads"])): r for r in grp if r["role"] != "baseline"}
    if runs:
        spent = sum(r["prefill_seconds"] for r in runs.values())
        full = sum(r["base_prefill_seconds"] for r in runs.values())
        # Per prompt, then the median: one prompt timed while the machine was busy or paused moves a total, not
        # a median.
        per = {}
        for key, r in runs.items():
            s, f = per.get(key[:4], (0.0, 0.0))
            per[key[:4]] = (s + r["prefill_seconds"], f + r["base_prefill_seconds"])
        med = statistics.median(1 - s / f for s, f in per.values())
        lines += ["", f"Prefix reuse: the {len(runs)} DoPE prefills (one per distinct prompt and head set, controls "
                      f"included) took {spent:.0f} s; from scratch they would have taken about {full:.0f} s (the "
                      f"baseline's prefill time of the same prompt each); they started at layer "
                      f"{statistics.mean(r['first_layer'] for r in runs.values()):.1f} on average; median saving per prompt "
                      f"{100 * med:.0f}% (wall-clock times: read them only from a run on an otherwise idle "
                      f"machine)."]
    return lines


def plot_heatmap(rows, args, path, noisy):
    """gkamradt-style: depth on the y axis, one column per method (and a panel per length), red = miss; a cell is
    the fraction of its needles retrieved."""
    if not rows:
        return
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    ds = sorted({r["depth"] for r in rows})
    cmap = LinearSegmentedColormap.from_list("nih", ["#F0496E", "#EBB839", "#0CD79F"])
    fig = Figure(figsize=(2.2 + 1.0 * len(names) * len(lengths), 1.5 + 0.35 * len(ds)), layout="constrained")
    axes = fig.subplots(1, len(lengths), squeeze=False)[0]
    for ax, L in zip(axes, lengths):
        grid = [[_mean([r["score"] for r in rows if r["length"] == L and r["method"] == n and r["depth"] == d])
                 for n in names] for d in ds]
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                if not math.isnan(val):
                    ax.text(j, i, f"{val:.2g}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), [("baseline" if n == "none" else n) for n in names], rotation=30, ha="right")
        ax.set_yticks(range(len(ds)), [f"{100 * d:.0f}%" for d in ds])
        n = len({r["trial"] for r in rows if r["length"] == L})
        ax.set_title(f"{L} tokens ({n} needle{'s' * (n > 1)} per cell)")
        ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, label="fraction retrieved")
    fig.suptitle(f"{args.model_name}: needle in a haystack{' (noisy: %d sinks)' % noisy if noisy else ''}")
    fig.savefig(path, dpi=110)
    print(f"heatmap: {path}")


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def depths(n: int):
    return [round(i / (n - 1), 4) for i in range(n)] if n > 1 else [0.5]


# -----------------------------------------------------------------------------
# Command line


def _list(kind):
    def parse(s):
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=lambda s: [parse_len(x) for x in s.split(",")], default=[parse_len("8k")],
                   help="token length(s), e.g. 4k, 16k, 64k or 3000; comma-separated for several (default 8k)")
    p.add_argument("--variant", type=lambda s: s.split(","), default=["none", "parts"],
                   help="comma-separated from none,parts,all,gaussian; the baseline always runs, first "
                        "(default none,parts)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="an HF Llama/Qwen2 folder (default: packaged SmolLM2)")
    p.add_argument("--depths", type=int, default=11, help="needle depths from 0%% to 100%% (default 11)")
    p.add_argument("--trials", "--needles", type=int, default=1,
                   help="needles per depth: different key phrases and numbers (default 1)")
    p.add_argument("--noisy", type=_list(int), default=[0],
                   help="sink tokens (BOS) right after the needle; comma-separated for several settings, e.g. 0,4 "
                        "(default 0)")
    p.add_argument("--ntk", default="auto",
                   help="'auto' (Dynamic NTK to the length when it exceeds the native context), 'none', or a factor")
    p.add_argument("--k", type=int, help="heads to denoise (default: per variant, see module docstring)")
    p.add_argument("--r", type=int, help="truncation rank r of the entropy")
    p.add_argument("--criterion", choices=entropy.CRITERIA, help="where the Grams are taken")
    p.add_argument("--metric", choices=entropy.METRICS, help="head score")
    p.add_argument("--order", choices=entropy.ORDERS, help="asc: lowest scores denoised; desc: highest")
    p.add_argument("--controls", type=lambda s: [] if s == "none" else s.split(","), default=["random"],
                   help="matched controls per DoPE variant: random (the same variant on k random heads, drawn per "
                        "prompt), flip (the k heads at the other end of the ranking), both as random,flip, or none "
                        "(default random)")
    p.add_argument("--sweep", action="store_true",
                   help="also run every rule of the grid below; the best row is labelled best-of-sweep")
    p.add_argument("--sweep-k", type=_list(int), default=[1, 3, 5])
    p.add_argument("--sweep-r", type=_list(int), default=[1, 8, 32])
    p.add_argument("--sweep-criterion", type=_list(str), default=["query/post_ntk", "key/post_ntk"])
    p.add_argument("--sweep-metric", type=_list(str), default=["trunc"])
    p.add_argument("--sweep-order", type=_list(str), default=["asc", "desc"])
    p.add_argument("--haystack-file", help="a text file of real prose (e.g. Paul Graham essays) instead of filler")
    p.add_argument("--needle", default=NEEDLE, help="needle template with {key} and {value} (a 7-digit number)")
    p.add_argument("--question", default=QUESTION, help="question template with {key}")
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX, help="start of the answer, with {key} (RULER style)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--chunk", type=int, default=0,
                   help="prefill chunk in tokens; 0 (default) runs the prompt in one pass, the fastest on a CPU "
                        "(SDPA's causal kernel skips the masked half); a chunk bounds memory by chunk x length")
    p.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"],
                   help="float32 (default, the reference) or bfloat16 (~20%% faster on CPUs with AVX512-BF16)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-reuse", dest="reuse", action="store_false",
                   help="recompute every method's prefill from scratch instead of reusing the baseline's layers "
                        "below its first denoised one (the answers are identical either way)")
    p.add_argument("--report-heads", action="store_true",
                   help="only calibrate: print p1 per layer and the heads each rule picks, save the heatmaps")
    p.add_argument("--out", default="results/nih", help="folder for results.jsonl, plots and calibration")
    p.add_argument("--summarize", nargs="+", metavar="DIR",
                   help="run nothing: rebuild summary.md and the heatmaps in --out from the results.jsonl of these "
                        "folders (every setting they hold, and all of them pooled)")
    a = p.parse_args(argv)
    bad = [v for v in a.variant if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}: choose from {', '.join(VARIANTS)}")
    a.variant = ["none"] + [v for v in dict.fromkeys(a.variant) if v != "none"]
    bad = [c for c in a.controls if c not in CONTROLS]
    if bad:
        p.error(f"unknown control(s) {bad}: choose from {', '.join(CONTROLS)} or none")
    for name, allowed in (("criterion", entropy.CRITERIA), ("metric", entropy.METRICS), ("order", entropy.ORDERS)):
        bad = [x for x in getattr(a, f"sweep_{name}") if x not in allowed]
        if bad:
            p.error(f"unknown --sweep-{name} {bad}: choose from {', '.join(allowed)}")
    if a.depths < 1 or a.trials < 1 or min(a.noisy) < 0 or a.chunk < 0 or a.max_new_tokens < 1:
        p.error("--depths, --trials and --max-new-tokens must be >= 1, --noisy and --chunk >= 0")
    return a


def summarize_dirs(dirs, args) -> list:
    """--summarize: the summary of finished runs, without loading a model."""
    rows = []
    for d in dirs:
        f = Path(d) / "results.jsonl"
        if not f.is_file():
            raise SystemExit(f"error: {f} does not exist (give folders that an eval_nih.py run wrote to)")
        rows += load_done(f).values()
    if not rows:
        raise SystemExit(f"error: no results in {', '.join(dirs)}")
    args.model_name = rows[0]["model"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return summarize(rows, args, out)


if __name__ == "__main__":
    args = parse_args()
    if args.summarize:
        summarize_dirs(args.summarize, args)
        raise SystemExit(0)
    if args.model == DEFAULT_MODEL:
        from setup_weights import ensure_weights

        ensure_weights("smollm2")
    run(args)
