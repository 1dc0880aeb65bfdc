"""Device-clean library code, checked on a CPU: everything a GPU run touches must live where the data is.

A model built on the `meta` device has tensors with shapes and dtypes but no storage. Every op on them runs its shape
logic only, and an op that mixes a meta tensor with a CPU tensor (other than a 0-dim scalar, which every device
accepts, as CUDA does) raises "Tensor on device cpu is not on the expected device meta" or refuses a cross-device
copy. So a stray CPU allocation inside a forward (a `torch.empty` without a device, a Gram kept on the CPU, a mask or
a DoPE table built on the host) fails here exactly as it would on a user's first GPU run, where CPU CI would
otherwise never notice: on a CPU, every default device is the right one.

Two things meta cannot do, and what these tests do about them:

- Read a value back to the host: `int(t)`, `bool(t)`, `t.item()`, `t.tolist()` (greedy decoding's next token,
  entropy's finiteness checks, select_heads' ranking). `HostReads` (a TorchFunctionMode) answers those calls on meta
  tensors with stand-in values (0, False, a list of zeros of the right shape) and counts them. The device path runs
  to its end; only the host's view of the values is fake. These reads are the places where a GPU run synchronises,
  which is where a small final result is allowed to move to the CPU.
- Compute anything: the numbers themselves are checked by the rest of the suite on the CPU (and by gpu_check.py on a
  GPU), not here.

A CPU tensor that is copied to the device (`.to(device)`) is not an error on meta or on a GPU, but on CUDA a blocking
host-to-device copy synchronises the stream, so one inside a layer costs a sync per layer. `HostCopies` (a
TorchDispatchMode) records every host-to-meta copy: after a warm-up, a forward may copy one small tensor, the RoPE
inverse frequencies (d/2 floats, computed on the host by model.rope_params), and nothing else.

The model is built under `with torch.device("meta")` and run outside it: inside, every factory call would default to
meta and hide the very allocations these tests look for.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import entropy
from dope import DopePlan, HeadRope, apply_dope, gaussian, remove_dope
from model import Config, Transformer
from tiny import ROPE_TYPES

META = torch.device("meta")
aten = torch.ops.aten
HEADS = [(0, 1), (1, 2), (1, 3)]  # both layers denoised; in layer 1 both heads of one KV group
PLANS = {  # every DoPE variant, and the documented ablations
    "none": None,
    "parts": dict(variant="parts"),
    "all": dict(variant="all"),
    "gaussian": dict(variant="gaussian"),
    "parts_zero": dict(variant="parts", zero=True),
    "all_zero": dict(variant="all", zero=True),
    "gaussian_v1": dict(variant="gaussian", gaussian_form="v1"),
    "gaussian_v2": dict(variant="gaussian", gaussian_form="v2"),
}


def meta_model(arch="llama", rope="ntk"):
    rope_scaling = {"rope_type": "ntk", "factor": 2.0} if rope == "ntk" else ROPE_TYPES[rope]
    cfg = Config(arch=arch, vocab_size=97, n_embd=32, n_hidden=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16,
                 max_pos=32, rope_scaling=rope_scaling, qkv_bias=arch == "qwen2", tie_embeddings=arch == "llama")
    with torch.device("meta"):
        m = Transformer(cfg).eval()
    assert all(p.is_meta for p in m.parameters())
    return m


def meta_ids(T):
    return torch.zeros(1, T, dtype=torch.long, device=META)


class HostReads(TorchFunctionMode):
    """Stand-in answers for reads of a meta tensor's values by the host (which meta cannot do); counts them."""

    VALUES = {"__int__": 0, "__index__": 0, "item": 0, "__bool__": False, "__float__": 0.0}

    def __init__(self):
        super().__init__()
        self.reads = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and args[0].is_meta and (name in self.VALUES or name == "tolist"):
            self.reads[name] = self.reads.get(name, 0) + 1
            t = args[0]
            return torch.zeros(t.shape, dtype=t.dtype).tolist() if name == "tolist" else self.VALUES[name]
        return func(*args, **(kwargs or {}))


class _HostCopiesDispatch(TorchDispatchMode):
    def __init__(self, copies):
        super().__init__()
        self.copies = copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = func.overloadpacket
        src, dst = (args[0], out) if kind in (aten.to, aten._to_copy) else \
            (args[1], args[0]) if kind is aten.copy_ else (None, None)
        if src is not None and src.device.type == "cpu" and dst.device.type == "meta" and src.dim() > 0:
            self.copies.append(tuple(src.shape))
        return out


class _HostDataFunction(TorchFunctionMode):
    # torch.tensor(host data, device=...) copies below the dispatcher, where a TorchDispatchMode does not see it
    def __init__(self, copies):
        super().__init__()
        self.copies = copies

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and args and not isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor) and out.is_meta and out.dim() > 0:
            self.copies.append(tuple(out.shape))
        return out


class HostCopies:
    """Records the shape of every copy of a non-scalar host tensor (or host data) to the meta device."""

    def __enter__(self):
        self.copies = []
        self._modes = [_HostDataFunction(self.copies), _HostCopiesDispatch(self.copies)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def steady_copies(step):
    """Host-to-device copies of the second of two calls of step() (the first one may fill caches)."""
    step()
    with HostCopies() as rec:
        step()
    return rec.copies


ROPE_FREQS = [(8,)]  # d/2 = 8 inverse frequencies: the one host copy a forward may make


# -----------------------------------------------------------------------------
# A whole forward: chunked prefill (the second chunk builds the bottom-right causal mask) and a cached decode step


def prefill_and_decode(m, T=24, chunk=16):
    cache = m.new_cache(1, T + 1)
    with torch.inference_mode():
        logits = m.prefill(meta_ids(T), cache, chunk=chunk)
        assert logits.device == META and logits.shape == (1, 1, 97)
        full = m(meta_ids(T), all_logits=True)  # one pass without a cache (SDPA's is_causal)
        assert full.device == META and full.shape == (1, T, 97)
        step = m(meta_ids(1), cache=cache)
        assert step.device == META and step.shape == (1, 1, 97)
    for k, v in zip(cache.k, cache.v):
        assert k.device == META and v.device == META
    return cache


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_forward_with_every_dope_variant_stays_on_the_device(arch, plan):
    m = meta_model(arch)
    if PLANS[plan] is not None:
        apply_dope(m, DopePlan(HEADS, **PLANS[plan]))
    cache = prefill_and_decode(m)
    if plan != "none":  # the DoPE layers store keys per query head, on the device
        assert all(k.shape[1] == 4 for k in cache.k)

    def decode_step():
        with torch.inference_mode():
            c = m.new_cache(1, 2)
            m(meta_ids(1), cache=c)
            m(meta_ids(1), cache=c)

    assert steady_copies(decode_step) == ROPE_FREQS * 2, "a forward copies only the RoPE frequencies from the host"
    remove_dope(m)


@pytest.mark.parametrize("rope", list(ROPE_TYPES))
def test_forward_with_every_rope_scaling_stays_on_the_device(rope):
    # 40 > max_pos: dynamic NTK's base grows with the length (and its prefill runs in one pass: chunks would each
    # rotate with their own base, which model.prefill refuses)
    prefill_and_decode(meta_model(rope=rope), T=40, chunk=40 if rope == "dynamic" else 16)


def test_head_rope_tables_and_gaussian_draws_on_the_positions_device():
    pos = torch.arange(100, 107, device=META)
    assert gaussian(42, 3, 1, 0, pos, 16).device == META
    cos, sin = torch.ones(7, 16, device=META), torch.zeros(7, 16, device=META)
    for name, kw in PLANS.items():
        if kw is None:
            continue
        plan = DopePlan([(0, 1)], **kw)
        plan.bands = torch.tensor([False] * 5 + [True] * 3)  # a host mask, as apply_dope or a user may leave it
        c, s, add = HeadRope(plan, 0, [1], 4)(cos, sin, pos)
        assert c.device == META and s.device == META and (add is None or add.device == META), name


# -----------------------------------------------------------------------------
# The scoring pass: Grams accumulate where q and k are; only the final ranking reaches the host


@pytest.mark.parametrize("preprocess, gram_dtype", [("none", torch.float64), ("uncomp", torch.float32)])
def test_scoring_pass_stays_on_the_device(preprocess, gram_dtype):
    m = meta_model()
    tokens = torch.zeros(1, 48, dtype=torch.long)  # host tokens, as a caller builds them: moved to the model
    with HostReads() as host:
        grams = entropy.score_model(m, tokens, chunk=16, progress=False, preprocess=preprocess, gram_dtype=gram_dtype)
        assert set(grams) == set(entropy.CRITERIA)
        for c, S in grams.items():
            assert S.device == META and S.shape == (2, 4, 16, 16) and S.dtype == torch.float64, c
        scores = entropy.head_scores(grams["query/post_ntk"], "trunc", r=1)  # eigvalsh on the device
        assert scores.device == META and scores.shape == (2, 4)
        assert entropy.mean_scores([scores, scores]).device == META
        heads = entropy.select_heads(scores, k=3)  # the one result that leaves the device
    assert len(heads) == 3 and host.reads.get("tolist")


@pytest.mark.parametrize("plan", ["none", "parts", "gaussian"])
def test_attention_probe_stays_on_the_device_and_reads_nothing_back(plan):
    """The probe's rows, mask and weights live where q and k are; it learns the chunk's positions from the shapes, so
    it reads no value back to the host (no sync per layer on a GPU)."""
    m = meta_model()
    if PLANS[plan]:
        apply_dope(m, DopePlan(HEADS, **PLANS[plan]))
    with HostReads() as host:
        w, q = entropy.attention_probe(m, torch.zeros(1, 40, dtype=torch.long), [3, 17, 30, 39], chunk=16)
    assert w.device == META and w.shape == (2, 4, 4, 40) and q.tolist() == [3, 17, 30, 39]
    assert not host.reads


def test_gram_accumulator_allocates_on_the_first_q_or_a_given_device():
    f = torch.ones(4)
    q, k, pos = torch.zeros(1, 4, 5, 8, device=META), torch.zeros(1, 2, 5, 8, device=META), torch.arange(5, device=META)
    acc = entropy.GramAccumulator(1, 4, 2, 8, f, f, preprocess="uncomp")
    acc(0, q, k, pos)
    assert all(S.device == META for S in acc.grams().values())
    acc = entropy.GramAccumulator(1, 4, 2, 8, f, f, device="meta")
    acc(0, q, k, pos)
    assert all(S.device == META for S in acc.grams().values())
    with pytest.raises(ValueError, match="device"):  # data elsewhere than the Grams: said, not a cryptic op error
        acc(0, torch.zeros(1, 4, 5, 8), torch.zeros(1, 2, 5, 8), torch.arange(5))


def test_apply_rope_half_allocates_on_the_inputs_device():
    x = torch.zeros(1, 2, 5, 8, device=META)
    cos, sin = entropy.rope_half_tables(torch.ones(4, device=META), torch.arange(5, device=META), torch.float64)
    out = entropy.apply_rope_half(x, cos, sin)
    assert out.device == META and out.dtype == torch.float64


# -----------------------------------------------------------------------------
# Cached greedy decoding, and the whole pipeline: score, select, denoise, answer


def test_generate_stays_on_the_device():
    m = meta_model()
    apply_dope(m, DopePlan(HEADS, "gaussian"))
    with HostReads() as host:
        out = m.generate(meta_ids(20), max_new_tokens=3, chunk=16)
        assert out == [0, 0, 0] and host.reads.get("__int__") == 3  # the only host reads: one token per step

        def one_token():
            m.generate(meta_ids(3), max_new_tokens=2)
        copies = steady_copies(one_token)
    # a prefill, then a decode step per new token but the last (its logits would go unused): the RoPE frequencies
    # only; each new token is fed back from the device's argmax, not copied from the host
    assert copies == ROPE_FREQS * 2


def test_score_select_denoise_generate_pipeline():
    m = meta_model()
    with HostReads():
        grams = entropy.score_model(m, meta_ids(32), chunk=16, progress=False, criteria=("query/post_ntk",))
        heads = entropy.select_heads(entropy.head_scores(grams["query/post_ntk"], "trunc", r=1), k=2)
        for variant in ("parts", "all", "gaussian"):
            apply_dope(m, DopePlan(heads, variant))
            assert len(m.generate(meta_ids(20), max_new_tokens=2, chunk=16)) == 2
    remove_dope(m)


# -----------------------------------------------------------------------------
# The harness catches what it is meant to catch


def test_a_stray_cpu_allocation_fails_on_meta():
    """A per-head table built on the host (torch.ones without a device) is the bug class these tests exist for."""
    m = meta_model()

    def host_tables(cos, sin, pos):
        return torch.ones(4, *cos.shape), torch.zeros(4, *sin.shape), None  # (H, T, d) on the CPU: wrong

    m.layers[0].self_attn.head_rope = host_tables
    with pytest.raises(RuntimeError, match="device"), torch.inference_mode():
        m(meta_ids(8))


def test_host_copies_are_recorded():
    with HostCopies() as rec:
        torch.ones(3, 5).to(META)
        torch.zeros(2, device=META).copy_(torch.ones(2))
        torch.tensor([[7]], device=META)
        torch.tensor(1.0).to(META)  # a scalar: not counted
    assert rec.copies == [(3, 5), (2,), (1, 1)]
