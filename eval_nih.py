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
     the spikiest, low-entropy heads or the flattest, highest-rank ones lose their position), and fixed random-head
     controls (seeded per setting, never a rule's head).
  4. the run: the tokens before a needle are the same for every prompt of the setting, so each head set prefills the
     haystack once and every prompt only its tail (exact shared-prefix reuse); a DoPE head set also starts at its
     first denoised layer from the baseline's hidden state (exact layer reuse). Greedy answers stop at a newline and
     are scored by RULER's string match (right when the needle's number appears in the answer); the teacher-forced
     log-probability of the right answer is recorded too. One JSON record per (prompt, method) is appended to
     results.jsonl as soon as that method has answered, so a run interrupted on one machine, even mid-prompt,
     resumes on another from the committed file (and on the same machine also from its shared prefixes, saved in
     OUT/prefix-cache until the setting is complete).
  5. report.py turns the records into tables with 95% intervals, verdicts and heatmaps (summary.md).

The default rule (query, post_ntk, truncated entropy r = 1, 5 heads, ascending) is the paper's best original-64K row;
with --noisy, by-all uses key, post_ntk, r = 8, 1 head, descending (its noisy-64K row). Every part of a rule is a
flag; --sweep runs a grid of rules and labels its best row as what it is, the best of a sweep on the test prompts.
Beyond the native context the paper's static Dynamic NTK is on by default. docs/METHOD.md has the method's reading.
"""

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import entropy
from nih import report
from nih.budget import TAIL_CHUNK, LayerProgress, check_memory, first_layer, plan_work
from nih.report import append_record, load_done
from dope import VARIANTS, DopePlan, apply_dope, remove_dope
from model import Config, Tokenizer, Transformer, check_dynamic_chunks, parse_len, read_json
from tools.setup_weights import DEFAULT_MODEL_DIR, ensure_weights

PROJECT = Path(__file__).resolve().parent
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "  # RULER's noise
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
KEYS = ["the blue whale", "the silent harbor", "the copper kettle", "the northern orchard", "the paper lantern",
        "the winter falcon", "the velvet staircase", "the amber compass", "the hidden meadow", "the iron violin"]
CALIB_KEY = "the calibration lighthouse"  # never used by a test prompt
REUSE = ("prefix", "layers", "none")

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
        check_templates(needle, question, answer_prefix)
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
        assert head == self.head, "the chat header before the haystack must not depend on the key"
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


def check_templates(needle: str, question: str, answer_prefix: str):
    """Each template may use only its own fields; the needle must hold {value} and {key}, the question {key}."""
    import string

    for name, t, need in (("needle", needle, {"key", "value"}), ("question", question, {"key"}),
                          ("answer prefix", answer_prefix, set())):
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
        except ValueError as e:
            raise ValueError(f"the {name} template {t!r} is not a format string: {e}") from None
        allowed = {"key", "value"} if name == "needle" else {"key"}
        if fields - allowed:
            raise ValueError(f"the {name} template {t!r} uses unknown field(s) {sorted(fields - allowed)}: "
                             f"only {{{'}, {'.join(sorted(allowed))}}} are filled in")
        if need - fields:
            raise ValueError(f"the {name} template {t!r} must contain {{{'}, {'.join(sorted(need - fields))}}}")


def needle_value(seed: int, *parts) -> str:
    """A 7-digit number, deterministic per (seed, length, depth, trial)."""
    return str(random.Random(f"{seed}|" + "|".join(map(str, parts))).randint(1_000_000, 9_999_999))


def score(answer: str, expected: str) -> int:
    """RULER's string match: 1 if the expected number appears in the answer."""
    return int(expected in answer)


def depths(n: int):
    return [round(i / (n - 1), 4) for i in range(n)] if n > 1 else [0.5]


def setting_prompts(builder: PromptBuilder, length: int, noisy: int, args) -> list:
    """(depth, trial, Prompt) for every prompt of one setting."""
    return [(d, t, builder.build(length, d, KEYS[t % len(KEYS)], needle_value(args.seed, length, d, t), noisy))
            for d in depths(args.depths) for t in range(args.trials)]


# -----------------------------------------------------------------------------
# What a result depends on: the model by its files' content, the haystack by its text, every flag that moves a logit


def file_digest(*paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_id(folder) -> str:
    """The identity of a checkpoint: its config and every weights file, by content (a different checkpoint in a
    folder of the same name is a different model)."""
    folder = Path(folder)
    files = [folder / "config.json"] + sorted(folder.glob("*.safetensors"))
    return file_digest(*files)


def identity(args, model_fp: str, haystack_text: str, factor) -> dict:
    """Everything a record and a calibration depend on besides the prompt and the method."""
    return dict(model=model_fp, haystack=hashlib.sha256(haystack_text.encode()).hexdigest()[:16], ntk=factor,
                seed=args.seed, dtype=args.dtype, device=args.device.split(":")[0], chunk=args.chunk,
                max_new_tokens=args.max_new_tokens,
                **({"engine": f"transformers/{args.attn}"} if args.engine == "transformers" else {}),
                needle=args.needle, question=args.question, answer_prefix=args.answer_prefix)


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# -----------------------------------------------------------------------------
# 2. Calibration


def calibrate(model, builder, length, noisy, args, out: Path, ident: dict) -> dict:
    """Spectra of every criterion on the calibration prompt (its own needle and key), kept in out/ under a name
    that hashes everything they depend on. A damaged file is reported and recomputed."""
    key = dict(ident, length=length, noisy=noisy, calib_key=CALIB_KEY, max_new_tokens=None)
    path = out / f"calib_{length}_noisy{noisy}_{digest(key)}.json"  # text: spectra, never weights or pickles
    if path.exists():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                saved["spectra"] = {c: torch.tensor(p, dtype=torch.float64) for c, p in saved["spectra"].items()}
                return saved
            warnings.warn(f"{path} was computed for other settings; recomputing it")
        except Exception as e:  # a truncated or foreign file: a cache, so recompute
            warnings.warn(f"{path} is damaged ({type(e).__name__}: {e}); recomputing it")
    p = builder.build(length, 0.5, CALIB_KEY, needle_value(args.seed, "calib", length), noisy)
    t0 = time.time()
    with LayerProgress(model, length, 1.0, f"calibration, {length} tokens, noisy={noisy}"):
        # float32 per-chunk Gram products summed in float64: within 1e-6 of all-float64 scores, about half the cost
        grams = entropy.score_model(model, torch.tensor([p.ids], device=args.device),
                                    chunk=min(args.chunk or length, length), gram_dtype=torch.float32,
                                    progress=False)
    spectra = {c: entropy.spectrum(g).cpu() for c, g in grams.items()}  # (L, H, d): all any metric needs
    saved = {"key": key, "spectra": spectra, "seconds": time.time() - t0}
    text = json.dumps({**saved, "spectra": {c: p.tolist() for c, p in spectra.items()}})
    write_atomic(path, lambda f: f.write(text.encode()))
    return saved


def write_atomic(path: Path, write):
    """write(f) into a temporary file beside path, then rename it over path: a crash leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# 3. Methods: the baseline, DoPE with a rule's heads, and fixed random-head controls


@dataclass
class Method:
    """One row of the results. role: baseline | rule | random (control: the same variant on k heads drawn at random
    once per setting, never a rule's head) | sweep (one point of --sweep)."""
    name: str  # "none", "parts/asc", "parts/desc", "parts/random0", "parts[key/post_ntk trunc r=8 k=1 desc]"
    variant: str  # none | parts | all | gaussian
    role: str
    rule: dict | None = None
    heads: list = field(default_factory=list)

    @property
    def head_set(self):
        return self.variant, tuple(map(tuple, self.heads))


def rule_for(variant: str, args, noisy: int) -> dict:
    """The head-selection rule of a variant: the paper's default, overridden by any flag the user gave."""
    base = dict(RULE_NOISY_ALL if (variant == "all" and noisy) else RULE_ORIGINAL)
    for k in ("k", "criterion", "metric", "r"):
        if getattr(args, k) is not None:
            base[k] = getattr(args, k)
    return base


def rule_name(variant: str, rule: dict) -> str:
    return f"{variant}[{rule['criterion']} {rule['metric']} r={rule['r']} k={rule['k']} {rule['order']}]"


def control_heads(n_layer: int, n_head: int, k: int, exclude, seed, *parts) -> list:
    """k (layer, head) pairs drawn uniformly at random among the heads not in `exclude`, reproducible from
    (seed, *parts)."""
    exclude = {tuple(h) for h in exclude}
    pool = [(layer, h) for layer in range(n_layer) for h in range(n_head) if (layer, h) not in exclude]
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} control heads from the {len(pool)} heads outside the selection")
    return sorted(random.Random("|".join(map(str, (seed, "control", *parts)))).sample(pool, k))


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
        return entropy.select_heads(self.scores(rule), rule["k"], rule["order"])


def sweep_rules(args):
    return [dict(k=k, criterion=c, metric=m, r=r, order=o) for c in args.sweep_criterion for m in args.sweep_metric
            for r in (args.sweep_r if m in ("trunc", "renorm") else [1])
            for k in args.sweep_k for o in args.sweep_order]


def methods_for(sel: Selector, args, n_layer: int, n_head: int, length: int, noisy: int) -> list:
    """Every method of one setting, the same for each of its prompts: baseline, each variant's rule in each order of
    --order (default: the rule's own), the sweep, then --random-sets fixed control head sets per variant."""
    methods = [Method("none", "none", "baseline")]
    for v in args.variant[1:]:
        base = rule_for(v, args, noisy)
        for order in (args.order or {}).get(v, [base["order"]]):
            rule = dict(base, metric="spectral", r=1, order="asc") if order == "flat" else dict(base, order=order)
            methods.append(Method(f"{v}/{order}", v, "rule", rule, sel.heads(rule)))
    if args.sweep:
        seen = {m.name for m in methods}
        for v in args.variant[1:]:
            for rule in sweep_rules(args):
                if rule_name(v, rule) not in seen:
                    seen.add(rule_name(v, rule))
                    methods.append(Method(rule_name(v, rule), v, "sweep", rule, sel.heads(rule)))
    chosen = {tuple(h) for m in methods if m.role == "rule" for h in m.heads}
    for v in args.variant[1:]:
        k = rule_for(v, args, noisy)["k"]
        for i in range(args.random_sets):
            heads = control_heads(n_layer, n_head, k, chosen, args.seed, length, noisy, v, i)
            methods.append(Method(f"{v}/random{i}", v, "random", dict(k=k, set=i), heads))
    return methods


# -----------------------------------------------------------------------------
# 4. The run: shared haystack prefix, layer reuse, one record per (prompt, method)


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


@torch.inference_mode()
def answer_and_decode(model, head_set, cache, logits, answer, prompt_ids, max_new_tokens, stop, seed) -> dict:
    """With the prompt in the cache: the answer's teacher-forced log-probability, then greedy decoding, under the
    head set's DoPE plan."""
    variant, heads = head_set
    t0 = time.time()
    if heads:
        apply_dope(model, DopePlan(list(heads), variant, seed=seed))
    try:
        lp = answer_logprob(model, cache, logits, answer)
        new = model.generate(prompt_ids, max_new_tokens, stop, cache=cache, logits=logits)
    finally:
        remove_dope(model)
    return dict(new=new, logprob=lp, decode_seconds=time.time() - t0)


@torch.inference_mode()
def prefill_from(model, idx, cache, chunk: int, first: int = 0, hidden=None, taps=None):
    """model.prefill with layer reuse: a DoPE head changes nothing below its layer, so its run may start at layer
    `first` from the input hidden states there (hidden: one (B, t, C) tensor per chunk), the cache already holding
    the layers below (KVCache.share). taps = {layer: []} collects those inputs, chunk by chunk. The loop is
    Transformer.forward's, started at `first`. Returns the last position's logits (B, 1, vocab)."""
    n_layer, n_chunks = len(model.layers), -(-idx.shape[1] // chunk)
    if not 0 <= first < n_layer or (first > 0) != (hidden is not None):
        raise ValueError(f"first={first!r}: expected 0 without hidden states, or a layer in 1..{n_layer - 1} with "
                         "the input hidden state of each chunk")
    if hidden is not None and len(hidden) != n_chunks:
        raise ValueError(f"hidden holds {len(hidden)} chunk states, but {idx.shape[1]} tokens in chunks of {chunk} "
                         f"make {n_chunks}")
    check_dynamic_chunks(model.config, cache.pos, idx.shape[1], chunk)
    logits = None
    for n, i in enumerate(range(0, idx.shape[1], chunk)):
        ids = idx[:, i:i + chunk]
        x = hidden[n] if first else model.embed_tokens(ids)  # (B, t, C)
        cos, sin, pos, mask = model.rope_at(cache.pos, ids.shape[1], x)
        for layer in range(first, n_layer):
            if taps is not None and layer in taps:
                taps[layer].append(x)
            x = model.layers[layer](x, cos, sin, pos, cache, mask)
        cache.pos += ids.shape[1]
        logits = model.logits(x)
    return logits


class HeadSetRunner:
    """Runs the prompts of one setting for a list of methods, sharing every computation that is provably the same.

    - Shared prefix (reuse="prefix"): prompt p is stream[:P] + tail with P = p.needle_at. Each head set prefills the
      longest shared prefix once into its own KV cache; prompts then run deepest needle first, and each rewinds
      the cache to its P (everything before P is still the stream's) and prefills only its tail.
    - Layers (reuse != "none"): a DoPE head set's cache points at the baseline's for the layers below its first
      denoised layer f, and its prefills start at f from the baseline's hidden state there (taps). The baseline runs
      each tail first, so those shared layers hold the current prompt when a DoPE head set reads them; decoding
      writes each position past the prompt before reading it.
    Answers are identical to a full recomputation and log-probabilities agree to float rounding (different matmul
    shapes): tests/test_eval_nih.py checks both."""

    def __init__(self, model, methods, length: int, extra: int, chunk: int, reuse: str, device, seed: int,
                 layers: bool = True):
        self.model, self.length, self.extra, self.chunk, self.reuse, self.device, self.seed = \
            model, length, extra, chunk, reuse, device, seed
        self.valid = 0  # leading positions of the baseline's cache that still hold the shared stream
        self.sets = {}  # head set -> first layer
        for m in [Method("none", "none", "baseline")] + methods:
            self.sets.setdefault(m.head_set, first_layer(m, reuse, layers))
        self.base_key = ("none", ())
        self.caches = {}

    def _prefill(self, head_set, ids, cache, taps=None, hidden=None):
        variant, heads = head_set
        f = self.sets[head_set]
        chunk = (self.chunk or TAIL_CHUNK) if cache.pos else (self.chunk or len(ids))
        if heads:
            apply_dope(self.model, DopePlan(list(heads), variant, seed=self.seed))
        idx = torch.tensor([ids], device=self.device)
        try:
            if f or taps:  # layer reuse (model.py only)
                return prefill_from(self.model, idx, cache, chunk, f, hidden[f] if f else None, taps)
            return self.model.prefill(idx, cache, chunk)
        finally:
            remove_dope(self.model)

    def _cache(self, head_set):
        if head_set not in self.caches:
            cache = self.model.new_cache(1, self.length + self.extra)
            if self.sets[head_set]:  # shared with the baseline below the first denoised layer
                cache.share(self.caches[self.base_key], self.sets[head_set])
            self.caches[head_set] = cache
        return self.caches[head_set]

    def prefix(self, stream: list, wanted, store: "PrefixStore | None" = None):
        """Prefill the shared stream into the baseline's cache and each wanted head set's; with a store, load each
        cache that was saved (a run resumed on the same machine) and save each one computed."""
        store = store or PrefixStore(None, 0, 0, {})
        dope = [s for s in wanted if s != self.base_key]
        need = {self.sets[s] for s in dope if not store.has(s, self.sets[s])} - {0}  # taps for what is computed
        base = self._cache(self.base_key)
        taps = store.load(self.base_key, 0, base, stream, self.device, need, self.chunk)
        if taps is None:
            taps = {f: [] for f in {self.sets[s] for s in dope} if f > 0}
            self._prefill(self.base_key, stream, base, taps=taps)
            store.save(self.base_key, 0, base, stream, taps)
        for s in dope:
            cache = self._cache(s)
            if store.load(s, self.sets[s], cache, stream, self.device) is None:
                f = self.sets[s]
                if f and f not in taps:  # its file was damaged: the baseline's hidden states are needed after all
                    taps[f] = []
                    base.rewind(0)
                    self._prefill(self.base_key, stream, base, taps={f: taps[f]})
                self._prefill(s, stream, cache, hidden=taps)
                store.save(s, self.sets[s], cache, stream)
        self.valid = len(stream)

    def prompt(self, ids: list, start: int, wanted, decode):
        """Run the tail ids[start:] for the baseline and every wanted head set, in wanted's order; decode(head_set,
        cache, logits) is called for each while its cache holds the whole prompt. Yields (head_set, decode's output
        with prefill_seconds) as each head set finishes, so a caller can record it before the next one starts. The
        baseline's tail always runs (the others read its lower layers), decoded only when wanted."""
        if start > self.valid:
            raise RuntimeError(f"the cached shared prefix holds {self.valid} positions, the prompt needs {start}: "
                               "run prompts deepest needle first")
        return self._prompt(ids, start, wanted, decode)

    def _prompt(self, ids, start, wanted, decode):
        for cache in self.caches.values():
            cache.rewind(min(cache.pos, start))
        base = self._cache(self.base_key)
        self.valid = start  # the tail overwrites what followed
        taps = {f: [] for f in {self.sets[s] for s in wanted} if f > 0}
        t0 = time.time()
        logits = self._prefill(self.base_key, ids[start:], base, taps=taps)
        seconds = seconds_since(t0, logits)
        if self.base_key in wanted:
            yield self.base_key, decode(self.base_key, base, logits) | {"prefill_seconds": seconds}
        for s in wanted:
            if s == self.base_key:
                continue
            t0 = time.time()
            cache = self._cache(s)
            logits = self._prefill(s, ids[start:], cache, hidden=taps)
            seconds = seconds_since(t0, logits)
            out = decode(s, cache, logits) | {"prefill_seconds": seconds}
            if self.reuse != "prefix":
                del self.caches[s]  # nothing to share with the next prompt
            yield s, out


def seconds_since(t0: float, result: torch.Tensor) -> float:
    """Wall-clock seconds from t0 until `result` is computed: on a GPU, whose kernels run asynchronously, after
    waiting for them (else the time would land in whatever synchronises next, the decoding)."""
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return time.time() - t0


class PrefixStore:
    """The shared prefix's KV caches on disk while a setting runs, so that a run stopped before its last prompt resumes
    on the same machine without prefilling the haystack again (with the deepest needle first, each head set's prefix is
    close to a full prefill: the largest part of a setting's work before its first record). One file per head set: its
    own layers' keys and values (from its first denoised layer; the layers below are the baseline's) for the first n
    positions of the setting's stream, and for the baseline the hidden states the DoPE head sets start from. A file is
    named by a digest of everything its numbers depend on (the run's identity, the setting, the head set), holds the
    stream's tokens (a prefix is reused only for the same tokens), is written atomically one layer at a time (never a
    second copy of a cache in memory), is recomputed with a warning when damaged, and is deleted once the setting is
    complete. The folder ignores itself in git: caches are gigabytes and belong to one machine. Loaded numbers are the
    saved ones, bit for bit."""

    MAGIC = b"DOPEKV1\n"

    def __init__(self, folder, length: int, noisy: int, ident: dict):
        self.folder = Path(folder) if folder else None
        self.tag = f"prefix_{length}_noisy{noisy}"
        self.key = dict(ident=ident, length=length, noisy=noisy)
        self.saving = self.folder is not None

    def path(self, head_set, first: int) -> Path | None:
        if self.folder is None:
            return None
        variant, heads = head_set
        return self.folder / f"{self.tag}_{digest([self.key, variant, [list(h) for h in heads], first])}.kv"

    def has(self, head_set, first: int) -> bool:
        p = self.path(head_set, first)
        return p is not None and p.exists()

    def save(self, head_set, first: int, cache, stream: list, taps=None):
        """Write cache's layers from `first` up to len(stream) positions (and the baseline's taps, whole)."""
        if not self.saving:
            return
        n = len(stream)
        named = [(f"{kv}{layer}", getattr(cache, kv)[layer][:, :, :n]) for layer in range(first, len(cache.k))
                 for kv in "kv"]
        named += [(f"tap{f}", torch.cat(chunks, 1)) for f, chunks in sorted((taps or {}).items())]
        size = sum(t.numel() * t.element_size() for _, t in named)
        header = json.dumps(dict(key=self.key, head_set=[head_set[0], [list(h) for h in head_set[1]]], first=first,
                                 ids=stream, tensors=[(name, list(t.shape), str(t.dtype)) for name, t in named]))

        def write(f):
            f.write(self.MAGIC + len(header).to_bytes(8, "little") + header.encode())
            for _, t in named:  # one tensor at a time: contiguous on the CPU, then its bytes
                f.write(memoryview(t.contiguous().cpu().view(torch.uint8).numpy()))

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            ignore = self.folder / ".gitignore"
            if not ignore.exists():
                ignore.write_text("# caches of a run in progress: gigabytes, for this machine only\n*\n")
            if shutil.disk_usage(self.folder).free < size + 2**30:
                raise OSError(f"not enough free disk for {size / 2**30:.1f} GiB")
            write_atomic(self.path(head_set, first), write)
        except OSError as e:  # a full or read-only disk must not cost the run its work
            warnings.warn(f"{self.folder}: cannot save the shared prefix ({e}); going on without saving it (an "
                          "interrupted run will prefill it again)")
            self.saving = False
            return
        print(f"   shared prefix of {head_set[0]} {list(head_set[1])}: {n} positions saved "
              f"({size / 2**30:.2f} GiB, until the setting is complete)")

    def load(self, head_set, first: int, cache, stream: list, device, taps=(), chunk: int = 0):
        """Fill cache's layers from `first` with a saved prefix of at least len(stream) positions whose tokens
        begin with stream; cache.pos = len(stream). Returns the taps for the layers in `taps` (split in chunks of
        `chunk`, as prefill_from reads them), or None when there is no usable file (nothing changed then)."""
        p = self.path(head_set, first)
        if p is None or not p.exists():
            return None
        n = len(stream)
        try:
            with open(p, "rb") as f:
                if f.read(len(self.MAGIC)) != self.MAGIC:
                    raise ValueError("not a saved prefix")
                h = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                shapes = {name: (shape, getattr(torch, dtype.removeprefix("torch.")))
                          for name, shape, dtype in h["tensors"]}
                size = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
                if p.stat().st_size != f.tell() + size:
                    raise ValueError(f"{p.stat().st_size} bytes, the header promises {f.tell() + size}")
                if h["key"] != self.key or h["first"] != first or h["ids"][:n] != stream or \
                        not {f"tap{t}" for t in taps} <= set(shapes):
                    print(f"   {p.name}: saved for other tokens or a shorter prefix; prefilling it again")
                    return None
                out = {}
                for name, (shape, dtype) in shapes.items():  # in file order
                    buf = torch.empty(shape, dtype=dtype)
                    f.readinto(memoryview(buf.view(torch.uint8).numpy()))
                    if name.startswith("tap"):
                        out[int(name[3:])] = buf[:, :n]
                        continue
                    kv, layer = name[0], int(name[1:])
                    B, heads, _, d = shape
                    store = getattr(cache, kv)
                    if store[layer] is None or store[layer].shape[1] != heads:
                        store[layer] = torch.empty(B, heads, cache.max_len, d, dtype=buf.dtype,
                                                   device=device)
                    store[layer][:, :, :n] = buf[:, :, :n]
        except Exception as e:  # torn or foreign: a cache, so recompute it
            warnings.warn(f"{p} is damaged ({type(e).__name__}: {e}); prefilling it again")
            p.unlink(missing_ok=True)
            return None
        cache.pos = n
        print(f"   shared prefix of {head_set[0]} {list(head_set[1])}: {n} positions loaded from {p}")
        return {t: list(out[t].split(chunk or n, dim=1)) for t in taps}

    def clear(self):
        """The setting is complete: delete its saved prefixes (and the folder, when nothing else is left in it)."""
        if self.folder is None or not self.folder.is_dir():
            return
        for p in self.folder.glob(f"{self.tag}_*.kv"):
            p.unlink()
        if not [p for p in self.folder.iterdir() if p.name != ".gitignore"]:
            shutil.rmtree(self.folder)


# -----------------------------------------------------------------------------
# Records: append-only JSONL, resumable across machines


def cell_id(ident: dict, length, noisy, depth, trial, m: Method) -> str:
    return json.dumps([ident, length, noisy, depth, trial, m.name, m.rule, [list(h) for h in m.heads]],
                      sort_keys=True)


# -----------------------------------------------------------------------------
# The run


def run(args):
    """Every (length, noise) setting of args; the records of all of them (and summary.md in --out)."""
    model_path, out = Path(args.model), Path(args.out)
    cfg = check_inputs(args)
    tok = Tokenizer(model_path)
    haystack = read_haystack(args.haystack_file)
    model_fp = model_id(model_path)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        results = out / "results.jsonl"
        done = load_done(results)
        all_rows = []
        for length in args.len:
            model, factor = load_model(model_path, length, cfg.max_pos, args)
            builder = PromptBuilder(tok, haystack, model.config.bos_token_id, args.needle, args.question,
                                    args.answer_prefix)
            stop = stop_tokens(tok, model.config)
            ident = identity(args, model_fp, haystack, factor)
            print(f"== {model_path.name} at {length} tokens ({length / cfg.max_pos:.2f}x native {cfg.max_pos}), "
                  f"{describe_rope(model.config, factor)}, on {args.device} in {args.dtype}")
            for noisy in args.noisy:
                all_rows += run_setting(model, tok, builder, length, noisy, factor, args, ident, stop, out, results,
                                        done)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves nothing behind that was not there
        raise
    if all_rows and not args.report_heads:
        report.summarize(all_rows, out)
    return all_rows


def usage_error(msg: str):
    print(f"eval_nih.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_inputs(args) -> Config:
    """What can be checked before any model work, against the model's config: the folder, the flags that count
    heads or ranks, the output folder. Usage errors exit with code 2, naming the flag or file."""
    path = Path(args.model)
    if not (path / "config.json").is_file():
        usage_error(f"--model {path}: no config.json there (see weights.md for how to get weights)")
    try:
        c = Config.from_hf(read_json(path / "config.json"))
    except (ValueError, KeyError, TypeError) as e:
        usage_error(f"--model {path}: {path / 'config.json'} is not a usable model config ({e})")
    heads = c.n_layer * c.n_head
    for flag, values, hi, what in (("--k", [args.k], heads, f"{c.n_layer} layers x {c.n_head} heads"),
                                   ("--sweep-k", args.sweep_k if args.sweep else [], heads, "heads in the model"),
                                   ("--r", [args.r], c.head_dim, f"head width d = {c.head_dim}"),
                                   ("--sweep-r", args.sweep_r if args.sweep else [], c.head_dim, "the head width")):
        bad = [v for v in values if v is not None and not 1 <= v <= hi]
        if bad:
            usage_error(f"{flag} {bad[0]}: must be between 1 and {hi} ({what})")
    k = max([rule_for(v, args, n)["k"] for v in args.variant[1:] for n in args.noisy] or [0])
    if args.random_sets and len(args.variant) > 1 and 2 * k > heads - 1:
        usage_error(f"--random-sets with k = {k}: too few heads outside the rules' ({heads} in the model)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        usage_error(f"--out {out} is a file, not a folder")
    if args.prefix_cache not in (None, "none") and Path(args.prefix_cache).is_file():
        usage_error(f"--prefix-cache {args.prefix_cache} is a file, not a folder")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        usage_error(f"--out {out}: {probe} is not writable")
    return c


def run_setting(model, tok, builder, length, noisy, factor, args, ident, stop, out, results, done) -> list:
    """One (length, noise) setting: calibrate, choose each method's heads, then run every (prompt, method) cell that
    the records do not hold yet, deepest needle first. Returns the setting's records."""
    extra = args.max_new_tokens + 16
    check_memory(model, [], length, extra, args)  # the baseline alone must fit: refuse before calibrating
    calib = calibrate(model, builder, length, noisy, args, out, ident) \
        if len(args.variant) > 1 or args.report_heads else None
    if args.report_heads:
        report_heads(calib, model.config, length, noisy, args, out)
        return []
    methods = setting_methods(calib, model.config, args, length, noisy, out)
    prompts = sorted(setting_prompts(builder, length, noisy, args), key=lambda x: -x[2].needle_at)
    ids = {(d, t, m.name): cell_id(ident, length, noisy, d, t, m) for d, t, _ in prompts for m in methods}
    todo = [(d, t, p) for d, t, p in prompts if any(ids[d, t, m.name] not in done for m in methods)]
    missing = [m for m in methods if any(ids[d, t, m.name] not in done for d, t, _ in todo)]
    runner = HeadSetRunner(model, missing, length, extra, args.chunk, args.reuse, args.device, args.seed,
                           args.layer_reuse)
    folder = None if args.prefix_cache == "none" or args.reuse != "prefix" or not args.layer_reuse else \
        Path(args.prefix_cache) if args.prefix_cache else out / "prefix-cache"  # model.py's KVCache only
    store = PrefixStore(folder, length, noisy, ident)
    stored = {s for s, f in runner.sets.items() if store.has(s, f)}
    work = announce_work(model, calib, methods, missing, prompts, todo, length, extra, args, stored)
    fixed = dict(model=Path(args.model).name, model_id=ident["model"], native=model.config.max_pos, length=length,
                 noisy=noisy, ntk_factor=factor, reuse=args.reuse, seed=args.seed, dtype=args.dtype, device=args.device)
    with LayerProgress(model, length, work, f"{length} tokens, noisy={noisy}") as progress:
        if todo and args.reuse == "prefix":
            stream = builder.stream(todo[0][2].needle_at)  # the deepest needle: every other prefix is shorter
            for _, _, p in todo:
                assert p.ids[:p.needle_at] == stream[:p.needle_at], "a prompt is not a slice of the shared stream"
            runner.prefix(stream, {m.head_set for m in missing}, store)
        for d, t, p in todo:
            need = [m for m in methods if ids[d, t, m.name] not in done]
            for m, rec in run_prompt(runner, model, tok, p, need, stop, args):
                rec = dict(cell=ids[d, t, m.name], **fixed, depth=d, trial=t, **rec)
                append_record(results, rec)
                done[rec["cell"]] = rec
        progress.bar.n = progress.bar.total
    store.clear()  # every cell of the setting is recorded
    return [done[ids[d, t, m.name]] for d, t, _ in prompts for m in methods]


def setting_methods(calib, cfg, args, length: int, noisy: int, out: Path) -> list:
    """The setting's methods with their heads (saved and printed: which heads each rule removes)."""
    sel = Selector(calib) if calib else None
    methods = methods_for(sel, args, cfg.n_layer, cfg.n_head, length, noisy)
    if sel:
        save_heads(sel, methods, length, noisy, out, Path(args.model).name)
    for m in methods:
        if m.role in ("rule", "random"):
            print(f"   noisy={noisy} {m.name}: {m.rule} -> heads {m.heads}")
    return methods


def announce_work(model, calib, methods, missing, prompts, todo, length, extra, args, stored=()) -> float:
    """Refuse what would not fit; print what is left to run and its cost (less the shared prefixes saved on disk,
    `stored`). Returns the work in full prefills."""
    if not todo:
        return 0.0
    check_memory(model, missing, length, extra, args)
    work = plan_work(model.config, missing, todo, length, args.reuse, extra, args.layer_reuse, stored)
    scratch = plan_work(model.config, missing, todo, length, "none", extra)
    secs = calib["seconds"] if calib else None
    eta = f", ~{work * secs / 3600:.1f} h at {secs:.0f} s per full prefill (the calibration pass)" if secs else ""
    print(f"   {len(todo)} of {len(prompts)} prompts to run with {len(missing)} methods: about {work:.1f} full "
          f"prefills with --reuse {args.reuse} ({scratch:.1f} from scratch){eta}")
    return work


def run_prompt(runner, model, tok, p: Prompt, need, stop, args):
    """Run one prompt for the methods in need; yields (method, the record's per-prompt fields) as each head set
    finishes, so a stop mid-prompt keeps the methods already run."""
    answer = tok.encode(" " + p.value)
    prompt_ids = torch.tensor([p.ids], device=args.device)

    def decode(head_set, cache, logits):
        return answer_and_decode(model, head_set, cache, logits, answer, prompt_ids, args.max_new_tokens, stop,
                                 args.seed)

    start = p.needle_at if args.reuse == "prefix" else 0
    order = list(dict.fromkeys(m.head_set for m in need))  # methods' order: records come out in it
    for head_set, o in runner.prompt(p.ids, start, order, decode):
        text = tok.decode(o["new"]).split("\n")[0]  # stop at a newline, as the paper does
        for m in (m for m in need if m.head_set == head_set):
            yield m, dict(actual_depth=round(p.actual_depth, 4), key=p.key, expected=p.value, method=m.name,
                          variant=m.variant, role=m.role, rule=m.rule, heads=m.heads, answer=text,
                          score=score(text, p.value), logprob=round(o["logprob"], 6),
                          prefill_seconds=round(o["prefill_seconds"], 2),
                          decode_seconds=round(o["decode_seconds"], 2), first_layer=runner.sets[m.head_set],
                          tail_tokens=len(p.ids) - start)


def load_model(path: Path, length: int, native: int, args):
    """The model with the RoPE scaling of this length: --ntk auto is the paper's static Dynamic NTK to the length."""
    factor = None
    if args.ntk == "auto":
        factor = length / native if length > native else None
    elif args.ntk != "none":
        factor = float(args.ntk)
    scaling = {"rope_type": "ntk", "factor": factor} if factor else {}
    if args.engine == "transformers":  # the same experiment on the engine people run (hf_dope.py)
        from engines.hf_dope import HFModel

        model = HFModel.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device,
                                        rope_scaling=scaling, attn_implementation=args.attn,
                                        device_map=args.device_map)
    else:
        model = Transformer.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device,
                                            rope_scaling=scaling)
    return model, factor


def describe_rope(cfg, factor) -> str:
    if not factor:
        return "no scaling"
    new_base = cfg.rope_theta * (factor * factor - factor + 1) ** (cfg.head_dim / (cfg.head_dim - 2))
    return f"Dynamic NTK x{factor:.3g} (static, base {cfg.rope_theta:g} -> {new_base:.4g})"


def stop_tokens(tok, cfg) -> set:
    """EOS, and every token whose text holds a newline: the paper stops at a newline."""
    stop = {tok.eos_id, *cfg.eos_token_ids} - {None}
    return stop | {i for t, i in tok.tok.get_vocab().items() if "\n" in tok.decode([i])}


def read_haystack(path) -> str:
    if not path:
        return FILLER
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        usage_error(f"--haystack-file {path}: no such file")
    except IsADirectoryError:
        usage_error(f"--haystack-file {path} is a folder, not a text file")
    except UnicodeDecodeError as e:
        usage_error(f"--haystack-file {path} is not UTF-8 text ({e.reason} at byte {e.start})")
    if not text.strip():
        usage_error(f"--haystack-file {path} is empty")
    return text


# -----------------------------------------------------------------------------
# What the detector sees: heads per rule, p1 per layer


def save_heads(sel: Selector, methods, length, noisy, out: Path, model_name: str):
    """Each rule's heads as JSON and on the layers x heads heatmap of its score."""
    for m in methods:
        if m.role != "rule":
            continue
        scores = sel.scores(m.rule)
        stem = out / f"heads_{length}_noisy{noisy}_{m.name.replace('/', '_')}"
        entropy.plot_scores(scores, m.heads, stem.with_suffix(".png"),
                            title=f"{model_name} at {length} tokens: heads for DoPE {m.name}",
                            label=f"{m.rule['metric']} r={m.rule['r']} ({m.rule['criterion']})")
        text = json.dumps({"rule": m.rule, "heads": m.heads, "scores": [scores[h].item() for h in m.heads],
                           "p1": [sel.spectra[m.rule["criterion"]][h][0].item() for h in m.heads]}, indent=1)
        write_atomic(stem.with_suffix(".json"), lambda f: f.write(text.encode() + b"\n"))


def report_heads(calib, cfg, length, noisy, args, out: Path):
    model_name = Path(args.model).name
    """The spectral share p1 per layer (min / median / max over heads) for each criterion, and the heads each
    variant's rule picks in each order."""
    print(f"-- noisy={noisy}\n   calibration pass: {calib['seconds']:.0f} s")
    for crit in ("query/post_ntk", "key/post_ntk", "query/pre_ntk"):
        p1 = entropy.spectrum_scores(calib["spectra"][crit], "spectral")  # (L, H)
        spike = (p1 >= 1 / math.e).float().mean().item()
        print(f"   p1 = ||S||_2 / tr S, {crit}: {100 * spike:.0f}% of heads in the spike regime p1 >= 1/e")
        print("   layer " + " ".join(f"{i:>4}" for i in range(p1.shape[0])))
        for name, f in (("min", lambda x: x.min(-1).values), ("median", lambda x: x.median(-1).values),
                        ("max", lambda x: x.max(-1).values)):
            print(f"   {name:>5} " + " ".join(f"{v:4.2f}" for v in f(p1).tolist()))
        entropy.plot_scores(p1, [], out / f"p1_{length}_noisy{noisy}_{crit.replace('/', '_')}.png",
                            title=f"{model_name} at {length} tokens", label=f"spectral share p1 ({crit})")
    sel = Selector(calib)
    a = argparse.Namespace(**{**vars(args), "variant": ["none", "parts", "all", "gaussian"], "random_sets": 0,
                              "sweep": False})
    methods = methods_for(sel, a, cfg.n_layer, cfg.n_head, length, noisy)
    for m in methods[1:]:
        p1 = [sel.spectra[m.rule["criterion"]][h][0].item() for h in m.heads]
        print(f"   DoPE {m.name}: {m.rule} -> heads {m.heads} (p1 {', '.join(f'{x:.2f}' for x in p1)})")
    save_heads(sel, methods, length, noisy, out, model_name)
    print(f"   plots: {out}/p1_{length}_noisy{noisy}_*.png, {out}/heads_{length}_noisy{noisy}_*.png")


# -----------------------------------------------------------------------------
# Command line


def _list(kind):
    def parse(s):
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_args(argv=None):
    """The flags, checked (usage errors exit 2 naming the flag); --order becomes {variant: [orders]}."""
    p = build_parser()
    a = p.parse_args(argv)
    bad = [v for v in a.variant if v not in ("none", *VARIANTS)]
    if bad:
        p.error(f"unknown variant(s) {bad}: choose from none, {', '.join(VARIANTS)}")
    a.variant = ["none"] + [v for v in dict.fromkeys(a.variant) if v != "none"]
    if a.order is not None:
        a.order = parse_orders(p, a.order, a.variant[1:])
    check_flags(p, a)
    a.dtype = a.dtype or ("float32" if a.device == "cpu" else "bfloat16")
    a.layer_reuse = a.engine == "model"  # transformers cannot resume a forward at a layer
    return a


def parse_orders(p, items: list, variants: list) -> dict:
    """--order asc,flat or parts:asc,gaussian:desc -> {variant: [orders]}."""
    orders = {}
    for item in items:
        v, _, o = item.rpartition(":")
        if o not in (*entropy.ORDERS, "flat") or (v and v not in variants):
            p.error(f"--order {','.join(items)}: give asc, desc, flat or a list, or VARIANT:ORDER for a variant "
                    f"of --variant ({', '.join(variants) or 'none given'})")
        for w in [v] if v else variants:
            orders.setdefault(w, []).append(o)
    return {v: list(dict.fromkeys(o)) for v, o in orders.items()}


def check_flags(p, a) -> None:
    """What argparse's types and choices cannot say: ranges, factors, devices, engines and templates."""
    for name, allowed in (("criterion", entropy.CRITERIA), ("metric", entropy.METRICS), ("order", entropy.ORDERS)):
        bad = [x for x in getattr(a, f"sweep_{name}") if x not in allowed]
        if bad:
            p.error(f"unknown --sweep-{name} {bad}: choose from {', '.join(allowed)}")
    if a.earlier and not a.summarize:
        p.error("--earlier only adds to a --summarize (give --summarize DIR ... --earlier SUMMARY_MD)")
    if a.earlier and not Path(a.earlier).is_file():
        p.error(f"--earlier {a.earlier}: no such file")
    if a.depths < 1 or a.trials < 1 or min(a.noisy) < 0 or a.chunk < 0 or a.max_new_tokens < 1 or a.random_sets < 0:
        p.error("--depths, --trials and --max-new-tokens must be >= 1, --noisy, --chunk and --random-sets >= 0")
    if a.ntk not in ("auto", "none"):
        try:
            factor = float(a.ntk)
        except ValueError:
            p.error(f"--ntk {a.ntk!r}: give auto, none or a factor > 1 (e.g. 3 for 24K on an 8K model)")
        if not math.isfinite(factor) or factor <= 1:
            p.error(f"--ntk {a.ntk!r}: a Dynamic NTK factor must be a finite number > 1 (none: no scaling)")
    try:
        torch.device(a.device)
    except RuntimeError:
        p.error(f"--device {a.device!r} is not a torch device (cpu, cuda, cuda:0, ...)")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA device here (use --device cpu)")
    if a.engine == "transformers":
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            p.error("--engine transformers needs the transformers package (pip install transformers)")
        if a.device_map and importlib.util.find_spec("accelerate") is None:
            p.error("--device-map needs the accelerate package (pip install accelerate)")
    elif a.device_map:
        p.error("--device-map goes with --engine transformers")
    try:
        check_templates(a.needle, a.question, a.answer_prefix)
    except ValueError as e:
        p.error(str(e))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=lambda s: [parse_len(x) for x in s.split(",")], default=[parse_len("8k")],
                   help="token length(s), e.g. 4k, 16k, 64k or 3000; comma-separated for several (default 8k)")
    p.add_argument("--variant", type=lambda s: s.split(","), default=["none", "parts"],
                   help="comma-separated from none,parts,all,gaussian; the baseline always runs, first "
                        "(default none,parts)")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR),
                   help="an HF Llama/Qwen2 folder (default: packaged SmolLM2)")
    p.add_argument("--device", default=default_device(), help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="default float32 on a CPU (the reference), bfloat16 on a GPU")
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
    p.add_argument("--order", type=lambda s: s.split(","),
                   help="which heads lose their position: asc (the lowest scores), desc (the highest), flat (the "
                        "lowest spectral share p1 on the rule's criterion: the highest-rank heads, whatever the "
                        "metric); several as separate rules, e.g. asc,flat; VARIANT:ORDER for one variant only, e.g. "
                        "parts:asc,parts:flat,gaussian:asc (default: each rule's own order)")
    p.add_argument("--random-sets", type=int, default=1,
                   help="fixed random-head control sets per variant, seeded per setting (default 1; 0: none)")
    p.add_argument("--sweep", action="store_true",
                   help="also run every rule of the grid below; the best row is labelled best-of-sweep")
    p.add_argument("--sweep-k", type=_list(int), default=[1, 3, 5])
    p.add_argument("--sweep-r", type=_list(int), default=[1, 8, 32])
    p.add_argument("--sweep-criterion", type=_list(str), default=["query/post_ntk", "key/post_ntk"])
    p.add_argument("--sweep-metric", type=_list(str), default=["trunc"])
    p.add_argument("--sweep-order", type=_list(str), default=["asc", "desc"])
    p.add_argument("--haystack-file", help="a UTF-8 text file of real prose (e.g. essays) instead of filler")
    p.add_argument("--needle", default=NEEDLE, help="needle template with {key} and {value} (a 7-digit number)")
    p.add_argument("--question", default=QUESTION, help="question template with {key}")
    p.add_argument("--answer-prefix", default=ANSWER_PREFIX, help="start of the answer, with {key} (RULER style)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--chunk", type=int, default=0,
                   help="prefill chunk in tokens; 0 (default) runs a prefix in one pass, the fastest on a CPU "
                        f"(SDPA's causal kernel skips the masked half), and tails in chunks of {TAIL_CHUNK}")
    p.add_argument("--engine", choices=["model", "transformers"], default="model",
                   help="model: this project's model.py (default); transformers: the checkpoint loaded by Hugging Face "
                        "transformers with hf_dope.py (shared-prefix reuse, no layer reuse)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="the attention implementation of --engine transformers (default sdpa)")
    p.add_argument("--device-map",
                   help="--engine transformers: transformers' device_map, e.g. auto to spread the layers over every "
                        "visible GPU (needs the accelerate package)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--reuse", choices=REUSE, default="prefix",
                   help="prefix (default): each head set prefills the shared haystack once and each prompt its tail, "
                        "from the first denoised layer; layers: per prompt, from the first denoised layer; none: "
                        "recompute everything (the answers are the same either way)")
    p.add_argument("--prefix-cache", metavar="DIR",
                   help="with --reuse prefix: where each head set's shared-prefix KV cache is saved while a setting "
                        "runs, so that an interrupted run resumes without prefilling the haystack again on this "
                        "machine; deleted when the setting is complete; 'none' to save nothing (default: "
                        "OUT/prefix-cache, which ignores itself in git)")
    p.add_argument("--report-heads", action="store_true",
                   help="only calibrate: print p1 per layer and the heads each rule picks, save the heatmaps")
    p.add_argument("--out", default="results/nih", help="folder for results.jsonl, plots and calibration")
    p.add_argument("--summarize", nargs="+", metavar="DIR",
                   help="run nothing: rebuild summary.md and the heatmaps in --out from the results.jsonl of these "
                        "folders (every setting they hold, and all of them pooled)")
    p.add_argument("--earlier", metavar="SUMMARY_MD",
                   help="with --summarize: add the settings of a summary.md written at commit b671c0d (1x and 2x, "
                        "whose per-prompt records were not kept) to the table and plot by context multiple")
    return p


def main(argv=None):
    """The command line: parse, then summarize or run; returns the records."""
    args = parse_args(argv)
    if args.summarize:
        return report.summarize_dirs(args.summarize, Path(args.out), args.earlier)
    if Path(args.model).resolve() == DEFAULT_MODEL_DIR:
        ensure_weights()  # the packaged default model, fetched and converted on first use
    return run(args)


if __name__ == "__main__":
    main()
