"""Tests for entropy.py: the spectrum scores, the streamed Grams, head selection and the picture.

Property tests (hypothesis) state the invariant in their name and docstring. Rotations are checked against an
independent complex-number reference and against HF's apply_rotary_pos_emb.
"""

import math
import os
import re
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import entropy  # noqa: E402
from entropy import (  # noqa: E402
    CRITERIA, GramAccumulator, apply_rope_half, head_scores, mean_scores, plot_scores, rope_half_tables,
    score_model, select_heads, spectral_share, spectrum, truncated_entropy, truncated_entropy_renorm,
    vanilla_entropy,
)

FAST = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**31 - 1)
dims = st.sampled_from([2, 4, 8, 16])


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def random_x(seed, n, d, batch=()):
    """Anisotropic random activations (*batch, n, d): per-column scales spread over several decades."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp(2 * torch.randn(*batch, 1, d, generator=g, dtype=torch.float64))
    return torch.randn(*batch, n, d, generator=g, dtype=torch.float64) * scales


def gram(x):
    return x.mT @ x


def random_orthogonal(seed, d):
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed


def inv_freq(d, base):
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def rotate_ref(x, pos, inv_freq):
    """Independent half-split RoPE: band f is the complex number x_f + i x_{f+d/2}, turned by pos * theta_f.
    Angles in float32 as HF computes them, the rest in float64."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h].double(), x[..., h:].double())  # (..., T, d/2)
    angle = (pos.float()[:, None] * inv_freq.float()[None, :]).double()  # (T, d/2)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def reference_gram(x, pos, inv_freq, preprocess):
    """One-shot Gram of x (B, h, T, d) over batch and tokens, straight from the definitions. -> (h, d, d)."""
    x = x.double()
    if inv_freq is not None:
        x = rotate_ref(x, pos, inv_freq)
    x = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])  # (h, B*T, d)
    if preprocess == "uncomp":
        x = x / x.norm(dim=-1, keepdim=True)  # unit rows ...
        x = x - x.mean(dim=1, keepdim=True)  # ... then centred over tokens
    return gram(x)


def spike_gram(seed, d, strength):
    """A rank-one spike s u u^T on top of a noise Gram N, with s = strength * tr(N).
    lambda_max >= u^T S u >= s, so p1 >= strength / (1 + strength): strength >= 1/(e-1) gives p1 >= 1/e."""
    g = torch.Generator().manual_seed(seed)
    noise = gram(torch.randn(4 * d, d, generator=g, dtype=torch.float64))
    u = torch.randn(d, generator=g, dtype=torch.float64)
    u = u / u.norm()
    return strength * torch.trace(noise) * torch.outer(u, u) + noise


def spectrum_gram(p, seed):
    """A Gram with the given normalised spectrum p, in a random orthonormal basis."""
    Q = random_orthogonal(seed, len(p))
    return Q @ torch.diag(torch.tensor(p, dtype=torch.float64)) @ Q.T


# ---------------------------------------------------------------------------------------------------------------------
# 1. spectrum and scores

@FAST
@given(seed=seeds, d=dims, n=st.integers(1, 40), data=st.data())
def test_entropies_lie_in_0_ln_d_and_truncation_only_lowers_them(seed, d, n, data):
    """0 <= H^r <= H <= ln d, and the renormalised H^r lies in [0, ln r]."""
    r = data.draw(st.integers(1, d))
    S = gram(random_x(seed, n, d, batch=(2,)))  # (2, d, d)
    H, Hr, Hn = vanilla_entropy(S), truncated_entropy(S, r), truncated_entropy_renorm(S, r)
    eps = 1e-12
    assert ((0 <= Hr) & (Hr <= H + eps) & (H <= math.log(d) + eps)).all()
    assert ((Hn >= -eps) & (Hn <= math.log(r) + eps)).all()
    p = spectrum(S)
    assert (p >= 0).all() and (p[..., :-1] >= p[..., 1:]).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=torch.float64))


@FAST
@given(seed=seeds, d=dims, n=st.integers(1, 40), c=st.floats(0.01, 100) | st.floats(-100, -0.01), data=st.data())
def test_scores_invariant_under_scaling_and_rotation_of_x(seed, d, n, c, data):
    """Every score depends only on the spectrum of X^T X normalised by its trace: X -> cX and X -> XQ
    (Q orthogonal) leave all of them unchanged."""
    r = data.draw(st.integers(1, d))
    X = random_x(seed, n, d)
    Q = random_orthogonal(seed + 1, d)
    for metric in entropy.METRICS:
        base = head_scores(gram(X), metric, r)
        torch.testing.assert_close(head_scores(gram(c * X), metric, r), base, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(head_scores(gram(X @ Q), metric, r), base, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("d", [2, 8, 64])
def test_isotropic_gram_has_entropy_ln_d_and_rank_one_has_zero(d):
    iso = 3.0 * torch.eye(d, dtype=torch.float64)
    assert vanilla_entropy(iso).item() == pytest.approx(math.log(d), abs=1e-12)
    assert truncated_entropy(iso, d).item() == pytest.approx(math.log(d), abs=1e-12)
    assert truncated_entropy(iso, 1).item() == pytest.approx(math.log(d) / d, abs=1e-12)
    assert spectral_share(iso).item() == pytest.approx(1 / d, abs=1e-12)
    v = torch.arange(1, d + 1, dtype=torch.float64)
    rank_one = torch.outer(v, v)
    assert vanilla_entropy(rank_one).item() == pytest.approx(0.0, abs=1e-12)
    assert spectral_share(rank_one).item() == pytest.approx(1.0, abs=1e-12)


@FAST
@given(seed=seeds, d=dims, n=st.integers(1, 40))
def test_truncated_entropy_at_r_equal_d_is_vanilla_entropy(seed, d, n):
    """H^d = H: with every eigenvalue kept, truncation does nothing."""
    S = gram(random_x(seed, n, d, batch=(3,)))
    torch.testing.assert_close(truncated_entropy(S, d), vanilla_entropy(S), atol=1e-12, rtol=0)


@FAST
@given(seed=seeds, d=dims, n=st.integers(1, 40))
def test_renormalised_truncated_entropy_is_zero_at_r_1_for_every_head(seed, d, n):
    """v1 Eq. 30 at r = 1 keeps one eigenvalue renormalised to 1: -1 ln 1 = 0, so it cannot rank heads."""
    S = gram(random_x(seed, n, d, batch=(3, 4)))
    assert (truncated_entropy_renorm(S, 1) == 0).all()


@FAST
@given(seed=seeds, d=dims)
def test_spectral_share_is_spectral_norm_over_trace(seed, d):
    S = gram(random_x(seed, 2 * d, d, batch=(3,)))
    expected = torch.linalg.matrix_norm(S, ord=2) / S.diagonal(dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(spectral_share(S), expected, atol=1e-12, rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(heads=st.lists(st.tuples(seeds, st.floats(0.6, 20.0)), min_size=2, max_size=8, unique_by=lambda h: h[0]),
       d=st.sampled_from([4, 8, 16]))
def test_in_spike_regime_h1_ascending_ranks_like_spectral_norm_descending(heads, d):
    """For Grams with p1 >= 1/e, -x ln x is strictly decreasing in p1, so ranking heads by H^1 ascending gives
    exactly the ranking by normalised spectral norm p1 descending."""
    S = torch.stack([spike_gram(seed, d, strength) for seed, strength in heads])[None]  # (1, m, d, d)
    p1 = spectral_share(S)
    assert (p1 >= 1 / math.e).all(), "construction guarantees the spike regime"
    gaps = p1.flatten().sort().values.diff()
    assume(bool((gaps > 1e-6).all()))  # hypothesis likes duplicate heads; ties have no strict order
    m = S.shape[1]
    assert select_heads(truncated_entropy(S, 1), m, "asc") == select_heads(p1, m, "desc")
    assert select_heads(head_scores(S, "trunc", 1), m, "asc") == select_heads(head_scores(S, "spectral"), m, "desc")


@FAST
@given(d=st.sampled_from([4, 8, 16, 64]), a=st.floats(0.0, 0.99), seed=seeds, data=st.data())
def test_below_one_over_e_h1_order_reverses(d, a, seed, data):
    """For p1 < 1/e, -x ln x is increasing: the head with the larger spectral share has the larger H^1, so H^1
    ascending and p1 descending pick opposite heads."""
    b = data.draw(st.floats(a + 0.01, 1.0))
    floor, ceil = 1 / d + 1e-3, 1 / math.e - 1e-3  # p1 >= 1/d always
    p_small, p_big = floor + a * (ceil - floor), floor + b * (ceil - floor)
    grams = [spectrum_gram([p] + [(1 - p) / (d - 1)] * (d - 1), seed) for p in (p_big, p_small)]
    S = torch.stack(grams)[None]  # (1, 2, d, d): head 0 has the bigger spike
    p1, h1 = spectral_share(S)[0], truncated_entropy(S, 1)[0]
    assert p1[0] > p1[1] and (p1 < 1 / math.e).all()
    assert h1[0] > h1[1]
    assert select_heads(h1[None], 1, "asc") == [(0, 1)]
    assert select_heads(p1[None], 1, "desc") == [(0, 0)]


def test_spectrum_raises_on_all_zero_gram_naming_the_heads():
    S = gram(random_x(0, 10, 4, batch=(2, 3)))  # (2, 3, 4, 4)
    S[1, 2] = 0
    S[0, 0] = 0
    with pytest.raises(ValueError, match=r"zero trace.*\[\(0, 0\), \(1, 2\)\]"):
        spectrum(S)
    with pytest.raises(ValueError, match="zero trace"):
        head_scores(S, "vanilla")
    S = gram(random_x(0, 10, 4, batch=(2,)))
    S[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\[\(1,\)\]"):
        spectrum(S)


def test_head_scores_rejects_unknown_metric_listing_the_valid_ones():
    S = gram(random_x(0, 10, 4))
    with pytest.raises(ValueError, match="trunc, vanilla, renorm, spectral"):
        head_scores(S, "entropy")


@pytest.mark.parametrize("r", [0, -1, 5, 1.0, 2.5, True, "1", None])
def test_truncation_rank_outside_1_d_raises(r):
    S = gram(random_x(0, 10, 4))
    with pytest.raises(ValueError, match=r"\[1, d = 4\]"):
        truncated_entropy(S, r)
    with pytest.raises(ValueError, match=r"\[1, d = 4\]"):
        head_scores(S, "renorm", r)


def test_mean_scores_averages_per_prompt_scores():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    torch.testing.assert_close(mean_scores([a, b]), torch.tensor([[2.0, 4.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one"):
        mean_scores([])
    with pytest.raises(ValueError, match="same shape"):
        mean_scores([a, torch.zeros(2, 1)])


# ---------------------------------------------------------------------------------------------------------------------
# 2. streamed Grams

def test_rope_matches_hf_apply_rotary_pos_emb():
    """Parity with the reference: HF's x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), float32 tables."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    d, T = 16, 37
    x = torch.randn(2, 3, T, d)
    pos = torch.arange(100, 100 + T)
    cos, sin = rope_half_tables(inv_freq(d, 10000.0), pos)  # (T, d/2)
    full = lambda t: torch.cat((t, t), dim=-1)[None]  # (1, T, d), HF's table layout  # noqa: E731
    hf, _ = llama.apply_rotary_pos_emb(x, x, full(cos), full(sin))
    torch.testing.assert_close(apply_rope_half(x, cos, sin), hf, atol=1e-6, rtol=1e-6)
    x64 = apply_rope_half(x.double(), cos.double(), sin.double())
    torch.testing.assert_close(x64, hf.double(), atol=1e-5, rtol=1e-5)


def make_inputs(seed, B, T, n_head, n_kv_head, d, offset=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n_head, T, d, generator=g) + 2.0  # a mean, so that centring matters
    k = torch.randn(B, n_kv_head, T, d, generator=g) * torch.linspace(0.1, 3, d)
    return q, k, torch.arange(offset, offset + T)


def accumulate(q, k, pos, cuts, **kw):
    """Feed (q, k, pos) to a fresh accumulator in chunks split at `cuts`, layer 0 only."""
    B, H, T, d = q.shape
    acc = GramAccumulator(1, H, k.shape[1], d, **kw)
    bounds = [0, *cuts, T]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc(0, q[:, :, a:b], k[:, :, a:b], pos[a:b])
    assert acc.n_tokens == B * T
    return acc.grams()


@settings(max_examples=30, deadline=None)
@given(seed=seeds, T=st.integers(2, 48), B=st.sampled_from([1, 2]), preprocess=st.sampled_from(["none", "uncomp"]),
       offset=st.integers(0, 5000), data=st.data())
def test_streamed_gram_over_any_chunking_equals_one_shot_gram(seed, T, B, preprocess, offset, data):
    """sum over chunks of X_c^T X_c = X^T X for every criterion, with or without UNComp preprocessing (unit rows,
    centred over tokens by S - s s^T / N); both equal the Gram built from the full X by the definitions."""
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=6)))
    H, Hkv, d = 4, 2, 8
    q, k, pos = make_inputs(seed, B, T, H, Hkv, d, offset)
    freqs = {"pre_ntk": None, "post_ntk": inv_freq(d, 40000.0), "post_rope": inv_freq(d, 10000.0)}
    kw = dict(inv_freq_used=freqs["post_ntk"], inv_freq_orig=freqs["post_rope"], preprocess=preprocess)
    chunked, whole = accumulate(q, k, pos, cuts, **kw), accumulate(q, k, pos, [], **kw)
    for c in CRITERIA:
        kind, where = c.split("/")
        x = q if kind == "query" else k
        ref = reference_gram(x, pos, freqs[where], preprocess)  # (h, d, d)
        if kind == "key":
            ref = ref.repeat_interleave(H // Hkv, dim=0)
        scale = ref.abs().max()
        torch.testing.assert_close(chunked[c][0], whole[c][0], atol=1e-12 * scale, rtol=1e-12)
        torch.testing.assert_close(chunked[c][0], ref, atol=1e-6 * scale, rtol=1e-6)


def test_key_grams_are_shared_across_a_gqa_group():
    """Query head h reads KV head h // (n_head / n_kv_head): a group's heads get one key Gram, hence one score."""
    H, Hkv, d = 6, 2, 8
    q, k, pos = make_inputs(1, 1, 20, H, Hkv, d)
    G = accumulate(q, k, pos, [7], inv_freq_used=inv_freq(d, 500.0), inv_freq_orig=inv_freq(d, 100.0))
    for c in ("key/pre_ntk", "key/post_ntk", "key/post_rope"):
        S = G[c][0]  # (H, d, d)
        for h in range(H):
            assert torch.equal(S[h], S[(h // 3) * 3])
        assert not torch.allclose(S[0], S[3])
        scores = head_scores(G[c], "trunc", 2)[0]
        assert torch.equal(scores[:3], scores[0].expand(3)) and torch.equal(scores[3:], scores[3].expand(3))
    torch.testing.assert_close(G["key/pre_ntk"][0, 4], reference_gram(k[:, 1:2], pos, None, "none")[0])


def test_rotation_with_zero_frequencies_is_the_identity():
    """inv_freq = 0 means cos = 1, sin = 0 at every position: post-rotation Grams equal the pre-rotation ones."""
    d = 8
    q, k, pos = make_inputs(2, 2, 30, 4, 2, d, offset=1234)
    zero = torch.zeros(d // 2)
    G = accumulate(q, k, pos, [5, 17], inv_freq_used=zero, inv_freq_orig=zero)
    for kind in ("query", "key"):
        torch.testing.assert_close(G[f"{kind}/post_ntk"], G[f"{kind}/pre_ntk"], atol=0, rtol=0)
        torch.testing.assert_close(G[f"{kind}/post_rope"], G[f"{kind}/pre_ntk"], atol=0, rtol=0)


@FAST
@given(seed=seeds, offset=st.integers(0, 70000))
def test_rotation_preserves_the_trace(seed, offset):
    """RoPE is a rotation of each token's vector: norms, hence tr(X^T X) = sum of squared norms, are unchanged."""
    d = 16
    q, k, pos = make_inputs(seed, 1, 25, 4, 2, d, offset)
    G = accumulate(q, k, pos, [11], inv_freq_used=inv_freq(d, 10000.0 * 8), inv_freq_orig=inv_freq(d, 10000.0))
    tr = {c: G[c].diagonal(dim1=-2, dim2=-1).sum(-1) for c in CRITERIA}
    for kind in ("query", "key"):
        for where in ("post_ntk", "post_rope"):
            torch.testing.assert_close(tr[f"{kind}/{where}"], tr[f"{kind}/pre_ntk"], atol=0, rtol=1e-12)


def test_float32_gram_dtype_is_close_to_float64():
    d = 16
    q, k, pos = make_inputs(3, 1, 300, 4, 2, d, offset=30000)
    kw = dict(inv_freq_used=inv_freq(d, 40000.0), inv_freq_orig=inv_freq(d, 10000.0))
    G64 = accumulate(q, k, pos, [100, 200], **kw)
    G32 = accumulate(q, k, pos, [100, 200], gram_dtype=torch.float32, **kw)
    for c in CRITERIA:
        torch.testing.assert_close(G32[c], G64[c], atol=1e-5 * G64[c].abs().max(), rtol=1e-5)
        torch.testing.assert_close(head_scores(G32[c], "trunc", 1), head_scores(G64[c], "trunc", 1), atol=1e-6,
                                   rtol=0)


def test_accumulator_rejects_bad_configuration():
    f = inv_freq(8, 10000.0)
    with pytest.raises(ValueError, match="unknown criteria"):
        GramAccumulator(1, 4, 2, 8, f, f, criteria=("query/post_ntk", "value/pre_ntk"))
    with pytest.raises(ValueError, match="unknown preprocess"):
        GramAccumulator(1, 4, 2, 8, f, f, preprocess="centre")
    with pytest.raises(ValueError, match="multiple"):
        GramAccumulator(1, 4, 3, 8, f, f)
    acc = GramAccumulator(2, 4, 2, 8, f, f, criteria=("query/pre_ntk",))
    q, k, pos = make_inputs(0, 1, 5, 4, 2, 8)
    acc(0, q, k, pos)
    with pytest.raises(RuntimeError, match="every layer"):
        acc.grams()  # layer 1 never called
    acc(1, q, k, pos)
    assert list(acc.grams()) == ["query/pre_ntk"]


# ---------------------------------------------------------------------------------------------------------------------
# 3. score_model with a fake model that speaks the duck-typed API

class FakeCache:
    def __init__(self, max_len):
        self.pos, self.max_len = 0, max_len


class FakeModel:
    """Random token embeddings and per-layer q/k projections; calls observer(layer, q, k, pos) like model.py."""

    def __init__(self, n_layer=2, n_head=4, n_kv_head=2, head_dim=8, width=12, vocab=50, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.config = SimpleNamespace(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, head_dim=head_dim)
        self.emb = torch.randn(vocab, width, generator=g)
        self.wq = torch.randn(n_layer, width, n_head * head_dim, generator=g)
        self.wk = torch.randn(n_layer, width, n_kv_head * head_dim, generator=g)

    def rope_inv_freq(self, scaled=True, seq_len=None):
        """A dynamic-NTK-like base that grows with seq_len, so that a wrong length would show."""
        growth = max(1.0, (seq_len or 16) / 16) if scaled else 1.0
        return inv_freq(self.config.head_dim, 10000.0 * growth)

    def new_cache(self, batch=1, max_len=0):
        return FakeCache(max_len)

    def qk(self, tokens, layer):  # (1, t) -> q (1, H, t, d), k (1, Hkv, t, d), before rotation
        c = self.config
        x = self.emb[tokens]  # (1, t, width)
        q = (x @ self.wq[layer]).view(1, -1, c.n_head, c.head_dim).transpose(1, 2)
        k = (x @ self.wk[layer]).view(1, -1, c.n_kv_head, c.head_dim).transpose(1, 2)
        return q, k

    @contextmanager
    def observing(self, observer):
        self.observer = observer
        yield
        self.observer = None

    def __call__(self, tokens, cache):
        t = tokens.shape[1]
        assert cache.pos + t <= cache.max_len
        pos = torch.arange(cache.pos, cache.pos + t)
        for layer in range(self.config.n_layer):
            self.observer(layer, *self.qk(tokens, layer), pos)
        cache.pos += t


@pytest.mark.parametrize("preprocess", ["none", "uncomp"])
def test_score_model_chunked_prefill_gives_the_one_shot_grams(preprocess):
    model = FakeModel()
    tokens = torch.randint(0, 50, (1, 45), generator=torch.Generator().manual_seed(0))
    G = score_model(model, tokens, chunk=16, preprocess=preprocess, progress=False)  # chunks 16 + 16 + 13
    assert set(G) == set(CRITERIA)
    pos = torch.arange(45)
    freqs = {"pre_ntk": None, "post_ntk": model.rope_inv_freq(seq_len=45), "post_rope": model.rope_inv_freq(False)}
    for layer in range(2):
        q, k = model.qk(tokens, layer)
        for c in CRITERIA:
            kind, where = c.split("/")
            ref = reference_gram(q if kind == "query" else k, pos, freqs[where], preprocess)
            if kind == "key":
                ref = ref.repeat_interleave(2, dim=0)
            torch.testing.assert_close(G[c][layer], ref, atol=1e-6 * ref.abs().max(), rtol=1e-6)
    G1 = score_model(model, tokens[0], criteria=("key/post_ntk",), chunk=45, preprocess=preprocess, progress=False)
    torch.testing.assert_close(G1["key/post_ntk"], G["key/post_ntk"], atol=1e-9, rtol=1e-9)
    # gram_sum's blocks (a GPU's default form), here 5 tokens each: whole blocks and a tail in every chunk
    Gb = score_model(model, tokens, chunk=16, preprocess=preprocess, progress=False, gram_rows=5)
    for c in CRITERIA:
        torch.testing.assert_close(Gb[c], G[c], atol=1e-9, rtol=1e-9)
    # Several calibration prompts: average the scores, not the Grams.
    other = score_model(model, tokens.flip(1), criteria=("key/post_ntk",), chunk=16, progress=False,
                        preprocess=preprocess)
    scores = [head_scores(g["key/post_ntk"], "trunc", 1) for g in (G, other)]
    assert mean_scores(scores).shape == (2, 4)


def test_score_model_runs_a_prompt_shorter_than_its_chunk_as_one_chunk():
    """A prompt shorter than the chunk gives the Grams of the same prompt scored in one chunk of its own length."""
    tokens = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(3))
    short = score_model(FakeModel(), tokens, chunk=2048, progress=False)
    exact = score_model(FakeModel(), tokens, chunk=10, progress=False)
    assert all(torch.equal(short[c], exact[c]) for c in CRITERIA)


@pytest.mark.parametrize("chunk, message", [(0, "chunk=0"), (-4, "chunk=-4"), (2.5, "chunk=2.5"), (True, "chunk=True")])
def test_score_model_refuses_a_chunk_that_is_not_a_positive_int(chunk, message):
    with pytest.raises(ValueError, match=f"chunk must be an int >= 1.*{re.escape(message)}"):
        score_model(FakeModel(), torch.zeros(1, 10, dtype=torch.long), chunk=chunk, progress=False)


def test_score_model_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match=r"calibration prompt is empty \(0 tokens\)"):
        score_model(FakeModel(), torch.zeros(1, 0, dtype=torch.long), progress=False)


# ---------------------------------------------------------------------------------------------------------------------
# 4. head selection

def test_select_heads_ascending_and_descending():
    scores = torch.tensor([[0.5, 0.1, 0.9],
                           [0.3, 0.7, 0.2]])
    assert select_heads(scores, 3, "asc") == [(0, 1), (1, 2), (1, 0)]
    assert select_heads(scores, 2, "desc") == [(0, 2), (1, 1)]
    assert select_heads(scores, 6) == select_heads(scores, 6, "desc")[::-1]


def test_select_heads_breaks_ties_by_layer_then_head():
    scores = torch.tensor([[1.0, 0.0, 0.0],
                           [0.0, 1.0, 1.0]])
    assert select_heads(scores, 3, "asc") == [(0, 1), (0, 2), (1, 0)]
    assert select_heads(scores, 3, "desc") == [(0, 0), (1, 1), (1, 2)]
    assert select_heads(torch.zeros(2, 2), 4, "desc") == [(0, 0), (0, 1), (1, 0), (1, 1)]


@FAST
@given(seed=seeds, L=st.integers(1, 5), H=st.integers(1, 5), data=st.data())
def test_select_heads_takes_the_k_extreme_scores(seed, L, H, data):
    """asc returns k heads none of which scores above an unselected head; desc likewise from the top."""
    k = data.draw(st.integers(1, L * H))
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (L, H), generator=g).double()  # small range: many ties
    for order, sign in (("asc", 1), ("desc", -1)):
        chosen = select_heads(scores, k, order)
        assert len(set(chosen)) == k
        rest = [(l, h) for l in range(L) for h in range(H) if (l, h) not in chosen]
        if rest:
            assert max(sign * scores[c].item() for c in chosen) <= min(sign * scores[c].item() for c in rest)


@FAST
@given(seed=seeds, L=st.integers(1, 5), H=st.integers(1, 5), d=st.sampled_from([4, 64]), data=st.data())
def test_flat_removes_the_k_heads_of_lowest_spectral_share(seed, L, H, d, data):
    """flat, the high-rank reading: no chosen head has a larger p1 than an unchosen one, whatever spectra the heads
    have (spikes, flat spectra, and the ties of GQA key scores)."""
    k = data.draw(st.integers(1, L * H))
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(L, H, d, generator=g, dtype=torch.float64) ** torch.randint(1, 12, (L, H, 1), generator=g)
    p = p.sort(-1, descending=True).values
    p = p / p.sum(-1, keepdim=True)  # (L, H, d): normalised spectra, descending
    p[0] = p[-1]  # a repeated layer: tied scores
    p1 = entropy.spectrum_scores(p, "spectral")  # (L, H)
    chosen = select_heads(p1, k, "flat")
    rest = [(l, h) for l in range(L) for h in range(H) if (l, h) not in chosen]
    assert len(set(chosen)) == k
    if rest:
        assert max(p1[c].item() for c in chosen) <= min(p1[c].item() for c in rest)


@FAST
@given(p1=st.lists(st.integers(370, 1000), min_size=2, max_size=12, unique=True), data=st.data())
def test_in_spike_regime_flat_and_asc_on_h1_are_the_two_ends_of_one_ranking(p1, data):
    """Where every head has p1 >= 1/e, H^1 = -p1 ln p1 falls as p1 grows, so asc on H^1 removes the spikiest heads
    (p1 desc) and flat removes the other end, the k heads of highest H^1: the two readings never share a head while
    2k <= the number of heads."""
    p1 = torch.tensor(p1, dtype=torch.float64)[None] / 1000  # (1, H), distinct, all >= 0.37 > 1/e
    k = data.draw(st.integers(1, p1.shape[1] // 2))
    h1 = entropy.spectrum_scores(torch.stack((p1, 1 - p1), -1), "trunc", 1)  # (1, H): only p1 enters H^1
    assert select_heads(p1, k, "flat") == select_heads(h1, k, "desc")
    assert select_heads(h1, k, "asc") == select_heads(p1, k, "desc")
    assert not set(select_heads(p1, k, "flat")) & set(select_heads(h1, k, "asc"))


def test_flat_refuses_scores_that_are_not_spectral_shares():
    with pytest.raises(ValueError, match=r"'flat' ranks spectral shares p1 in \(0, 1\], got scores in \[-0.5, 2\]"):
        select_heads(torch.tensor([[-0.5, 2.0]]), 1, "flat")
    assert select_heads(torch.tensor([[0.5, 0.2, 1.0]]), 2, "flat") == [(0, 1), (0, 0)]


@pytest.mark.parametrize("k", [0, -1, 7, 2.0, True])
def test_select_heads_rejects_k_outside_1_to_all_heads(k):
    with pytest.raises(ValueError, match=r"\[1, 6\].*2 layers x 3 heads"):
        select_heads(torch.zeros(2, 3), k)


def test_select_heads_rejects_nan_or_inf_scores_and_unknown_order():
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="asc, desc, flat"):
        select_heads(scores, 1, "ascending")
    scores[1, 2] = float("nan")
    scores[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*\[\(0, 1\), \(1, 2\)\]"):
        select_heads(scores, 1)


# ---------------------------------------------------------------------------------------------------------------------
# 5. picture

def test_plot_scores_writes_a_png(tmp_path):
    scores = torch.rand(30, 9, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "scores.png"
    out = plot_scores(scores, select_heads(scores, 3), path, title="test", label="H^1")
    assert out == path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), h=st.integers(1, 3), T=st.integers(1, 70), d=st.sampled_from([2, 4, 8]),
       rows=st.integers(1, 32), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_gram_sum_is_the_sum_of_x_transpose_x_over_batch_and_tokens(B, h, T, d, rows, transposed, seed):
    """gram_sum's blocks (T a multiple of rows or not, shorter than one block, x laid out (B, T, h, d) and transposed
    as the model makes q) add up to the float64 Gram: exactly in float64, to float32 rounding in float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, h, d, generator=g, dtype=torch.float64).transpose(1, 2) if transposed else \
        torch.randn(B, h, T, d, generator=g, dtype=torch.float64)
    ref = torch.einsum("bhtd,bhte->hde", x, x)
    got = entropy.gram_sum(x, rows)
    assert got.dtype == torch.float64 and got.shape == (h, d, d)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy.gram_sum(x.float(), rows), ref, rtol=1e-5, atol=1e-5 * T)
    # on a CPU the default is one product per head, in x's dtype, the batch summed before float64: bit for bit
    assert torch.equal(entropy.gram_sum(x.float()), (x.float().mT @ x.float()).sum(0).double())
