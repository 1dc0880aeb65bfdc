"""entropy.py's attention probe (AttentionProbe, attention_probe, attention_mass): the attention weights it returns are
the ones the forward computes, against a dense softmax(q k^T / sqrt(d)) built independently (plain and under each
DoPE variant, chunked, GQA) and against transformers' eager attention weights on the packaged model."""

import math

import pytest
import torch

import entropy
from dope import DopePlan, apply_dope, remove_dope
from model import Transformer, apply_rope, rope_cos_sin
from tiny import hf_tiny, ours

VARIANTS = [None, "parts", "all", "gaussian"]
HEADS = [(0, 1), (1, 2), (1, 3)]  # both layers; in layer 1 both query heads of one KV group


def dense_reference(model, ids):
    """softmax(q k^T / sqrt(d)) over the whole prompt, T x T, from the pre-rotation q and k (the observer seam) rotated
    here with the same tables attention uses (shared cos/sin, or the plan's per-head ones), keys repeated per group."""
    qk = {}
    with torch.inference_mode(), model.observing(lambda layer, q, k, pos: qk.__setitem__(layer, (q, k, pos))):
        model(ids)  # one forward, no cache: the observer sees every position at once
    out = []
    inv_freq, scale = model.rope_inv_freq(seq_len=ids.shape[1]), 1.0
    for layer, (q, k, pos) in sorted(qk.items()):
        cos, sin = rope_cos_sin(inv_freq, pos, scale)  # (T, d)
        attn = model.layers[layer].self_attn
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (1, H, T, d)
        if attn.head_rope is not None:
            cos, sin, add = attn.head_rope(cos, sin, pos)  # (H, T, d)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if add is not None:
                q, k = q + add[0], k + add[1]
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        T = ids.shape[1]
        s = q[0] @ k[0].transpose(-1, -2) / math.sqrt(q.shape[-1])  # (H, T, T)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out.append(torch.softmax(s, -1))
    return torch.stack(out)  # (L, H, T, T)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ours(hf_tiny("llama", rope={"rope_type": "dynamic", "factor": 2.0}), tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_probe_equals_a_dense_softmax_plain_and_under_each_dope_variant(tiny, variant):
    """Chunked (chunks of 5 over 23 tokens, rows in three chunks) with GQA's shared keys: each probed row equals the
    dense T x T reference's row, and sums to 1 over the keys it may see."""
    ids = torch.randint(0, tiny.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    if variant:
        apply_dope(tiny, DopePlan(HEADS, variant), inv_freq=tiny.rope_inv_freq(scaled=False))
    try:
        queries = [0, 3, 4, 9, 17, 21, 22]
        w, q = entropy.attention_probe(tiny, ids, queries, chunk=5)
        ref = dense_reference(tiny, ids)
    finally:
        remove_dope(tiny)
    assert w.shape == (2, 4, len(queries), 23) and q.tolist() == queries
    torch.testing.assert_close(w, ref[:, :, queries], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, len(queries)), atol=1e-6, rtol=0)
    for n, p in enumerate(queries):
        assert (w[:, :, n, p + 1:] == 0).all()  # causal: nothing after the query's own position


def test_probe_under_dope_differs_from_plain_only_on_the_plans_heads(tiny):
    """A plan moves the attention of the heads it names and of no other head of their layer (layer 0 here; the layers
    above see layer 0's changed output, so they are not compared)."""
    ids = torch.randint(0, tiny.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    plain, _ = entropy.attention_probe(tiny, ids, chunk=8)
    apply_dope(tiny, DopePlan([(0, 1)], "all"))
    try:
        dope_w, _ = entropy.attention_probe(tiny, ids, chunk=8)
    finally:
        remove_dope(tiny)
    moved = (dope_w - plain).abs().amax(dim=(-1, -2))  # (L, H)
    assert moved[0, 1] > 1e-3
    assert moved[0, [0, 2, 3]].max() < 1e-6  # float rounding: with a plan the keys are rotated per query head


def test_probe_reproduces_the_attention_output(tiny):
    """The probe's weights times the values give the output SDPA computed (the probe sees what attention sees)."""
    ids = torch.randint(0, tiny.config.vocab_size, (1, 15), generator=torch.Generator().manual_seed(3))
    attn = tiny.layers[1].self_attn
    got = {}
    h1 = attn.v_proj.register_forward_hook(lambda m, a, out: got.__setitem__("v", out))
    h2 = attn.o_proj.register_forward_hook(lambda m, a, out: got.__setitem__("y", a[0]))
    try:
        w, q = entropy.attention_probe(tiny, ids, chunk=15)
    finally:
        h1.remove(), h2.remove()
    v = got["v"].view(1, 15, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)[0]  # (H, T, d)
    y = got["y"].view(1, 15, 4, 16).transpose(1, 2)[0, :, q]  # (H, Q, d)
    torch.testing.assert_close(w[1] @ v, y, atol=1e-5, rtol=1e-4)


def test_probe_equals_transformers_eager_attention_weights_on_the_packaged_model():
    """SmolLM2-135M-Instruct in float32: the probe's rows equal transformers' eager `output_attentions` for the same
    prompt, in every layer and head."""
    from transformers import AutoModelForCausalLM

    from tools.setup_weights import ensure_weights

    path = ensure_weights("smollm2")
    model = Transformer.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(4))
    w, q = entropy.attention_probe(model, ids, chunk=16)
    with torch.inference_mode():
        att = torch.stack(ref(ids, output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    assert q.tolist() == list(range(16, 48))
    torch.testing.assert_close(w, att[:, :, 16:], atol=2e-6, rtol=1e-4)


def test_attention_mass_sums_the_named_spans_and_the_recent_window():
    w = torch.zeros(1, 2, 2, 10)
    w[0, 0, 0, [0, 5, 6]] = torch.tensor([0.5, 0.25, 0.25])  # query at 6
    w[0, 0, 1, [0, 1, 9]] = torch.tensor([0.2, 0.3, 0.5])  # query at 9
    w[0, 1, :, 0] = 1.0
    m = entropy.attention_mass(w, torch.tensor([6, 9]), {"first": (0, 1), "first4": (0, 4), "needle": (5, 7)},
                               recent=3)
    torch.testing.assert_close(m["first"], torch.tensor([[0.35, 1.0]]))
    torch.testing.assert_close(m["first4"], torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(m["needle"], torch.tensor([[0.25, 0.0]]))
    torch.testing.assert_close(m["recent"], torch.tensor([[0.5, 0.0]]))  # keys 4..6 for row 0, 7..9 for row 1
    assert entropy.sink_heads(m["first"]).tolist() == [[True, True]]
    assert entropy.sink_heads(m["first"], threshold=0.5).tolist() == [[False, True]]


@pytest.mark.parametrize("queries, match", [
    ([5, 40], r"query positions \[40\] are outside the prompt of 20 tokens"),
    ([-1], r"query positions \[-1\] are outside"),
    ([], "at least one query position"),
    ([3, 3], "repeat"),
])
def test_probe_refuses_queries_outside_the_prompt(tiny, queries, match):
    ids = torch.zeros(1, 20, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        entropy.attention_probe(tiny, ids, queries)


def test_attention_mass_refuses_a_span_outside_the_prompt():
    with pytest.raises(ValueError, match=r"span 'needle' = \(8, 12\) is not inside the prompt of 10 tokens"):
        entropy.attention_mass(torch.zeros(1, 1, 1, 10), torch.tensor([9]), {"needle": (8, 12)})


def test_probe_refuses_a_batch(tiny):
    with pytest.raises(ValueError, match="tokens must be"):
        entropy.attention_probe(tiny, torch.zeros(2, 8, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------------
# nih/sinks.py: the measurement's statistics and its command, end to end on a short prompt of the packaged model

from hypothesis import given, settings, strategies as st  # noqa: E402

from nih import sinks  # noqa: E402


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=3, max_size=30, unique=True))
def test_spearman_is_one_under_a_monotone_map_and_minus_one_reversed(xs):
    x = torch.tensor(xs, dtype=torch.float64)
    assert sinks.spearman(x, x ** 3 + 2 * x) == pytest.approx(1.0)
    assert sinks.spearman(x, -x) == pytest.approx(-1.0)


def test_spearman_with_ties_equals_pearson_on_average_ranks():
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0]), torch.tensor([2.0, 1.0, 4.0, 4.0, 3.0])
    rx, ry = torch.tensor([1.0, 2.5, 2.5, 4.0, 5.0]), torch.tensor([2.0, 1.0, 4.5, 4.5, 3.0])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    assert sinks.spearman(x, y) == pytest.approx(float((rx * ry).sum() / (rx.norm() * ry.norm())))


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g)
    y = x + torch.randn(200, generator=g)
    lo, hi = sinks.bootstrap_interval(x, y, draws=500)
    assert lo < sinks.spearman(x, y) < hi and lo > 0.3
    assert sinks.bootstrap_interval(x, y, draws=500) == [lo, hi]


def test_binned_keeps_the_total_mass():
    row = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    b = sinks.binned(row, bins=100)
    assert b["width"] == 11 and len(b["mass"]) == 100 and sum(b["mass"]) == pytest.approx(float(row.sum()), rel=1e-5)


@pytest.mark.parametrize("text", ["19", "19:0:1", "a:b", "19-0"])
def test_heads_flag_refuses_what_is_not_layer_head_pairs(text, capsys):
    with pytest.raises(SystemExit):
        sinks.parse_args(["--heads", text])
    assert "layer:head pairs" in capsys.readouterr().err


def test_the_sinks_command_end_to_end_on_a_short_prompt(tmp_path, capsys):
    """400 tokens of the packaged model: the summary holds every field the docs read, the rule's heads are the
    calibration's lowest H^1, and measurement 2 writes one file per (depth, method) that a rerun reuses."""
    out = tmp_path / "sinks"
    argv = ["--len", "400", "--depths", "3", "--chunk", "256", "--out", str(out), "--test-depths", "0.5"]
    assert sinks.main(argv) == 0
    s = __import__("json").loads((out / "sinks.json").read_text())
    assert s["length"] == 400 and s["noisy"] == 0 and s["queries"] == [368, 399]
    for k in ("spearman_h1_sink", "spearman_p1_sink", "spearman_vanilla_sink"):
        assert -1 <= s[k] <= 1 and s[k + "_ci"][0] <= s[k] <= s[k + "_ci"][1]
    h1 = torch.tensor(s["scores"]["h1"])
    lowest = sorted(range(h1.numel()), key=lambda i: (float(h1.flatten()[i]), i))[:5]
    assert [h["head"] for h in s["head_sets"]["parts/asc"]] == [list(divmod(i, h1.shape[1])) for i in lowest]
    assert 0 <= s["sink_heads"] <= 1 and torch.tensor(s["mass"]["first"]).shape == h1.shape
    tests = {t["method"]: t for t in s["tests"]}
    assert set(tests) >= {"none", "parts/asc", "parts/flat", "gaussian/asc", "parts/random0"}
    assert all(t["depth"] == 0.5 and sum(t["profile"]["mass"]) == pytest.approx(1.0, abs=1e-4) for t in tests.values())
    table = {t["method"]: t for t in sinks.test_table(s["tests"])}
    assert set(table) == set(tests) - {"none"}
    asc = table["parts/asc"]
    assert asc["sink_before"] == pytest.approx(sum(tests["none"]["mass"]["first"][a][b] for a, b in asc_heads(s)))
    assert asc["sink_after"] == pytest.approx(sum(tests["parts/asc"]["mass"]["first"][a][b] for a, b in asc_heads(s)))
    files = sorted(p.name for p in out.glob("test_*.json"))
    assert len(files) == len(tests)
    for name in ("scores_vs_sink.png", "window_maps.png", "answer_attention.png", "answer_attention_by_method.png"):
        assert (out / name).stat().st_size > 0
    stamp = {f: (out / f).stat().st_mtime_ns for f in files}
    assert sinks.main(argv) == 0  # resumes: nothing probed again
    assert {f: (out / f).stat().st_mtime_ns for f in files} == stamp
    assert "not probed again" in capsys.readouterr().out


def asc_heads(summary):
    return [tuple(h["head"]) for h in summary["head_sets"]["parts/asc"]]


def test_the_sinks_command_refuses_a_head_outside_the_model(tmp_path):
    with pytest.raises(SystemExit, match=r"--heads 30:0: not a head of the model, which has 30 layers x 9 heads"):
        sinks.main(["--len", "600", "--out", str(tmp_path), "--heads", "30:0"])


def test_within_layer_rho_ignores_what_only_the_layer_explains():
    """A per-layer offset (both grow with depth) moves the pooled rho but not the within-layer one; the same order
    inside every layer gives 1, the reversed order -1."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 9, generator=g)
    y = x + 10 * torch.arange(6.0)[:, None]  # same order inside each layer, far apart across layers
    assert sinks.within_layers(x, y) == pytest.approx(1.0)
    assert sinks.within_layers(x, -x + torch.arange(6.0)[:, None]) == pytest.approx(-1.0)
    depth = torch.arange(6.0)[:, None].expand(6, 9)
    noise = torch.rand(6, 9, generator=g)
    assert sinks.spearman(depth + 0.1 * x, depth + 0.1 * noise) > 0.8  # pooled: the depth alone
    assert abs(sinks.within_layers(depth + 0.1 * x, depth + 0.1 * noise)) < 0.5
    lo, hi = sinks.layer_bootstrap(x, y, draws=200)
    assert lo == hi == pytest.approx(1.0)


def test_within_layer_ranks_share_ties_whatever_their_order():
    """Heads with no sink at all tie at 0: their ranks must not depend on where they stand in the layer."""
    x = torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 3.0, 4.0]])
    y = torch.tensor([[5.0, 1.0, 3.0, 6.0, 7.0], [2.0, 9.0, 4.0, 10.0, 11.0]])
    for order in ([2, 0, 1, 3, 4], [1, 2, 0, 3, 4]):  # the tied heads in other orders
        assert sinks.within_layers(x, y) == pytest.approx(sinks.within_layers(x[:, order], y[:, order]), abs=1e-12)
    # one layer: Spearman's rho with average ranks (0.894 here; ranks by position among the ties would give 0.7)
    assert sinks.within_layers(x[:1], y[:1]) == pytest.approx(sinks.spearman(x[0], y[0])) == pytest.approx(0.894427)
    assert sinks.ranks(torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0])).tolist() == [1.0, 4.0, 1.0, 1.0, 3.0]
