"""entropy.score_model driving model.py: the criteria mean what they say on a real forward."""

import pytest
import torch

import entropy
from tiny import hf_tiny, ours

T = 96


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, 97, (1, T), generator=torch.Generator().manual_seed(3))


def grams(model, idx, chunk=32):
    return entropy.score_model(model, idx, chunk=chunk, progress=False)


def test_post_ntk_equals_post_rope_without_scaling(tmp_path, idx):
    g = grams(ours(hf_tiny("llama"), tmp_path), idx)
    for side in ("query", "key"):
        torch.testing.assert_close(g[f"{side}/post_ntk"], g[f"{side}/post_rope"], atol=0, rtol=0)
        assert not torch.allclose(g[f"{side}/pre_ntk"], g[f"{side}/post_ntk"])


def test_pre_ntk_does_not_depend_on_the_rope_base(tmp_path, idx):
    """Before rotation, a layer's queries and keys do not see the base: layer 0 (whose input is the embedding) has the
    same pre_ntk Grams whatever the scaling, while post_ntk changes and post_rope (the original base) does not."""
    ref = hf_tiny("llama")
    plain = grams(ours(ref, tmp_path / "a"), idx)
    ntk = grams(ours(ref, tmp_path / "b", rope_scaling={"rope_type": "ntk", "factor": 4.0}), idx)
    for side in ("query", "key"):
        torch.testing.assert_close(ntk[f"{side}/pre_ntk"][0], plain[f"{side}/pre_ntk"][0], atol=0, rtol=0)
        torch.testing.assert_close(ntk[f"{side}/post_rope"][0], plain[f"{side}/post_rope"][0], atol=1e-9, rtol=1e-9)
        assert not torch.allclose(ntk[f"{side}/post_ntk"][0], plain[f"{side}/post_ntk"][0])


def test_scores_do_not_depend_on_the_chunking(tmp_path, idx):
    model = ours(hf_tiny("qwen2"), tmp_path)
    a, b = grams(model, idx, chunk=32), grams(model, idx, chunk=96)
    for c in entropy.CRITERIA:
        torch.testing.assert_close(entropy.head_scores(a[c], "trunc", 4), entropy.head_scores(b[c], "trunc", 4),
                                   atol=1e-6, rtol=0)


def test_key_scores_are_shared_by_a_gqa_group(tmp_path, idx):
    g = grams(ours(hf_tiny("llama", n_kv=2), tmp_path), idx)
    s = entropy.head_scores(g["key/post_ntk"], "trunc", 1)  # (2 layers, 4 heads), heads 0-1 and 2-3 share a key
    assert torch.equal(s[:, 0], s[:, 1]) and torch.equal(s[:, 2], s[:, 3]) and not torch.equal(s[:, 0], s[:, 2])

