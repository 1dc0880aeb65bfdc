"""model.py against transformers (the reference) on tiny random configs, plus the RoPE invariants and bad inputs.

Real-checkpoint parity lives in tests/test_real_models.py."""

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model import Config, Tokenizer, Transformer, apply_rope, rope_cos_sin, rope_params

from tiny import ROPE_TYPES, hf_tiny, ours

@pytest.mark.parametrize("arch,tie,n_kv", [("llama", False, 2), ("llama", True, 1), ("llama", False, 4),
                                           ("qwen2", False, 2), ("qwen2", True, 2)])
def test_logits_match_transformers(tmp_path, arch, tie, n_kv):
    ref = hf_tiny(arch, tie=tie, n_kv=n_kv)
    m = ours(ref, tmp_path)
    idx = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        want = ref(idx).logits
    got = m(idx, all_logits=True)
    assert (got - want).abs().max() <= 1e-4
    # the LM head on the last position alone: the same row, up to the rounding of a differently shaped GEMM
    torch.testing.assert_close(m(idx)[:, -1], got[:, -1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", list(ROPE_TYPES))
def test_rope_scaling_logits_match_transformers(tmp_path, kind):
    # 60 tokens > max_pos 32, so the scalings (dynamic's growth included) are exercised
    ref = hf_tiny("llama", rope=ROPE_TYPES[kind])
    m = ours(ref, tmp_path)
    idx = torch.randint(0, 97, (1, 60))
    with torch.no_grad():
        want = ref(idx).logits
    assert (m(idx, all_logits=True) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", list(ROPE_TYPES))
def test_cos_sin_tables_match_transformers(kind):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    ref = hf_tiny("llama", rope=ROPE_TYPES[kind])
    hf_rope = LlamaRotaryEmbedding(ref.config)
    cfg = Config.from_hf(ref.config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    T = 100
    pos = torch.arange(T)
    want_cos, want_sin = hf_rope(torch.zeros(1, dtype=torch.float32), pos[None])
    inv_freq, scale = rope_params(cfg, seq_len=T)
    cos, sin = rope_cos_sin(inv_freq, pos, scale)
    torch.testing.assert_close(cos, want_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, want_sin[0], atol=1e-6, rtol=0)


def test_ntk_static_equals_hf_dynamic_at_target_length(tmp_path):
    """The paper's static NTK for a target a * L equals HF's dynamic NTK evaluated at length a * L."""
    a, L = 3, 32
    ref = hf_tiny("llama", rope={"rope_type": "dynamic", "factor": float(a)}, max_pos=L)
    m = ours(ref, tmp_path, rope_scaling={"rope_type": "ntk", "factor": float(a)})
    idx = torch.randint(0, 97, (1, a * L))
    with torch.no_grad():
        want = ref(idx).logits
    assert (m(idx, all_logits=True) - want).abs().max() <= 1e-4
    d, base = m.config.head_dim, m.config.rope_theta
    torch.testing.assert_close(m.rope_inv_freq(), 1.0 / (base * (a * a - a + 1) ** (d / (d - 2))) **
                               (torch.arange(0, d, 2).float() / d))


def test_kv_cache_decode_equals_full_forward(tmp_path):
    m = ours(hf_tiny("qwen2"), tmp_path)
    idx = torch.randint(0, 97, (1, 25))
    full = m(idx, all_logits=True)
    cache = m.new_cache(1, 25)
    m(idx[:, :20], cache=cache)
    steps = [m(idx[:, t:t + 1], cache=cache)[:, -1] for t in range(20, 25)]
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 20:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16])
def test_chunked_prefill_equals_one_shot(tmp_path, chunk):
    m = ours(hf_tiny("llama"), tmp_path)
    idx = torch.randint(0, 97, (1, 23))
    full = m(idx, all_logits=True)
    cache = m.new_cache(1, 23)
    parts = [m(idx[:, i:i + chunk], cache=cache, all_logits=True) for i in range(0, 23, chunk)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_generate_greedy_matches_transformers(tmp_path):
    ref = hf_tiny("llama")
    m = ours(ref, tmp_path)
    idx = torch.randint(0, 97, (1, 10))
    want = ref.generate(idx, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 10:].tolist()
    assert m.generate(idx, 8, chunk=4) == want
    assert m.generate(idx, 8, stop_tokens={want[3]}) == want[:3]


def test_observer_sees_unrotated_q_k(tmp_path):
    m = ours(hf_tiny("llama"), tmp_path)
    seen = []
    with m.observing(lambda layer, q, k, pos: seen.append((layer, q.shape, k.shape, pos))):
        m(torch.randint(0, 97, (1, 9)))
    m(torch.randint(0, 97, (1, 9)))  # outside the block: nothing observed
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][1] == (1, 4, 9, 16) and seen[0][2] == (1, 2, 9, 16) and seen[0][3].tolist() == list(range(9))


def test_a_chunked_prefill_under_dynamic_ntk_past_native_is_refused(tmp_path):
    """HF's dynamic NTK takes its base from each forward's length: chunks past the native context would each rotate
    with their own base, so a chunked prefill there is refused; one pass, or chunks within native, still run."""
    m = ours(hf_tiny("llama"), tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    native, idx = m.config.max_pos, torch.randint(0, 97, (1, m.config.max_pos + 8))
    with pytest.raises(ValueError, match="dynamic NTK.*own base"):
        m.prefill(idx, m.new_cache(1, idx.shape[1]), chunk=native)
    one_pass = m.prefill(idx, m.new_cache(1, idx.shape[1]), chunk=idx.shape[1])
    torch.testing.assert_close(one_pass, m(idx), atol=0, rtol=0)
    m.prefill(idx[:, :native], m.new_cache(1, native), chunk=native // 2)  # within native: one base


# RoPE invariants (hypothesis) -------------------------------------------------------------------------------------

dims = st.sampled_from([2, 4, 8, 16, 64])


@settings(max_examples=40, deadline=None)
@given(d=dims, m=st.integers(0, 100_000), base=st.floats(10.0, 1e7), seed=st.integers(0, 2**16))
def test_rope_preserves_norms(d, m, base, seed):
    x = torch.randn(1, 1, 1, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cos, sin = rope_cos_sin(1.0 / base ** (torch.arange(0, d, 2) / d), torch.tensor([m]))
    torch.testing.assert_close(apply_rope(x, cos.double(), sin.double()).norm(), x.norm())


@settings(max_examples=40, deadline=None)
@given(d=dims, m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(0, 5000), seed=st.integers(0, 2**16))
def test_rope_score_depends_only_on_position_gap(d, m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))

    def score(a, b):  # float64 tables so the identity is checked, not float32 rounding at large angles
        f = torch.tensor([a, b], dtype=torch.float64)[:, None] * inv_freq
        cos, sin = torch.cat((f, f), -1).cos(), torch.cat((f, f), -1).sin()
        return apply_rope(q, cos[0], sin[0]) @ apply_rope(k, cos[1], sin[1])

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift))


@settings(max_examples=30, deadline=None)
@given(d=dims, m=st.integers(0, 10_000), seed=st.integers(0, 2**16))
def test_half_split_equals_interleaved_under_permutation(d, m, seed):
    """The paper writes RoPE interleaved (band f = dims 2f, 2f+1); HF checkpoints use half-split (f, f + d/2).
    They agree under the permutation that sends interleaved dim 2f -> f and 2f+1 -> f + d/2."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    theta = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = m * theta
    inter = x.clone()  # interleaved rotation, as printed in the paper
    inter[0::2] = x[0::2] * ang.cos() - x[1::2] * ang.sin()
    inter[1::2] = x[1::2] * ang.cos() + x[0::2] * ang.sin()
    perm = torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))  # half-split index i holds interleaved perm[i]
    emb = torch.cat((ang, ang))
    half = apply_rope(x[perm], emb.cos(), emb.sin())
    torch.testing.assert_close(half, inter[perm])


# Bad inputs ---------------------------------------------------------------------------------------------------------


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "nope")
    hf_tiny().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)


def test_corrupt_safetensors_header(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:8] + b"{not json" + f.read_bytes()[17:])
    with pytest.raises(ValueError, match="corrupt safetensors"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_architecture(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match="MistralForCausalLM"):
        Transformer.from_pretrained(tmp_path)


def test_unknown_rope_scaling(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="longrope"):
        Transformer.from_pretrained(tmp_path, rope_scaling={"rope_type": "longrope", "factor": 2.0})


def test_shape_mismatch_and_missing_tensor_are_named(tmp_path):
    hf_tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 48, "num_hidden_layers": 3}))
    with pytest.raises(ValueError) as e:
        Transformer.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "mis-shaped" in msg and "layers.0.mlp.up_proj.weight" in msg
    assert "missing" in msg and "layers.2." in msg


def test_kv_cache_overflow_is_an_error(tmp_path):
    m = ours(hf_tiny(), tmp_path)
    with pytest.raises(ValueError, match="full"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=m.new_cache(1, 4))


def test_ntk_base_formula():
    """v1 Eq. for Dynamic NTK as SGLang uses it: base' = base * (a^2 - a + 1)^(d/(d-2))."""
    cfg = Config(head_dim=128, rope_theta=500000.0, rope_scaling={"rope_type": "ntk", "factor": 8.0})
    inv_freq, _ = rope_params(cfg)
    new_base = 500000.0 * 57 ** (128 / 126)
    assert math.isclose(inv_freq[1].item(), new_base ** (-2 / 128), rel_tol=1e-6)


def manifest_folder(path):
    """A folder as setup_weights.py finishes one (files, then MANIFEST.json with each one's size and sha256)."""
    from tools.setup_weights import MODELS, write_manifest

    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    write_manifest(path, MODELS["smollm2"], "bf16")
    return path


def test_a_checked_file_is_hashed_again_only_when_it_changes(tmp_path, monkeypatch):
    """check_folder remembers each file's sha256 under its (device, inode, size, mtime, ctime) in the folder's
    digest cache: a second process (the memo cleared) hashes nothing, and an edit is hashed again and refused even
    when the size and the mtime are put back (the ctime cannot be)."""
    import os

    import model

    f = manifest_folder(tmp_path / "m")
    assert model.check_folder(f) is True and (f / model.DIGEST_CACHE).is_file()
    hashed = []
    real = model.hashlib.sha256
    monkeypatch.setattr(model.hashlib, "sha256", lambda *a: hashed.append(a) or real(*a))
    monkeypatch.setattr(model, "_DIGESTS", {})
    assert model.check_folder(f) is True and hashed == []
    w = f / "model.safetensors"
    st = w.stat()
    w.write_bytes(bytes(range(255, -1, -1)) * 64)  # same size
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match=r"model\.safetensors has sha256 [0-9a-f]{64}, the manifest says"):
        model.check_folder(f)
    assert hashed


def test_the_digest_cache_is_only_a_cache(tmp_path, monkeypatch):
    """A garbage cache is ignored, a disk that refuses the cache costs only the cache (and leaves no temporary file),
    and a folder without a manifest (not this project's) is never written to."""
    import errno

    import model

    f = manifest_folder(tmp_path / "m")
    (f / model.DIGEST_CACHE).write_text("[not a cache")
    assert model.check_folder(f) is True
    monkeypatch.setattr(model, "_DIGESTS", {})
    (f / model.DIGEST_CACHE).unlink()

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model.os, "replace", full)
    assert model.check_folder(f) is True
    assert sorted(p.name for p in f.iterdir()) == ["MANIFEST.json", "config.json", "model.safetensors"]
    monkeypatch.undo()
    (f / "MANIFEST.json").unlink()
    assert model.check_folder(f) is False
    model.sha256_files(f, ["model.safetensors"])
    assert sorted(p.name for p in f.iterdir()) == ["config.json", "model.safetensors"]
