"""
What a needle-in-a-haystack run costs, before and while it runs: its work in full prefills (a FLOP model: the
per-token matmuls plus causal attention), whether its caches fit the device, and a progress bar inside prefills.
eval_nih.py prints the estimate before a run and refuses what would not fit; bench_reuse.py compares the estimate
with the wall-clock.
"""

import ctypes
import functools
import resource
import sys

import torch

# A tail meets a cached prefix, so its attention needs an explicit bottom-right causal mask (chunk x length), and
# with a mask SDPA computes the whole block where its causal kernel skips the upper triangle: a small chunk wastes
# less of that work (the masked triangle is chunk/2 keys per query) and bounds the mask's memory.
TAIL_CHUNK = 1024


def first_layer(m, reuse: str, layers: bool = True) -> int:
    """A DoPE head changes nothing below its layer: a head set can start there (0: the whole forward). layers=False:
    an engine that cannot resume a forward at a layer (transformers)."""
    return min(layer for layer, _ in m.heads) if m.heads and reuse != "none" and layers else 0


def baseline_runs(methods, reuse: str, layers: bool = True) -> bool:
    """Whether the baseline's forward runs: when the baseline is itself a method to answer, or a DoPE head set starts
    above layer 0 from its hidden states. Extensions alone (a whole forward of their own) do not need it."""
    return any(m.head_set == ("none", ()) or first_layer(m, reuse, layers) > 0 for m in methods)


def cost(cfg, start: int, n: int) -> float:
    """Work of n new tokens after `start` cached ones in one layer, in token units: the per-token matmuls (weights of
    one layer, 2 flops per weight) plus attention (QK^T and AV over start + i keys, 4 n_head d flops per key), both
    divided by the attention flops per key."""
    per_token = 2 * (cfg.n_embd * cfg.head_dim * (2 * cfg.n_head + 2 * cfg.n_kv_head) + 3 * cfg.n_embd * cfg.n_hidden)
    c0 = per_token / (4 * cfg.n_head * cfg.head_dim)
    return n * (c0 + start) + n * n / 2


def plan_work(cfg, methods, prompts, length, reuse: str, extra: int, layers: bool = True, stored=(),
              need=None) -> float:
    """Total work of a setting (the methods and prompts still to run) in full prefills of `length` tokens: each head
    set's layers from its first denoised one, for the shared prefix once (reuse=prefix; not for the head sets in
    `stored`, whose prefix is loaded from disk) and then every prompt's tail, plus teacher forcing and greedy
    decoding (at most `extra` tokens each). need: {(depth, trial): the methods that prompt still runs}, as
    nih/reuse.run_prompts computes them (a resumed prompt runs only its missing head sets); default: all of them."""

    def head_sets(ms):
        sets = {m.head_set: 1 - first_layer(m, reuse, layers) / cfg.n_layer for m in ms}
        if baseline_runs(ms, reuse, layers):  # the others read its lower layers
            sets.setdefault(("none", ()), 1.0)
        return sets

    full, sets = cost(cfg, 0, length), head_sets(methods)
    work = sum(v for s, v in sets.items() if s not in stored) * \
        cost(cfg, 0, max((p.needle_at for _, _, p in prompts), default=0)) if reuse == "prefix" else 0.0
    for d, t, p in prompts:
        start = p.needle_at if reuse == "prefix" else 0
        mine = head_sets(need[d, t]) if need is not None else sets
        work += sum(mine.values()) * cost(cfg, start, length - start)
        work += len(mine) * 2 * cost(cfg, length, extra)  # decode, one token at a time (an upper bound)
    return work / full


class LayerProgress:
    """A progress bar inside prefills: forward hooks on the model's blocks advance it by each layer's work
    (cost()/n_layer, in full prefills), so a 30-minute prefill shows where it is and an ETA."""

    def __init__(self, model, length: int, total: float, desc: str):
        from tqdm.auto import tqdm

        self.cfg, self.full, self.hooks = model.config, cost(model.config, 0, length), []
        blocks = model.hf.model.layers if hasattr(model, "hf") else model.layers  # transformers' decoder layers
        self.bar = tqdm(total=total, desc=desc, unit="prefill", bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} "
                        "prefills [{elapsed}<{remaining}]", mininterval=2, file=sys.stderr)
        for block in blocks:
            self.hooks.append(block.register_forward_hook(self._hook, with_kwargs=True))

    def _hook(self, block, args, kwargs, output):
        # model.Block(x (B, T, C), cos, sin, pos (T,), ...); a transformers layer(hidden_states, ..., cache_position)
        x = args[0] if args else kwargs["hidden_states"]
        pos = args[3] if len(args) > 3 else kwargs.get("cache_position", kwargs.get("position_ids"))
        if x.shape[1]:
            start = int(pos.reshape(-1)[0]) if pos is not None else 0
            self.bar.update(cost(self.cfg, start, x.shape[1]) / self.cfg.n_layer / self.full)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.bar.close()


def check_memory(model, methods, length, extra, args):
    """Refuse a run whose caches and activations would not fit the device: the baseline's KV cache (when it runs:
    baseline_runs), one per DoPE head set (its layers from the first denoised one; a layer with DoPE heads stores
    keys and values per query head), the hidden states kept for layer reuse, the prefill's activations and the
    weights."""
    need, avail = memory_needed(model.config, methods, length, extra, args) + _weights(model), \
        available_memory(args.device)
    print(f"   memory: about {need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB available on {args.device}")
    if need > 0.9 * avail:
        raise SystemExit(f"error: a {length}-token run with these methods needs about {need / 2**30:.1f} GiB but only "
                         f"{avail / 2**30:.1f} GiB is available on {args.device}; use a shorter --len, fewer methods "
                         "or --reuse layers (one DoPE cache at a time)")


def memory_passes(model, methods, length, extra, args, one: bool = False) -> list:
    """The methods in as few passes over the prompts as the device's memory allows, in their order. One pass holds
    the caches of all its head sets at once (with --reuse prefix each keeps the shared haystack); methods that do
    not fit beside each other run in a later pass, with shared prefixes of their own, and answer exactly as in one
    pass. Each pass's memory is printed (check_memory); a method that does not fit alone is refused. one: a single
    pass, checked as a whole (vLLM, which keeps its own KV memory)."""
    fits = 0.9 * available_memory(args.device) - _weights(model)
    passes = [list(methods)] if one else []
    for m in [] if one else methods:
        if passes and memory_needed(model.config, passes[-1] + [m], length, extra, args) <= fits:
            passes[-1].append(m)
        else:
            passes.append([m])
    for ms in passes:
        check_memory(model, ms, length, extra, args)
    if len(passes) > 1:
        print(f"   {len(passes)} passes over the prompts, as memory allows: " +
              " | ".join(", ".join(m.name for m in ms) for ms in passes))
    return passes


def in_pass(asked, ms) -> list:
    """The prompts a pass runs: each (key, prompt, methods) of `asked` with its methods cut to those of the pass
    `ms`, and without the prompts left with none."""
    return [(k, p, mine) for k, p, methods in asked if (mine := [m for m in methods if m in ms])]


def _weights(model) -> int:
    return sum(p.numel() * p.element_size() for p in getattr(model, "hf", model).parameters())


def memory_needed(c, methods, length, extra, args) -> int:
    b = torch.finfo(getattr(torch, args.dtype)).bits // 8
    T = length + extra
    layer_kv = 2 * c.head_dim * T * b  # keys + values of one head
    sets = {m.head_set: m for m in methods if m.heads}
    kv = c.n_layer * c.n_kv_head * layer_kv if not methods or baseline_runs(methods, args.reuse, args.layer_reuse) \
        else 0  # the baseline's; no methods: the check of the baseline alone
    dope_kv = []
    for m in sets.values():
        f = first_layer(m, args.reuse, args.layer_reuse)
        dope_layers = len({layer for layer, _ in m.heads})
        dope_kv.append(((c.n_layer - f) * c.n_kv_head + dope_layers * (c.n_head - c.n_kv_head)) * layer_kv)
    for m in {m.head_set: m for m in methods if m.role == "extension"}.values():  # a whole cache of its own
        dope_kv.append(c.n_layer * c.n_kv_head * layer_kv * (3 if m.variant == "selfextend" else 2) // 2)  # 2d keys
    kv += sum(dope_kv) if args.reuse == "prefix" else max(dope_kv, default=0)
    firsts = {first_layer(m, args.reuse, args.layer_reuse) for m in sets.values()} - {0}
    taps = 2 * len(firsts) * length * c.n_embd * b  # hidden states of the prefix and of a tail
    chunk = min(args.chunk or length, length)
    act = chunk * (3 * c.n_hidden + 8 * c.n_embd + 4 * c.n_head * c.head_dim) * 4  # MLP, residual, q/k/v, tables
    mask = min(args.chunk or TAIL_CHUNK, length) * T * b  # a tail's chunk x length mask
    logits = extra * c.vocab_size * 8  # teacher forcing's logits in float64
    return kv + taps + act + mask + logits


def trim_heap():
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; a no-op without glibc). Tensors up to
    32 MB live in that heap, so a long run's resident memory grows past what it holds: each prefill's transient
    tensors leave holes between the KV caches that stay, touched pages the heap keeps. Called after each prefill on
    a CPU, it keeps the memory a run prints (memory_needed) the memory it takes; it moves no number."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


def peak_resident() -> int:
    """This process's peak resident memory in bytes so far (Linux's ru_maxrss, in KiB), to print beside the
    estimate memory_needed gave."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory(device) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def announce_work(model, passes, prompts, todo, length, extra, args, stored=(), seconds=None, need=None) -> float:
    """Print what is left to run and its cost (less the shared prefixes saved on disk, `stored`; seconds: one full
    prefill's, for an ETA). passes: the methods left to run, as memory_passes groups them; prompts, todo:
    (depth, trial, prompt) of the setting and of what is left to run; need: the methods each of those prompts still
    runs (plan_work). Returns the work in full prefills."""
    if not todo:
        return 0.0
    missing = [m for ms in passes for m in ms]
    asked = [((d, t), p, need[d, t] if need is not None else missing) for d, t, p in todo]
    work = scratch = 0.0
    for ms in passes:  # each pass prefills its own shared prefix, and the baseline again where its sets read it
        mine = {k: methods for k, _, methods in in_pass(asked, ms)}
        sub = [x for x in todo if x[:2] in mine]
        work += plan_work(model.config, ms, sub, length, args.reuse, extra, args.layer_reuse, stored, mine)
        scratch += plan_work(model.config, ms, sub, length, "none", extra, need=mine)
    eta = f", ~{work * seconds / 3600:.1f} h at {seconds:.0f} s per full prefill (the calibration pass)" \
        if seconds else ""
    print(f"   {len(todo)} of {len(prompts)} prompts to run with {len(missing)} methods: about {work:.1f} full "
          f"prefills with --reuse {args.reuse} ({scratch:.1f} from scratch){eta}")
    return work
