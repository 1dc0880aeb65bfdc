"""
A single-file Llama / Qwen2 forward pass that loads real Hugging Face checkpoints.

Read top to bottom: config -> RoPE (pure functions, one per context-extension scaling) -> RMSNorm -> Self-Extend
(grouped attention past a neighbour window, a training-free extension to compare DoPE with) -> attention (GQA, KV
cache, chunked prefill) -> MLP -> block -> model (loading, forward, generate) -> tokenizer.

RoPE is written out explicitly because the DoPE paper (Xiong et al., arXiv 2511.09146) is about it: attention applies
RoPE from cos/sin tables, and a layer may carry per-head tables (`Attention.head_rope`), which is the seam `dope.py`
uses to denoise chosen heads without touching this file. The other seams: `Transformer.observing` shows entropy.py q
and k before rotation; `rope_at`, `logits` and `KVCache.share` let the experiment resume a forward at a layer;
`Transformer.use_self_extend` runs every layer's attention as Self-Extend's.

Module and parameter names follow HF (`q_proj`, `input_layernorm`, ...) so any HF `LlamaForCausalLM` or
`Qwen2ForCausalLM` safetensors checkpoint loads as is, strictly.
"""

import argparse
import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


# -----------------------------------------------------------------------------
# Config


@dataclass
class Config:
    arch: str = "llama"  # "llama" | "qwen2"
    vocab_size: int = 32000
    n_embd: int = 576
    n_hidden: int = 1536  # MLP width (HF: intermediate_size)
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    head_dim: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling dict, or None for plain RoPE
    max_pos: int = 8192  # native context (HF: max_position_embeddings)
    qkv_bias: bool = False  # Qwen2 has q/k/v biases
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        """Refuse, naming the field and value, a config no model can be built from (or one that would build and
        then fail or misread inside a forward): sizes that are not positive ints, query heads that KV heads cannot
        share evenly, an odd head width (half-split RoPE pairs dims f and f + d/2), special ids outside the
        vocabulary."""
        for name in ("vocab_size", "n_embd", "n_hidden", "n_layer", "n_head", "n_kv_head", "head_dim", "max_pos"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral):
                raise TypeError(f"config {name} must be an int, got {name}={v!r}")
            if v < 1:
                raise ValueError(f"config {name} must be >= 1, got {name}={v!r}")
        if self.arch not in ARCHITECTURES.values():
            raise ValueError(f"config arch={self.arch!r}: expected one of {sorted(ARCHITECTURES.values())}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"config n_head={self.n_head} query heads cannot share n_kv_head={self.n_kv_head} KV "
                             "heads evenly: n_head must be a multiple of n_kv_head")
        if self.head_dim % 2:
            raise ValueError(f"config head_dim={self.head_dim} is odd: RoPE rotates pairs of dims (f, f + d/2)")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"config {name} must be a finite number > 0, got {name}={v!r}")
        for name, ids in (("bos_token_id", [] if self.bos_token_id is None else [self.bos_token_id]),
                          ("eos_token_ids", self.eos_token_ids)):
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, Integral) or not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"config {name}: {bad[0]!r} is not a token id of the {self.vocab_size}-id vocabulary")

    @classmethod
    def from_hf(cls, d: dict) -> "Config":
        archs = d.get("architectures") or [d.get("model_type", "?")]
        if archs[0] not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {archs[0]!r}: this model.py supports {sorted(ARCHITECTURES)}")
        arch = ARCHITECTURES[archs[0]]
        # transformers >= 5 writes `rope_parameters` (theta inside); older configs write rope_theta + rope_scaling
        rp = dict(d.get("rope_parameters") or {})
        theta = rp.pop("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", rp.get("type", "default")) != "default" else None)
        eos = d.get("eos_token_id")
        n_head = d["num_attention_heads"]
        if not d.get("head_dim") and isinstance(n_head, int) and n_head > 0 and d["hidden_size"] % n_head:
            raise ValueError(f"hidden_size {d['hidden_size']} is not a multiple of num_attention_heads {n_head}, and "
                             "no head_dim is given")
        return cls(
            arch=arch, vocab_size=d["vocab_size"], n_embd=d["hidden_size"], n_hidden=d["intermediate_size"],
            n_layer=d["num_hidden_layers"], n_head=n_head, n_kv_head=d.get("num_key_value_heads", n_head),
            head_dim=d.get("head_dim") or d["hidden_size"] // n_head, norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling, max_pos=d.get("max_position_embeddings", 2048),
            qkv_bias=arch == "qwen2" or d.get("attention_bias", False), o_bias=d.get("attention_bias", False),
            mlp_bias=d.get("mlp_bias", False), tie_embeddings=d.get("tie_word_embeddings", False),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos if isinstance(eos, list) else [eos] if eos is not None else [],
        )


# -----------------------------------------------------------------------------
# RoPE (v1 Eq. 8-11, v2 Eq. 1-4), half-split ("rotate_half", NeoX) layout: band f rotates dims (f, f + d/2).
# Each scaling is a pure function returning (inverse frequencies (d/2,) float32, attention scale on cos/sin),
# as HF's modeling_rope_utils does.


def inv_freq_default(base: float, d: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # theta_f = base^(-2f/d)


def rope_linear(base, d, factor):
    """Position interpolation: every frequency divided by the factor."""
    return inv_freq_default(base, d) / factor, 1.0


def rope_ntk(base, d, factor):
    """"Dynamic NTK" as SGLang/vLLM compute it, static for a target length a * L_native (the DoPE paper's scaling):
    base' = base * (a*a - a + 1)^(d/(d-2))."""
    return inv_freq_default(base * (factor * factor - factor + 1) ** (d / (d - 2)), d), 1.0


def rope_dynamic(base, d, factor, max_pos, seq_len):
    """HF's dynamic NTK: the base grows with the current length N; equals rope_ntk at N = a * L_native."""
    seq_len = max(seq_len, max_pos)
    return inv_freq_default(base * (factor * seq_len / max_pos - (factor - 1)) ** (d / (d - 2)), d), 1.0


def rope_llama3(base, d, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1: divide low frequencies by the factor, keep high ones, interpolate smoothly in between."""
    inv_freq = inv_freq_default(base, d)
    old = original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high_freq_factor) * ~(wavelen > old / low_freq_factor)
    return torch.where(medium, smoothed, scaled), 1.0


def rope_yarn(base, d, factor, original_max_position_embeddings, beta_fast=32, beta_slow=1, attention_factor=None,
              mscale=None, mscale_all_dim=None, truncate=True):
    """YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, scale attention by mscale."""
    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim) \
            if mscale and mscale_all_dim else get_mscale(factor)

    def correction_dim(n_rot):  # the dimension whose wavelength makes n_rot turns over the native context
        return d * math.log(original_max_position_embeddings / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, d, 2).float() / d)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def rope_params(cfg: Config, seq_len: int | None = None, scaled: bool = True) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (d/2,) and cos/sin scale for this config's rope_scaling (None or scaled=False: plain)."""
    s = dict(cfg.rope_scaling or {}) if scaled else {}
    kind = s.pop("rope_type", s.pop("type", "default"))
    base, d = cfg.rope_theta, cfg.head_dim
    if kind == "default":
        return inv_freq_default(base, d), 1.0
    if kind == "linear":
        return rope_linear(base, d, s["factor"])
    if kind == "ntk":
        return rope_ntk(base, d, s["factor"])
    if kind == "dynamic":
        return rope_dynamic(base, d, s["factor"], cfg.max_pos, seq_len or cfg.max_pos)
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return rope_llama3(base, d, **{k: s[k] for k in keys})
    if kind == "yarn":
        s.setdefault("original_max_position_embeddings", cfg.max_pos)
        keys = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
                "mscale_all_dim", "truncate")
        return rope_yarn(base, d, **{k: s[k] for k in keys if s.get(k) is not None})
    raise ValueError(f"unknown rope_scaling type {kind!r}: expected default, linear, ntk, dynamic, llama3 or yarn")


def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, scale: float = 1.0):
    """cos/sin tables (T, d) in float32 for absolute positions pos (T,)."""
    freqs = pos[:, None].float() * inv_freq[None, :].float()  # (T, d/2): angle m * theta_f
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, d): half-split, band f at dims f and f + d/2
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def apply_rope(x, cos, sin):
    """R(m) x for x (B, H, T, d) with cos/sin (T, d) or per-head (H, T, d). Rotation preserves norms and makes
    <R(m) q, R(n) k> depend only on n - m."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_qk(q, k, cos, sin, pos, head_rope=None):
    """Rotate queries (B, H, T, d) and keys (B, Hkv, T, d) with shared tables (T, d), or with per-head tables from
    head_rope(cos, sin, pos) -> (cos, sin, add) of shape (H, T, d). Per-head tables rotate a shared key once for
    each query head it serves, so the keys come back expanded to (B, H, T, d)."""
    if head_rope is None:
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    cos, sin, add = head_rope(cos, sin, pos)  # (H, T, d) each; add: None or (2, H, T, d)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, T, d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if add is not None:  # DoPE's v1 additive Gaussian ablation
        q, k = q + add[0].to(q.dtype), k + add[1].to(k.dtype)
    return q, k


USE_KERNEL = "auto"  # "auto": the Triton kernel (kernels.py) on CUDA tensors when triton imports; True; False
kernels = None


def use_kernel(x) -> bool:
    """Whether the fused kernel rotates x: asked for, able to run here, and no gradients needed (it is forward
    only). The model decides; kernels.py has no fallback of its own."""
    global kernels
    if USE_KERNEL is False or (USE_KERNEL == "auto" and not x.is_cuda) or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if kernels is None:
        try:
            import kernels as k
        except ImportError:  # no triton: the eager path is the same math
            if USE_KERNEL is True:
                raise
            return False
        kernels = k
    return kernels.available()


# -----------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()  # the variance in float32, as HF does
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class KVCache:
    """Rotated keys and values per layer, allocated on first write with the head count the layer writes
    (a layer with per-head DoPE tables stores keys per query head)."""

    def __init__(self, n_layer: int, max_len: int):
        if isinstance(max_len, bool) or not isinstance(max_len, Integral):
            raise TypeError(f"a KV cache's max_len must be an int, got max_len={max_len!r}")
        if max_len < 1:
            raise ValueError(f"a KV cache holds max_len >= 1 positions, got max_len={max_len!r}")
        self.max_len, self.pos = int(max_len), 0
        self.k, self.v = [None] * n_layer, [None] * n_layer

    def update(self, layer, k, v):  # k, v: (B, h, T, d) for positions pos .. pos + T - 1
        B, h, T, d = k.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full: cannot add {T} at position {self.pos}")
        if self.k[layer] is None or self.k[layer].shape[1] != h or self.k[layer].shape[-1] != d:
            if self.pos:  # e.g. a DoPE plan installed or removed mid-sequence: the cached keys are not its keys
                held = tuple(self.k[layer].shape[1::2]) if self.k[layer] is not None else "none"
                raise ValueError(f"layer {layer} writes keys of (heads, width) {(h, d)} into a cache whose {self.pos} "
                                 f"positions hold {held}: install or remove a DoPE plan or Self-Extend only on an "
                                 "empty cache (rewind(0) or a new one)")
            self.k[layer] = k.new_empty(B, h, self.max_len, d)
            self.v[layer] = v.new_empty(B, h, self.max_len, v.shape[-1])  # Self-Extend's keys are 2d wide
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]

    def share(self, other: "KVCache", n_layers: int):
        """Point this cache's first n_layers layers at other's tensors: what is written through one is read through
        both (the experiment's layer reuse, for layers that two runs compute identically)."""
        for layer in range(n_layers):
            self.k[layer], self.v[layer] = other.k[layer], other.v[layer]

    def rewind(self, pos: int):
        """Forget every position from pos on (e.g. after scoring a teacher-forced answer): the next write goes
        there, and nothing past it is ever read before it is written again."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind a cache at position {self.pos} to {pos}")
        self.pos = pos


# -----------------------------------------------------------------------------
# Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend LLM Context Window Without Tuning", arXiv
# 2401.01325, Sec. 3): past a neighbour window, attention sees grouped positions, so that no relative position
# exceeds what the model was trained on. Plain RoPE tables; DoPE's per-head tables apply to both levels.


@dataclass(frozen=True)
class SelfExtend:
    """Group size G and neighbour window W. A key within the window of its query (0 <= i - j < W) keeps the normal
    positions i and j; a farther key is seen at j // G and the query at i // G + W - W // G, so the grouped
    distance continues the window's distances (it is W at i - j = W when G divides both). The paper writes the
    shift W - W / G: W must be a multiple of G, so that it is a whole position."""
    group: int
    window: int

    def __post_init__(self):
        for name in ("group", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral):
                raise TypeError(f"Self-Extend's {name} must be an int (tokens), got {name}={v!r}")
            if v < 1:
                raise ValueError(f"Self-Extend's {name} must be >= 1 token, got {name}={v!r}")
        if self.window % self.group:
            raise ValueError(f"Self-Extend's window W={self.window} must be a multiple of its group G={self.group} "
                             "(the grouped query shift W - W / G is then a whole position)")

    @classmethod
    def for_length(cls, length: int, native: int, window: int = 1024, group: int = 8) -> "SelfExtend":
        """The reference implementation's defaults for Llama, W = 1024 and G = 8, with G doubled until its authors'
        rule of thumb holds for `length` tokens at the loose end of its range: W + (length - W) / G <= 2/3 of the
        native context (the positions a model has seen most of; the LongLM README's empirical rule asks for 1/2 to
        2/3 of it)."""
        if window >= native:
            raise ValueError(f"Self-Extend's window W={window} must be smaller than the native context {native}")
        if length <= window:  # every key a neighbour: nothing is grouped
            return cls(group, window)
        if window >= 2 * native / 3:  # W + (length - W) / G tends to W as G grows: it never holds
            raise ValueError(f"Self-Extend's window W={window} is not below 2/3 of the native context {native}: no "
                             f"group G brings W + ({length} - W) / G under it (give a smaller window)")
        while window + (length - window) / group > 2 * native / 3:
            group *= 2
        return cls(group, window)

    def positions(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grouped positions (T,) of queries and of keys at absolute positions pos (T,)."""
        return pos // self.group + self.window - self.window // self.group, pos // self.group

    def max_len(self, native: int) -> int:
        """The longest sequence whose every position stays below the native context: the farthest grouped query,
        (T - 1) // G + W - W // G, must be < native, so T <= (native - W + W // G) * G = (native - W) G + W."""
        return (native - self.window + self.window // self.group) * self.group

    def check(self, length: int, native: int) -> None:
        """Refuse, naming the values, a window or group that cannot fit `length` tokens into the native context."""
        if self.window >= native:
            raise ValueError(f"Self-Extend's window W={self.window} must be smaller than the native context {native}: "
                             "neighbour positions reach W - 1 and grouped ones start above them")
        if length > self.max_len(native):
            raise ValueError(f"Self-Extend with G={self.group}, W={self.window} fits {self.max_len(native)} tokens in "
                             f"a native context of {native} ((native - W) G + W), not {length}: take a larger group")

    def attend(self, attn, q, k, v, cos, sin, pos, cache=None):
        """Self-Extend inside attention layer `attn`: q (B, H, T, d), k, v (B, Hkv, T, d) before rotation, cos/sin
        (T, d) the neighbour tables at pos. Rotates each token twice (normal and grouped positions, through
        attn.head_rope when DoPE is on), caches both keys side by side, (B, h, S, 2d), and attends. (B, H, T, d)."""
        B, H, T, d = q.shape
        end = (cache.pos if cache is not None else 0) + T  # positions 0 .. end - 1 are in the sequence
        self.check(end, attn.config.max_pos)
        inv_freq, scale = rope_params(attn.config, end)
        gq, gk = self.positions(pos)  # (T,) each
        qn, kn = rope_qk(q, k, cos, sin, pos, attn.head_rope)  # (B, H, T, d), (B, Hkv or H, T, d): positions i, j
        qg = _rotate(q, *rope_cos_sin(inv_freq.to(q.device), gq, scale), gq, attn.head_rope, 0)  # i // G + W - W // G
        kg = _rotate(k, *rope_cos_sin(inv_freq.to(k.device), gk, scale), gk, attn.head_rope, 1)  # j // G
        if kn.shape[1] != v.shape[1]:  # keys came back per query head (DoPE): values follow
            v = v.repeat_interleave(H // v.shape[1], dim=1)  # (B, H, T, d)
        kk = torch.cat((kn, kg), dim=-1)  # (B, h, T, 2d)
        if cache is not None:
            kk, v = cache.update(attn.layer, kk, v)  # (B, h, S, 2d), (B, h, S, d)
        return self_extend_attention(qn, kk[..., :d], qg, kk[..., d:], v, end - T, self.window)


def _rotate(x, cos, sin, pos, head_rope, which: int):
    """x (B, h, T, d) rotated by shared tables (T, d), or by head_rope's per-head ones (then expanded to H heads, and
    DoPE's additive term `add[which]` added: 0 for queries, 1 for keys): one side of rope_qk."""
    if head_rope is None:
        return apply_rope(x, cos, sin)
    cos, sin, add = head_rope(cos, sin, pos)  # (H, T, d) each
    x = apply_rope(x.repeat_interleave(cos.shape[0] // x.shape[1], dim=1), cos, sin)  # (B, H, T, d)
    return x if add is None else x + add[which].to(x.dtype)


def self_extend_attention(qn, kn, qg, kg, v, start: int, window: int, block: int = 512):
    """Self-Extend's attention: the neighbour scores qn kn^T / sqrt(d) where 0 <= i - j < window, the grouped
    scores qg kg^T / sqrt(d) where i - j >= window, merged by that mask into one matrix, causal, one softmax (in
    float32), times v. Queries (B, H, T, d) sit at positions start .. start + T - 1; keys and values (B, h, S, d)
    at 0 .. S - 1 (h divides H: a GQA group shares its keys). Returns (B, H, T, d).

    Queries go `block` at a time. For a block whose first query is at position p, every key before lo = p - window
    + 1 is grouped for all of its queries: those far keys are one unmasked attention (fused where PyTorch returns
    its log-sum-exp: attention_lse), the keys from lo on (at most block + window - 1) the explicit mixed matrix,
    and the two softmaxes are merged by their log-sum-exps into the one softmax over all keys. Memory grows with
    block * (block + window), not T * S."""
    B, H, T, d = qn.shape
    rep, scale = H // kn.shape[1], 1 / math.sqrt(d)
    if rep > 1:
        kn, kg, v = (x.repeat_interleave(rep, dim=1) for x in (kn, kg, v))  # (B, H, S, d)
    out = []
    for s in range(0, T, block):
        t = min(block, T - s)
        first, last = start + s, start + s + t - 1  # this block's query positions
        lo = max(0, first - window + 1)  # keys before lo are grouped for every query of the block
        i = torch.arange(first, last + 1, device=qn.device)[:, None]  # (t, 1)
        j = torch.arange(lo, last + 1, device=qn.device)[None, :]  # (1, last + 1 - lo): later keys are in the future
        grouped = (qg[:, :, s:s + t] * scale) @ kg[:, :, lo:last + 1].transpose(-2, -1)  # (B, H, t, last + 1 - lo)
        near = (qn[:, :, s:s + t] * scale) @ kn[:, :, lo:last + 1].transpose(-2, -1)
        scores = torch.where(i - j < window, near, grouped).float().masked_fill(j > i, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, t, 1), finite: key i is always seen
        y = torch.softmax(scores, dim=-1) @ v[:, :, lo:last + 1].float()  # (B, H, t, d)
        if lo:  # the far keys, all grouped: their softmax, weighted against the near one's by the two masses
            y_far, lse_far = attention_lse(qg[:, :, s:s + t], kg[:, :, :lo], v[:, :, :lo], scale)
            m = torch.maximum(lse, lse_far)
            w, w_far = torch.exp(lse - m), torch.exp(lse_far - m)
            y = (w * y + w_far * y_far) / (w + w_far)
        out.append(y.to(v.dtype))
    return torch.cat(out, dim=2)


USE_FUSED_LSE = True  # False: attention_lse always takes the explicit product (the tests run both)


def attention_lse(q, k, v, scale: float):
    """softmax(q k^T scale) v without a mask, in float32, and its log-sum-exp (B, H, t, 1): PyTorch's fused CPU
    kernel where it is there (it never forms the t x S scores), the explicit product otherwise (CUDA, or a PyTorch
    without that kernel); tests/test_self_extend.py runs both."""
    fused = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused is not None and q.device.type == "cpu" and USE_FUSED_LSE:
        y, lse = fused(q, k, v, 0.0, False, scale=scale)
        return y.float(), lse.float()[..., None]
    scores = (q * scale).float() @ k.float().transpose(-2, -1)  # (B, H, t, S)
    return torch.softmax(scores, dim=-1) @ v.float(), torch.logsumexp(scores, dim=-1, keepdim=True)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.config = cfg  # Self-Extend's grouped tables come from the same RoPE
        assert cfg.n_head % cfg.n_kv_head == 0, f"{cfg.n_head} query heads cannot share {cfg.n_kv_head} KV heads"
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.o_bias)
        # Optional per-head RoPE: a callable (cos, sin, pos) -> (cos, sin, add) with cos/sin (n_head, T, d) and add
        # None or (2, n_head, T, d) added to q and k after rotation. dope.py sets it; None means plain RoPE.
        self.head_rope = None
        # Optional observer(layer, q, k, pos) called with q and k before rotation; entropy.py sets it (through
        # Transformer.observing) to score heads. None means nothing is observed.
        self.observer = None
        # Optional probe(layer, q, k, pos) called with what attention sees: the rotated queries (B, H, T, d) and every
        # key so far (B, h, S, d), key j at position j. entropy.py's attention probe sets it (Transformer.probing).
        self.probe = None
        # Optional SelfExtend: grouped attention past a neighbour window (Transformer.use_self_extend). None: plain.
        self.self_extend = None

    def forward(self, x, cos, sin, pos, cache=None, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        if self.observer is not None:  # entropy.py reads q and k before rotation
            self.observer(self.layer, q, k, pos)
        if self.self_extend is not None:  # its own rotations, cache layout and attention (no probe there)
            y = self.self_extend.attend(self, q, k, v, cos, sin, pos, cache)  # (B, H, T, d)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        rope = kernels.rope_qk if use_kernel(q) else rope_qk  # the fused Triton kernel on a GPU, else eager
        q, k = rope(q, k, cos, sin, pos, self.head_rope)  # (B, H, T, d), (B, Hkv or H, T, d)
        if k.shape[1] != v.shape[1]:  # keys came back per query head (DoPE): values follow
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, H, T, d)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, h, S, d), S = cached + T
        if self.probe is not None:  # entropy.py reads the attention weights of a few queries
            self.probe(self.layer, q, k, pos)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=k.shape[1] != self.n_head)  # (B, H, T, d)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos, cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        rope_params(cfg)  # fail now, not at the first forward, on an unknown or incomplete rope_scaling
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope_inv_freq(self, scaled: bool = True, seq_len: int | None = None) -> torch.Tensor:
        """Inverse frequencies (d/2,) in use (scaled=True) or of the original base (scaled=False)."""
        return rope_params(self.config, seq_len, scaled)[0]

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache(self.config.n_layer, max_len or self.config.max_pos)

    def forward(self, idx, cache=None, all_logits=False):
        """Logits (B, T, vocab) if all_logits, else (B, 1, vocab) for the last position only. With a cache, idx
        continues the cached sequence (chunked prefill or decode)."""
        check_token_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin, pos, mask = self.rope_at(start, T, x)
        for layer in self.layers:
            x = layer(x, cos, sin, pos, cache, mask)
        if cache is not None:
            cache.pos += T
        return self.logits(x, all_logits)

    def rope_at(self, start: int, T: int, x):
        """What every layer needs for T new positions after `start` cached ones: cos, sin (T, d) float32, the
        positions pos (T,), and the attention mask (None: causal from position 0, or a single query)."""
        pos = torch.arange(start, start + T, device=x.device)  # (T,) absolute positions
        inv_freq, scale = rope_params(self.config, start + T)
        cos, sin = rope_cos_sin(inv_freq.to(x.device), pos, scale)  # (T, d) float32
        mask = None
        if T > 1 and start > 0:
            # A chunk of T new queries meets start + T keys: query i sits at start + i, so SDPA's is_causal (which
            # aligns the mask to the top-left corner) would be wrong. Build the bottom-right-aligned mask once, as
            # an additive float mask so SDPA does not convert it again in every layer. Size T x S, never S x S.
            keep = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            mask = torch.zeros(T, start + T, dtype=x.dtype, device=x.device).masked_fill_(~keep, float("-inf"))
        return cos, sin, pos, mask

    def logits(self, x, all_logits: bool = False):
        """The final norm and LM head on hidden states x (B, T, C): (B, T or 1, vocab) in float32."""
        x = self.norm(x if all_logits else x[:, -1:])  # the LM head on the last position only, at inference
        return self.lm_head(x).float()

    @contextmanager
    def observing(self, observer):
        """Call observer(layer, q (B, H, T, d), k (B, Hkv, T, d), pos (T,)) in every layer with q and k before
        rotation, inside the with block (entropy.py's scoring pass)."""
        for block in self.layers:
            block.self_attn.observer = observer
        try:
            yield
        finally:
            for block in self.layers:
                block.self_attn.observer = None

    @contextmanager
    def probing(self, probe):
        """Call probe(layer, q (B, H, T, d), k (B, h, S, d), pos (T,)) in every layer with the rotated queries and
        all the keys attention sees (key j is position j), inside the with block (entropy.py's attention probe)."""
        for block in self.layers:
            block.self_attn.probe = probe
        try:
            yield
        finally:
            for block in self.layers:
                block.self_attn.probe = None

    def use_self_extend(self, se: "SelfExtend | None"):
        """Run every layer's attention as Self-Extend `se` (None: plain attention again); returns the model. Its
        grouped tables use this config's RoPE, which must not change with the length (HF's dynamic NTK does). A
        cache holds what one setting wrote: switch only between sequences."""
        if se is not None and not isinstance(se, SelfExtend):
            raise TypeError(f"use_self_extend takes a SelfExtend or None, got {se!r}")
        kind = (self.config.rope_scaling or {}).get("rope_type", (self.config.rope_scaling or {}).get("type"))
        if se is not None and kind == "dynamic":
            raise ValueError("Self-Extend under HF's dynamic NTK scaling: the base would change with the length and "
                             "the grouped positions with it; use plain RoPE (Self-Extend's setting) or a static "
                             "scaling")
        if se is not None and se.window >= self.config.max_pos:
            se.check(se.window, self.config.max_pos)  # names the window that cannot fit
        for block in self.layers:
            block.self_attn.self_extend = se
        return self

    @torch.inference_mode()
    def prefill(self, idx, cache, chunk: int = 2048, progress=None):
        """Run idx (B, T) into the cache chunk by chunk; returns the last position's logits (B, 1, vocab).
        Memory grows with chunk * T, never T * T."""
        if isinstance(chunk, bool) or not isinstance(chunk, Integral):
            raise TypeError(f"prefill chunk must be an int (tokens per forward), got chunk={chunk!r}")
        if chunk < 1:
            raise ValueError(f"prefill chunk must be >= 1 (tokens per forward), got chunk={chunk!r}")
        check_token_ids(idx, self.config.vocab_size)
        check_dynamic_chunks(self.config, cache.pos, idx.shape[1], chunk)
        logits = None
        for i in range(0, idx.shape[1], chunk):
            logits = self(idx[:, i:i + chunk], cache=cache)
            if progress is not None:
                progress.update(min(chunk, idx.shape[1] - i))
        return logits

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens: int, stop_tokens=(), chunk: int = 2048, cache=None, logits=None):
        """Greedy decoding of one sequence idx (1, T). Returns the new token ids (stop token excluded).
        With logits, the prompt is already in the cache (e.g. a prefill with reused layers) and is not run again."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
        check_token_ids(idx, self.config.vocab_size)
        if idx.shape[0] != 1:
            raise ValueError(f"generate() decodes one sequence at a time: idx has shape {tuple(idx.shape)}, "
                             "expected (1, tokens)")
        if cache is None:
            cache = self.new_cache(1, idx.shape[1] + max_new_tokens)
        if logits is None:
            logits = self.prefill(idx, cache, chunk)
        out = []
        for _ in range(max_new_tokens):
            nxt = logits[0, -1].argmax().view(1, 1)  # (1, 1) on the model's device: fed back without a host copy
            tok = int(nxt)  # the one read by the host per step
            if tok in stop_tokens:
                break
            out.append(tok)
            if len(out) < max_new_tokens:  # the last token's logits would go unused
                logits = self(nxt, cache=cache)
        return out

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", rope_scaling=None) -> "Transformer":
        """Load an HF Llama/Qwen2 folder (config.json + model.safetensors or a sharded index), checked first by
        open_folder. rope_scaling overrides the config's, e.g. {"rope_type": "ntk", "factor": 8.0} for the DoPE
        paper's 64K setup."""
        path = Path(path)
        cfg = open_folder(path)
        if rope_scaling is not None:
            cfg.rope_scaling = rope_scaling or None
        with torch.device("meta"):
            model = cls(cfg)
        model.load_state_dict(load_safetensors(path), strict=True, assign=True, where=path)
        if cfg.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.to(device=device, dtype=dtype).eval()

    def load_state_dict(self, sd, strict=True, assign=False, where=None):
        """Strict loading with errors that name the offending tensors (and the folder `where` they came from)."""
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)
        own = {k: v for k, v in self.state_dict().items() if not (self.config.tie_embeddings and k == "lm_head.weight")}
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
        if strict and (missing or unexpected or shapes):
            raise ValueError(f"{'the checkpoint' if where is None else where} does not match its config:" + "".join(
                f"\n  {what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
                for what, names in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if names))
        return super().load_state_dict(sd, strict=False, assign=assign)


def open_folder(path) -> Config:
    """What every loader here checks before it reads a weight: the folder holds config.json and its weights, every file
    a loader reads matches the folder's MANIFEST.json if it has one (check_folder), and config.json is a config
    this model.py can build. Returns that config; raises naming the folder or file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist or is not a folder, so it has no "
                                "config.json or model.safetensors (see weights.md for how to get weights)")
    weights = "model.safetensors.index.json" if (path / "model.safetensors.index.json").is_file() \
        else "model.safetensors"
    missing = [f for f in ("config.json", weights) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} has no {' and no '.join(missing)} (see weights.md for how to get "
                                "weights)")
    check_folder(path)
    d = read_json(path / "config.json")
    try:
        return Config.from_hf(d)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'} is not a usable HF config: "
                         f"{'missing key ' + repr(e.args[0]) if isinstance(e, KeyError) else e}") from e


# A folder's files checked by content at every load, cheaply. tools/setup_weights.py writes MANIFEST.json last in
# every folder it builds: the size and sha256 of each file, the tokenizer's and the config's included, so a folder
# that matches it is byte for byte the one built from one GGUF (its tokenizer belongs to its weights).

MANIFEST = "MANIFEST.json"
DIGEST_CACHE = ".sha256-cache.json"  # in a folder with a MANIFEST.json: each file's sha256 under its stat key
_DIGESTS: dict = {}  # this process's memo: (folder, names, stat keys) -> sha256


def loader_files(path: Path) -> list[str]:
    """The files of a model folder that a loader here (or transformers) reads: config, weights, tokenizer."""
    names = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"]
    return [n for n in names if (path / n).exists()] + sorted(p.name for p in path.glob("*.safetensors"))


def check_folder(path, names=None) -> bool:
    """Refuse a model folder whose files do not match its MANIFEST.json, naming each damaged, edited, missing or
    unlisted file; names: only these files (a tokenizer checks its own). True when the manifest vouched for them,
    False when the folder has no manifest: nothing then says what its files should be, and eval_nih.py keys its
    records on their content instead. Every file a loader reads must be listed (loader_files); others are ignored.
    After the first check of a file this costs a stat: see sha256_files."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        return False
    manifest = read_json(mf)
    try:
        listed = {str(n): (int(e["size"]), str(e["sha256"])) for n, e in manifest["files"].items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{mf} is not a manifest of file sizes and sha256s ({type(e).__name__}: {e})") from e
    wanted = loader_files(path) if names is None else [n for n in names if (path / n).exists() or n in listed]
    problems = [f"{n} is not in it (added after the folder was built)" for n in wanted if n not in listed]
    for name, (size, sha) in sorted(listed.items()):
        f = path / name
        if names is not None and name not in names:
            continue
        if not f.is_file():
            problems.append(f"{name} is missing" if not f.exists() else f"{name} is not a file")
        elif f.stat().st_size != size:
            problems.append(f"{name} is {f.stat().st_size} bytes, the manifest says {size} (truncated or edited)")
        elif (actual := sha256_files(path, [name])) != sha:
            problems.append(f"{name} has sha256 {actual}, the manifest says {sha} (damaged or edited)")
    if problems:
        raise ValueError(f"{path} does not match its {MANIFEST}: {'; '.join(problems)}. Rebuild it (python -m "
                         f"tools.setup_weights rebuilds a packaged model), or delete {MANIFEST} to use these files "
                         "as another model")
    return True


def sha256_files(folder, names) -> str:
    """The sha256 of the named files of folder read one after another (of one name: that file's sha256), hashed
    once per version of the files. The digest is remembered under each file's (device, inode, size, mtime_ns,
    ctime_ns): any write, truncation, copy or rename over a file changes one of them (touch can set the mtime back,
    never the ctime), and then the files are hashed again. It is remembered in this process, and also in the folder's
    .sha256-cache.json when the folder has a MANIFEST.json (setup_weights.py built it: this project's own folder),
    so checking 270 MB of weights at every load costs one stat per file after the first. A cache that cannot be
    read or written is only a cache: the files are hashed."""
    folder = Path(folder)
    stats = [os.stat(folder / n) for n in names]
    key = "\n".join(names)
    stat_key = [[s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns] for s in stats]
    memo = (str(folder.resolve()), key, json.dumps(stat_key))
    if memo in _DIGESTS:
        return _DIGESTS[memo]
    owned, cache_file, cache = (folder / MANIFEST).exists(), folder / DIGEST_CACHE, {}
    if owned:
        try:
            cache = json.loads(cache_file.read_text())
            hit = cache[key]
            if hit["stat"] == stat_key:
                _DIGESTS[memo] = hit["sha256"]
                return hit["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            cache = cache if isinstance(cache, dict) else {}
    h = hashlib.sha256()
    for n in names:
        with open(folder / n, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    _DIGESTS[memo] = h.hexdigest()
    if owned:
        cache[key] = {"stat": stat_key, "sha256": h.hexdigest()}
        tmp = folder / f"{DIGEST_CACHE}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(cache) + "\n")
            os.replace(tmp, cache_file)  # whole or absent, whoever writes last
        except OSError:  # a read-only or full disk: the next process hashes again
            tmp.unlink(missing_ok=True)
    return h.hexdigest()


def load_safetensors(path: Path, meta: bool = False) -> dict:
    """All tensors of model.safetensors, or of every shard named in model.safetensors.index.json. No pickles.
    meta=True: their names and shapes only, as meta tensors, read from the files' headers."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} has no weight_map of tensor -> file") from e
    else:
        files = ["model.safetensors"]
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing weights file{'s' if len(missing) > 1 else ''} in {path}: "
                                f"{', '.join(missing)}")
    sd = {}
    for name in files:
        f = path / name
        try:
            if meta:
                with safe_open(f, framework="pt") as st:
                    sd.update({k: torch.empty(st.get_slice(k).get_shape(), device="meta") for k in st.keys()})
            else:
                sd.update(load_file(f))
        except SafetensorError as e:
            raise ValueError(f"corrupt safetensors file {f}: {e}") from e
    return sd


def parse_len(s: str) -> int:
    """'4k' -> 4096, '16K' -> 16384, '3000' -> 3000 (k = 1024)."""
    t = s.strip().lower()
    try:
        n = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"length {s!r} is not a token count like 4k, 16k, 64k or 3000") from None
    if n < 256:
        raise argparse.ArgumentTypeError(f"length {s!r} is too short for a haystack (at least 256 tokens)")
    return n


def read_json(path: Path):
    """A JSON file's contents; a file that is not JSON (or not text) is an error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {e}") from e


def check_token_ids(idx, vocab_size: int) -> None:
    """What the embedding would reject with an unhelpful message (or misread), rejected naming the value: idx must
    be a (batch, tokens) tensor of int64/int32 ids in [0, vocab_size), with at least one token. One min/max pass."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"token ids must be a torch.Tensor of shape (batch, tokens), got {type(idx).__name__}")
    if idx.ndim != 2 or idx.shape[0] == 0:
        raise ValueError(f"token ids must have shape (batch, tokens), got {tuple(idx.shape)}")
    if idx.shape[1] == 0:
        raise ValueError(f"empty prompt: token ids of shape {tuple(idx.shape)} hold no token")
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"token ids must be torch.int64 or torch.int32, got {idx.dtype}")
    if idx.is_meta:  # shapes only (the device tests): no values to check
        return
    lo, hi = torch.stack(torch.aminmax(idx)).tolist()
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(torch.nonzero(idx == bad)[0].tolist())
        raise ValueError(f"token id {bad} at (batch, position) {where} is out of range: the vocabulary has "
                         f"{vocab_size} ids, 0..{vocab_size - 1}")


def check_dynamic_chunks(cfg: Config, start: int, T: int, chunk: int) -> None:
    """HF's dynamic NTK sets the base from the length of each forward, so a prefill split into several forwards
    past the native context would rotate its chunks with different bases (and differ from one pass). Refused,
    naming the ways out."""
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind == "dynamic" and start + T > cfg.max_pos and (start > 0 or T > chunk):
        raise ValueError(f"a prefill of {T} tokens after {start} cached ones in chunks of {chunk} under dynamic NTK "
                         f"scaling past the native {cfg.max_pos}: each forward would rotate with its own base. Prefill "
                         "in one pass from position 0 (chunk >= tokens), or use the static rope_type 'ntk' at the "
                         "target length")


# -----------------------------------------------------------------------------
# Tokenizer: the `tokenizers` library reads tokenizer.json; jinja2 renders the chat template.


class Tokenizer:
    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        check_folder(path, ["tokenizer.json", "tokenizer_config.json"])  # against the folder's manifest, if any
        self.path = path
        try:
            self.tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception on a malformed file
            raise ValueError(f"{path / 'tokenizer.json'} is not a readable tokenizer (corrupt or truncated?): "
                             f"{e}") from e
        tc = path / "tokenizer_config.json"
        self.config = read_json(tc) if tc.is_file() else {}
        if not isinstance(self.config, dict):
            raise ValueError(f"{tc} holds a {type(self.config).__name__}, not a JSON object")
        self.bos_token = self._str(self.config.get("bos_token"))
        self.eos_token = self._str(self.config.get("eos_token"))
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        if self.eos_token and self.eos_id is None:
            raise ValueError(f"{tc} names eos_token {self.eos_token!r}, which {path / 'tokenizer.json'} does not "
                             "have: the two files do not belong together")

    def check_fits(self, cfg: Config):
        """Refuse a tokenizer that cannot be the one of a model with this config, before any prompt runs: one whose
        ids reach past the model's embedding (a tokenizer of a larger vocabulary: some text would encode to ids the
        model has no row for). Smaller is allowed (embeddings are often padded)."""
        n = self.tok.get_vocab_size(with_added_tokens=True)
        if n > cfg.vocab_size:
            raise ValueError(f"{self.path / 'tokenizer.json'} has {n} token ids but the model's vocab_size is "
                             f"{cfg.vocab_size}: this tokenizer does not belong to these weights")

    @staticmethod
    def _str(t):
        return t.get("content") if isinstance(t, dict) else t

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's chat template (jinja2, sandboxed, as HF does)."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        template = self.config.get("chat_template")
        if not template:
            raise ValueError("tokenizer_config.json has no chat_template")

        def raise_exception(msg):
            raise ValueError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=self.bos_token or "", eos_token=self.eos_token or "")


def main(argv=None):
    """Chat with a checkpoint: `python model.py --prompt "..."`. A folder, file or flag that cannot be used is one
    line naming it (exit 1)."""
    import sys
    import time

    from tools.setup_weights import DEFAULT_MODEL_DIR  # weights/ next to this file, whatever the working directory

    p = argparse.ArgumentParser(description="Chat with a checkpoint through model.py")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="an HF folder (default: %(default)s)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = p.parse_args(argv)
    try:
        model = Transformer.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
        tok = Tokenizer(a.model)
        tok.check_fits(model.config)
        ids = tok.encode(tok.chat([{"role": "user", "content": a.prompt}]))
        t0 = time.time()
        out = model.generate(torch.tensor([ids]), a.max_new_tokens,
                             stop_tokens={tok.eos_id, *model.config.eos_token_ids})
    except (OSError, ValueError, TypeError) as e:
        print(f"model.py: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(tok.decode(out))
    print(f"[{len(ids)} prompt tokens, {len(out)} new tokens in {time.time() - t0:.1f}s]")


if __name__ == "__main__":
    main()
