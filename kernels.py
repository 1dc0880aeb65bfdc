"""
An optional fused RoPE: one Triton program rotates queries and keys together (the Liger-Kernel way), with the three
DoPE denoisings (Xiong et al., "DoPE: Denoising Rotary Position Embedding", arXiv 2511.09146) inside the kernel, so a
DoPE forward costs about what a plain one costs. model.py chooses it (model.use_kernel); this file imports nothing
from model.py and has no eager fallback of its own.

What it computes is model.py's eager rope_qk: RoPE (v1 Eq. 8-11, v2 Eq. 1-4) in the half-split layout,
    out[f]       = x[f] cos[f]             - x[f + d/2] sin[f]
    out[f + d/2] = x[f + d/2] cos[f + d/2] + x[f] sin[f + d/2]       (= x * cos + rotate_half(x) * sin)
and, on the heads a DoPE plan selects (m_h = 0 in v1 Eq. 32-37 / v2 Eq. 13-17), a per-head mode:
    0 plain RoPE; 1 by-parts: identity rotation (cos 1, sin 0) on the low-frequency band mask (v1 Eq. 32-34,
    v2 Eq. 13-15); 2 by-all: no rotation (v1 Eq. 35, v2 Eq. 16); 3 by-Gaussian: cos and sin replaced by N(0, sigma^2)
    draws (v1 Eq. 36-37, v2 Eq. 17), the same counter-based hash + Box-Muller as dope.gaussian, computed in the
    kernel from (seed, layer, head, position, dim) instead of read from a table.
A launch is compiled for one of: no plan, a plan of identity modes (by-parts, by-all), a by-Gaussian plan; only the
last carries the draws' code. The ablations (plan.zero, gaussian_form "v1"/"v2") and any head_rope that is not a
dope.HeadRope run in table mode: head_rope(cos, sin, pos) builds per-head tables (H, T, d) and the kernel reads them.

Why fuse (memory traffic): RoPE does 3 flops per element, under 1 flop per byte moved in bf16, so it is bound by
memory bandwidth, not arithmetic. Eager `x * cos + rotate_half(x) * sin` is 5 elementwise kernels (x*cos, the negated
half, the cat, *sin, +; plus casting the tables), which together read ~5.5 and write ~4.5 tensors the size of x. With
DoPE, eager also builds and reads per-head cos/sin tables (H, T, d) in float32, each twice the size of a bf16 q, and
copies the keys per query head. The fused kernel reads q and k once and writes them once (the keys once per query
head under DoPE, as the eager path returns them), plus the (T, d) tables that all heads share: ~5x less traffic for
plain RoPE, more for DoPE. bench_rope.py models these bytes per launch (launch_bytes), prints the time they imply at
an H100's and an A100's published bandwidth, and on a GPU measures the kernel against the device's peak bandwidth,
the physical limit for this kernel.

Tables or on the fly (rope_qk vs rope_qk_from_freqs; every scaling in model.py is an inv_freq and a scale, so both
cover them): both are bound by the q/k traffic. Reading the float32 tables adds T * d * 8 bytes per launch (both
halves, so that any (T, d) table gives eager's result; Liger reads one), ~5% of the q/k bytes at 32 query / 8 KV
heads, d = 128, bf16; the 8 KV groups' programs for a block of positions run side by side, so the re-reads hit L2.
Computing cos(m theta_f), sin(m theta_f) costs one sin and one cos per (position, band) per KV group: _sin_cos
reduces the float32 angle in float64 and evaluates Cephes' polynomials (~1.5 ulp at any angle a float32 position
makes). Not the SFU's sin.approx, which would be wrong at the angles m * theta_f of 10^4-10^5 rad that long contexts
reach, and not tl.sin/tl.cos: libdevice's routines reserve stack for their large-angle path under some triton
versions (3.6.0: 32-40 B per thread). The arithmetic overlaps with the loads. Measured on an H200 (bench_rope.py, bf16,
32 query / 8 KV heads, d = 128): from 16K tokens on, tables and frequencies are within 5% of each other, both at
74-86% of the peak bandwidth. model.py passes tables, so rope_qk is the path it uses.

Registers and spills: a program holds a (BLOCK_T, BLOCK_F) tile of each tensor it works on, so the tile sets the
registers a thread needs. On a GPU the launch picks one tile per kind of launch (TILE, whatever T is), chosen so that
no launch spills to local memory or needs more than 128 registers per thread. `python kernels.py --resources`
compiles every launch the code can pick (9 kinds x fp32/fp16/bf16 x d = 64, 128; the group size is a runtime
argument) ahead of time for sm_80 and sm_90 with triton's ptxas, no GPU needed, and reads registers and stack from
the cubins with cuobjdump: 46-96 registers, 0 bytes of stack; tests/test_kernels.py asserts both bounds. Those are
compiler facts; how fast each tile runs is not measured here (no GPU).

Precision: the kernel loads q, k (fp32/fp16/bf16) and the float32 tables, computes in float32 and rounds once on the
store. The eager path casts cos/sin to x.dtype first and rounds after each of its ops, so in fp16/bf16 the two differ
by a few units in the last place of the dtype (tests: atol 1e-2 fp16, 1e-1 bf16, Liger's; the kernel is the more
accurate one, within half an ulp of the exact result). In fp32 with tables the kernel does eager's operations in
eager's order with FMA contraction off, so plain RoPE, by-parts and by-all in the kernel, and table mode equal eager
bit for bit: tested under the interpreter (numpy float32), with the interpreter's tile and with the GPU's; on a GPU
it should hold as well (IEEE float32 multiplies and adds, no FMA) but has not been run. From frequencies, sin/cos
implementations may differ in the last bit (tested within 1e-5). The Gaussian draws are computed in float32
(dope.gaussian uses float64, then rounds): within 3 float32 ulps (tested).

Forward only (inference): rope_qk refuses inputs that need gradients; model.use_kernel says no to them and model.py
runs its eager rope_qk, the same math. Without triton this file still imports and available() is False.
"""

import os
import sys
import weakref

import torch

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
        correct ln(fl(1 - e)) for the rounding of 1 - e, which (1 - fl(1 - e)) - e gives exactly (Sterbenz).
        One logarithm per draw: its argument is chosen first."""
        low = h < 0x80000000
        u = (h.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # 2^-32
        e = ((h ^ 0xFFFFFFFF).to(tl.float32) + 0.5) * 2.3283064365386963e-10
        v = 1.0 - e
        dv = (1.0 - v) - e  # v + dv = 1 - e
        lg = tl.log(tl.where(low, u, v))
        return tl.where(low, -lg, -(lg + dv / v))

    @triton.jit
    def _sin_cos_small(a):
        """(sin a, cos a) for |a| <= pi/4 in float32: Cephes' sinf/cosf polynomials, within 1 ulp of the exact values
        (tests/test_kernels.py checks 2^18 of the 2^29 arguments _cos_2pi passes, ends included; all of them were
        checked once in numpy without FMA, as the kernel compiles them: at most 0.81 ulp for sin, 0.99 for cos).
        tl.sin/tl.cos would carry libdevice's reduction for large angles, registers these small angles never need."""
        z = a * a
        s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * a + a
        c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
        return s, c

    @triton.jit
    def _sin_cos(x):
        """(sin x, cos x) for float32 angles x, |x| < 2^24 (m theta_f for any position float32 holds exactly): x is
        reduced in float64 to k pi/2 + a, |a| <= pi/4 (Cody-Waite: pi/2 in three parts, the first two of 27 and 25
        bits, so k times each is exact for |k| < 2^26), then Cephes' polynomials on a and the quadrant k mod 4 pick
        +-sin a, +-cos a. Within ~1.5 ulp of sin, cos of the float32 angle, like libdevice's __nv_sinf/__nv_cosf
        (tested against float64 up to 2^24 rad). Those keep, for |x| > 105615, a Payne-Hanek reduction whose work
        array is local memory: triton 3.6's build of them costs 32-40 bytes of stack per thread (seen compiled for
        sm_80/sm_90 and on an H200), traffic in a kernel whose whole cost is traffic; this reduction needs none."""
        xd = x.to(tl.float64)
        k = tl.floor(xd * 0.6366197723675814 + 0.5)  # nearest multiple of pi/2 (x * 2/pi rounded)
        a = ((xd - k * 1.570796325802803) - k * 9.920935739593517e-10) - k * 5.721188726109832e-18
        s, c = _sin_cos_small(a.to(tl.float32))
        n = k.to(tl.int32) & 3  # two's complement: k = -1 is quadrant 3
        sin = tl.where(n == 0, s, tl.where(n == 1, c, tl.where(n == 2, -s, -c)))
        cos = tl.where(n == 0, c, tl.where(n == 1, -s, tl.where(n == 2, -c, s)))
        return sin, cos

    @triton.jit
    def _cos_2pi(h):
        """cos(2 pi u) for u = (h + 0.5) / 2^32, accurate relative to the result (also near its zeros): the angle is
        reduced in integers to n pi/2 + a with |a| <= pi/4, then cos(n pi/2 + a) is one of +-cos a, +-sin a."""
        octant = h >> 29
        odd = (octant & 1) == 1
        w = h & 0x1FFFFFFF
        w = tl.where(odd, 0x1FFFFFFF - w, w)  # distance to the nearest multiple of pi/2, in units of pi/4 / 2^29
        a = (w.to(tl.float32) + 0.5) * 1.4629180792671596e-09  # pi/4 / 2^29: |a| in (0, pi/4)
        s, c = _sin_cos_small(a)
        s = tl.where(odd, -s, s)  # a is negative past an odd octant's multiple of pi/2
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

    @triton.jit
    def _rot_store(out_ptr, off, x1, x2, c1, c2, s1, s2, mask, HALF: tl.constexpr):
        o1, o2 = _rot(x1, x2, c1, c2, s1, s2)
        tl.store(out_ptr + off, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + off + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["T", "n_kv", "n_tblk", "G", "seed", "layer"])
    def _rope_kernel(
        q_ptr, k_ptr, qo_ptr, ko_ptr,  # q (B, H, T, d), k (B, Hkv, T, d); outputs q (B, H, T, d), k (B, Hkv or H, T, d)
        cos_ptr, sin_ptr, freq_ptr, pos_ptr,  # tables (T, d) or (H, T, d) | inverse frequencies (d/2,); positions (T,)
        mode_ptr, band_ptr,  # DoPE: mode per query head (H,) int32, band mask (d/2,) int8
        T: tl.int32, n_kv: tl.int32, n_tblk: tl.int32, G: tl.int32,  # G: query heads per KV head (GQA group size)
        scale, sigma, seed: tl.int32, layer: tl.int32,
        sq_b: tl.int64, sq_h: tl.int64, sq_t: tl.int32, sk_b: tl.int64, sk_h: tl.int64, sk_t: tl.int32,
        sqo_b: tl.int64, sqo_h: tl.int64, sqo_t: tl.int32, sko_b: tl.int64, sko_h: tl.int64, sko_t: tl.int32,
        sc_h: tl.int64, sc_t: tl.int32,
        D: tl.constexpr,  # head width d
        BLOCK_T: tl.constexpr,  # positions per program
        BLOCK_F: tl.constexpr,  # d/2 rounded up to a power of two
        FROM_FREQS: tl.constexpr,  # cos/sin computed from inv_freq instead of read
        PER_HEAD: tl.constexpr,  # tables (H, T, d): table mode for head_rope options the modes do not cover
        DOPE: tl.constexpr,  # 0 none; 1 the mode vector's identity modes (by-parts, by-all); 2 its by-Gaussian heads
        EXPAND_K: tl.constexpr,  # write the key once per query head (any head_rope), as model.rope_qk returns it
    ):
        # One program: batch b, BLOCK_T positions from t0, KV group g. KV groups vary fastest so programs that share a
        # block of positions run together and the tables they all read stay in L2. Scalar offsets (batch, head, first
        # row) go into the base pointers in int64; the tile's own offsets stay int32 (the launch checks they fit).
        pid = tl.program_id(0).to(tl.int64)
        g = pid % n_kv
        t0 = (pid // n_kv) % n_tblk * BLOCK_T
        b = pid // (n_kv * n_tblk)
        HALF: tl.constexpr = D // 2
        r = tl.arange(0, BLOCK_T)  # (BLOCK_T,) row in this tile
        f = tl.arange(0, BLOCK_F)  # (BLOCK_F,) band: dims f and f + d/2
        rows = r < (T - t0).to(tl.int32)
        mask = rows[:, None] & (f < HALF)[None, :]  # (BLOCK_T, BLOCK_F)
        m = tl.load(pos_ptr + t0 + r, mask=rows, other=0)  # (BLOCK_T,) absolute positions (cached decode: m != t)
        tab = r[:, None] * sc_t + f[None, :]
        x_off = r[:, None] * sq_t + f[None, :]
        k_off = r[:, None] * sk_t + f[None, :]
        qo_off = r[:, None] * sqo_t + f[None, :]
        ko_off = r[:, None] * sko_t + f[None, :]
        cos_ptr += t0 * sc_t
        sin_ptr += t0 * sc_t

        # RoPE tables for these rows, shared by the group's heads (v1 Eq. 8-11: angle m * theta_f): read or computed
        # once per program. Per-head tables are read inside the head loop instead.
        if not PER_HEAD:
            if FROM_FREQS:
                ang = m.to(tl.float32)[:, None] * tl.load(freq_ptr + f, mask=f < HALF, other=0.0)[None, :]
                s1, c1 = _sin_cos(ang)
                c1 = c1 * scale
                s1 = s1 * scale
                c2, s2 = c1, s1  # half-split: band f is dims f and f + d/2
            else:
                c1 = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(tl.float32)
                c2 = tl.load(cos_ptr + tab + HALF, mask=mask, other=0.0).to(tl.float32)
                s1 = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(tl.float32)
                s2 = tl.load(sin_ptr + tab + HALF, mask=mask, other=0.0).to(tl.float32)
        if DOPE == 1:
            band = tl.load(band_ptr + f, mask=f < HALF, other=0) != 0  # (BLOCK_F,) low-frequency bands
        if DOPE == 2:
            seed_key = _hash32(_hash32(seed.to(tl.uint32)) ^ layer.to(tl.uint32))

        # The group's key, read once; without per-query-head keys it is rotated once, with the shared tables.
        k_ptr += b * sk_b + g * sk_h + t0 * sk_t
        k1 = tl.load(k_ptr + k_off, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_ptr + k_off + HALF, mask=mask, other=0.0).to(tl.float32)
        if not EXPAND_K:
            _rot_store(ko_ptr + b * sko_b + g * sko_h + t0 * sko_t, ko_off, k1, k2, c1, c2, s1, s2, mask, HALF)

        for i in range(G):  # a loop, not unrolled: G is a runtime argument (one compiled kernel for every group size)
            h = g * G + i  # query head
            q_h = q_ptr + b * sq_b + h * sq_h + t0 * sq_t
            q1 = tl.load(q_h + x_off, mask=mask, other=0.0).to(tl.float32)
            q2 = tl.load(q_h + x_off + HALF, mask=mask, other=0.0).to(tl.float32)
            qo_h = qo_ptr + b * sqo_b + h * sqo_h + t0 * sqo_t
            ko_h = ko_ptr + b * sko_b + h * sko_h + t0 * sko_t  # EXPAND_K: this query head's copy of the key
            if PER_HEAD:
                hc1 = tl.load(cos_ptr + h * sc_h + tab, mask=mask, other=0.0).to(tl.float32)
                hc2 = tl.load(cos_ptr + h * sc_h + tab + HALF, mask=mask, other=0.0).to(tl.float32)
                hs1 = tl.load(sin_ptr + h * sc_h + tab, mask=mask, other=0.0).to(tl.float32)
                hs2 = tl.load(sin_ptr + h * sc_h + tab + HALF, mask=mask, other=0.0).to(tl.float32)
                _rot_store(qo_h, qo_off, q1, q2, hc1, hc2, hs1, hs2, mask, HALF)
                _rot_store(ko_h, ko_off, k1, k2, hc1, hc2, hs1, hs2, mask, HALF)
            elif DOPE == 2:
                if tl.load(mode_ptr + h) == 3:  # by-Gaussian (v1 Eq. 36-37): only these heads pay for the draws
                    head_key = _hash32(seed_key ^ h.to(tl.uint32))
                    key_c, key_s = _hash32(head_key ^ 0), _hash32(head_key ^ 1)  # stream 0: cos, 1: sin
                    # one half at a time, two draws live instead of four: out[f] needs cos[f], sin[f] ...
                    gc = sigma * _gaussian(key_c, m, f, D)
                    gs = sigma * _gaussian(key_s, m, f, D)
                    tl.store(qo_h + qo_off, (q1 * gc + (-q2) * gs).to(qo_ptr.dtype.element_ty), mask=mask)
                    tl.store(ko_h + ko_off, (k1 * gc + (-k2) * gs).to(ko_ptr.dtype.element_ty), mask=mask)
                    # ... and out[f + d/2] needs cos[f + d/2], sin[f + d/2]
                    gc = sigma * _gaussian(key_c, m, f + HALF, D)
                    gs = sigma * _gaussian(key_s, m, f + HALF, D)
                    tl.store(qo_h + qo_off + HALF, (q2 * gc + q1 * gs).to(qo_ptr.dtype.element_ty), mask=mask)
                    tl.store(ko_h + ko_off + HALF, (k2 * gc + k1 * gs).to(ko_ptr.dtype.element_ty), mask=mask)
                else:
                    _rot_store(qo_h, qo_off, q1, q2, c1, c2, s1, s2, mask, HALF)
                    _rot_store(ko_h, ko_off, k1, k2, c1, c2, s1, s2, mask, HALF)
            else:
                hc1, hc2, hs1, hs2 = c1, c2, s1, s2
                if DOPE == 1:
                    # by-parts (v1 Eq. 32-34) on the band mask, by-all (v1 Eq. 35) on every band: identity rotation
                    mode = tl.load(mode_ptr + h)
                    ident = (((mode == 1) & band) | (mode == 2))[None, :]  # (1, BLOCK_F)
                    hc1 = tl.where(ident, 1.0, hc1)
                    hc2 = tl.where(ident, 1.0, hc2)
                    hs1 = tl.where(ident, 0.0, hs1)
                    hs2 = tl.where(ident, 0.0, hs2)
                _rot_store(qo_h, qo_off, q1, q2, hc1, hc2, hs1, hs2, mask, HALF)
                if EXPAND_K:  # the shared key, rotated with this query head's tables
                    _rot_store(ko_h, ko_off, k1, k2, hc1, hc2, hs1, hs2, mask, HALF)


def interpreted() -> bool:
    """True when the kernel was defined under TRITON_INTERPRET=1 (it then runs on CPU tensors, in numpy)."""
    return triton is not None and type(_rope_kernel).__name__ == "InterpretedFunction"


def available() -> bool:
    """True when the kernel can run here: triton imports, and a CUDA device exists or TRITON_INTERPRET=1 was set
    before this module was imported (triton reads it when @triton.jit runs, i.e. at import of this file)."""
    return triton is not None and (interpreted() or torch.cuda.is_available())


# -----------------------------------------------------------------------------
# Public API: the contract of model.py's eager rope_qk (which this file does not import: model.py chooses)


def rope_qk(q, k, cos, sin, pos, head_rope=None, *, block_t=None):
    """The eager rope_qk, fused: q (B, H, T, d), k (B, Hkv, T, d), cos/sin (T, d) float32 (attention scale
    included), pos (T,) absolute positions. Returns (q, k) rotated, in their dtypes; with a head_rope the keys come
    back per query head (B, H, T, d). A dope.HeadRope with by-parts, by-all or by-Gaussian "replace" runs inside the
    kernel; other head_ropes run in table mode (per-head tables from head_rope(cos, sin, pos)). Forward only: inputs
    that need gradients are refused (the caller runs its eager path). block_t overrides the tile's rows (tests)."""
    return _rope(q, k, pos, head_rope, cos=cos, sin=sin, block_t=block_t)


def rope_qk_from_freqs(q, k, inv_freq, pos, scale=1.0, head_rope=None, *, block_t=None):
    """rope_qk with cos/sin computed in the kernel from inverse frequencies inv_freq (d/2,) and the attention scale:
    the same result as rope_qk(q, k, *cos_sin_tables(inv_freq, pos, scale), pos, head_rope) without the tables."""
    return _rope(q, k, pos, head_rope, inv_freq=inv_freq, scale=scale, block_t=block_t)


def cos_sin_tables(inv_freq, pos, scale=1.0):
    """cos/sin tables (T, d) float32 for positions pos (T,), half-split: what table mode needs when only inv_freq is
    given. The same operations as model.rope_cos_sin (tests check the two are equal bit for bit)."""
    freqs = pos[:, None].float() * inv_freq[None, :].float()  # (T, d/2): angle m * theta_f
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, d)
    return emb.cos() * scale, emb.sin() * scale


# -----------------------------------------------------------------------------
# DoPE plan -> kernel arguments


_dope_cache = weakref.WeakKeyDictionary()  # HeadRope -> {(variant, heads, bands, device): (modes, bands)}


def dope_args(head_rope, n_head: int, d: int, device):
    """The kernel's view of a dope.HeadRope: dict(modes (H,) int32, bands (d/2,) int8, gaussian, seed, sigma, layer),
    or None when this head_rope needs table mode (plan.zero, gaussian_form "v1"/"v2", or not a dope.HeadRope). The
    mode vector and band mask are cached per HeadRope; an in-place edit of plan.bands is not seen: call
    dope.apply_dope again."""
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
    return dict(modes=modes, bands=bands, gaussian=p.variant == "gaussian", seed=seed, sigma=float(p.sigma),
                layer=int(head_rope.layer))


# -----------------------------------------------------------------------------
# Launch


def _rope(q, k, pos, head_rope, cos=None, sin=None, inv_freq=None, scale=1.0, block_t=None):
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError("the Triton RoPE is forward only and these inputs need gradients: run the eager rope_qk "
                           "(model.use_kernel() says no to them)")
    if head_rope is None:
        return launch(q, k, pos, cos, sin, inv_freq, scale, block_t=block_t)
    spec = dope_args(head_rope, q.shape[1], q.shape[-1], q.device)
    if spec is not None:
        return launch(q, k, pos, cos, sin, inv_freq, scale, spec=spec, expand_k=True, block_t=block_t)
    # table mode: per-head tables (H, T, d) built by head_rope, read by the kernel
    if cos is None:
        cos, sin = cos_sin_tables(inv_freq, pos, scale)
    cos, sin, add = head_rope(cos, sin, pos)  # (H, T, d); add: None or (2, H, T, d)
    q, k = launch(q, k, pos, cos, sin, expand_k=True, block_t=block_t)
    if add is not None:  # DoPE's v1 additive Gaussian ablation
        q, k = q + add[0].to(q.dtype), k + add[1].to(k.dtype)
    return q, k


# Elements of the (BLOCK_T, BLOCK_F) tile one program holds per tensor on a GPU, by kind of launch, with 4 warps
# (128 threads): plain RoPE 8 per thread, the DoPE modes and per-head tables 4, by-Gaussian 2 (four draws per element,
# each a chain of hashes, a log, a sqrt and a polynomial). Chosen so that every launch compiles without spilling and
# under 128 registers per thread for sm_80 and sm_90, with room to spare (`python kernels.py --resources` prints the
# table; tests/test_kernels.py asserts it). At twice these tiles (d = 128) plain RoPE from frequencies spills 32 B on
# sm_80, expanded keys need up to 168 registers, and by-parts/by-all and by-Gaussian from tables reach 107-128.
# One tile per kind whatever T is: short prompts mask rows, and there is one compiled variant to check.
TILE = {"plain": 1024, "dope": 512, "per_head": 512, "gaussian": 256}
NUM_WARPS = 4


def tile_rows(d: int, kind: str, cuda: bool = True, T: int = 1) -> int:
    """BLOCK_T, the rows of a program's tile, for head width d and a kind of TILE. On CPU (the interpreter, which pays
    per program, and compiles nothing) one big tile of up to 8192 elements, fewer rows for short T."""
    block_f = triton.next_power_of_2(d // 2)
    if cuda:
        return max(1, TILE[kind] // block_f)
    return max(1, min(triton.next_power_of_2(T), 8192 // block_f))


def launch(q, k, pos, cos=None, sin=None, inv_freq=None, scale=1.0, spec=None, expand_k=False, block_t=None):
    """One kernel launch over q and k. cos/sin: (T, d) shared or (H, T, d) per head; or inv_freq (d/2,) and scale.
    spec: dope_args(...) (mode vector, band mask, seed, ...) or None. expand_k: keys per query head (B, H, T, d)."""
    if triton is None:
        raise RuntimeError("kernels.py needs triton (pip install triton); model.py's eager rope_qk is the same math")
    if not q.is_cuda and not interpreted():
        raise RuntimeError("the Triton kernel runs on CUDA tensors, or on CPU with TRITON_INTERPRET=1 set before "
                           "kernels.py is imported")
    qo, ko, grid, args, meta = _prepare(q, k, pos, cos, sin, inv_freq, scale, spec, expand_k, block_t, q.is_cuda)
    if grid[0]:
        _rope_kernel[grid](*args, **meta)
    return qo, ko


def _prepare(q, k, pos, cos, sin, inv_freq, scale, spec, expand_k, block_t, cuda):
    """Check the inputs, allocate the outputs, choose the tile: (qo, ko, grid, args, meta) of the launch."""
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    assert k.shape == (B, Hkv, T, d), f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    assert H % Hkv == 0, f"{H} query heads cannot share {Hkv} KV heads"
    assert d % 2 == 0, f"head width {d} must be even"
    assert pos.shape == (T,), f"pos {tuple(pos.shape)} must have one position per row, T = {T}"
    assert q.device == k.device, "q and k on different devices"
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qo = torch.empty_like(q)  # same strides as q: model.py's (B, T, H, d) memory seen as (B, H, T, d)
    ko = torch.empty_like(q, dtype=k.dtype) if expand_k else torch.empty_like(k)
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
        cos = cos.to(device=q.device, dtype=torch.float32).contiguous()
        sin, freq = sin.to(device=q.device, dtype=torch.float32).contiguous(), q
        sc_h, sc_t = (cos.stride(0) if per_head else 0), cos.stride(-2)
    modes, bands = (spec["modes"], spec["bands"]) if spec else (q, q)
    dope_kind = 0 if spec is None else 2 if spec["gaussian"] else 1
    kind = "per_head" if per_head else ("plain", "dope", "gaussian")[dope_kind]
    BLOCK_T = block_t or tile_rows(d, kind, cuda, T)
    BLOCK_F = triton.next_power_of_2(d // 2)
    n_tblk = triton.cdiv(T, BLOCK_T)
    strides = (*_bht(q), *_bht(k), *_bht(qo), *_bht(ko), sc_h, sc_t)
    # the tile's offsets are int32 in the kernel (row stride x BLOCK_T + d); batch and head offsets are int64
    assert max(strides[2::3] + (sc_t,)) * BLOCK_T + d < 2**31, "a row stride too large for the kernel's int32 offsets"
    args = (q, k, qo, ko, cos, sin, freq, pos, modes, bands,
            T, Hkv, n_tblk, H // Hkv, float(scale), spec["sigma"] if spec else 1.0, spec["seed"] if spec else 0,
            spec["layer"] if spec else 0, *strides)
    meta = dict(D=d, BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, FROM_FREQS=from_freqs, PER_HEAD=per_head, DOPE=dope_kind,
                EXPAND_K=expand_k, num_warps=NUM_WARPS,
                enable_fp_fusion=False)  # x*c + y*s rounded as eager rounds it (an FMA would differ by an ulp in fp32)
    return qo, ko, (B * n_tblk * Hkv if q.numel() else 0,), args, meta


def _bht(x):
    return x.stride(0), x.stride(1), x.stride(2)


# -----------------------------------------------------------------------------
# Ahead of time: registers and spills of every launch, compiled for NVIDIA GPUs on a machine without one

# What the launch can pick: a kind of launch x dtype x head width; the group size is a runtime argument of the kernel
# (one compiled kernel for all). Group sizes checked by default: 9 / 3 heads (SmolLM2-135M), 14 / 2 (Qwen2.5-0.5B),
# 32 / 8 (LLaMA-3-8B).
LAUNCHES = {  # name: (tables or freqs, DoPE spec: None, "parts", "gaussian" | "per_head" tables, keys per query head)
    "plain, tables": ("tables", None, False),
    "plain, freqs": ("freqs", None, False),
    "plain, expanded keys, tables": ("tables", None, True),
    "plain, expanded keys, freqs": ("freqs", None, True),
    "DoPE parts/all, tables": ("tables", "parts", True),
    "DoPE parts/all, freqs": ("freqs", "parts", True),
    "DoPE gaussian, tables": ("tables", "gaussian", True),
    "DoPE gaussian, freqs": ("freqs", "gaussian", True),
    "per-head tables": ("tables", "per_head", True),
}
AOT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
AOT_GROUPS = ((9, 3), (14, 2), (32, 8))


def example_launch(name, dtype, d, n_head, n_kv, T=16, device="cpu"):
    """(args, meta) of the CUDA launch of LAUNCHES[name] for q (1, n_head, T, d) in model.py's layout, built from
    tensors on device (CPU, or meta for shapes too big to allocate) through the launch's own code (_prepare with
    cuda=True): the tile, the arguments and the constexprs that launch() would pass on a GPU."""
    source, dope_kind, expand_k = LAUNCHES[name]
    q = torch.zeros(1, T, n_head, d, dtype=dtype, device=device).transpose(1, 2)
    k = torch.zeros(1, T, n_kv, d, dtype=dtype, device=device).transpose(1, 2)
    pos = torch.arange(T, device=device)
    inv_freq = torch.ones(d // 2, device=device)
    cos = sin = None
    if source == "tables":
        shape = (n_head, T, d) if dope_kind == "per_head" else (T, d)
        cos = sin = torch.zeros(shape, device=device)
    spec = None
    if dope_kind in ("parts", "gaussian"):
        spec = dict(modes=torch.zeros(n_head, dtype=torch.int32, device=device),
                    bands=torch.zeros(d // 2, dtype=torch.int8, device=device), gaussian=dope_kind == "gaussian",
                    seed=0, sigma=1.0, layer=0)
    *_, args, meta = _prepare(q, k, pos, cos, sin, inv_freq, 1.0, spec, expand_k, None, cuda=True)
    return args, meta


_TY = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64", torch.int32: "i32",
       torch.int8: "i8"}


def jit_specialization(args, meta):
    """(signature, constexprs, attrs, options) that Triton's JIT compiles for these launch arguments on CUDA, written
    out for this kernel: a tensor is a typed pointer, 16-byte aligned ones get tt.divisibility 16; an int gets its
    annotated type and, unless do_not_specialize, tt.divisibility 16 when a multiple of 16; a float is fp32."""
    fn = _rope_kernel
    params = [p for p in fn.params if not p.is_constexpr]
    assert len(params) == len(args), (len(params), len(args))
    sig, attrs = {}, {}
    for i, (p, v) in enumerate(zip(params, args)):
        if isinstance(v, torch.Tensor):
            sig[p.name], div = "*" + _TY[v.dtype], v.data_ptr() % 16 == 0 and not p.do_not_specialize_on_alignment
        elif isinstance(v, int):
            assert p.annotation_type in ("i32", "i64"), f"{p.name}: annotate the int's type in the kernel"
            sig[p.name], div = p.annotation_type, not p.do_not_specialize and v % 16 == 0
        else:
            sig[p.name], div = "fp32", False
        if div:
            attrs[(fn.arg_names.index(p.name),)] = [["tt.divisibility", 16]]
    consts = {k: v for k, v in meta.items() if k in fn.arg_names}
    sig.update({k: "constexpr" for k in consts})
    options = {k: v for k, v in meta.items() if k not in fn.arg_names}
    return sig, consts, attrs, options


def compile_cubin(specialization, arch: int) -> bytes:
    """The cubin of the kernel for sm_<arch> (80: A100, 90: H100), compiled with triton's bundled ptxas."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, options = specialization
    src = ASTSource(_rope_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["cubin"]


def nvidia_tools() -> dict:
    """Paths of the ptxas and cuobjdump that ship with triton's NVIDIA backend ($TRITON_PTXAS_PATH and
    $TRITON_CUOBJDUMP_PATH override them). FileNotFoundError, saying what is missing, when there are none."""
    from triton import backends

    if "nvidia" not in backends.backends:
        raise FileNotFoundError("this triton has no NVIDIA backend")
    paths = {}
    for tool in ("ptxas", "cuobjdump"):
        try:
            paths[tool] = getattr(triton.knobs.nvidia, tool).path
        except (AttributeError, RuntimeError):
            raise FileNotFoundError(f"no {tool} in triton's NVIDIA backend (set TRITON_{tool.upper()}_PATH)") from None
    return paths


def resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    """Registers per thread and stack bytes (local memory for spills; 0 when nothing spills) of a cubin's kernel,
    read by `cuobjdump --dump-resource-usage`."""
    import re
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rope.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
    assert found, f"no REG/STACK in cuobjdump's output:\n{out}"
    return dict(registers=int(found[1]), stack=int(found[2]))


def _compile_one(job):
    key, specialization, arch, cuobjdump = job
    return key, arch, resource_usage(compile_cubin(specialization, arch), cuobjdump)


def resources(archs=(80, 90), dtypes=tuple(AOT_DTYPES), ds=(64, 128), groups=AOT_GROUPS, launches=tuple(LAUNCHES),
              workers=None):
    """Registers and stack of every launch in launches x dtypes x ds x groups, compiled for each arch. Launches that
    compile identically (same specialization: the group size is a runtime argument) are compiled once. Returns one
    row per launch: dict(launch, dtype, d, groups, BLOCK_T, num_warps, sm<arch>: {registers, stack})."""
    import json
    from concurrent.futures import ProcessPoolExecutor

    cuobjdump = nvidia_tools()["cuobjdump"]
    rows = {}
    for name in launches:
        for dt in dtypes:
            for d in ds:
                for H, Hkv in groups:
                    spec = jit_specialization(*example_launch(name, AOT_DTYPES[dt], d, H, Hkv))
                    key = json.dumps([spec[0], spec[1], sorted(spec[2]), spec[3]], sort_keys=True)
                    row = rows.setdefault(key, dict(launch=name, dtype=dt, d=d, groups=[], spec=spec,
                                                    BLOCK_T=spec[1]["BLOCK_T"], num_warps=spec[3]["num_warps"]))
                    row["groups"].append(H // Hkv)
    jobs = [(key, row["spec"], arch, cuobjdump) for key, row in rows.items() for arch in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:  # each job is a ptxas run and MLIR passes: CPU bound
            done = list(pool.map(_compile_one, jobs))
    else:
        done = [_compile_one(j) for j in jobs]
    for key, arch, usage in done:
        rows[key][f"sm{arch}"] = usage
    return [{k: v for k, v in row.items() if k != "spec"} for row in rows.values()]


def format_resources(rows, archs=(80, 90)) -> str:
    """A markdown table of resources() rows."""
    cols = " | ".join(f"sm_{a} regs | sm_{a} stack B" for a in archs)
    head = f"| launch | dtype | d | group sizes | BLOCK_T | {cols} |"
    lines = [head, "|" + "---|" * (5 + 2 * len(archs))]
    for r in rows:
        usage = " | ".join(f"{r[f'sm{a}']['registers']} | {r[f'sm{a}']['stack']}" for a in archs)
        lines.append(f"| {r['launch']} | {r['dtype']} | {r['d']} | {', '.join(map(str, r['groups']))} | "
                     f"{r['BLOCK_T']} | {usage} |")
    return "\n".join(lines)


def _main(argv=None):
    import argparse
    import json
    import time

    p = argparse.ArgumentParser(description="kernels.py: a self-check, or the compiled kernel's resources")
    p.add_argument("--resources", action="store_true",
                   help="compile every launch for sm_80 and sm_90 (no GPU needed) and print registers and stack")
    p.add_argument("--json", action="store_true", help="with --resources: print the rows as JSON")
    p.add_argument("--workers", type=int, default=None, help="parallel compiles (default: the CPU count)")
    a = p.parse_args(argv)
    if a.resources:
        if triton is None or interpreted():
            print("--resources needs triton, without TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        try:
            rows = resources(workers=a.workers)
        except FileNotFoundError as e:
            print(e, file=sys.stderr)
            return 3
        if a.json:
            print(json.dumps(rows))
        else:
            print(format_resources(rows))
            bad = [r for r in rows for s in ("sm80", "sm90") if r[s]["stack"] or r[s]["registers"] > 128]
            print(f"\n{len(rows)} distinct compiled launches x 2 targets in {time.perf_counter() - t0:.0f} s; "
                  f"{len(bad)} spill or exceed 128 registers per thread")
        return 0
    print(f"triton {'missing' if triton is None else triton.__version__}, available: {available()}, "
          f"interpreted: {interpreted()}, env TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    if available():
        dev = "cuda" if torch.cuda.is_available() and not interpreted() else "cpu"
        q, k = torch.randn(1, 4, 9, 16, device=dev), torch.randn(1, 2, 9, 16, device=dev)
        inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, device=dev).float() / 16)
        pos = torch.arange(5, 14, device=dev)
        c, s = cos_sin_tables(inv, pos)
        # the eager formula: x * cos + rotate_half(x) * sin
        ref = [x * c + torch.cat((-x[..., 8:], x[..., :8]), -1) * s for x in (q, k)]
        got = rope_qk(q, k, c, s, pos)
        print("max |fused - eager|:", max((a - b).abs().max().item() for a, b in zip(ref, got)))
    return 0


if __name__ == "__main__":  # python kernels.py [--resources] (CPU self-check: TRITON_INTERPRET=1 python kernels.py)
    sys.exit(_main())
