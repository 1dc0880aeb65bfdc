"""dope.py: the three denoisings as table transformations, checked on a tiny random Llama (4 query / 2 KV heads)
and on a hand-written model that has only what the module docstring's contract names."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from dope import DopePlan, apply_dope, band_dims, by_all, by_parts, gaussian, low_freq_bands, remove_dope
from nih.reuse import prefill_from
from tiny import hf_tiny, ours

T = 40


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return ours(hf_tiny("llama", n_kv=2), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(1))


def head_outputs(model, idx, layer):
    """Per-head attention outputs (B, T, H, d) of one layer: the input of o_proj."""
    got = {}
    a = model.layers[layer].self_attn
    hook = a.o_proj.register_forward_pre_hook(lambda mod, args: got.setdefault("y", args[0]))
    try:
        model(idx, all_logits=True)
    finally:
        hook.remove()
    return got["y"].view(*idx.shape, a.n_head, a.head_dim)


def run(model, idx, plan=None, **kw):
    if plan is not None:
        apply_dope(model, plan, **kw)
    try:
        return model(idx, all_logits=True)
    finally:
        remove_dope(model)


def test_low_freq_bands_threshold():
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)  # wavelengths 2 pi / theta_f
    bands = low_freq_bands(inv_freq, native_len=1000)
    assert bands.tolist() == [(2 * math.pi / f) >= 1000 for f in inv_freq.tolist()]
    assert bands.tolist() == [False] * 5 + [True] * 3  # wavelengths 6.3, 20, 63, 199, 628 | 1987, 6283, 19869
    assert band_dims(bands).tolist() == bands.tolist() * 2  # half-split: band f is dims f and f + d/2


def test_table_transforms():
    cos, sin = torch.rand(5, 8), torch.rand(5, 8)
    dims = torch.tensor([True, False, False, True] * 2)
    c, s = by_parts(cos, sin, dims)
    assert (c[:, dims] == 1).all() and (s[:, dims] == 0).all() and torch.equal(c[:, ~dims], cos[:, ~dims])
    c, s = by_parts(cos, sin, dims, zero=True)
    assert (c[:, dims] == 0).all() and (s[:, dims] == 0).all()
    c, s = by_all(cos, sin)
    assert (c == 1).all() and (s == 0).all()


def test_by_all_on_every_head_equals_no_rotation(model, idx, tmp_path):
    nope = ours(hf_tiny("llama", n_kv=2), tmp_path, rope_scaling={"rope_type": "linear", "factor": math.inf})
    assert (nope.rope_inv_freq() == 0).all()  # theta_f = 0: cos = 1, sin = 0 everywhere
    every = [(layer, h) for layer in range(2) for h in range(4)]
    torch.testing.assert_close(run(model, idx, DopePlan(every, "all")), nope(idx, all_logits=True),
                               atol=1e-6, rtol=0)


def test_by_parts_without_low_bands_changes_nothing(model, idx):
    plain = run(model, idx)
    plan = DopePlan([(0, 1), (1, 3)], "parts", native_len=10**12)  # no band is that slow
    out = run(model, idx, plan)
    assert not plan.bands.any()
    torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)


def test_by_parts_with_every_band_equals_by_all(model, idx):
    heads = [(0, 2), (1, 0)]
    parts = DopePlan(heads, "parts", native_len=1)
    out = run(model, idx, parts)
    assert parts.bands.all()
    torch.testing.assert_close(out, run(model, idx, DopePlan(heads, "all")), atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["parts", "all", "gaussian"])
def test_only_the_selected_head_changes(model, idx, variant):
    """Heads 0 and 1 share KV head 0. Denoising head 1 (its query and its own copy of the shared key) must leave
    head 0 and every other head bit-for-bit unchanged, and change head 1."""
    before = head_outputs(model, idx, layer=1)
    apply_dope(model, DopePlan([(1, 1)], variant, native_len=8))
    try:
        after = head_outputs(model, idx, layer=1)
    finally:
        remove_dope(model)
    for h in (0, 2, 3):
        assert torch.equal(after[:, :, h], before[:, :, h]), f"untouched head {h} changed"
    assert not torch.allclose(after[:, :, 1], before[:, :, 1])


def test_layers_below_the_first_denoised_layer_are_untouched(model, idx):
    before = head_outputs(model, idx, layer=0)
    apply_dope(model, DopePlan([(1, 2)], "gaussian"))
    try:
        assert torch.equal(head_outputs(model, idx, layer=0), before)
    finally:
        remove_dope(model)


def test_remove_dope_restores_plain_rope_exactly(model, idx):
    plain = run(model, idx)
    apply_dope(model, DopePlan([(0, 0)], "gaussian"))
    assert not torch.equal(model(idx, all_logits=True), plain)
    remove_dope(model)
    assert torch.equal(model(idx, all_logits=True), plain)


@pytest.mark.parametrize("form", ["replace", "v1", "v2"])
def test_gaussian_prefill_and_cached_decode_agree(model, idx, form):
    plan = DopePlan([(0, 1), (1, 2)], "gaussian", gaussian_form=form)
    full = run(model, idx, plan)
    apply_dope(model, plan)
    try:
        cache = model.new_cache(1, T)
        parts = [model(idx[:, :17], cache=cache, all_logits=True)]
        parts += [model(idx[:, t:t + 1], cache=cache, all_logits=True) for t in range(17, T)]
    finally:
        remove_dope(model)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_gaussian_is_reproducible_for_a_seed_and_differs_across_seeds(model, idx):
    a = run(model, idx, DopePlan([(0, 1)], "gaussian", seed=42))
    assert torch.equal(a, run(model, idx, DopePlan([(0, 1)], "gaussian", seed=42)))
    assert not torch.equal(a, run(model, idx, DopePlan([(0, 1)], "gaussian", seed=7)))


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, 100_000), n=st.integers(1, 50), split=st.integers(0, 50))
def test_gaussian_draws_depend_only_on_position(start, n, split):
    pos = torch.arange(start, start + n)
    whole = gaussian(42, 3, 5, 0, pos, 16)
    split = min(split, n)
    torch.testing.assert_close(torch.cat((gaussian(42, 3, 5, 0, pos[:split], 16),
                                          gaussian(42, 3, 5, 0, pos[split:], 16))), whole, atol=0, rtol=0)


def test_gaussian_draws_are_standard_normal_and_independent_streams():
    z = gaussian(42, 0, 0, 0, torch.arange(4096), 64, sigma=2.0)  # 262144 draws
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 2.0) < 0.02
    assert abs(((z / 2) ** 4).mean().item() - 3.0) < 0.1  # normal kurtosis
    other = gaussian(42, 0, 0, 1, torch.arange(4096), 64, sigma=2.0)
    assert abs(torch.corrcoef(torch.stack((z.flatten(), other.flatten())))[0, 1].item()) < 0.01
    assert not torch.equal(gaussian(42, 0, 1, 0, torch.arange(8), 64), gaussian(42, 0, 0, 0, torch.arange(8), 64))


def test_bad_plans_are_clear_errors(model):
    with pytest.raises(ValueError, match="variant"):
        DopePlan([(0, 0)], "noise")
    with pytest.raises(ValueError, match="gaussian_form"):
        DopePlan([(0, 0)], "gaussian", gaussian_form="v3")
    with pytest.raises(ValueError, match=r"\(2, 0\).*2 layers x 4 heads"):
        apply_dope(model, DopePlan([(2, 0)], "all"))
    with pytest.raises(ValueError, match="do not exist"):
        apply_dope(model, DopePlan([(0, 4)], "all"))


@torch.inference_mode()
def test_prefix_reuse_equals_full_recomputation(model, idx):
    """A head denoised in layer 1 changes nothing below it: resuming at layer 1 from the plain run's hidden state and
    layer-0 cache gives bit-identical logits to a full DoPE forward, chunked prefill and decode included."""
    plan = DopePlan([(1, 2)], "gaussian")
    taps, base = {1: []}, model.new_cache(1, T)
    prefill_from(model, idx[:, :30], base, chunk=16, taps=taps)
    apply_dope(model, plan)
    try:
        full_cache = model.new_cache(1, T)
        want = [model.prefill(idx[:, :30], full_cache, chunk=16)] + [model(idx[:, t:t + 1], cache=full_cache)
                                                                    for t in range(30, T)]
        cache = model.new_cache(1, T)
        cache.share(base, 1)
        got = [prefill_from(model, idx[:, :30], cache, chunk=16, first=1, hidden=taps[1])]
        got += [model(idx[:, t:t + 1], cache=cache) for t in range(30, T)]
    finally:
        remove_dope(model)
    assert torch.equal(torch.cat(got, 1), torch.cat(want, 1))


def test_by_parts_takes_its_bands_from_the_scaled_base_in_use(tmp_path):
    """v2 Eq. 14: theta_f from the NTK-scaled base the forward uses, not the checkpoint's. With base 1e4, d = 16 and
    L_native = 32, the static NTK factor 8 (base x 57^(8/7)) turns one more band slow enough to count as low."""
    m = ours(hf_tiny("llama", n_kv=2), tmp_path, rope_scaling={"rope_type": "ntk", "factor": 8.0})
    plan = DopePlan([(0, 1)], "parts")
    apply_dope(m, plan)
    remove_dope(m)
    scaled = low_freq_bands(m.rope_inv_freq(), 32)
    unscaled = low_freq_bands(m.rope_inv_freq(scaled=False), 32)
    assert torch.equal(plan.bands, scaled) and not torch.equal(scaled, unscaled)
    assert int(scaled.sum()) > int(unscaled.sum())


def test_by_parts_under_hf_dynamic_scaling_is_refused(tmp_path):
    m = ours(hf_tiny("llama", n_kv=2, rope={"rope_type": "dynamic", "factor": 2.0}), tmp_path)
    with pytest.raises(ValueError, match="dynamic NTK"):
        apply_dope(m, DopePlan([(0, 1)], "parts"))
    apply_dope(m, DopePlan([(0, 1)], "parts"), inv_freq=m.rope_inv_freq(seq_len=64))  # explicit: allowed
    remove_dope(m)
    apply_dope(m, DopePlan([(0, 1)], "all"))  # no bands involved
    remove_dope(m)


# -----------------------------------------------------------------------------
# The contract of the module docstring, on a model that has nothing else


def rotate(x, cos, sin):
    return x * cos + torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), -1) * sin


class ContractAttention:
    """Only what dope.py's contract names: n_head and a head_rope slot, called as the contract says."""

    def __init__(self, n_head):
        self.n_head, self.head_rope = n_head, None

    def rope(self, q, k, cos, sin, pos):  # q (H, T, d), k (Hkv, T, d), cos/sin (T, d)
        if self.head_rope is None:
            return rotate(q, cos, sin), rotate(k, cos, sin)
        cos, sin, add = self.head_rope(cos, sin, pos)  # (H, T, d) each
        k = k.repeat_interleave(self.n_head // k.shape[0], 0)  # (H, T, d): a shared key once per query head
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        return (q, k) if add is None else (q + add[0], k + add[1])


class ContractModel:
    """layers[i].self_attn, and what by-parts reads: config.max_pos, config.rope_scaling, rope_inv_freq()."""

    def __init__(self, n_layer=3, n_head=4, d=8, max_pos=16, by_parts=True):
        self.layers = [type("Block", (), {"self_attn": ContractAttention(n_head)})() for _ in range(n_layer)]
        if by_parts:
            self.inv_freq = 1.0 / 10000.0 ** (torch.arange(0, d, 2).double() / d)  # (d/2,): 1, 0.1, 0.01, 0.001
            self.config = type("Config", (), {"max_pos": max_pos, "rope_scaling": None})()
            self.rope_inv_freq = lambda: self.inv_freq


@pytest.mark.parametrize("variant", ["parts", "all", "gaussian"])
def test_a_model_with_only_the_contract_gets_every_variant(variant):
    """apply_dope on a model that is not model.py: the denoised layers get a head_rope, the others none; in those
    layers the selected heads get the variant's tables (by-parts: no rotation on the bands below 2 pi / L_native,
    here bands 1-3 of 4) and every other head plain RoPE; remove_dope restores plain RoPE everywhere."""
    m, T, d = ContractModel(), 5, 8
    pos = torch.arange(3, 3 + T)
    freqs = pos[:, None].double() * m.inv_freq[None]  # (T, d/2)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()  # (T, d)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, T, d, generator=g, dtype=torch.float64)  # (H, T, d)
    k = torch.randn(2, T, d, generator=g, dtype=torch.float64)  # (Hkv, T, d)
    plain = rotate(q, cos, sin), rotate(k.repeat_interleave(2, 0), cos, sin)
    apply_dope(m, DopePlan([(1, 2), (2, 0)], variant))
    assert [a.self_attn.head_rope is not None for a in m.layers] == [False, True, True]
    dims = band_dims(low_freq_bands(m.inv_freq, 16))
    assert dims.tolist() == [False, True, True, True] * 2
    for layer, head in ((1, 2), (2, 0)):
        got = m.layers[layer].self_attn.rope(q, k, cos, sin, pos)
        for h in range(4):
            for x, x_plain, x_in in zip(got, plain, (q, k.repeat_interleave(2, 0))):
                if h != head:
                    assert torch.equal(x[h], x_plain[h]), (layer, h)
                elif variant == "parts":
                    assert torch.allclose(x[h], rotate(x_in[h], *by_parts(cos, sin, dims)))
                    assert torch.equal(x[h][:, dims], x_in[h][:, dims])  # the low bands keep q and k as they are
                elif variant == "all":
                    assert torch.equal(x[h], x_in[h])
                else:
                    assert not torch.allclose(x[h], x_plain[h])
    remove_dope(m)
    assert all(a.self_attn.head_rope is None for a in m.layers)
    q_out, k_out = m.layers[1].self_attn.rope(q, k, cos, sin, pos)
    assert torch.equal(q_out, plain[0]) and torch.equal(k_out, rotate(k, cos, sin))


def test_only_by_parts_needs_the_config_and_the_frequencies():
    """by-all and by-Gaussian read nothing but the layers; by-parts without config or rope_inv_freq fails naming
    the missing attribute, and with inv_freq and native_len given it needs neither."""
    m = ContractModel(by_parts=False)
    for variant in ("all", "gaussian"):
        apply_dope(m, DopePlan([(0, 1)], variant))
        assert m.layers[0].self_attn.head_rope is not None
    with pytest.raises(AttributeError, match="config"):
        apply_dope(m, DopePlan([(0, 1)], "parts"))
    m.config = type("Config", (), {"rope_scaling": None})()
    inv_freq = torch.tensor([1.0, 0.1, 0.01, 0.001])
    plan = DopePlan([(0, 1)], "parts", native_len=16)
    apply_dope(m, plan, inv_freq=inv_freq)
    assert plan.bands.tolist() == [False, True, True, True]
