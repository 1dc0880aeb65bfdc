"""
An optional fused RoPE: one Triton program rotates queries and keys together (the Liger-Kernel way), with the three
DoPE denoisings (Xiong et al., arXiv 2511.09146) inside it, so a DoPE forward costs about what a plain one costs.
model.py chooses it (model.use_kernel); this file imports nothing from model.py and has no eager fallback of its own.

It computes model.py's eager rope_qk: RoPE (v1 Eq. 8-11, v2 Eq. 1-4) in the half-split layout,
    out[f]       = x[f] cos[f]             - x[f + d/2] sin[f]
    out[f + d/2] = x[f + d/2] cos[f + d/2] + x[f] sin[f + d/2]       (= x * cos + rotate_half(x) * sin)
and, on the heads a DoPE plan selects (m_h = 0 in v1 Eq. 32-37 / v2 Eq. 13-17), a per-head mode (MODES): 1 by-parts,
the identity rotation on the low-frequency bands; 2 by-all, no rotation; 3 by-Gaussian, cos and sin replaced by
N(0, sigma^2) draws computed in the kernel with dope.gaussian's counter-based hash and Box-Muller. The ablations
(plan.zero, gaussian_form "v1"/"v2") and any head_rope that is not a dope.HeadRope run in table mode: head_rope
builds per-head tables (H, T, d) and the kernel reads them. Forward only; computes in float32 and rounds once on the
store (fp32 with tables: eager's result bit for bit). Without triton this file still imports and available() is
False. Why fuse, tables vs frequencies, registers and precision: docs/PERFORMANCE.md, "The fused RoPE kernel".
"""

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
