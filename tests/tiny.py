"""Tiny random HF checkpoints (2 layers, width 32) saved to disk and loaded by model.py: the litgpt way to test
a forward against the reference implementation. transformers is a test-only dependency."""

import torch

from model import Transformer

ROPE_TYPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
}


def hf_tiny(arch="llama", rope=None, tie=False, n_kv=2, theta=10000.0, max_pos=32):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    C, M = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    rp = {"rope_type": "default", **(rope or {}), "rope_theta": theta}
    cfg = C(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=n_kv, head_dim=16, max_position_embeddings=max_pos, tie_word_embeddings=tie,
            rope_parameters=rp)
    torch.manual_seed(0)
    ref = M(cfg).eval()
    if arch == "qwen2":  # random-init biases are zero: make them count
        for layer in ref.model.layers:
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                torch.nn.init.normal_(p, std=0.5)
    return ref


def ours(ref, tmp_path, **kw):
    ref.save_pretrained(tmp_path)
    return Transformer.from_pretrained(tmp_path, dtype=torch.float32, **kw)
