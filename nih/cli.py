"""
The command line of eval_nih.py: its flags, and every check that can run before any model work. A usage error exits
with code 2 and a message naming the flag or file and its value, and leaves nothing behind.
"""

import argparse
import importlib.util
import math
import os
import string
import sys
from pathlib import Path

import torch

import entropy
from dope import VARIANTS
from model import Config, SelfExtend, parse_len, read_json
from nih.budget import TAIL_CHUNK
from nih.reuse import EXTENSIONS, MODES
from tools.setup_weights import DEFAULT_MODEL_DIR


def parse_args(argv, doc: str, needle: str, question: str, answer_prefix: str):
    """The flags, checked (usage errors exit 2 naming the flag); --order becomes {variant: [orders]}. doc: the help's
    description; needle, question, answer_prefix: the default templates."""
    p = build_parser(doc, needle, question, answer_prefix)
    a = p.parse_args(argv)
    bad = [v for v in a.variant if v not in ("none", *VARIANTS, *EXTENSIONS)]
    if bad:
        p.error(f"unknown variant(s) {bad}: choose from none, {', '.join(VARIANTS + EXTENSIONS)}")
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
        if o not in entropy.ORDERS or (v and v not in variants):
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
        if importlib.util.find_spec("transformers") is None:
            p.error("--engine transformers needs the transformers package (pip install transformers)")
        if a.device_map and importlib.util.find_spec("accelerate") is None:
            p.error("--device-map needs the accelerate package (pip install accelerate)")
        if set(a.variant) & set(EXTENSIONS):
            p.error(f"--variant {','.join(sorted(set(a.variant) & set(EXTENSIONS)))} runs on model.py only (--engine "
                    "model): its RoPE or attention is swapped inside model.py's forward")
    elif a.device_map:
        p.error("--device-map goes with --engine transformers")
    if a.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            p.error("--engine vllm needs vLLM: run eval_nih.py with the python that `bash .ci/vllm_env` prints (an "
                    "environment with requirements-vllm.txt)")
        if {"yarn", "selfextend"} & set(a.variant):
            p.error("--engine vllm runs the baseline and DoPE's variants; YaRN and Self-Extend run on model.py only")
    if a.self_extend is not None and "selfextend" not in a.variant:
        p.error("--self-extend sets the group and window of --variant selfextend (add it to --variant)")
    try:
        check_templates(a.needle, a.question, a.answer_prefix)
    except ValueError as e:
        p.error(str(e))


def check_templates(needle: str, question: str, answer_prefix: str):
    """Each template may use only its own fields; the needle must hold {value} and {key}, the question {key}."""
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


def unwind_on_sigterm():
    """A kill (SIGTERM, what `kill`, timeout and most schedulers send) unwinds the run as Ctrl-C does, so that its
    lock file and a folder it made but never wrote to are removed; without this handler the process just dies.
    The command line's, not the library's: it sets a process-wide handler."""
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)


def usage_error(msg: str):
    print(f"eval_nih.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_inputs(args, k: int) -> Config:
    """What can be checked before any model work, against the model's config: the folder, the flags that count
    heads or ranks (k: the most heads any rule of the run denoises), the output folder."""
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
    if args.random_sets and len(args.variant) > 1 and 2 * k > heads - 1:
        usage_error(f"--random-sets with k = {k}: too few heads outside the rules' ({heads} in the model)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        usage_error(f"--out {out} is {'a file' if out.is_file() else 'a FIFO or a socket'}, not a folder")
    cache = Path(args.prefix_cache) if args.prefix_cache not in (None, "none") else None
    if cache is not None and cache.exists() and not cache.is_dir():
        usage_error(f"--prefix-cache {cache} is {'a file' if cache.is_file() else 'a FIFO or a socket'}, not a folder")
    probe = out if out.is_dir() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        usage_error(f"--out {out}: {probe} is not writable")
    return c


def check_model(path: Path, cfg: Config):
    """The model folder before any model work: its files against its manifest, each tensor's shape against
    config.json (headers only, on the meta device) and its tokenizer against the config. Returns the Tokenizer; a
    fault is a usage error in one line."""
    from model import Tokenizer, Transformer, load_safetensors, open_folder

    try:
        with torch.device("meta"):
            Transformer(open_folder(path)).load_state_dict(load_safetensors(path, meta=True), assign=True, where=path)
        tok = Tokenizer(path)
        tok.check_fits(cfg)
    except (OSError, ValueError) as e:
        usage_error(f"--model {path}: " + str(e).replace("\n  ", " "))
    return tok


def check_distinct_depths(prompts: list, trials: int):
    """prompts: (depth, trial, Prompt). Refused (ValueError) when two depths put their needles at the same sentence
    boundary: the records and the tables would count depths that were not run."""
    at = {}
    for d, t, p in prompts:
        if t == 0:
            at.setdefault(p.needle_at, []).append(d)
    clash = [(pos, ds) for pos, ds in at.items() if len(ds) > 1]
    if clash:
        pos, ds = clash[0]
        raise ValueError(f"depths {', '.join(f'{100 * d:g}%' for d in ds)} all put the needle at token {pos} (the "
                         f"haystack's nearest sentence boundary): {len(at)} of the {len(prompts) // trials} "
                         "depths are distinct; give fewer --depths, a longer --len or a haystack with more sentences")


def self_extend_for(args, length: int, native: int, extra: int) -> SelfExtend:
    """Self-Extend's group and window for a setting: --self-extend G,W, or SelfExtend.for_length's for the prompt and
    its answer; a pair that cannot fit the native context, or a window not smaller than the prompt, is a usage
    error."""
    try:
        se = SelfExtend(*args.self_extend) if args.self_extend else SelfExtend.for_length(length + extra, native)
        se.check(length + extra, native)
    except (TypeError, ValueError) as e:
        usage_error(f"--variant selfextend at {length} tokens (and {extra} of answer): {e}")
    if se.window >= length:
        usage_error(f"--variant selfextend: the window W={se.window} is not smaller than the {length}-token prompt, "
                    "so every key would be a neighbour (plain attention); give --self-extend G,W with a smaller "
                    "window")
    return se


def read_haystack(path) -> str:
    """--haystack-file: a UTF-8 text file of real prose."""
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


def _list(kind):
    def parse(s):
        try:
            return [kind(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of {kind.__name__}") from None
    return parse


def _group_window(s: str) -> tuple:
    try:
        g, w = (int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a group and a window, e.g. 8,1024") from None
    return g, w


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser(doc: str, needle: str, question: str, answer_prefix: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--len", type=lambda s: [parse_len(x) for x in s.split(",")], default=[parse_len("8k")],
                   help="token length(s), e.g. 4k, 16k, 64k or 3000; comma-separated for several (default 8k)")
    p.add_argument("--variant", type=lambda s: s.split(","), default=["none", "parts"],
                   help="comma-separated from none,parts,all,gaussian (DoPE) and yarn,selfextend (two other "
                        "training-free extensions, compared with the baseline); the baseline is always one, answered "
                        "first (default none,parts)")
    p.add_argument("--self-extend", type=_group_window, metavar="G,W",
                   help="Self-Extend's group size and neighbour window (default: model.SelfExtend.for_length, the "
                        "reference implementation's W = 1024, G = 8 doubled until the length fits its rule)")
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
    p.add_argument("--needle", default=needle, help="needle template with {key} and {value} (a 7-digit number)")
    p.add_argument("--question", default=question, help="question template with {key}")
    p.add_argument("--answer-prefix", default=answer_prefix, help="start of the answer, with {key} (RULER style)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--chunk", type=int, default=0,
                   help="prefill chunk in tokens; 0 (default) runs a prefix in one pass, the fastest on a CPU "
                        f"(SDPA's causal kernel skips the masked half), and tails in chunks of {TAIL_CHUNK}")
    p.add_argument("--engine", choices=["model", "transformers", "vllm"], default="model",
                   help="model: this project's model.py (default); transformers: the checkpoint loaded by Hugging Face "
                        "transformers with hf_dope.py (shared-prefix reuse, no layer reuse); vllm: answered by vLLM "
                        "with engines/vllm_dope.py, its prefix caching for the reuse, heads still picked on model.py "
                        "(run eval_nih.py with the python that `bash .ci/vllm_env` prints)")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                   help="the attention implementation of --engine transformers (default sdpa)")
    p.add_argument("--device-map",
                   help="--engine transformers: transformers' device_map, e.g. auto to spread the layers over every "
                        "visible GPU (needs the accelerate package)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--reuse", choices=MODES, default="prefix",
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
