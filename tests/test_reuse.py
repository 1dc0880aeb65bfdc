"""nih/reuse.py: the shared prefix, layer reuse and saved prefixes give every method the answers of a full
recomputation, on the real default model."""

import time
from types import SimpleNamespace

import pytest
import torch

import eval_nih
from eval_nih import Method, PromptBuilder, parse_args
from model import SelfExtend, Tokenizer, Transformer
from nih.decode import answer_logprob
from nih.reuse import HeadSetRunner, PrefixStore, run_prompts
from tools.setup_weights import ensure_weights


N = 300  # prompt tokens: a haystack with three depths, short enough for the suite


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(ensure_weights("smollm2"))


@pytest.fixture(scope="module")
def smol():
    return Transformer.from_pretrained(ensure_weights("smollm2"), dtype=torch.float32)


def run_grid(model, tok, prompts, methods, reuse, chunk=0, max_new=8, store=None):
    """Every method on every prompt through run_prompts, as eval_nih.run_setting calls it; {(depth, trial, method):
    output}. store: a PrefixStore for the shared prefix."""
    prompts = sorted(prompts, key=lambda x: -x[2].needle_at)

    def decode(p, head_set, cache, logits):
        return eval_nih.answer_and_decode(model, head_set, cache, logits, tok.encode(" " + p.value),
                                          torch.tensor([p.ids]), max_new, {tok.eos_id}, 42)

    todo = [((d, t), p, methods) for d, t, p in prompts]
    return {(d, t, m.name): o for (d, t), m, o in run_prompts(model, todo, decode, extra=max_new + 16, chunk=chunk,
                                                                reuse=reuse, store=store)}


GRID_METHODS = [Method("none", "none", "baseline"), Method("parts/asc", "parts", "rule", heads=[(10, 3), (21, 1)]),
                Method("gaussian/asc", "gaussian", "rule", heads=[(3, 2), (29, 8)]),
                Method("all/random0", "all", "random", heads=[(0, 4), (17, 2)]),
                Method("twin", "all", "sweep", heads=[(0, 4), (17, 2)])]


@pytest.mark.parametrize("noisy, reuse, chunk", [(0, "prefix", 0), (2, "prefix", 0), (0, "prefix", 128),
                                                 (2, "layers", 0)])
def test_shared_prefix_and_layer_reuse_equal_a_full_recomputation(tok, smol, noisy, reuse, chunk):
    """Each head set prefilling the shared haystack once (and starting at its first denoised layer) gives every
    method the answer that a full recomputation of each prompt gives, and the answer's log-probability to 1e-5
    (float32; the matmul shapes differ, so not bit for bit), at depths 0%, 50% and 100%, original and noisy, in one
    pass or in chunks. Identical head sets run once."""
    b = PromptBuilder(tok, sink_id=smol.config.bos_token_id)
    prompts = eval_nih.setting_prompts(b, N, noisy, parse_args(["--depths", "3", "--trials", "1"]))
    full = full_grid(smol, tok, noisy)
    got = run_grid(smol, tok, prompts, GRID_METHODS, reuse, chunk, max_new=6)
    for cell, o in full.items():
        assert got[cell]["new"] == o["new"], cell
        assert got[cell]["logprob"] == pytest.approx(o["logprob"], abs=1e-5), cell
    assert len({round(o["logprob"], 4) for (d, _, n), o in full.items() if d == 0.5}) == 4  # the methods differ
    assert all(full[d, 0, "twin"] == full[d, 0, "all/random0"] for d in (0.0, 0.5, 1.0))


_FULL = {}


def full_grid(smol, tok, noisy):
    """The reference: every prompt recomputed from scratch by every method (computed once per noise setting)."""
    if noisy not in _FULL:
        b = PromptBuilder(tok, sink_id=smol.config.bos_token_id)
        prompts = eval_nih.setting_prompts(b, N, noisy, parse_args(["--depths", "3", "--trials", "1"]))
        _FULL[noisy] = run_grid(smol, tok, prompts, GRID_METHODS, "none", max_new=6)
    return _FULL[noisy]


def test_a_saved_shared_prefix_resumes_bit_for_bit(tok, smol, tmp_path, monkeypatch):
    """PrefixStore: each head set's prefix saved while the first run computes it is loaded by the next run with no
    forward at all, and every answer and log-probability is the first run's to the last bit, also when the saved
    prefix is longer than the rerun needs (its deepest needles already answered); a missing file costs only its
    head set (the baseline's saved hidden states start it); a torn file is named in a warning and recomputed; the
    folder ignores itself in git and is gone once cleared; a disk that refuses the file costs a warning, not the run."""
    b = PromptBuilder(tok, sink_id=smol.config.bos_token_id)
    prompts = eval_nih.setting_prompts(b, N, 2, parse_args(["--depths", "3", "--trials", "1"]))
    ident, methods = {"run": "test"}, [GRID_METHODS[0], GRID_METHODS[1], GRID_METHODS[3]]  # first layers 0, 10, 0
    store = PrefixStore(tmp_path / "kv", N, 2, ident)
    first = bits(run_grid(smol, tok, prompts, methods, "prefix", max_new=6, store=store))
    files = sorted((tmp_path / "kv").glob(f"prefix_{N}_noisy2_*.kv"))
    assert len(files) == 3  # baseline, parts/asc, all/random0
    assert (tmp_path / "kv" / ".gitignore").read_text().splitlines()[-1] == "*"

    forwards = []
    real = HeadSetRunner._prefill
    monkeypatch.setattr(HeadSetRunner, "_prefill", lambda self, hs, ids, cache, *a, **k:
                        forwards.append((hs, cache.pos)) or real(self, hs, ids, cache, *a, **k))
    again = bits(run_grid(smol, tok, prompts, methods, "prefix", max_new=6, store=store))
    deepest = max(p.needle_at for _, _, p in prompts)
    assert forwards and not [hs for hs, pos in forwards if pos == 0]  # tails only: no prefix was prefilled
    assert again == first  # the same tensors in: the same bits out

    shallower = [x for x in prompts if x[2].needle_at < deepest]  # the deepest prompt answered, the rest to run
    again = bits(run_grid(smol, tok, shallower, methods, "prefix", max_new=6, store=store))
    assert again == {c: o for c, o in first.items() if c[0] != 1.0}

    parts = store.path(methods[1].head_set, 10)
    parts.unlink()
    forwards.clear()
    again = bits(run_grid(smol, tok, prompts, methods, "prefix", max_new=6, store=store))
    assert [hs for hs, pos in forwards if pos == 0] == [methods[1].head_set]
    assert again == first and parts.exists()

    for damaged in (store.path(("none", ()), 0), parts):  # parts': the baseline was loaded without its taps
        damaged.write_bytes(damaged.read_bytes()[:-100])
        with pytest.warns(UserWarning, match=f"{damaged.name} is damaged"):
            again = bits(run_grid(smol, tok, prompts, methods, "prefix", max_new=6, store=store))
        assert again == first
    (tmp_path / "a-file").write_text("")
    blocked = PrefixStore(tmp_path / "a-file" / "kv", N, 2, ident)  # a disk that refuses: warned, not fatal
    cache = smol.new_cache(1, 8)
    smol.prefill(torch.tensor([[1, 2, 3]]), cache)
    with pytest.warns(UserWarning, match="cannot save the shared prefix"):
        blocked.save(("none", ()), 0, cache, [1, 2, 3])
    assert not blocked.saving
    other = PrefixStore(tmp_path / "kv", N, 0, ident)  # another setting: other files, untouched
    assert not other.has(("none", ()), 0)
    store.clear()
    assert not (tmp_path / "kv").exists()


def bits(outs):
    """What a record keeps of an output: the answer's tokens and its log-probability (not the timings)."""
    return {cell: (o["new"], o["logprob"]) for cell, o in outs.items()}


def test_the_runner_refuses_a_prompt_past_the_cached_prefix(tok, smol):
    b = PromptBuilder(tok)
    prompts = eval_nih.setting_prompts(b, 400, 0, parse_args(["--depths", "2"]))
    runner = HeadSetRunner(smol, [], 400, 20, 0, "prefix", "cpu", 42)
    shallow, deep = sorted((p for _, _, p in prompts), key=lambda p: p.needle_at)
    runner.prefix(b.stream(deep.needle_at), {("none", ())})
    list(runner.prompt(shallow.ids, shallow.needle_at, {("none", ())}, lambda *a: {}))
    with pytest.raises(RuntimeError, match="deepest needle first"):
        runner.prompt(deep.ids, deep.needle_at, {("none", ())}, lambda *a: {})


def test_prompts_that_do_not_share_the_stream_or_an_unknown_mode_are_refused(smol):
    """run_prompts checks what the shared prefix stands on before any forward: every prompt's tokens before its
    needle are the deepest prompt's."""
    deep, other = SimpleNamespace(ids=[1, 2, 3, 4, 5, 6], needle_at=4), SimpleNamespace(ids=[1, 9, 3, 4, 5, 6],
                                                                                       needle_at=2)
    base = [Method("none", "none", "baseline")]
    with pytest.raises(ValueError, match="prompt b: its tokens before the needle are not the shared stream's"):
        list(run_prompts(smol, [("a", deep, base), ("b", other, base)], None, extra=4))
    with pytest.raises(ValueError, match="reuse='both'"):
        list(run_prompts(smol, [("a", deep, base)], None, extra=4, reuse="both"))


def test_prefill_seconds_leave_out_the_decoding(tok, smol):
    """A record's prefill_seconds time the tail's prefill alone; the decoding has its own decode_seconds (records
    written before this was fixed counted the decoding in both)."""
    b = PromptBuilder(tok)
    prompts = eval_nih.setting_prompts(b, N, 0, parse_args(["--depths", "1"]))
    p = prompts[0][2]
    sets = {("none", ()), ("parts", ((3, 1),))}
    runner = HeadSetRunner(smol, [Method("parts/asc", "parts", "rule", heads=[(3, 1)])], N, 20, 0, "prefix", "cpu",
                           42)
    runner.prefix(b.stream(p.needle_at), sets)

    def slow_decode(head_set, cache, logits):
        time.sleep(1.0)
        return {"decode_seconds": 1.0}

    t0 = time.time()
    outs = dict(runner.prompt(p.ids, p.needle_at, sets, slow_decode))
    wall = time.time() - t0
    assert set(outs) == sets and all(o["prefill_seconds"] > 0 for o in outs.values())
    # the two prefills and the two 1-s decodings ran one after the other inside `wall`: counted once each, they fit
    assert sum(o["prefill_seconds"] for o in outs.values()) + 2 * 1.0 <= wall + 0.01, (outs, wall)


EXTENSION_METHODS = [Method("none", "none", "baseline"), Method("yarn", "yarn", "extension", {"factor": 2.0}),
                     Method("selfextend", "selfextend", "extension", {"group": 4, "window": 64})]


def test_extensions_reuse_their_own_prefix_and_equal_a_direct_forward(tok, smol):
    """YaRN and Self-Extend through run_prompts (each prefilling its own shared prefix, then the tails) give the
    answer and the log p of one forward over the whole prompt with the extension set on the model directly, and
    leave the model as it was loaded."""
    b = PromptBuilder(tok, sink_id=smol.config.bos_token_id)
    prompts = eval_nih.setting_prompts(b, N, 0, parse_args(["--depths", "2", "--trials", "1"]))
    got = run_grid(smol, tok, prompts, EXTENSION_METHODS, "prefix", max_new=6)
    for d, t, p in prompts:
        for m in EXTENSION_METHODS[1:]:
            if m.variant == "yarn":
                smol.config.rope_scaling = {"rope_type": "yarn", "factor": 2.0}
            else:
                smol.use_self_extend(SelfExtend(4, 64))
            try:
                cache, ids = smol.new_cache(1, 600), torch.tensor([p.ids])
                logits = smol.prefill(ids, cache, chunk=len(p.ids))
                lp = answer_logprob(smol, cache, logits, tok.encode(" " + p.value))
                new = smol.generate(ids, 6, {tok.eos_id}, cache=cache, logits=logits)
            finally:
                smol.config.rope_scaling = None
                smol.use_self_extend(None)
            assert got[d, t, m.name]["new"] == new and got[d, t, m.name]["logprob"] == pytest.approx(lp, abs=1e-5)
            assert abs(got[d, t, m.name]["logprob"] - got[d, t, "none"]["logprob"]) > 1e-4  # the extension acts
    assert smol.config.rope_scaling is None and all(blk.self_attn.self_extend is None for blk in smol.layers)


def test_extensions_alone_never_run_the_baseline_and_answer_as_beside_it(tok, smol, monkeypatch):
    """A run of YaRN and Self-Extend alone (the baseline's records already held) computes no baseline forward, for
    the shared prefix or any tail, and answers exactly as the same methods run beside the baseline."""
    b = PromptBuilder(tok)
    prompts = eval_nih.setting_prompts(b, N, 0, parse_args(["--depths", "2", "--trials", "1"]))
    beside = run_grid(smol, tok, prompts, EXTENSION_METHODS, "prefix", max_new=4)
    computed, real = [], HeadSetRunner._prefill

    def counting(self, head_set, *a, **kw):
        computed.append(head_set)
        return real(self, head_set, *a, **kw)

    monkeypatch.setattr(HeadSetRunner, "_prefill", counting)
    alone = run_grid(smol, tok, prompts, EXTENSION_METHODS[1:], "prefix", max_new=4)
    assert computed and ("none", ()) not in computed
    assert len(computed) == 2 * (1 + len(prompts))  # each extension: its shared prefix, then every tail
    assert set(alone) == {k for k in beside if k[2] != "none"}
    assert all(alone[k]["new"] == beside[k]["new"] and alone[k]["logprob"] == beside[k]["logprob"] for k in alone)

    # a resumed run: the baseline and a DoPE head set from layer 10 on the deepest prompt, YaRN alone on the other:
    # that prompt runs no baseline tail (nothing of it reads the baseline), and every answer is as in one run
    late = [EXTENSION_METHODS[0], Method("parts/asc", "parts", "rule", heads=[(10, 3)]), EXTENSION_METHODS[1]]
    prompts = sorted(prompts, key=lambda x: -x[2].needle_at)
    todo = [((d, t), p, late if i == 0 else late[2:]) for i, (d, t, p) in enumerate(prompts)]

    def decode(p, head_set, cache, logits):
        return eval_nih.answer_and_decode(smol, head_set, cache, logits, tok.encode(" " + p.value),
                                          torch.tensor([p.ids]), 4, {tok.eos_id}, 42)

    computed.clear()
    resumed = {(*k, m.name): o for k, m, o in run_prompts(smol, todo, decode, extra=20, reuse="prefix")}
    assert computed.count(("none", ())) == 2  # the shared prefix and the deepest prompt's tail, not the other's
    assert len(computed) == 2 * 3 + 1  # each head set's prefix and first tail; YaRN's second tail
    assert all(resumed[k]["new"] == beside[k]["new"] for k in resumed if k[2] != "parts/asc")


# --------------------------------------------------------------------------
# Saved prefixes that can never cost a result: a damaged file or an obstacle is named and recomputed, never used


def tiny_cache():
    """A prefix of a tiny random model: (model, its cache after 64 tokens, the tokens)."""
    from model import Config

    torch.manual_seed(0)
    m = Transformer(Config(vocab_size=97, n_embd=32, n_hidden=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=8,
                           max_pos=256, tie_embeddings=False)).eval()
    stream = list(range(1, 65))
    cache = m.new_cache(1, 128)
    m.prefill(torch.tensor([stream]), cache)
    return m, cache, stream


def zeros_in_the_data(p):
    with open(p, "r+b") as f:  # 2 KiB of the last layer's values, the size unchanged
        f.seek(p.stat().st_size - 4096)
        f.write(bytes(2048))


def folder_instead(p):
    p.unlink()
    p.mkdir()


def fifo_instead(p):
    import os

    p.unlink()
    os.mkfifo(p)


def edited_header(p):  # the header claims another head set
    data = p.read_bytes()
    p.write_bytes(data.replace(b'"head_set": ["none", []]', b'"head_set": ["all", [[]]]'))


# (id, what is done to the saved file, regex of the warning)
BAD_PREFIXES = [
    ("1 KiB of zeros in the tensor data", zeros_in_the_data, r"is damaged \(ValueError: its data does not match the "
                                                            r"sha256 it was saved with\); prefilling it again"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-100]), r"is damaged \(ValueError: \d+ bytes, the header"),
    ("another head set in the header", edited_header, r"is damaged"),
    ("a version-1 file", lambda p: p.write_bytes(b"DOPEKV1\n" + p.read_bytes()[8:]), r"not a saved prefix of this"),
    ("a folder at its path", folder_instead, r"is not a file \(a folder, a FIFO or a dangling link\?\): not read"),
    ("a FIFO at its path", fifo_instead, r"is not a file .*: not read"),
]


@pytest.mark.parametrize("damage, message", [r[1:] for r in BAD_PREFIXES], ids=[r[0] for r in BAD_PREFIXES])
def test_a_damaged_saved_prefix_or_an_obstacle_is_named_and_never_used(tmp_path, damage, message):
    """PrefixStore.load checks a file by the sha256 it ends in and by what its header claims (run, setting, head
    set, first layer, tokens) before a number of it counts, and never opens a folder or a FIFO at its path (a FIFO
    would block the run): each is a warning naming the file, and the prefix is computed again."""
    m, cache, stream = tiny_cache()
    store = PrefixStore(tmp_path / "pc", 64, 0, {"run": 1})
    store.save(("none", ()), 0, cache, stream)
    p = store.path(("none", ()), 0)
    damage(p)
    fresh = m.new_cache(1, 128)
    with pytest.warns(UserWarning, match=message):
        assert store.load(("none", ()), 0, fresh, stream, "cpu") is None
    assert fresh.pos == 0 and store.has(("none", ()), 0) is False


def test_an_intact_saved_prefix_is_loaded_bit_for_bit(tmp_path):
    m, cache, stream = tiny_cache()
    store = PrefixStore(tmp_path / "pc", 64, 0, {"run": 1})
    store.save(("none", ()), 0, cache, stream)
    fresh = m.new_cache(1, 128)
    assert store.load(("none", ()), 0, fresh, stream, "cpu") == {} and fresh.pos == 64
    assert all(torch.equal(a[:, :, :64], b[:, :, :64]) for a, b in zip(cache.k + cache.v, fresh.k + fresh.v))


def test_the_store_writes_and_deletes_only_what_it_owns(tmp_path):
    """A folder the store creates ignores itself in git and goes with its last cache; a folder that was there
    (--prefix-cache at --out, or at a folder of one's own .gitignore) gets no .gitignore and is never deleted; the
    temporary file of a save killed mid-write (its pid gone) is removed by the next store."""
    import subprocess
    import sys

    m, cache, stream = tiny_cache()
    ours = PrefixStore(tmp_path / "new", 64, 0, {"run": 1})
    ours.save(("none", ()), 0, cache, stream)
    assert (tmp_path / "new" / ".gitignore").read_text() == PrefixStore.IGNORE
    ours.clear()
    assert not (tmp_path / "new").exists()
    for name, mine in (("out", {"results.jsonl": "{}\n"}), ("rules", {".gitignore": "my rules\n"})):
        folder = tmp_path / name
        folder.mkdir()
        for f, text in mine.items():
            (folder / f).write_text(text)
        store = PrefixStore(folder, 64, 0, {"run": 1})
        store.save(("none", ()), 0, cache, stream)
        store.clear()
        assert {p.name: p.read_text() for p in folder.iterdir()} == mine
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / "new" / f".{ours.path(('none', ()), 0).name}.{dead.stdout.strip()}.tmp"
    killed.parent.mkdir()
    killed.write_bytes(bytes(1000))
    PrefixStore(tmp_path / "new", 64, 0, {"run": 1})
    assert not killed.exists()


def test_trim_heap_hands_freed_heap_pages_back(monkeypatch):
    """Mid-size tensors live in the C heap: freed between tensors that stay, their pages stay resident until
    budget.trim_heap hands them back (what keeps a long run's memory the memory it prints). In a process of its own:
    the check fixes glibc's mmap threshold, which must not leak into the other tests."""
    import ctypes
    import subprocess
    import sys
    from pathlib import Path

    from nih import budget

    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("no glibc: malloc_trim does not exist here, and trim_heap does nothing")
    check = """
import ctypes, torch
from nih import budget
ctypes.CDLL("libc.so.6").mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: 8 MB blocks in the heap, as after a run's frees
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
kept, freed = [], []
for i in range(64):
    (kept if i % 2 else freed).append(torch.ones(2 << 20))  # 8 MB each, touched
before = resident()
del freed
after_free = resident()
budget.trim_heap()
print(before - after_free, before - resident(), all(bool(t.eq(1).all()) for t in kept))
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    freed_alone, trimmed, intact = int(out[0]), int(out[1]), out[2] == "True"
    assert freed_alone < 0.1 * 32 * (8 << 20)  # freed, the 32 blocks' pages stay with the heap
    assert trimmed > 0.5 * 32 * (8 << 20)  # trimmed, they go back
    assert intact
    monkeypatch.setattr(budget, "_libc", lambda: SimpleNamespace())  # no malloc_trim: nothing to do, no error
    budget.trim_heap()
