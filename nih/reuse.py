"""
Exact reuse in the needle-in-a-haystack grid: every prompt of a setting answered by every method with only the
computations that provably differ, in one call (run_prompts).

- Shared prefix (reuse="prefix"): the tokens before a needle are the same for every prompt of a setting, so each head
  set prefills that stream once and every prompt only its tail.
- Layers (reuse != "none"): a DoPE head changes nothing below its layer, so a head set starts at its first denoised
  layer from the baseline's hidden state there, its cache pointing at the baseline's for the layers below.
- Saved prefixes (PrefixStore): each head set's shared prefix on disk while a setting runs, so that a run stopped
  before its last prompt resumes on the same machine without prefilling the haystack again.
- A head set is a DoPE plan (a variant and its heads) or another context extension (YaRN, Self-Extend; as_method),
  which changes every layer: it reuses its own shared prefix, nothing of the baseline's.

Answers are identical to a full recomputation and log-probabilities agree to float rounding (the matmul shapes
differ): tests/test_reuse.py checks both, and bench/bench_reuse.py measures what each reuse saves.
"""

import hashlib
import json
import math
import os
import shutil
import stat
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from dope import DopePlan, apply_dope, remove_dope
from model import SelfExtend, check_dynamic_chunks
from nih import records
from nih.budget import TAIL_CHUNK, baseline_runs, first_layer, trim_heap

MODES = ("prefix", "layers", "none")
BASELINE = ("none", ())  # the head set of the baseline: no variant, no heads
EXTENSIONS = ("yarn", "selfextend")  # other training-free extensions, run beside DoPE: a whole forward of their own


@contextmanager
def as_method(model, head_set, seed: int):
    """The model as a head set computes, inside the with block: DoPE's plan on the set's heads; or, for an extension,
    whose head set holds its parameters ((name, value) pairs) where DoPE's holds heads, YaRN in place of the loaded
    Dynamic NTK (("factor", a): model.rope_yarn's defaults otherwise) or Self-Extend on plain RoPE (("group", G),
    ("window", W)) for the whole forward; the baseline as loaded otherwise."""
    variant, heads = head_set
    rope = model.config.rope_scaling
    try:
        if variant == "yarn":
            model.config.rope_scaling = {"rope_type": "yarn", **dict(heads)}
        elif variant == "selfextend":
            model.config.rope_scaling = None
            model.use_self_extend(SelfExtend(**dict(heads)))
        elif heads:
            apply_dope(model, DopePlan(list(heads), variant, seed=seed))
        yield model
    finally:
        remove_dope(model)
        if variant == "selfextend":
            model.use_self_extend(None)
        model.config.rope_scaling = rope


def run_prompts(model, todo, decode, *, extra: int, chunk: int = 0, reuse: str = "prefix", device="cpu",
                seed: int = 42, layers: bool = True, store: "PrefixStore | None" = None):
    """Answer every prompt with each of its methods, reusing what is the same (see the module docstring).

    todo: [(key, prompt, methods)], deepest needle first; a prompt has .ids (all of one length) and .needle_at
    (ids[:needle_at] is the setting's shared stream); a method has .name, .head_set (variant, heads) and .heads.
    decode(prompt, head_set, cache, logits) is called while the cache holds the whole prompt (logits: its last
    position's, (1, 1, vocab)) and returns a dict. Yields (key, method, decode's output with prefill_seconds,
    first_layer and tail_tokens) as each head set finishes, so a caller can record it before the next one starts;
    methods with the same head set share one computation. layers=False: an engine that cannot resume a forward at
    a layer (transformers). store: where the shared prefixes are saved and loaded (model.py's KVCache only)."""
    if not todo:
        return
    if reuse not in MODES:
        raise ValueError(f"reuse={reuse!r}: expected one of {', '.join(MODES)}")
    methods = list({m.name: m for _, _, need in todo for m in need}.values())
    runner = HeadSetRunner(model, methods, len(todo[0][1].ids), extra, chunk, reuse, device, seed, layers)
    if reuse == "prefix":
        deepest = todo[0][1]
        stream = deepest.ids[:deepest.needle_at]  # every other prompt's prefix is a prefix of it
        for key, p, _ in todo:
            if p.ids[:p.needle_at] != stream[:p.needle_at]:
                raise ValueError(f"prompt {key}: its tokens before the needle are not the shared stream's")
        runner.prefix(stream, {m.head_set for m in methods}, store)
    for key, p, need in todo:
        start = p.needle_at if reuse == "prefix" else 0
        wanted = list(dict.fromkeys(m.head_set for m in need))  # the methods' order: outputs come out in it
        for head_set, out in runner.prompt(p.ids, start, wanted, lambda s, cache, logits: decode(p, s, cache, logits)):
            out |= dict(first_layer=runner.sets[head_set], tail_tokens=len(p.ids) - start)
            for m in need:
                if m.head_set == head_set:
                    yield key, m, out


def head_sets(methods, reuse: str, layers: bool = True) -> dict:
    """head set -> the layer its forward starts at, the baseline's (0) first: the computations run_prompts does."""
    sets = {BASELINE: 0}
    for m in methods:
        sets.setdefault(m.head_set, first_layer(m, reuse, layers))
    return sets


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
    """The computations of run_prompts, one setting at a time: prefix() prefills the shared stream for each head set,
    then prompt() runs each prompt's tail, deepest needle first.

    - Shared prefix: prompt p is stream[:P] + tail with P = p.needle_at. Each head set's KV cache holds the longest
      shared prefix; a prompt rewinds it to its P (everything before P is still the stream's) and prefills its tail.
    - Layers: a DoPE head set's cache points at the baseline's for the layers below its first denoised layer f, and
      its prefills start at f from the baseline's hidden state there (taps). The baseline runs each tail first, so
      those shared layers hold the current prompt when a DoPE head set reads them; decoding writes each position
      past the prompt before reading it."""

    def __init__(self, model, methods, length: int, extra: int, chunk: int, reuse: str, device, seed: int,
                 layers: bool = True):
        self.model, self.length, self.extra, self.chunk, self.reuse, self.device, self.seed = \
            model, length, extra, chunk, reuse, device, seed
        self.valid = 0  # leading positions of the baseline's cache that still hold the shared stream
        self.sets = head_sets(methods, reuse, layers)  # head set -> first layer
        self.base = baseline_runs(methods, reuse, layers)  # extensions alone never run the baseline's forward
        self.caches = {}
        self.cpu = torch.device(device).type == "cpu"  # where the C heap holds the tensors (budget.trim_heap)

    def _prefill(self, head_set, ids, cache, taps=None, hidden=None):
        f = self.sets[head_set]
        chunk = (self.chunk or TAIL_CHUNK) if cache.pos else (self.chunk or len(ids))
        idx = torch.tensor([ids], device=self.device)
        with as_method(self.model, head_set, self.seed):
            if f or taps:  # layer reuse (model.py only)
                logits = prefill_from(self.model, idx, cache, chunk, f, hidden[f] if f else None, taps)
            else:
                logits = self.model.prefill(idx, cache, chunk)
        if self.cpu:
            trim_heap()  # the prefill's transient tensors are freed: their pages go back
        return logits

    def _cache(self, head_set):
        if head_set not in self.caches:
            cache = self.model.new_cache(1, self.length + self.extra)
            if self.sets[head_set]:  # shared with the baseline below the first denoised layer
                cache.share(self.caches[BASELINE], self.sets[head_set])
            self.caches[head_set] = cache
        return self.caches[head_set]

    def prefix(self, stream: list, wanted, store: "PrefixStore | None" = None):
        """Prefill the shared stream into the baseline's cache and each wanted head set's; with a store, load each
        cache that was saved (a run resumed on the same machine) and save each one computed."""
        store = store or PrefixStore(None, 0, 0, {})
        dope = [s for s in wanted if s != BASELINE]
        need = {self.sets[s] for s in dope if not store.has(s, self.sets[s])} - {0}  # taps for what is computed
        base = self._cache(BASELINE) if self.base else None
        taps = store.load(BASELINE, 0, base, stream, self.device, need, self.chunk) if self.base else {}
        if taps is None:
            taps = {f: [] for f in {self.sets[s] for s in dope} if f > 0}
            self._prefill(BASELINE, stream, base, taps=taps)
            store.save(BASELINE, 0, base, stream, taps)
        for s in dope:
            cache = self._cache(s)
            loaded = store.load(s, self.sets[s], cache, stream, self.device)
            if self.cpu:
                trim_heap()  # the file's buffers are freed: their pages go back before the next cache fills
            if loaded is None:
                f = self.sets[s]
                if f and f not in taps:  # its file was damaged: the baseline's hidden states are needed after all
                    taps[f] = []
                    base.rewind(0)
                    self._prefill(BASELINE, stream, base, taps={f: taps[f]})
                self._prefill(s, stream, cache, hidden=taps)
                store.save(s, self.sets[s], cache, stream)
        self.valid = len(stream)

    def prompt(self, ids: list, start: int, wanted, decode):
        """Run the tail ids[start:] for the baseline and every wanted head set, in wanted's order; decode(head_set,
        cache, logits) is called for each while its cache holds the whole prompt. Yields (head_set, decode's output
        with prefill_seconds) as each head set finishes, so a caller can record it before the next one starts. The
        baseline's tail runs when it is wanted or a wanted head set reads its lower layers (baseline_runs), decoded
        only when wanted."""
        if start > self.valid:
            raise RuntimeError(f"the cached shared prefix holds {self.valid} positions, the prompt needs {start}: "
                               "run prompts deepest needle first")
        return self._prompt(ids, start, wanted, decode)

    def _prompt(self, ids, start, wanted, decode):
        for cache in self.caches.values():
            cache.rewind(min(cache.pos, start))
        self.valid = start  # the tail overwrites what followed
        taps = {f: [] for f in {self.sets[s] for s in wanted} if f > 0}
        if self.base and (BASELINE in wanted or taps):  # else nothing of this prompt reads it (a resumed prompt)
            base = self._cache(BASELINE)
            t0 = time.time()
            logits = self._prefill(BASELINE, ids[start:], base, taps=taps)
            seconds = seconds_since(t0, logits)
            if BASELINE in wanted:
                yield BASELINE, decode(BASELINE, base, logits) | {"prefill_seconds": seconds}
        for s in wanted:
            if s == BASELINE:
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
    second copy of a cache in memory) and ends in the sha256 of everything before it, and is deleted once the setting
    is complete. A file whose digest, size or header (run, setting, head set, first layer, tokens) is not what it
    should be is recomputed with a warning naming it; something other than a file at its path (a folder, a FIFO) is
    never opened for reading, and named. Loaded numbers are the saved ones, bit for bit.

    A folder the store creates ignores itself in git (caches are gigabytes and belong to one machine) and is removed
    when its last cache is; a folder that existed before (--prefix-cache at a folder of yours) gets neither."""

    MAGIC = b"DOPEKV2\n"
    IGNORE = "# caches of a run in progress: gigabytes, for this machine only\n*\n"

    def __init__(self, folder, length: int, noisy: int, ident: dict):
        self.folder = Path(folder) if folder else None
        self.tag = f"prefix_{length}_noisy{noisy}"
        self.key = dict(ident=ident, length=length, noisy=noisy)
        self.saving = self.folder is not None
        if self.folder is not None and self.folder.is_dir():
            records.remove_stale_temporaries(self.folder)  # of a save killed mid-write

    def path(self, head_set, first: int) -> Path | None:
        if self.folder is None:
            return None
        variant, heads = head_set
        return self.folder / f"{self.tag}_{records.digest([self.key, variant, [list(h) for h in heads], first])}.kv"

    def has(self, head_set, first: int) -> bool:
        p = self.path(head_set, first)
        return p is not None and p.is_file()

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
            h = hashlib.sha256(self.MAGIC + len(header).to_bytes(8, "little") + header.encode())
            f.write(self.MAGIC + len(header).to_bytes(8, "little") + header.encode())
            for _, t in named:  # one tensor at a time: contiguous on the CPU, then its bytes
                data = memoryview(t.contiguous().cpu().view(torch.uint8).numpy())
                h.update(data)
                f.write(data)
            f.write(h.digest())

        try:
            if not self.folder.is_dir():
                self.folder.mkdir(parents=True)  # ours: it ignores itself, and goes when its caches do
                (self.folder / ".gitignore").write_text(self.IGNORE)
            if shutil.disk_usage(self.folder).free < size + 2**30:
                raise OSError(f"not enough free disk for {size / 2**30:.1f} GiB")
            records.write_atomic(self.path(head_set, first), write)
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
        `chunk`, as prefill_from reads them), or None when there is no usable file (the cache's position is then
        unchanged, and a prefill overwrites whatever a damaged file put in it)."""
        p = self.path(head_set, first)
        if p is None or not (p.exists() or p.is_symlink()):
            return None
        if not p.is_file():
            warnings.warn(f"{p} is not a file (a folder, a FIFO or a dangling link?): not read; prefilling the shared "
                          "prefix again (remove it to let this run save its prefix there)")
            return None
        n = len(stream)
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put there since the check must not block the run
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise ValueError("not a file")
            with os.fdopen(fd, "rb") as f:
                head = f.read(len(self.MAGIC) + 8)
                if head[:len(self.MAGIC)] != self.MAGIC:
                    raise ValueError("not a saved prefix of this version")
                raw = f.read(int.from_bytes(head[len(self.MAGIC):], "little"))
                digest = hashlib.sha256(head + raw)
                h = json.loads(raw)
                shapes = {name: (shape, getattr(torch, dtype.removeprefix("torch.")))
                          for name, shape, dtype in h["tensors"]}
                size = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
                if p.stat().st_size != f.tell() + size + digest.digest_size:
                    raise ValueError(f"{p.stat().st_size} bytes, the header promises "
                                     f"{f.tell() + size + digest.digest_size}")
                if h["key"] != self.key or h["first"] != first or h["ids"][:n] != stream or \
                        h["head_set"] != [head_set[0], [list(x) for x in head_set[1]]] or \
                        not {f"tap{t}" for t in taps} <= set(shapes):
                    print(f"   {p.name}: saved for other tokens or a shorter prefix; prefilling it again")
                    return None
                out = {}
                for name, (shape, dtype) in shapes.items():  # in file order
                    buf = torch.empty(shape, dtype=dtype)
                    f.readinto(memoryview(buf.view(torch.uint8).numpy()))
                    digest.update(memoryview(buf.view(torch.uint8).numpy()))
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
                if f.read() != digest.digest():
                    raise ValueError("its data does not match the sha256 it was saved with")
        except Exception as e:  # torn, damaged or foreign: a cache, so recompute it
            warnings.warn(f"{p} is damaged ({type(e).__name__}: {e}); prefilling it again")
            p.unlink(missing_ok=True)
            return None
        cache.pos = n
        print(f"   shared prefix of {head_set[0]} {list(head_set[1])}: {n} positions loaded from {p}")
        return {t: list(out[t].split(chunk or n, dim=1)) for t in taps}

    def clear(self):
        """The setting is complete: delete its saved prefixes, and the folder when the store created it (it holds
        the store's own .gitignore) and nothing else is left in it."""
        if self.folder is None or not self.folder.is_dir():
            return
        for p in self.folder.glob(f"{self.tag}_*.kv"):
            if p.is_file():
                p.unlink()
        ignore = self.folder / ".gitignore"
        if [p.name for p in self.folder.iterdir()] == [".gitignore"] and ignore.is_file() and \
                ignore.read_text() == self.IGNORE:
            shutil.rmtree(self.folder)


