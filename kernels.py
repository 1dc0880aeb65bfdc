"""
An optional fused RoPE for model.py: one Triton program rotates queries and keys together (the Liger-Kernel way),
with the three DoPE denoisings (Xiong et al., "DoPE: Denoising Rotary Position Embedding", arXiv 2511.09146) inside
the kernel, so a DoPE forward costs what a plain one costs.

What it computes is exactly model.rope_qk: RoPE (v1 Eq. 8-11, v2 Eq. 1-4) in the half-split layout,
    out[f]       = x[f] cos[f]             - x[f + d/2] sin[f]
    out[f + d/2] = x[f + d/2] cos[f + d/2] + x[f] sin[f + d/2]       (= x * cos + rotate_half(x) * sin)
and, on the heads a DoPE plan selects (m_h = 0 in v1 Eq. 32-37 / v2 Eq. 13-17), a per-head mode:
    0 plain RoPE; 1 by-parts: identity rotation (cos 1, sin 0) on the low-frequency band mask (v1 Eq. 32-34,
    v2 Eq. 13-15); 2 by-all: no rotation (v1 Eq. 35, v2 Eq. 16); 3 by-Gaussian: cos and sin replaced by N(0, sigma^2)
    draws (v1 Eq. 36-37, v2 Eq. 17), the same counter-based hash + Box-Muller as dope.gaussian, computed in the
    kernel from (seed, layer, head, position, dim) instead of read from a table.
The ablations (plan.zero, gaussian_form "v1"/"v2") and any head_rope that is not a dope.HeadRope run in table mode:
head_rope(cos, sin, pos) builds per-head tables (H, T, d) and the same kernel reads them.

Why fuse (memory traffic): RoPE does 3 flops per element, under 1 flop per byte moved in bf16, so it is bound by
memory bandwidth, not arithmetic. Eager `x * cos + rotate_half(x) * sin` is 5 elementwise kernels (x*cos, the negated
half, the cat, *sin, +; plus casting the tables), which together read ~5.5 and write ~4.5 tensors the size of x. With
DoPE, eager also builds and reads per-head cos/sin tables (H, T, d) in float32, each twice the size of a bf16 q, and
copies the keys per query head. The fused kernel reads q and k once and writes them once (the keys once per query
head under DoPE, as the eager path returns them), plus the (T, d) tables that all heads share: ~5x less traffic for
plain RoPE, more for DoPE. bench_rope.py measures it on a GPU against the device's peak bandwidth, the physical limit
for this kernel.

Tables or on the fly (rope_qk vs rope_qk_from_freqs; every scaling in model.py is an inv_freq and a scale, so both
cover them): both are bound by the q/k traffic. Reading the float32 tables adds T * d * 8 bytes per launch (both
halves, so that any (T, d) table gives eager's result; Liger reads one), ~5% of the q/k bytes at 32 query / 8 KV
heads, d = 128, bf16; the 8 KV groups' programs for a block of positions run side by side, so the re-reads hit L2.
Computing cos(m theta_f), sin(m theta_f) costs one sin and one cos per (position, band) per KV group. tl.sin/tl.cos
compile to libdevice __nv_sinf/__nv_cosf: accurate software routines (~25 instructions with range reduction while
|angle| < ~10^5 rad, a slow path beyond), not the SFU's sin.approx, which would be wrong at the angles m * theta_f of
10^4-10^5 rad that long contexts reach. That is ~3-15% of the time the bytes take (RTX 4090 .. H100 ratios of ALU
rate to bandwidth) and overlaps with the loads. So on the fly should be a few percent faster in the kernel alone: it
trades the 5% of extra bytes for arithmetic the memory stalls hide. In a model the difference is smaller still: the
tables are built once per forward and shared by all layers. This is reasoning, not a measurement (no GPU here):
bench_rope.py times both; model.py passes tables, so rope_qk is the path it uses.

Precision: the kernel loads q, k (fp32/fp16/bf16) and the float32 tables, computes in float32 and rounds once on the
store. The eager path casts cos/sin to x.dtype first and rounds after each of its ops, so in fp16/bf16 the two differ
by a few units in the last place of the dtype (tests: atol 1e-2 fp16, 1e-1 bf16, Liger's; the kernel is the more
accurate one, within half an ulp of the exact result). In fp32, table mode does eager's operations in eager's order
with FMA contraction off, so the results agree bit for bit (checked under the interpreter); from frequencies, sin/cos
implementations may differ in the last bit. The Gaussian draws are computed in float32 (dope.gaussian uses float64,
then rounds): within 3 float32 ulps.

Forward only (inference): when autograd needs gradients, rope_qk falls back to the eager math. Without triton this
file still imports and available() is False; model.py then uses its eager rope_qk, the same math.
"""

import os
import weakref

import torch

from model import rope_cos_sin as cos_sin, rope_qk as rope_qk_eager  # the eager math: the fallback and the reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path of the project never needs triton
    triton = None

try:
    import dope  # only to recognise dope.HeadRope and read its plan
except ImportError:
    dope = None

MODES = {"plain": 0, "parts": 1, "all": 2, "gaussian": 3}  # the per-head mode vector's codes


# -----------------------------------------------------------------------------
# The kernel

if triton is not None:

    @triton.jit
    def _hash32(x):
        """lowbias32 on uint32 (dope._hash32): multiplications wrap mod 2^32, shifts are logical."""
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return x

    @triton.jit
    def _neg_log_uniform(h):
        """-ln u for u = (h + 0.5) / 2^32, h uint32, in float32 and accurate relative to the result. Near u = 1 the
        float32 u has lost the bits -ln u is made of, so there take e = 1 - u from the complement ~h (exact) and
        correct ln(fl(1 - e)) for the rounding of 1 - e, which (1 - fl(1 - e)) - e gives exactly (Sterbenz)."""
        u = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2^-32
        e = ((h ^ 0xFFFFFFFF).to(tl.float32) + 0.5) * 2.3283064365386963e-10
        v = 1.0 - e
        dv = (1.0 - v) - e  # v + dv = 1 - e
        return tl.where(h < 0x80000000, -tl.log(u), -(tl.log(v) + dv / v))

    @triton.jit
    def _cos_2pi(h):
        """cos(2 pi u) for u = (h + 0.5) / 2^32, accurate relative to the result (also near its zeros): the angle is
        reduced in integers to n pi/2 + a with |a| <= pi/4, then cos(n pi/2 + a) is one of +-cos a, +-sin a."""
        octant = h >> 29
        odd = (octant & 1) == 1
        w = h & 0x1FFFFFFF
        w = tl.where(odd, 0x1FFFFFFF - w, w)  # distance to the nearest multiple of pi/2, in units of pi/4 / 2^29
        a = (w.to(tl.float32) + 0.5) * 1.4629180792671596e-09  # pi/4 / 2^29: |a| in (0, pi/4)
        c = tl.cos(a)
        s = tl.where(odd, -tl.sin(a), tl.sin(a))  # a is negative past an odd octant's multiple of pi/2
        n = ((octant + 1) >> 1) & 3
        return tl.where(n == 0, c, tl.where(n == 1, -s, tl.where(n == 2, -c, s)))

    @triton.jit
    def _gaussian(key, pos, dim, D: tl.constexpr):
        """N(0, 1) draws (BLOCK_T, BLOCK_F) for positions pos (BLOCK_T,) int64 and dims dim (BLOCK_F,): dope.gaussian,
        counter = 2 (pos * d + dim) (uint32 wrap-around keeps the same low 32 bits as dope's int64), Box-Muller."""
        counter = (pos.to(tl.uint32)[:, None] * D + dim.to(tl.uint32)[None, :]) * 2
        h1 = _hash32(_hash32(counter) ^ key)
        h2 = _hash32(_hash32(counter + 1) ^ key)
        return tl.sqrt_rn(2.0 * _neg_log_uniform(h1)) * _cos_2pi(h2)

    @triton.jit
    def _rot(x1, x2, c1, c2, s1, s2):
        """x * cos + rotate_half(x) * sin on the two halves, written as eager writes it (no FMA: see the launch)."""
        return x1 * c1 + (-x2) * s1, x2 * c2 + x1 * s2

    @triton.jit(do_not_specialize=["seed", "layer"])
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr,  # q (B, H, T, d), k (B, Hkv, T, d); outputs q (B, H, T, d), k (B, Hkv or H, T, d)
        cos_ptr, sin_ptr, freq_ptr, pos_ptr,  # tables (T, d) or (H, T, d) | inverse frequencies (d/2,); positions (T,)
        mode_ptr, band_ptr,  # DoPE: mode per query head (H,) int32, band mask (d/2,) int8
        T, n_kv, n_tblk, scale, sigma, seed, layer,
        sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t, sc_h, sc_t,
        G: tl.constexpr,  # query heads per KV head (GQA group size)
        D: tl.constexpr,  # head width d
        BLOCK_T: tl.constexpr,  # positions per program
        BLOCK_F: tl.constexpr,  # d/2 rounded up to a power of two
        FROM_FREQS: tl.constexpr,  # cos/sin computed from inv_freq instead of read
        PER_HEAD: tl.constexpr,  # tables (H, T, d): table mode for head_rope options the modes do not cover
        DOPE: tl.constexpr,  # read the mode vector
        EXPAND_K: tl.constexpr,  # write the key once per query head (any head_rope), as model.rope_qk returns it
    ):
        # One program: batch b, BLOCK_T positions, KV group g. KV groups vary fastest so programs that share a block
        # of positions run together and the tables they all read stay in L2.
        pid = tl.program_id(0).to(tl.int64)
        g = pid % n_kv
        tb = (pid // n_kv) % n_tblk
        b = pid // (n_kv * n_tblk)
        HALF: tl.constexpr = D // 2
        t = tb * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,) row in this chunk
        f = tl.arange(0, BLOCK_F)  # (BLOCK_F,) band: dims f and f + d/2
        mask = (t < T)[:, None] & (f < HALF)[None, :]  # (BLOCK_T, BLOCK_F)
        m = tl.load(pos_ptr + t, mask=t < T, other=0)  # (BLOCK_T,) absolute positions (cached decode: m != t)

        # RoPE tables for these rows, shared by the group's heads (v1 Eq. 8-11: angle m * theta_f)
        tab = t[:, None] * sc_t + f[None, :]
        if FROM_FREQS:
            ang = m.to(tl.float32)[:, None] * tl.load(freq_ptr + f, mask=f < HALF, other=0.0)[None, :]
            c1 = tl.cos(ang) * scale
            s1 = tl.sin(ang) * scale
            c2, s2 = c1, s1  # half-split: band f is dims f and f + d/2
        else:
            c1 = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(tl.float32)
            c2 = tl.load(cos_ptr + tab + HALF, mask=mask, other=0.0).to(tl.float32)
            s1 = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(tl.float32)
            s2 = tl.load(sin_ptr + tab + HALF, mask=mask, other=0.0).to(tl.float32)
        if DOPE:
            band = tl.load(band_ptr + f, mask=f < HALF, other=0) != 0  # (BLOCK_F,) low-frequency bands
            seed_key = _hash32(_hash32(seed.to(tl.uint32)) ^ layer.to(tl.uint32))

        # The group's key, read once; without per-head tables it is rotated once, with the shared tables.
        k_off = b * sk_b + g * sk_h + t[:, None] * sk_t + f[None, :]
        k1 = tl.load(k_ptr + k_off, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + k_off + HALF, mask=mask, other=0.0).to(tl.float32)
        if not EXPAND_K:
            o1, o2 = _rot(k1, k2, c1, c2, s1, s2)
            ko = b * sko_b + g * sko_h + t[:, None] * sko_t + f[None, :]
            tl.store(ko_ptr + ko, o1.to(ko_ptr.dtype.element_ty), mask=mask)
            tl.store(ko_ptr + ko + HALF, o2.to(ko_ptr.dtype.element_ty), mask=mask)

        for i in range(G):  # a loop, not unrolled: the Gaussian branch is big
            h = g * G + i  # query head
            hc1, hc2, hs1, hs2 = c1, c2, s1, s2
            if PER_HEAD:
                hc1 = tl.load(cos_ptr + h * sc_h + tab, mask=mask, other=0.0).to(tl.float32)
                hc2 = tl.load(cos_ptr + h * sc_h + tab + HALF, mask=mask, other=0.0).to(tl.float32)
                hs1 = tl.load(sin_ptr + h * sc_h + tab, mask=mask, other=0.0).to(tl.float32)
                hs2 = tl.load(sin_ptr + h * sc_h + tab + HALF, mask=mask, other=0.0).to(tl.float32)
            if DOPE:
                mode = tl.load(mode_ptr + h)
                # by-parts (v1 Eq. 32-34) on the band mask, by-all (v1 Eq. 35) on every band: the identity rotation
                ident = ((mode == 1) & band) | (mode == 2)  # (BLOCK_F,)
                hc1 = tl.where(ident[None, :], 1.0, hc1)
                hc2 = tl.where(ident[None, :], 1.0, hc2)
                hs1 = tl.where(ident[None, :], 0.0, hs1)
                hs2 = tl.where(ident[None, :], 0.0, hs2)
                if mode == 3:  # by-Gaussian (v1 Eq. 36-37): one branch per program, only these heads pay for it
                    head_key = _hash32(seed_key ^ h.to(tl.uint32))
                    key_c, key_s = _hash32(head_key ^ 0), _hash32(head_key ^ 1)  # stream 0: cos, 1: sin
                    hc1 = sigma * _gaussian(key_c, m, f, D)
                    hc2 = sigma * _gaussian(key_c, m, f + HALF, D)
                    hs1 = sigma * _gaussian(key_s, m, f, D)
                    hs2 = sigma * _gaussian(key_s, m, f + HALF, D)
            q_off = b * sq_b + h * sq_h + t[:, None] * sq_t + f[None, :]
            q1 = tl.load(q_ptr + q_off, mask=mask, other=0.0).to(tl.float32)
            q2 = tl.load(q_ptr + q_off + HALF, mask=mask, other=0.0).to(tl.float32)
            o1, o2 = _rot(q1, q2, hc1, hc2, hs1, hs2)
            qo = b * sqo_b + h * sqo_h + t[:, None] * sqo_t + f[None, :]
            tl.store(qo_ptr + qo, o1.to(qo_ptr.dtype.element_ty), mask=mask)
            tl.store(qo_ptr + qo + HALF, o2.to(qo_ptr.dtype.element_ty), mask=mask)
            if EXPAND_K:  # the shared key, rotated with this query head's tables
                o1, o2 = _rot(k1, k2, hc1, hc2, hs1, hs2)
                ko = b * sko_b + h * sko_h + t[:, None] * sko_t + f[None, :]
                tl.store(ko_ptr + ko, o1.to(ko_ptr.dtype.element_ty), mask=mask)
                tl.store(ko_ptr + ko + HALF, o2.to(ko_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """True when the kernel was defined under TRITON_INTERPRET=1 (it then runs on CPU tensors, in numpy)."""
    return triton is not None and type(_rope_kernel).__name__ == "InterpretedFunction"


def available() -> bool:
    """True when the kernel can run here: triton imports, and a CUDA device exists or TRITON_INTERPRET=1 was set
    before this module was imported (triton reads it when @triton.jit runs, i.e. at import of this file)."""
    return triton is not None and (interpreted() or torch.cuda.is_available())


# -----------------------------------------------------------------------------
# Public API: the same contract as model.rope_qk


def rope_qk(q, k, cos, sin, pos, head_rope=None, *, block_t=None):
    """model.rope_qk, fused: q (B, H, T, d), k (B, Hkv, T, d), cos/sin (T, d) float32 (attention scale included),
    pos (T,) absolute positions. Returns (q, k) rotated, in their dtypes; with a head_rope the keys come back per query
    head (B, H, T, d). A dope.HeadRope with by-parts, by-all or by-Gaussian "replace" runs inside the kernel; other
    head_ropes run in table mode (per-head tables from head_rope(cos, sin, pos))."""
    return _rope(q, k, pos, head_rope, cos=cos, sin=sin, block_t=block_t)


def rope_qk_from_freqs(q, k, inv_freq, pos, scale=1.0, head_rope=None, *, block_t=None):
    """rope_qk with cos/sin computed in the kernel from inverse frequencies inv_freq (d/2,) and the attention scale:
    the same result as rope_qk(q, k, *model.rope_cos_sin(inv_freq, pos, scale), pos, head_rope) without the tables."""
    return _rope(q, k, pos, head_rope, inv_freq=inv_freq, scale=scale, block_t=block_t)


# -----------------------------------------------------------------------------
# DoPE plan -> kernel arguments


_dope_cache = weakref.WeakKeyDictionary()  # HeadRope -> {(variant, heads, bands, device): (modes, bands)}


def dope_args(head_rope, n_head: int, d: int, device):
    """The kernel's view of a dope.HeadRope: dict(modes (H,) int32, bands (d/2,) int8, seed, sigma, layer), or None
    when this head_rope needs table mode (plan.zero, gaussian_form "v1"/"v2", or not a dope.HeadRope). The mode vector
    and band mask are cached per HeadRope; an in-place edit of plan.bands is not seen: call dope.apply_dope again."""
    if dope is None or not isinstance(head_rope, dope.HeadRope):
        return None
    p = head_rope.plan
    if p.zero or (p.variant == "gaussian" and p.gaussian_form != "replace"):
        return None
    if head_rope.n_head != n_head:
        raise ValueError(f"head_rope is for {head_rope.n_head} query heads, q has {n_head}")
    if p.variant == "parts" and (p.bands is None or p.bands.numel() != d // 2):
        raise ValueError(f"by-parts needs plan.bands of {d // 2} bands (apply_dope fills it), got "
                         f"{None if p.bands is None else tuple(p.bands.shape)}")
    # built once per (plan state, device): a host-to-device copy per layer per forward would cost more than RoPE
    sig = (p.variant, tuple(head_rope.heads), id(p.bands), str(device))
    per = _dope_cache.setdefault(head_rope, {})
    if sig not in per:
        modes = torch.zeros(n_head, dtype=torch.int32)
        modes[list(head_rope.heads)] = MODES[p.variant]
        bands = p.bands.to(torch.int8) if p.variant == "parts" else torch.zeros(d // 2, dtype=torch.int8)
        per.clear()
        per[sig] = modes.to(device), bands.to(device)
    modes, bands = per[sig]
    seed = int(p.seed) & 0xFFFFFFFF  # dope hashes the low 32 bits; pass them as an int32 so the signature is fixed
    seed = seed - 2**32 if seed >= 2**31 else seed
    return dict(modes=modes, bands=bands, seed=seed, sigma=float(p.sigma), layer=int(head_rope.layer))


# -----------------------------------------------------------------------------
# Launch


def _rope(q, k, pos, head_rope, cos=None, sin=None, inv_freq=None, scale=1.0, block_t=None):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):  # the kernel is forward only
        if cos is None:
            cos, sin = cos_sin(inv_freq, pos, scale)
        return rope_qk_eager(q, k, cos, sin, pos, head_rope)
    if head_rope is None:
        return launch(q, k, pos, cos, sin, inv_freq, scale, block_t=block_t)
    spec = dope_args(head_rope, q.shape[1], q.shape[-1], q.device)
    if spec is not None:
        return launch(q, k, pos, cos, sin, inv_freq, scale, spec=spec, expand_k=True, block_t=block_t)
    # table mode: per-head tables (H, T, d) built by head_rope, read by the kernel
    if cos is None:
        cos, sin = cos_sin(inv_freq, pos, scale)
    cos, sin, add = head_rope(cos, sin, pos)  # (H, T, d); add: None or (2, H, T, d)
    q, k = launch(q, k, pos, cos, sin, expand_k=True, block_t=block_t)
    if add is not None:  # DoPE's v1 additive Gaussian ablation
        q, k = q + add[0].to(q.dtype), k + add[1].to(k.dtype)
    return q, k


def launch(q, k, pos, cos=None, sin=None, inv_freq=None, scale=1.0, spec=None, expand_k=False, block_t=None):
    """One kernel launch over q and k. cos/sin: (T, d) shared or (H, T, d) per head; or inv_freq (d/2,) and scale.
    spec: dope_args(...) (mode vector, band mask, seed, ...) or None. expand_k: keys per query head (B, H, T, d)."""
    if triton is None:
        raise RuntimeError("kernels.py needs triton (pip install triton); model.py's eager rope_qk is the same math")
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    assert k.shape == (B, Hkv, T, d), f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    assert H % Hkv == 0, f"{H} query heads cannot share {Hkv} KV heads"
    assert d % 2 == 0, f"head width {d} must be even"
    assert pos.shape == (T,), f"pos {tuple(pos.shape)} must have one position per row, T = {T}"
    assert q.device == k.device, "q and k on different devices"
    if not q.is_cuda and not interpreted():
        raise RuntimeError("the Triton kernel runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1 set before "
                           "kernels.py is imported")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo = torch.empty_like(q)  # same strides as q: model.py's (B, T, H, d) memory seen as (B, H, T, d)
    ko = torch.empty_like(q, dtype=k.dtype) if expand_k else torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    pos = pos.to(device=q.device, dtype=torch.int64).contiguous()
    from_freqs = cos is None
    if from_freqs:
        assert inv_freq is not None and inv_freq.shape == (d // 2,), "give cos/sin tables or inv_freq (d/2,)"
        freq, cos, sin = inv_freq.to(device=q.device, dtype=torch.float32).contiguous(), q, q  # q: unused pointers
        sc_h = sc_t = 0
        per_head = False
    else:
        assert cos.shape == sin.shape and cos.shape[-2:] == (T, d), f"cos/sin {tuple(cos.shape)} for T={T}, d={d}"
        per_head = cos.dim() == 3
        assert not per_head or (cos.shape[0] == H and expand_k), "per-head tables (H, T, d) go with expand_k"
        cos, sin, freq = cos.to(q.device).contiguous(), sin.to(q.device).contiguous(), q
        sc_h, sc_t = (cos.stride(0) if per_head else 0), cos.stride(-2)
    modes, bands = (spec["modes"], spec["bands"]) if spec else (q, q)
    BLOCK_F = triton.next_power_of_2(d // 2)
    # ~1K elements per tile on a GPU (registers); larger on CPU, where the interpreter pays per program
    BLOCK_T = block_t or max(1, min(triton.next_power_of_2(T), (1024 if q.is_cuda else 8192) // BLOCK_F))
    n_tblk = triton.cdiv(T, BLOCK_T)
    _rope_kernel[(B * n_tblk * Hkv,)](
        q, k, qo, ko, cos, sin, freq, pos, modes, bands,
        T, Hkv, n_tblk, float(scale), spec["sigma"] if spec else 1.0, spec["seed"] if spec else 0,
        spec["layer"] if spec else 0,
        *_bht(q), *_bht(k), *_bht(qo), *_bht(ko), sc_h, sc_t,
        G=H // Hkv, D=d, BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, FROM_FREQS=from_freqs, PER_HEAD=per_head,
        DOPE=spec is not None, EXPAND_K=expand_k,
        enable_fp_fusion=False,  # x*c + y*s rounded as eager rounds it (an FMA would differ by an ulp in fp32)
    )
    return qo, ko


def _bht(x):
    return x.stride(0), x.stride(1), x.stride(2)


if __name__ == "__main__":  # a self-check: python kernels.py (CPU: TRITON_INTERPRET=1 python kernels.py)
    print(f"triton {'missing' if triton is None else triton.__version__}, available: {available()}, "
          f"interpreted: {interpreted()}, env TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    if available():
        dev = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
        q, k = torch.randn(1, 4, 9, 16, device=dev), torch.randn(1, 2, 9, 16, device=dev)
        inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, device=dev).float() / 16)
        pos = torch.arange(5, 14, device=dev)
        c, s = cos_sin(inv, pos)
        ref, got = rope_qk_eager(q, k, c, s, pos), rope_qk(q, k, c, s, pos)
        print("max |fused - eager|:", max((a - b).abs().max().item() for a, b in zip(ref, got)))
