"""
DoPE: the three training-free denoisings of RoPE (Xiong et al., "DoPE: Denoising Rotary Position Embedding",
arXiv 2511.09146), as transformations of per-head cos/sin tables.

Attention applies RoPE as x * cos + rotate_half(x) * sin (half-split layout: band f rotates dims f and f + d/2).
A head selected by entropy.py (m_h = 0 in v1 Eq. 32-37 / v2 Eq. 13-17) gets different tables; every other head keeps
the (NTK-scaled) RoPE. Following the paper's prose and v2 Figure 1 (see docs/METHOD.md, sections 4 and 6), "remove the
positional encoding" means the identity rotation (cos = 1, sin = 0), which keeps the q/k content:

- by-parts (v1 Eq. 32-34, v2 Eq. 13-15): no rotation on the low-frequency bands, theta_f <= 2 pi / L_native.
- by-all   (v1 Eq. 35,    v2 Eq. 16):    no rotation on the whole head (a NoPE head).
- by-Gaussian (v1 Eq. 36-37, v2 Eq. 17): cos and sin replaced by i.i.d. N(0, sigma^2) draws.

The same tables rotate the head's query and its key (a key shared by a GQA group is rotated once per query head).
Under a scaling whose tables carry an attention factor (YaRN's mscale m: cos and sin are m cos, m sin), an unrotated
band is still cos = 1, sin = 0: the factor is not kept on the bands a denoising removes (the paper is written for
plain and NTK-scaled RoPE, which have none).

This file does not import model.py. apply_dope and remove_dope work on any model that has (model.Transformer and
engines/hf_dope.HFModel do; tests/test_dope.py checks a hand-written one with nothing else):
  model.layers[i].self_attn   one attention module per layer, with
      .n_head                 its number of query heads H (read from layer 0), and
      .head_rope              a slot: apply_dope puts a HeadRope in the denoised layers', remove_dope sets every one to
                              None. When it is set, the attention calls head_rope(cos (T, d), sin (T, d), pos (T,)) ->
                              (cos (H, T, d), sin (H, T, d), add: None or (2, H, T, d)), rotates query head h and its
                              key (once per query head it serves) with cos[h], sin[h], then adds add[0] to the queries
                              and add[1] to the keys (model.rope_qk is the reference).
and, for by-parts only (its bands come from the frequencies in use):
  model.config.max_pos        L_native of the band threshold, unless DopePlan(native_len=...) gives it
  model.config.rope_scaling   a dict or None: HF's "dynamic" type is refused without an inv_freq
  model.rope_inv_freq()       the frequencies in use (d/2,), unless apply_dope(..., inv_freq=...) gives them
"""

import math
import operator
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

VARIANTS = ("parts", "all", "gaussian")


# -----------------------------------------------------------------------------
# Which bands are "low frequency"


def low_freq_bands(inv_freq: torch.Tensor, native_len: int) -> torch.Tensor:
    """Bands f whose angle theta_f (from the base actually in use, e.g. NTK-scaled) turns less than once over the
    native context: theta_f <= 2 pi / L_native (v1 Eq. 33, v2 Eq. 14). Returns a bool mask (d/2,)."""
    return inv_freq <= 2 * math.pi / native_len


def band_dims(bands: torch.Tensor) -> torch.Tensor:
    """Band mask (d/2,) -> dim mask (d,) in the half-split layout: band f is dims f and f + d/2."""
    return torch.cat((bands, bands))


# -----------------------------------------------------------------------------
# The three denoisings, on the tables of one head: cos, sin (T, d) -> (T, d)


def by_parts(cos, sin, dims: torch.Tensor, zero: bool = False):
    """No rotation on the masked dims (cos = 1, sin = 0); zero=True: the literal m_h zeroing of those dims."""
    return cos.masked_fill(dims, 0.0 if zero else 1.0), sin.masked_fill(dims, 0.0)


def by_all(cos, sin, zero: bool = False):
    """A NoPE head (cos = 1, sin = 0); zero=True: the literal m_h * q, m_h * k (q = k = 0: uniform attention)."""
    return torch.full_like(cos, 0.0 if zero else 1.0), torch.zeros_like(sin)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons), a well-mixed 32-bit integer hash, in int64 arithmetic: products wrap mod 2^64 and
    the mask keeps the low 32 bits, which are exact. The same function is easy to write in a Triton kernel."""
    m = 0xFFFFFFFF
    x = x & m
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def gaussian(seed: int, layer: int, head: int, stream: int, pos: torch.Tensor, d: int, sigma: float = 1.0):
    """N(0, sigma^2) draws (T, d) float32, a pure function of (seed, layer, head, stream, position, dim): prefill and
    cached decode see the same numbers, on any device and in any chunking. Box-Muller on two hashed uniforms."""
    key = int(_hash32(_hash32(_hash32(_hash32(torch.tensor(seed)) ^ layer) ^ head) ^ stream))
    counter = (pos.long()[:, None] * d + torch.arange(d, device=pos.device)[None, :]) * 2  # (T, d): 2 uniforms/draw
    u1 = (_hash32(_hash32(counter) ^ key).double() + 0.5) / 2**32  # in (0, 1)
    u2 = (_hash32(_hash32(counter + 1) ^ key).double() + 0.5) / 2**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
    return (sigma * z).float()


# -----------------------------------------------------------------------------
# A plan for the whole model, and the per-layer table function it installs


@dataclass
class DopePlan:
    """What to denoise. heads: (layer, query head) pairs, e.g. from entropy.select_heads.

    Options (all documented ablations; defaults follow docs/METHOD.md, sections 4 and 6):
      zero: by-parts / by-all zero the q/k dims instead of leaving them unrotated.
      gaussian_form: "replace" (default: cos, sin := eps_c, eps_s), "v2" (multiplicative, q' = eps * R q, v2 Eq. 17),
                     "v1" (additive replacement, q' = eps, k' = eps', v1 Eq. 36-37: the head's content is dropped).
      native_len: L_native for the by-parts band threshold (default: the model's native context).
    """
    heads: list
    variant: str = "parts"
    zero: bool = False
    gaussian_form: str = "replace"
    sigma: float = 1.0
    seed: int = 42
    native_len: int | None = None
    bands: torch.Tensor | None = field(default=None, repr=False)  # filled in by apply_dope for by-parts

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown DoPE variant {self.variant!r}: expected one of {VARIANTS}")
        if self.gaussian_form not in ("replace", "v1", "v2"):
            raise ValueError(f"unknown gaussian_form {self.gaussian_form!r}: expected replace, v1 or v2")
        if not isinstance(self.zero, bool):
            raise TypeError(f"zero must be True or False, got {self.zero!r}")
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, Real):
            raise TypeError(f"sigma must be a number, got sigma={self.sigma!r}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be finite and > 0, got sigma={self.sigma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise TypeError(f"seed must be an int, got seed={self.seed!r}")
        if not -2**63 <= self.seed < 2**63:
            raise ValueError(f"seed must fit in 64 bits, got seed={self.seed!r}")
        if self.native_len is not None:
            if isinstance(self.native_len, bool) or not isinstance(self.native_len, Integral):
                raise TypeError(f"native_len must be None or an int (tokens), got native_len={self.native_len!r}")
            if self.native_len <= 0:
                raise ValueError(f"native_len must be > 0 tokens, got native_len={self.native_len!r}")
        self.heads = sorted({_head(pair) for pair in _pairs(self.heads)})


def _pairs(heads):
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise TypeError(f"heads must be a list of (layer, head) pairs, got {heads!r}")
    return list(heads)


def _head(pair) -> tuple[int, int]:
    """(layer, head) as two ints >= 0. An index must be an integer (an int, a NumPy or 0-d torch integer): a float,
    a bool or a string is refused, never truncated."""
    try:
        layer, head = pair
    except (TypeError, ValueError):
        raise TypeError(f"heads must be (layer, head) pairs, got {pair!r}") from None
    out = []
    for v in (layer, head):
        try:
            if isinstance(v, bool) or getattr(v, "dtype", None) == torch.bool:
                raise TypeError
            i = operator.index(v)
        except TypeError:
            raise TypeError(f"head {pair!r}: index {v!r} is not an integer") from None
        if i < 0:
            raise ValueError(f"head {pair!r}: index {i} is negative (layers and heads count from 0)")
        out.append(i)
    return tuple(out)


class HeadRope:
    """The per-head tables of one layer: heads in `heads` are denoised, the rest get the model's tables unchanged."""

    def __init__(self, plan: DopePlan, layer: int, heads: list, n_head: int):
        self.plan, self.layer, self.heads, self.n_head = plan, layer, heads, n_head
        self._dims = (None, {})  # (plan.bands it was made from, {device: dim mask (d,)})

    def dims(self, device):
        """The by-parts dim mask (d,) on `device`: copied from plan.bands once per device, not in every call (on a
        GPU a host-to-device copy waits for the stream: it would cost a sync per head, layer and forward)."""
        bands, per_device = self._dims
        if bands is not self.plan.bands:  # apply_dope or a user set new bands
            bands, per_device = self.plan.bands, {}
            self._dims = (bands, per_device)
        if device not in per_device:
            per_device[device] = band_dims(bands).to(device)
        return per_device[device]

    def __call__(self, cos, sin, pos):
        T, d = cos.shape
        cos, sin = cos.expand(self.n_head, T, d).clone(), sin.expand(self.n_head, T, d).clone()  # (H, T, d)
        add = None
        p = self.plan
        for h in self.heads:
            if p.variant == "parts":
                cos[h], sin[h] = by_parts(cos[h], sin[h], self.dims(cos.device), p.zero)
            elif p.variant == "all":
                cos[h], sin[h] = by_all(cos[h], sin[h], p.zero)
            elif p.gaussian_form == "replace":
                cos[h], sin[h] = (gaussian(p.seed, self.layer, h, s, pos, d, p.sigma) for s in (0, 1))
            elif p.gaussian_form == "v2":  # eps * (q cos + rot(q) sin): one draw scales both terms
                eps = gaussian(p.seed, self.layer, h, 0, pos, d, p.sigma)
                cos[h], sin[h] = eps * cos[h], eps * sin[h]
            else:  # v1: rotate nothing, keep nothing, add independent draws for q and k
                cos[h], sin[h] = 0.0, 0.0
                if add is None:
                    add = torch.zeros(2, self.n_head, T, d, device=cos.device)  # (q or k, H, T, d)
                add[0, h] = gaussian(p.seed, self.layer, h, 2, pos, d, p.sigma)
                add[1, h] = gaussian(p.seed, self.layer, h, 3, pos, d, p.sigma)
        return cos, sin, add


def attention_layers(model):
    return [block.self_attn for block in model.layers]


def apply_dope(model, plan: DopePlan, inv_freq: torch.Tensor | None = None):
    """Make `model` run DoPE on plan.heads (in place; returns the model). inv_freq: the frequencies in use
    (default model.rope_inv_freq()), which decide the by-parts bands. Undo with remove_dope."""
    attn = attention_layers(model)
    n_layer, n_head = len(attn), attn[0].n_head
    bad = [(layer, h) for layer, h in plan.heads if not (0 <= layer < n_layer and 0 <= h < n_head)]
    if bad:
        raise ValueError(f"heads {bad} do not exist: the model has {n_layer} layers x {n_head} heads")
    if plan.variant == "parts":
        kind = (model.config.rope_scaling or {}).get("rope_type", (model.config.rope_scaling or {}).get("type"))
        if kind == "dynamic" and inv_freq is None:
            raise ValueError("by-parts under HF's dynamic NTK scaling: the base, and so the low-frequency bands, "
                             "change with the current length; use the static form (rope_type 'ntk', the paper's) or "
                             "pass the inv_freq of the length you run at")
        inv_freq = model.rope_inv_freq() if inv_freq is None else inv_freq  # the scaled base in use (v2 Eq. 14)
        plan.bands = low_freq_bands(inv_freq, plan.native_len or model.config.max_pos)
    remove_dope(model)
    for layer in sorted({layer for layer, _ in plan.heads}):
        attn[layer].head_rope = HeadRope(plan, layer, [h for lay, h in plan.heads if lay == layer], n_head)
    return model


def remove_dope(model):
    """Back to plain RoPE on every head."""
    for a in attention_layers(model):
        a.head_rope = None
    return model
