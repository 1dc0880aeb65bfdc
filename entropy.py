"""Truncated matrix entropy: which attention heads does DoPE denoise?

DoPE (Xiong et al., "Denoising Rotary Position Embedding", arXiv 2511.09146) looks at one attention head through the
Gram matrix of its queries (or keys) over a long calibration prompt. A head whose Gram has one dominant eigenvalue
(a rank-one "spike", v1 Sec. 4.2) is a head whose low-frequency RoPE bands add up coherently over the context: an
attention-sink head. The spike shows up as a low truncated matrix entropy, and those heads are the ones denoised.

The pipeline, in the order of this file:

    S = X^T X                     one (layer, head, criterion): X is (N tokens, d), S is (d, d), float64
    p = eig(S) / tr(S)            the normalised spectrum, descending             -> spectrum()
    H^r = -sum_{i<=r} p_i ln p_i  the score of the head                           -> head_scores()
    k heads with lowest H^r       global over all layers x heads                  -> select_heads()

S is never built from a stored X: GramAccumulator adds X^T X chunk by chunk while the model runs a chunked prefill,
so memory is O(layers x heads x d^2) whatever the prompt length. score_model() is the glue for a model that calls an
observer in every layer; plot_scores() draws the layers x heads map.

Only torch is needed at import time (tqdm and matplotlib are imported where used), and nothing here imports model.py:
the file can be pasted into another codebase. Equation numbers: "v1 Eq. N" / "v2 Eq. N" of the paper's two versions.
"""

import math
from numbers import Integral

import torch

# The six places where X is read (docs/METHOD.md, section 2): queries or keys, before rotation, rotated with the
# NTK-scaled base the model actually uses, or rotated with the model's original base.
CRITERIA = (
    "query/pre_ntk", "query/post_ntk", "query/post_rope",
    "key/pre_ntk", "key/post_ntk", "key/post_rope",
)
METRICS = ("trunc", "vanilla", "renorm", "spectral")
PREPROCESS = ("none", "uncomp")
ORDERS = ("asc", "desc", "flat")  # select_heads(): the two readings of which end loses its encoding


# ---------------------------------------------------------------------------------------------------------------------
# 1. Spectrum and scores of a Gram matrix

def spectrum(S):
    """Normalised eigenvalues p = eig(S) / tr(S) of a Gram matrix, sorted descending (v1 Eq. 23-30, v2 Eq. 11).

    S: (..., d, d), symmetric positive semi-definite (a Gram X^T X). Returns (..., d) float64 that sums to 1.
    Raises ValueError, naming the batch indices, when a Gram has zero trace (a head whose X was all zeros) or is not
    finite: a NaN must never flow silently into a ranking of heads.
    """
    S = torch.as_tensor(S).to(torch.float64)
    assert S.ndim >= 2 and S.shape[-1] == S.shape[-2], f"expected (..., d, d), got {tuple(S.shape)}"
    _check_batch(~torch.isfinite(S).all(dim=(-2, -1)), "has non-finite entries")
    trace = S.diagonal(dim1=-2, dim2=-1).sum(-1)  # (...)
    _check_batch(trace <= 0, "has zero trace (an all-zero Gram: a head whose queries/keys were all zero)")
    # S is PSD, so its eigenvalues are its singular values; eigvalsh is exact up to rounding, whose tiny negative
    # eigenvalues (rank-deficient S) would make ln p undefined.
    eig = torch.linalg.eigvalsh(S).flip(-1).clamp_min(0.0)  # (..., d), descending
    # Rounding can put a rank-one head's p1 at 1 + 1e-16; clamping keeps every -p ln p >= 0 exactly.
    return (eig / trace[..., None]).clamp_max(1.0)


def _check_batch(bad, what):
    if bad.any():
        where = [tuple(i) for i in torch.nonzero(bad).tolist()]
        raise ValueError(f"Gram matrix {what} at batch indices {where}")


def _plogp(p):
    # -p ln p with the limit 0 ln 0 = 0 (rank-deficient Grams have exact zeros).
    return -torch.special.xlogy(p, p)


def vanilla_entropy(S):
    """Matrix entropy H = -sum_{i=1..d} p_i ln p_i over the whole spectrum (v1 Eq. 23-30, v2 Def. A.6).

    0 for a rank-one Gram, ln d for an isotropic one. (..., d, d) -> (...).
    """
    return spectrum_scores(spectrum(S), "vanilla")


def _check_rank(r, d):
    if isinstance(r, bool) or not isinstance(r, Integral) or not 1 <= r <= d:
        raise ValueError(f"truncation rank r must be an int in [1, d = {d}], got {r!r}")
    return int(r)


def truncated_entropy(S, r):
    """Truncated matrix entropy H^r = -sum_{i<=r} p_i ln p_i (v1 Eq. 23-30, v2 Eq. 11). The project default.

    p is normalised by the full trace and NOT renormalised inside the top r, as in the authors' own UNComp code.
    Each term is >= 0, so H^r <= H and H^d = H. Small H^r means the top eigenvalues hold either almost all of the
    energy (p_i near 1, a spike) or almost none.

    r = 1 is a score of the spectral norm alone: H^1 = -p1 ln p1 with p1 = ||S||_2 / tr(S). The map x -> -x ln x
    rises on (0, 1/e] and falls on [1/e, 1], so among heads with p1 >= 1/e (the spike regime the paper is about)
    ranking by H^1 ascending is exactly ranking by p1 descending; among heads with p1 < 1/e the order is reversed
    (the flattest head scores lowest). spectral_share() gives p1 directly.
    (..., d, d) -> (...); r must be an int in [1, d].
    """
    return spectrum_scores(spectrum(S), "trunc", r)


def truncated_entropy_renorm(S, r):
    """The v1 Eq. 30 alternative: entropy of the top r eigenvalues renormalised to sum to 1 among themselves.

    exp of it is the "truncated effective rank" (between 1 and r). It ignores how much energy the top r hold, and
    at r = 1 it is the constant 0 for every head (exp = 1), so it cannot rank heads there: use r >= 2.
    (..., d, d) -> (...); r must be an int in [1, d].
    """
    return spectrum_scores(spectrum(S), "renorm", r)  # p1 > 0 since tr(S) > 0


def spectral_share(S):
    """Normalised spectral norm p1 = ||S||_2 / tr(S) = lambda_max / sum(lambda), in [1/d, 1].

    The size of the rank-one spike of v1 Sec. 4.2. Rank heads by it descending. (..., d, d) -> (...).
    """
    return spectrum_scores(spectrum(S), "spectral")


def head_scores(grams, metric="trunc", r=1):
    """One score per Gram: "trunc" (H^r, default), "vanilla" (H), "renorm" (v1 Eq. 30), "spectral" (p1).

    grams: (..., d, d), e.g. (n_layer, n_head, d, d). Returns (...) float64. r is used by "trunc" and "renorm" only.
    Pair the score with its order in select_heads(): "trunc" -> "asc", "vanilla" -> "desc", "spectral" -> "desc".
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    return spectrum_scores(spectrum(grams), metric, r)


def spectrum_scores(p, metric="trunc", r=1):
    """head_scores() from normalised spectra p (..., d), as spectrum() returns them. Every metric is a function of
    p alone, so a calibration can keep the spectra (d numbers per head) instead of the Grams (d^2)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if metric == "trunc":
        return _plogp(p[..., :_check_rank(r, p.shape[-1])]).sum(-1)  # H^r, v1 Eq. 23-30 / v2 Eq. 11
    if metric == "vanilla":
        return _plogp(p).sum(-1)
    if metric == "renorm":
        top = p[..., :_check_rank(r, p.shape[-1])]
        return _plogp(top / top.sum(-1, keepdim=True)).sum(-1)  # v1 Eq. 30
    if metric == "spectral":
        return p[..., 0]
    raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")


def mean_scores(scores):
    """Average per-prompt scores over several calibration prompts (docs/METHOD.md, section 2).

    Scores are averaged, not Grams: each prompt's spectrum is normalised by its own trace, so a longer or louder
    prompt does not outweigh the others, and the entropy of a summed Gram is not the mean of the entropies.
    scores: a non-empty list of equal-shape tensors, e.g. (n_layer, n_head). Returns their mean, float64.
    """
    scores = [torch.as_tensor(s, dtype=torch.float64) for s in scores]
    if not scores:
        raise ValueError("mean_scores needs at least one score tensor")
    shapes = {tuple(s.shape) for s in scores}
    if len(shapes) != 1:
        raise ValueError(f"all score tensors must have the same shape, got {sorted(shapes)}")
    return torch.stack(scores).mean(0)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Streaming Grams

def rope_half_tables(inv_freq, pos, dtype=torch.float32):
    """cos and sin tables (T, d/2) of RoPE (v1 Eq. 8-11, v2 Eq. 1-4) in `dtype`.

    pos: (T,) absolute positions; inv_freq: (d/2,) theta_f. The angles m * theta_f are computed in float32, exactly as
    HF (and model.py) compute them, and cos/sin are then taken in `dtype` (float64 keeps the trace exact). HF stores
    the same tables twice side by side, cat(freqs, freqs), because in the half-split layout band f rotates dims
    (f, f + d/2); one copy suffices here.
    """
    freqs = pos.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # (T, d/2)
    freqs = freqs.to(dtype)
    return freqs.cos(), freqs.sin()


def apply_rope_half(x, cos, sin):
    """Rotate x (..., T, d) by the half tables (T, d/2) in the half-split ("rotate_half", NeoX) layout.

    The same as HF's x * cat(cos, cos) + rotate_half(x) * cat(sin, sin) with rotate_half(x) = cat(-x2, x1), written
    on the two halves x = (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin). It makes one output and no temporaries, which
    matters because this runs in every layer of every chunk. The output has the promoted dtype of x and the tables,
    so float32 activations with float64 tables are rotated in float64 without a separate cast.
    """
    x1, x2 = x.chunk(2, dim=-1)  # (..., T, d/2) each
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)  # (..., T, d)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)  # x2 cos + x1 sin
    return out


GRAM_ROWS = 1024  # tokens per block in gram_sum on a GPU


def gram_sum(x, rows=None):
    """sum over batch and tokens of x^T x: (B, h, T, d) -> (h, d, d) float64.

    On a CPU (rows None): one (d, T) @ (T, d) product per head. On a GPU that product leaves only h output tiles to
    spread over the multiprocessors (SmolLM2: 9 heads of d = 64, an H200 has 132 SMs), and SmolLM2's 64K scoring pass
    took 2x a plain prefill that way; so there the tokens are cut into blocks of GRAM_ROWS, each block's Gram one entry
    of a single batched matmul, and the blocks add in float64 (on a CPU the blocks were slower: `python -m bench.bench_dope
    --gram --device cpu` times both). rows: tokens per block, to choose; rows >= T is the one-product form."""
    B, h, T, d = x.shape
    rows = rows or (GRAM_ROWS if x.is_cuda else T)
    if rows >= T:
        return (x.mT @ x).sum(0).to(torch.float64)  # (h, d, d): the sum over the batch is the sum over its tokens
    n = T // rows
    blocks = x[:, :, :n * rows].reshape(B, h, n, rows, d)
    S = (blocks.mT @ blocks).to(torch.float64).sum(dim=(0, 2))  # (B, h, n, d, d) -> (h, d, d)
    if n * rows < T:
        tail = x[:, :, n * rows:]
        S += (tail.mT @ tail).to(torch.float64).sum(0)
    return S


class GramAccumulator:
    """Streams S = X^T X for every (criterion, layer, head) during a chunked forward, never storing X.

    The model calls acc(layer, q, k, pos) in every layer with the projected, NOT yet rotated q (B, n_head, T, d) and
    k (B, n_kv_head, T, d), and pos (T,) the absolute positions of the chunk. For "post_ntk" / "post_rope" the
    accumulator rotates q and k itself, with inv_freq_used (the scaled frequencies the model runs with, e.g. Dynamic
    NTK) or inv_freq_orig (the checkpoint's base). Grams sum over batch and tokens in float64; memory is
    O(criteria x layers x heads x d^2). Key Grams are kept per KV head and expanded to query heads by grams().

    preprocess="uncomp" is UNComp's variant: L2-normalise each token's row, then centre over tokens. Both stream:
    the row norm is per token (and commutes with rotation, so it is done once before rotating), and the centred
    Gram is sum x x^T - N mu mu^T = S - s s^T / N with s = sum x, so only s and N are kept besides S.
    Centring before normalising would need mu before the first chunk, i.e. two passes: not offered.

    gram_dtype is the dtype of the per-chunk rotation and matmul (the sum over chunks is float64 either way).
    float64 is the reference; float32 halves the cost at a relative error of about 1e-6 per chunk's Gram.
    gram_rows: tokens per block of gram_sum (default: one product per head on a CPU, GRAM_ROWS on a GPU).

    The Grams live where the data is: on `device`, or (device=None) on the device of the first q seen. The rotation
    tables are built there too, so a GPU forward never waits on the host here.
    """

    def __init__(self, n_layer, n_head, n_kv_head, head_dim, inv_freq_used, inv_freq_orig, criteria=CRITERIA,
                 preprocess="none", gram_dtype=torch.float64, device=None, gram_rows=None):
        criteria = tuple(criteria)
        unknown = [c for c in criteria if c not in CRITERIA]
        if unknown or not criteria:
            raise ValueError(f"unknown criteria {unknown}; choose a non-empty subset of {', '.join(CRITERIA)}")
        if preprocess not in PREPROCESS:
            raise ValueError(f"unknown preprocess {preprocess!r}; valid: {', '.join(PREPROCESS)}")
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head = {n_head} is not a multiple of n_kv_head = {n_kv_head}")
        if head_dim % 2 != 0:
            raise ValueError(f"head_dim = {head_dim} must be even for RoPE")
        for name, f in (("inv_freq_used", inv_freq_used), ("inv_freq_orig", inv_freq_orig)):
            if tuple(f.shape) != (head_dim // 2,):
                raise ValueError(f"{name} must have shape ({head_dim // 2},), got {tuple(f.shape)}")
        self.n_layer, self.n_head, self.n_kv_head, self.head_dim = n_layer, n_head, n_kv_head, head_dim
        self.criteria, self.preprocess, self.gram_dtype = criteria, preprocess, gram_dtype
        self.gram_rows = gram_rows  # gram_sum's blocks (None: its default for the device)
        self.inv_freq = {"pre_ntk": None, "post_ntk": inv_freq_used.float(), "post_rope": inv_freq_orig.float()}
        self.S = self.s = self.device = None  # set by _allocate: on `device`, or on the first q's device
        if device is not None:
            self._allocate(torch.device(device))
        self.counts = [0] * n_layer  # tokens seen by each layer: all equal after a complete forward
        self._pos, self._tables = None, {}

    def _allocate(self, device):
        heads = {"query": self.n_head, "key": self.n_kv_head}
        L, d = self.n_layer, self.head_dim
        self.S = {c: torch.zeros(L, heads[c.split("/")[0]], d, d, dtype=torch.float64, device=device)
                  for c in self.criteria}
        self.device = self.S[self.criteria[0]].device  # "cuda" resolved to "cuda:0", as q.device reads
        # Row sums for UNComp's streamed centring.
        self.s = {c: torch.zeros(L, heads[c.split("/")[0]], d, dtype=torch.float64, device=device)
                  for c in self.criteria} if self.preprocess == "uncomp" else None
        # The frequencies (d/2,) move to the device once, not once per chunk.
        self.inv_freq = {k: None if f is None else f.to(device) for k, f in self.inv_freq.items()}

    def _cos_sin(self, pos):
        # Every layer of a chunk sees the same positions tensor (model.py passes one per forward): build each table
        # once per chunk. Keyed on the tensor object, not its values: comparing values would make a GPU wait for
        # the host in every layer; a new tensor with equal values only costs a rebuild.
        if pos is not self._pos:
            self._pos = pos
            self._tables = {}
            for where in ("post_ntk", "post_rope"):
                self._tables[where] = rope_half_tables(self.inv_freq[where], pos, self.gram_dtype)  # (T, d/2)
        return self._tables

    @torch.no_grad()
    def __call__(self, layer, q, k, pos):
        B, H, T, d = q.shape
        assert 0 <= layer < self.n_layer, f"layer {layer} outside [0, {self.n_layer})"
        assert (H, d) == (self.n_head, self.head_dim), f"q is {tuple(q.shape)}, expected (B, {self.n_head}, T, {d})"
        assert tuple(k.shape) == (B, self.n_kv_head, T, d), f"k is {tuple(k.shape)}, q is {tuple(q.shape)}"
        assert tuple(pos.shape) == (T,), f"pos must be (T,) = ({T},), got {tuple(pos.shape)}"
        if self.S is None:
            self._allocate(q.device)
        if not q.device == k.device == pos.device == self.device:
            raise ValueError(f"q on {q.device}, k on {k.device}, pos on {pos.device}: all must be on the Grams' "
                             f"device, {self.device}")
        tables = None
        for kind, x in (("query", q), ("key", k)):
            wanted = [c for c in self.criteria if c.startswith(kind)]
            if not wanted:
                continue
            if self.preprocess == "uncomp":
                # UNComp: unit rows. Rotation preserves norms, so normalising before rotating is the same.
                x = x.to(self.gram_dtype)
                x = x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # (B, h, T, d)
            for c in wanted:
                where = c.split("/")[1]
                if where == "pre_ntk":
                    xr = x.to(self.gram_dtype)  # (B, h, T, d)
                else:
                    tables = tables or self._cos_sin(pos)
                    xr = apply_rope_half(x, *tables[where])  # (B, h, T, d), in gram_dtype
                self.S[c][layer] += gram_sum(xr, self.gram_rows)  # (h, d, d)
                if self.s is not None:
                    self.s[c][layer] += xr.sum(dim=(0, 2)).to(torch.float64)  # (h, d)
        self.counts[layer] += B * T

    @property
    def n_tokens(self):
        """Tokens (batch x positions) accumulated so far, as seen by layer 0."""
        return self.counts[0]

    def grams(self):
        """dict criterion -> (n_layer, n_head, d, d) float64 Grams, on the device they were accumulated on (score
        them there: head_scores). Key Grams are expanded over each GQA group: query head h reads KV head
        h // (n_head // n_kv_head), so the heads of one group share a key score."""
        if len(set(self.counts)) != 1 or self.counts[0] == 0:
            raise RuntimeError(f"tokens seen per layer are {self.counts}: the observer must be called in every "
                               "layer of a complete forward before grams()")
        N = self.counts[0]
        out = {}
        for c in self.criteria:
            S = self.S[c].clone()  # (L, h, d, d)
            if self.s is not None:
                s = self.s[c]  # (L, h, d)
                S -= s[..., :, None] * s[..., None, :] / N  # sum x x^T - N mu mu^T, mu = s / N
            if c.startswith("key"):
                S = S.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (L, n_head, d, d)
            out[c] = S
        return out


# ---------------------------------------------------------------------------------------------------------------------
# 3. Glue: one chunked prefill over a calibration prompt

def one_prompt(model, tokens, device=None) -> torch.Tensor:
    """tokens (T,) or (1, T) as a (1, T) tensor on `device` (default: the device of the model's parameters, if it
    has any); anything else is a ValueError naming the shape."""
    if device is None:
        device = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = getattr(device, "device", None)
    tokens = torch.as_tensor(tokens, device=device)
    if tokens.ndim == 1:
        tokens = tokens[None]  # (1, T)
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must be (T,) or (1, T), got {tuple(tokens.shape)}")
    return tokens


def score_model(model, tokens, *, criteria=CRITERIA, chunk=2048, preprocess="none", progress=True,
                gram_dtype=torch.float64, device=None, gram_rows=None):
    """Run one chunked prefill of `tokens` through `model` and return its Grams: dict criterion -> (L, H, d, d).

    Score them with head_scores(); for several calibration prompts call this once per prompt and combine the
    per-prompt scores with mean_scores(). Calibrate at the target length (the paper picks its 64K heads on 64K
    prompts); a prompt shorter than `chunk` tokens runs as one chunk.

    The model is duck-typed: model.config.{n_layer, n_head, n_kv_head, head_dim}; model.rope_inv_freq() (in use) and
    model.rope_inv_freq(scaled=False) (original base); model.new_cache(batch=1, max_len=T); and
    model(tokens (1, t), cache=cache), which advances the cache; and model.observing(acc), a context manager inside
    which every layer calls acc(layer, q, k, pos) with q and k before rotation.

    The tokens are moved to `device` (default: the device of the model's parameters, if it has any), and the Grams
    stay on the device the model computes on. gram_rows: gram_sum's blocks (default: its choice for the device).
    """
    from tqdm.auto import tqdm

    tokens = one_prompt(model, tokens, device)
    T = tokens.shape[1]
    if isinstance(chunk, bool) or not isinstance(chunk, Integral) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1 (tokens per forward), got chunk={chunk!r}")
    if T == 0:
        raise ValueError("the calibration prompt is empty (0 tokens)")
    chunk = min(chunk, T)  # a short prompt is one chunk
    cfg = model.config
    acc = GramAccumulator(cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                          inv_freq_used=model.rope_inv_freq(seq_len=T), inv_freq_orig=model.rope_inv_freq(scaled=False),
                          criteria=criteria, preprocess=preprocess, gram_dtype=gram_dtype, gram_rows=gram_rows)
    with torch.inference_mode():
        cache = model.new_cache(batch=1, max_len=T)
        with model.observing(acc):
            for start in tqdm(range(0, T, chunk), desc="scoring heads", unit="chunk", disable=not progress):
                model(tokens[:, start:start + chunk], cache=cache)
    assert acc.n_tokens == T, f"the observer saw {acc.n_tokens} tokens of {T}"
    return acc.grams()


# ---------------------------------------------------------------------------------------------------------------------
# 4. Head selection

def select_heads(scores, k, order="asc"):
    """The k heads to denoise, chosen globally over all layers x heads (v1 Eq. 31, v2 Eq. 12).

    scores: (L, H). Which end of the ranking loses its encoding is where the paper's sources disagree
    (docs/METHOD.md, section 6); the orders name the readings:
      "asc"   the k lowest scores. On truncated entropy H^r: the spikiest, low-entropy heads, the paper's figures'
              and the Chinese summary's reading, and its rule of thumb (vanilla entropy pairs with "desc").
      "desc"  the k highest scores.
      "flat"  the k flattest, highest-rank heads: the k lowest spectral shares p1, whatever metric a rule names, so
              `scores` must be p1 (spectrum_scores(p, "spectral"), in (0, 1]). The Korean summary's reading: low-rank
              heads extrapolate well and keep their encoding, high-rank heads lose it. Not "desc" on H^1, whose
              maximum sits at p1 = 1/e; where every head has p1 >= 1/e, "flat" and "asc" on H^1 are the two ends of
              one ranking.
    Ties are broken by (layer, head) ascending, so the choice is deterministic (GQA key scores tie a lot).
    Returns [(layer, head), ...], best first.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    assert scores.ndim == 2, f"scores must be (layers, heads), got {tuple(scores.shape)}"
    L, H = scores.shape
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= L * H:
        raise ValueError(f"k = {k!r} heads requested, but k must be an int in [1, {L * H}] ({L} layers x {H} heads)")
    bad = ~torch.isfinite(scores)
    if bad.any():
        raise ValueError(f"non-finite scores at (layer, head) {[tuple(i) for i in torch.nonzero(bad).tolist()]}")
    if order == "flat" and not ((scores > 0) & (scores <= 1)).all():
        raise ValueError(f"order 'flat' ranks spectral shares p1 in (0, 1], got scores in [{scores.min().item():g}, "
                         f"{scores.max().item():g}]: pass spectrum_scores(p, 'spectral')")
    values = scores.flatten().tolist()
    sign = -1.0 if order == "desc" else 1.0  # "flat": the lowest p1 first
    ranked = sorted(range(L * H), key=lambda i: (sign * values[i], i))  # the index breaks ties: (layer, head) asc
    return [divmod(i, H) for i in ranked[:k]]


# ---------------------------------------------------------------------------------------------------------------------
# 5. Picture

def plot_scores(scores, selected, path, title="head scores", label="score"):
    """Save a layers x heads heatmap of `scores` to the PNG `path`, boxing the `selected` (layer, head) pairs.

    label names the metric on the colour bar, e.g. "truncated entropy H^1 (query/post_ntk)".
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend alone (safe inside notebooks).
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    scores = torch.as_tensor(scores, dtype=torch.float64).cpu().numpy()
    L, H = scores.shape
    fig = Figure(figsize=(min(2.5 + 0.45 * H, 16), min(1.5 + 0.25 * L, 14)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(scores, aspect="auto", cmap="viridis", interpolation="nearest")
    for layer, head in selected:
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, H, max(1, math.ceil(H / 16))))
    ax.set_yticks(range(0, L, max(1, math.ceil(L / 32))))
    ax.set_title(f"{title}\n({len(selected)} selected heads boxed in red)" if len(selected) else title)
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 6. What a low-entropy head does: its attention (the sink the spike stands for)
#
# The paper's mechanism (v1 Sec. 4.2, v2 Lemma 3.1 and Sec. 5.4): the slow RoPE bands of a spiky head add up
# coherently, so every query points the same way, and the head's attention piles onto the first tokens (an attention
# sink, the bright columns of the paper's Figures 2-4 and 6). The probe reads the attention weights a forward
# computes, for a few query rows, so that a head's score can be set beside where its attention goes.

SINK_THRESHOLD = 0.3  # a sink head: mean attention on the first token above this (Gu et al.'s Attention-Sink study)


class AttentionProbe:
    """Collect softmax(q k^T / sqrt(d)) of the query positions `queries` over every key, per layer and head, as a
    model's attention computes it: on the rotated q and k that attention sees (the RoPE scaling in use, a DoPE plan's
    per-head tables, GQA's shared keys), with the causal mask (key j is visible from position p iff j <= p).

    Pass it to model.probing(probe) around a chunked prefill: each layer calls probe(layer, q (1, H, t, d),
    k (1, h, S, d), pos (t,)) with the chunk's rotated queries and all S keys so far, so the chunk holds positions
    S - t .. S - 1 (read from the shapes: the probe never reads a value back from the device). Only the wanted rows are
    formed, so memory is layers x heads x queries x T floats, linear in T (never T x T).
    weights: (L, H, Q, T) float32 on the model's device; row i is the query at queries[i] (ascending), zero past it.
    """

    def __init__(self, n_layer: int, n_head: int, queries, length: int):
        queries = sorted(int(p) for p in queries)
        if not queries:
            raise ValueError("the probe needs at least one query position")
        bad = [p for p in queries if not 0 <= p < length]
        if bad:
            raise ValueError(f"query positions {bad} are outside the prompt of {length} tokens (0 .. {length - 1})")
        if len(set(queries)) != len(queries):
            raise ValueError(f"query positions repeat: {queries}")
        self.queries, self.length, self.shape = queries, length, (n_layer, n_head, len(queries), length)
        self.weights = None  # allocated on the first call, on the device the model computes on
        self.seen = [0] * n_layer  # rows computed per layer

    def __call__(self, layer, q, k, pos):
        if q.shape[0] != 1:
            raise ValueError(f"the attention probe reads one sequence, got a batch of {q.shape[0]}")
        H, t, d = q.shape[1:]
        h, S = k.shape[1], k.shape[2]  # h: KV heads, or H when a DoPE plan rotated the keys per query head
        start = S - t  # the chunk's first position
        i = [n for n, p in enumerate(self.queries) if start <= p < S]  # rows of weights in this chunk, ascending
        if not i:
            return
        if self.weights is None:
            self.weights = torch.zeros(self.shape, device=q.device)  # (L, H, Q, T)
        lo, hi = self.queries[i[0]] - start, self.queries[i[-1]] - start + 1
        contiguous = hi - lo == len(i)
        rows = slice(lo, hi) if contiguous else torch.tensor([self.queries[n] - start for n in i], device=q.device)
        qs = q[0, :, rows].float().reshape(h, H // h, len(i), d)  # (h, g, n, d): query head j uses key head j // g
        att = qs @ k[0].float().transpose(-1, -2)[:, None] / math.sqrt(d)  # (h, g, n, S)
        p = (torch.arange(lo, hi, device=q.device) if contiguous else rows) + start  # (n,) positions of the rows
        att = att.masked_fill(torch.arange(S, device=q.device)[None] > p[:, None], float("-inf"))  # causal
        self.weights[layer, :, i[0]:i[-1] + 1, :S] = torch.softmax(att, dim=-1).reshape(H, len(i), S)  # (H, n, S)
        self.seen[layer] += len(i)


def attention_probe(model, tokens, queries=None, *, chunk=2048, progress=False, device=None):
    """Attention weights (L, H, Q, T) of the query positions `queries` (default: the last 32, the question and the
    answer prefix of a needle prompt) over all T tokens, from one chunked prefill of `tokens` (T,) or (1, T).

    The model is duck-typed as in score_model, plus model.probing(probe) (a context manager inside which every layer
    calls probe(layer, q, k, pos) with the rotated queries and all keys so far). It costs one prefill: the probe forms
    only its Q rows per layer. Returns (weights, queries).
    """
    from tqdm.auto import tqdm

    tokens = one_prompt(model, tokens, device)
    T = tokens.shape[1]
    if queries is None:
        queries = range(max(0, T - 32), T)
    cfg = model.config
    probe = AttentionProbe(cfg.n_layer, cfg.n_head, list(queries), T)
    with torch.inference_mode():
        cache = model.new_cache(batch=1, max_len=T)
        with model.probing(probe):
            for start in tqdm(range(0, T, chunk), desc="attention probe", unit="chunk", disable=not progress):
                model(tokens[:, start:start + chunk], cache=cache)
    assert probe.seen == [len(probe.queries)] * cfg.n_layer, "the probe missed query rows: does every layer call it?"
    return probe.weights, torch.tensor(probe.queries)


def attention_mass(weights, queries, spans: dict, recent: int = 64) -> dict:
    """Per-head share of attention, averaged over the query rows: dict name -> (L, H).

    spans: name -> (start, stop) key ranges, e.g. {"first": (0, 1), "first4": (0, 4), "needle": (a, b)}; "recent" is
    added: the mass on the `recent` most recent keys of each query (its own position included).
    """
    L, H, Q, T = weights.shape
    out = {}
    for name, (a, b) in spans.items():
        if not 0 <= a < b <= T:
            raise ValueError(f"span {name!r} = ({a}, {b}) is not inside the prompt of {T} tokens")
        out[name] = weights[..., a:b].sum(-1).mean(-1)  # (L, H)
    j, queries = torch.arange(T, device=weights.device), torch.as_tensor(queries, device=weights.device)
    near = (j[None] <= queries[:, None]) & (j[None] > queries[:, None] - recent)  # (Q, T)
    out["recent"] = (weights * near).sum(-1).mean(-1)  # (L, H)
    return out


def sink_heads(first_mass, threshold: float = SINK_THRESHOLD):
    """Which heads are sink heads: mean attention on the first token above `threshold` (L, H) bool."""
    return torch.as_tensor(first_mass) > threshold
