"""Self-Extend in model.py (SelfExtend, self_extend_attention) against a dense reference written from the paper: every
query-key score from the relative position RoPE gives it (as complex numbers), the neighbour window built as the
reference implementation builds it, one softmax; then against itself chunked and cached, with DoPE on top. Every
test runs twice: the far keys' attention through PyTorch's fused kernel and through the explicit product."""

import functools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import dope
import model
from model import Config, SelfExtend, Transformer, inv_freq_default, self_extend_attention


@pytest.fixture(autouse=True, params=["fused", "explicit"])
def lse_path(request, monkeypatch):
    """model.attention_lse's two paths (the fused one where this PyTorch has it)."""
    monkeypatch.setattr(model, "USE_FUSED_LSE", request.param == "fused")
    return request.param


def tiny(n_kv=2, max_pos=32, seed=0, rope_scaling=None):
    cfg = Config(vocab_size=61, n_embd=32, n_hidden=48, n_layer=2, n_head=4, n_kv_head=n_kv, head_dim=8,
                 max_pos=max_pos, rope_scaling=rope_scaling, tie_embeddings=False)
    torch.manual_seed(seed)
    m = Transformer(cfg).float().eval()
    for p in m.parameters():  # larger weights than the default init: attention far from uniform
        torch.nn.init.normal_(p, std=0.4)
    return m


def neighbour_mask(T: int, W: int) -> torch.Tensor:
    """The window as the LongLM code builds it for a prompt (q_len == kv_len): the causal lower triangle, minus,
    from row W on, the lower triangle of the first T - W columns. True: a neighbour (0 <= i - j < W)."""
    m = torch.ones(T, T).tril()
    if T > W:
        m[W:, :T - W] -= torch.ones(T - W, T - W).tril()
    return m.bool()


def dense_reference(attn, x, se: SelfExtend, frozen=None):
    """Attention output (B, T, C) of one layer under Self-Extend, from q, k, v alone: the score of query i and key j
    is Re(sum_f q_f conj(k_f) e^{i theta_f delta}) / sqrt(d) with q_f = q[f] + i q[f + d/2] (RoPE's inner product
    depends only on the distance), delta = i - j inside the window and (i // G + W - W // G) - j // G outside it;
    `frozen` {head: bands (d/2,) bool} sets theta_f = 0 there (DoPE by-parts: those bands unrotated)."""
    B, T, _ = x.shape
    H, h, d = attn.n_head, attn.n_kv_head, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, d).transpose(1, 2).double()
    k = attn.k_proj(x).view(B, T, h, d).transpose(1, 2).repeat_interleave(H // h, dim=1).double()
    v = attn.v_proj(x).view(B, T, h, d).transpose(1, 2).repeat_interleave(H // h, dim=1).double()
    qc, kc = torch.complex(q[..., :d // 2], q[..., d // 2:]), torch.complex(k[..., :d // 2], k[..., d // 2:])
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    G, W = se.group, se.window
    near = neighbour_mask(T, W)
    delta = torch.where(near, i - j, (i // G + W - W // G) - j // G).double()  # (T, T)
    theta = inv_freq_default(attn.config.rope_theta, d).double()  # (d/2,)
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    for head in range(H):
        th = theta.masked_fill(frozen[head], 0.0) if frozen and head in frozen else theta
        phase = torch.polar(torch.ones(T, T, d // 2, dtype=torch.float64), delta[..., None] * th)  # (T, T, d/2)
        scores = (qc[:, head, :, None, :] * kc[:, head, None, :, :].conj() * phase).sum(-1).real / math.sqrt(d)
        scores = scores.masked_fill(j > i, float("-inf"))  # (B, T, T)
        out[:, head] = torch.softmax(scores, dim=-1) @ v[:, head]
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * d).float())


def layer_input(m, idx):
    return m.layers[0].input_layernorm(m.embed_tokens(idx))


@pytest.mark.parametrize("block", [512, 5])  # 5: blocks past the window, whose far keys are a softmax of their own
@pytest.mark.parametrize("n_kv,G,W", [(2, 2, 8), (1, 4, 8), (4, 3, 6), (2, 8, 8)])
def test_attention_matches_the_dense_reference(n_kv, G, W, block, monkeypatch):
    monkeypatch.setattr(model, "self_extend_attention", functools.partial(self_extend_attention, block=block))
    m = tiny(n_kv=n_kv)
    m.use_self_extend(SelfExtend(G, W))
    attn = m.layers[0].self_attn
    idx = torch.randint(0, 61, (2, 40))
    x = layer_input(m, idx)
    with torch.no_grad():
        cos, sin, pos, mask = m.rope_at(0, 40, x)
        got = attn(x, cos, sin, pos, None, mask)
        want = dense_reference(attn, x, SelfExtend(G, W))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_the_window_is_the_reference_implementations_mask():
    """Its construction (lower triangle minus the shifted one) is exactly 0 <= i - j < W."""
    for T, W in ((10, 3), (5, 8), (12, 12), (12, 1)):
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        assert torch.equal(neighbour_mask(T, W), (i - j >= 0) & (i - j < W)), (T, W)


def test_dope_by_parts_on_top_matches_the_reference_with_frozen_bands():
    m = tiny()
    plan = dope.DopePlan(heads=[(0, 1), (0, 3)], variant="parts")
    dope.apply_dope(m, plan, inv_freq=m.rope_inv_freq())
    m.use_self_extend(SelfExtend(2, 8))
    attn = m.layers[0].self_attn
    x = layer_input(m, torch.randint(0, 61, (1, 40)))
    assert plan.bands.any() and not plan.bands.all()  # some bands frozen, some not: the test can tell
    with torch.no_grad():
        cos, sin, pos, mask = m.rope_at(0, 40, x)
        got = attn(x, cos, sin, pos, None, mask)
        want = dense_reference(attn, x, SelfExtend(2, 8), frozen={1: plan.bands, 3: plan.bands})
        plain = dense_reference(attn, x, SelfExtend(2, 8))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize("variant", [None, "parts", "gaussian"])
def test_chunked_prefill_and_cached_decoding_equal_one_pass(variant):
    """Prefill in uneven chunks, then decode token by token through the KV cache: the same logits as one
    forward over the whole sequence (GQA, positions far past the window, DoPE per-head tables on both levels)."""
    m = tiny()
    if variant:
        dope.apply_dope(m, dope.DopePlan(heads=[(0, 0), (1, 2)], variant=variant), inv_freq=m.rope_inv_freq())
    m.use_self_extend(SelfExtend(4, 8))
    idx = torch.randint(0, 61, (1, 50))
    with torch.no_grad():
        want = m(idx, all_logits=True)
        cache = m.new_cache(1, 50)
        got = [m(idx[:, :13], cache=cache, all_logits=True), m(idx[:, 13:30], cache=cache, all_logits=True)]
        got += [m(idx[:, t:t + 1], cache=cache, all_logits=True) for t in range(30, 50)]
    torch.testing.assert_close(torch.cat(got, dim=1), want, atol=2e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 32), W=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 3))
def test_group_one_is_plain_attention(T, W, seed):
    """G = 1: grouped positions are the positions (shift W - W = 0), so Self-Extend is plain RoPE attention."""
    m = tiny(seed=seed)
    idx = torch.randint(0, 61, (1, T))
    with torch.no_grad():
        want = m(idx, all_logits=True)
        got = m.use_self_extend(SelfExtend(1, W))(idx, all_logits=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


@settings(max_examples=15, deadline=None)
@given(T=st.integers(2, 24), G=st.sampled_from([2, 4, 8]), seed=st.integers(0, 3))
def test_a_window_covering_the_sequence_is_plain_attention(T, G, seed):
    """Every key within W of its query is a neighbour: no grouped score is used."""
    m = tiny(seed=seed)
    idx = torch.randint(0, 61, (1, T))
    with torch.no_grad():
        want = m(idx, all_logits=True)
        got = m.use_self_extend(SelfExtend(G, 24))(idx, all_logits=True)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    m.use_self_extend(None)
    assert all(b.self_attn.self_extend is None for b in m.layers)


def test_max_len_is_where_the_farthest_grouped_query_reaches_the_native_context():
    for G, W, native in ((8, 1024, 8192), (16, 1024, 8192), (2, 8, 32), (4, 8, 32)):
        se = SelfExtend(G, W)
        top = se.max_len(native)
        gq, _ = se.positions(torch.tensor([top - 1, top]))
        assert gq.tolist() == [native - 1, native]  # the last token that fits, and the first that would not
        assert top == (native - W) * G + W  # the reference README's "maximum extended window"
    assert SelfExtend(8, 1024).max_len(8192) >= 32768 + 64 and SelfExtend(8, 1024).max_len(8192) < 65536


def test_bad_groups_windows_and_lengths_are_refused_by_name():
    with pytest.raises(TypeError, match="group must be an int"):
        SelfExtend(2.0, 8)
    with pytest.raises(ValueError, match="window must be >= 1"):
        SelfExtend(2, 0)
    with pytest.raises(ValueError, match="W=6 must be a multiple of its group G=4"):
        SelfExtend(4, 6)
    m = tiny()
    with pytest.raises(ValueError, match="window W=32 must be smaller than the native context 32"):
        m.use_self_extend(SelfExtend(2, 32))
    m.use_self_extend(SelfExtend(2, 8))  # fits (32 - 8) * 2 + 8 = 56 tokens
    with torch.no_grad():
        m(torch.randint(0, 61, (1, 56)))
        with pytest.raises(ValueError, match="fits 56 tokens in a native context of 32 .* not 57: take a larger"):
            m(torch.randint(0, 61, (1, 57)))
    with pytest.raises(TypeError, match="takes a SelfExtend or None"):
        m.use_self_extend((2, 8))
    dyn = tiny(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="dynamic NTK"):
        dyn.use_self_extend(SelfExtend(2, 8))


def test_switching_mid_sequence_is_refused_by_the_cache():
    """A cache written by plain attention holds keys of width d; Self-Extend writes 2d: never mixed."""
    m = tiny()
    cache = m.new_cache(1, 20)
    with torch.no_grad():
        m(torch.randint(0, 61, (1, 5)), cache=cache)
        m.use_self_extend(SelfExtend(2, 8))
        with pytest.raises(ValueError, match=r"keys of \(heads, width\) \(2, 16\) into a cache whose 5 positions "
                                             r"hold \(2, 8\)"):
            m(torch.randint(0, 61, (1, 1)), cache=cache)


def test_for_length_takes_the_reference_defaults_and_doubles_the_group_to_fit():
    """W = 1024, G = 8 at 3x and 4x SmolLM2's 8K (1024 + (32832 - 1024) / 8 = 4999 <= 5461), G = 16 at 8x; every
    choice fits its length and meets the rule of thumb."""
    for length, G in ((24576 + 64, 8), (32768 + 64, 8), (65536 + 64, 16)):
        se = SelfExtend.for_length(length, 8192)
        assert (se.group, se.window) == (G, 1024)
        assert se.window + (length - se.window) / se.group <= 2 * 8192 / 3 and se.max_len(8192) >= length
        se.check(length, 8192)
    with pytest.raises(ValueError, match="window W=1024 must be smaller than the native context 32"):
        SelfExtend.for_length(256, 32)
    # W at 2/3 of the native context or above: W + (N - W) / G tends to W, so no group fits (refused, not a hang)
    with pytest.raises(ValueError, match=r"window W=1500 is not below 2/3 of the native context 2000"):
        SelfExtend.for_length(4000, 2000, window=1500)
    assert SelfExtend.for_length(1000, 1500).group == 8  # a prompt within W (1024 > 2/3 of 1500): nothing to fit


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 30), cached=st.integers(0, 20), W=st.sampled_from([1, 3, 8]), block=st.integers(1, 7))
def test_query_blocks_do_not_change_the_attention(T, cached, W, block):
    """self_extend_attention's blocks of queries (each against the keys it can see) are one computation."""
    g = torch.Generator().manual_seed(T * 100 + cached)
    qn, qg = (torch.randn(1, 4, T, 8, generator=g) for _ in range(2))
    kn, kg, v = (torch.randn(1, 2, cached + T, 8, generator=g) for _ in range(3))
    whole = self_extend_attention(qn, kn, qg, kg, v, cached, W, block=256)
    torch.testing.assert_close(self_extend_attention(qn, kn, qg, kg, v, cached, W, block=block), whole,
                               atol=1e-6, rtol=0)
