"""
DoPE inside Hugging Face transformers: score the heads of a loaded `LlamaForCausalLM` or `Qwen2ForCausalLM` and run
a `dope.py` plan on it, with `entropy.py` and `dope.py` unchanged and no modeling file forked.

    model = HFModel.from_pretrained("weights/SmolLM2-135M-Instruct", rope_scaling={"rope_type": "ntk", "factor": 2.0})
    grams = entropy.score_model(model, calibration_ids)     # one forward; Grams streamed from hooks
    model.install(DopePlan(heads, "gaussian"))              # model(ids), model.generate(ids, 32) now run DoPE
    model.remove()                                          # plain RoPE again, bit for bit

`HFModel` looks like `model.Transformer` to entropy.py, dope.py and the experiment (config, rope_inv_freq, new_cache,
__call__, prefill, generate, layers); `HFModel(hf_model)` wraps a model you loaded yourself (e.g. with
`device_map="auto"` over several GPUs), `.hf` is the transformers model. Only this file imports transformers.

Where it enters transformers (5.23; tests/test_hf_dope.py checks each point and fails if one moves). In
LlamaAttention.forward and Qwen2Attention.forward:

    q, k, v = q_proj(x), k_proj(x), v_proj(x)       each viewed (B, T, -1, d): the head count follows the tensor
    q, k = apply_rotary_pos_emb(q, k, cos, sin)   cos, sin: the `position_embeddings` argument, (B, T, d)
    k, v = past_key_values.update(k, v, layer)    the cache keeps rotated keys
    attention_interface(self, q, k, v, ...)       repeats k and v self.num_key_value_groups times (GQA)

- Scoring needs q and k before rotation: forward hooks on q_proj and k_proj. Public extension points suffice.
- DoPE needs per-head tables, and keys rotated once per query head before the cache update. Hooks alone cannot give
  it: the one (B, T, d) table is broadcast over heads (`cos.unsqueeze(1)`) and no hook sits between the rotation and
  the cache update. Patching `apply_rotary_pos_emb` would be global to the process and blind to the calling layer.
  Instead, in the layers the plan names, and only while it is installed:
    * a forward pre-hook on self_attn swaps `position_embeddings` for the identity rotation (cos = 1, sin = 0:
      q * 1 + rotate_half(q) * 0 == q exactly) and builds the layer's dope.HeadRope tables in float32 from the
      model's own inverse frequencies and `position_ids`;
    * forward hooks on q_proj and k_proj rotate with those tables (model.apply_rope, the math model.py runs), keys
      first expanded to one per query head; a v_proj hook expands values to match;
    * the one patch: `self_attn.num_key_value_groups = 1`, because keys and values now arrive per query head and
      every attention function (eager, sdpa, flash) would repeat them again. Restored on removal. With it the
      registered attention functions run unchanged, so no `AttentionInterface` entry (and mask function) is needed.
  A forward hook then checks that each projection hook ran once: a refactor that bypasses them raises instead of
  silently running plain RoPE.
The cache is transformers' DynamicCache (a StaticCache preallocates one head count for every layer; DoPE layers keep
n_head keys and values per position, n_kv_head elsewhere).
"""

import inspect
from contextlib import contextmanager
from pathlib import Path

import torch

import dope
from model import (Config, Transformer, apply_rope, check_token_ids, load_safetensors, open_folder, read_json,
                   rope_cos_sin, rope_params)

try:
    import transformers
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2
except ImportError as e:
    raise ImportError("hf_dope.py needs the `transformers` package (pip install transformers==5.23.0); "
                      "model.py, entropy.py and dope.py run without it") from e

SUPPORTED = {"LlamaForCausalLM": modeling_llama, "Qwen2ForCausalLM": modeling_qwen2}


def check_architecture(name: str):
    if name not in SUPPORTED:
        raise ValueError(f"hf_dope supports {' and '.join(SUPPORTED)}, not {name}")


def check_intervention_point(hf):
    """The seams listed in the module docstring, read from the installed transformers; raises if one moved."""
    attn = hf.model.layers[0].self_attn
    rotary = SUPPORTED[type(hf).__name__].apply_rotary_pos_emb
    problems = []
    if list(inspect.signature(rotary).parameters)[:4] != ["q", "k", "cos", "sin"]:
        problems.append(f"apply_rotary_pos_emb{inspect.signature(rotary)} is not (q, k, cos, sin, ...)")
    if "position_embeddings" not in inspect.signature(type(attn).forward).parameters:
        problems.append(f"{type(attn).__name__}.forward takes no position_embeddings")
    problems += [f"{type(attn).__name__} has no {a}" for a in ("q_proj", "k_proj", "v_proj", "num_key_value_groups")
                 if not hasattr(attn, a)]
    if problems:
        raise RuntimeError(f"transformers {transformers.__version__} moved what hf_dope.py relies on: "
                           + "; ".join(problems))


class HFCache:
    """transformers' DynamicCache with model.KVCache's `pos` and `rewind`."""

    def __init__(self, kv, max_len: int):
        self.kv, self.max_len = kv, max_len

    @property
    def pos(self) -> int:
        return self.kv.get_seq_length()

    def rewind(self, pos: int):
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot rewind a cache at position {self.pos} to {pos}")
        if pos < self.pos:
            self.kv.crop(pos - self.pos)  # a negative count drops that many trailing positions


class DopeLayer:
    """dope.py's seam on one transformers attention module: setting `head_rope` (dope.apply_dope does) installs the
    hooks of the module docstring, None (dope.remove_dope) removes them."""

    def __init__(self, attn, layer: int, owner: "HFModel"):
        c = owner.config
        self.attn, self.layer, self.owner = attn, layer, owner
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.groups = attn.num_key_value_groups
        self._head_rope, self._handles, self._run = None, [], None

    @property
    def head_rope(self):
        return self._head_rope

    @head_rope.setter
    def head_rope(self, fn):
        for h in self._handles:
            h.remove()
        self._handles, self._head_rope, self._run = [], fn, None
        self.attn.num_key_value_groups = self.groups
        if fn is not None:
            a = self.attn
            self._handles = [a.register_forward_pre_hook(self._tables, with_kwargs=True),
                             a.q_proj.register_forward_hook(self._rotate_q),
                             a.k_proj.register_forward_hook(self._rotate_k),
                             a.v_proj.register_forward_hook(self._expand_v),
                             a.register_forward_hook(self._check)]
            a.num_key_value_groups = 1  # keys and values arrive per query head

    def _tables(self, attn, args, kwargs):
        pe, pos = kwargs.get("position_embeddings"), kwargs.get("position_ids")
        if pe is None or pos is None:
            raise RuntimeError(f"{type(attn).__name__} was called without position_embeddings and position_ids: "
                               "hf_dope.py cannot place its rotation")
        if not (pos == pos[:1]).all():
            raise ValueError("DoPE tables need the same positions in every row of the batch")
        pos = pos[0]  # (T,)
        rot = self.owner.rotary
        cos, sin = rope_cos_sin(rot.inv_freq.to(pos.device), pos, rot.attention_scaling)  # (T, d) float32
        self._run = dict(zip(("cos", "sin", "add"), self._head_rope(cos, sin, pos)), done=[])  # (H, T, d) each
        cos, sin = pe  # (B, T, d): the shared rotation becomes the identity in this layer
        return args, {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))}

    def _step(self, name: str, order=("q", "k", "v", "end")):
        """Between the pre-hook and the forward hook the projections must run q, k, v, once each, in that order."""
        done = self._run["done"] if self._run is not None else None
        if done is None or done != list(order[:order.index(name)]):
            self._run = None
            raise RuntimeError(f"{type(self.attn).__name__}.forward ran the projections {done} then {name!r}, not q, "
                               f"k, v once each: transformers {transformers.__version__} moved what hf_dope.py "
                               "relies on")
        done.append(name)
        return self._run

    def _rotate(self, out, h: int, which: int):
        """out (B, T, h * d) from q_proj (which = 0) or k_proj (1) -> rotated per query head, (B, T, H * d)."""
        r = self._step("qk"[which])
        B, T, _ = out.shape
        x = out.view(B, T, h, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        x = x.repeat_interleave(self.n_head // h, dim=1)  # (B, H, T, d): a GQA key once per query head
        x = apply_rope(x, r["cos"].to(x.device), r["sin"].to(x.device))
        if r["add"] is not None:  # DoPE's v1 additive Gaussian ablation
            x = x + r["add"][which].to(x)
        return x.transpose(1, 2).reshape(B, T, -1)

    def _rotate_q(self, mod, args, out):
        return self._rotate(out, self.n_head, 0)

    def _rotate_k(self, mod, args, out):
        return self._rotate(out, self.n_kv_head, 1)

    def _expand_v(self, mod, args, out):
        self._step("v")
        B, T, _ = out.shape
        v = out.view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, d)
        return v.repeat_interleave(self.n_head // self.n_kv_head, dim=2).reshape(B, T, -1)  # (B, T, H * d)

    def _check(self, attn, args, out):
        self._step("end")
        self._run = None


class Block:
    def __init__(self, self_attn: DopeLayer):
        self.self_attn = self_attn


class HFModel:
    """A transformers Llama/Qwen2 causal LM with model.Transformer's interface (see the module docstring)."""

    def __init__(self, hf, rope_scaling: dict | None = None):
        check_architecture(type(hf).__name__)
        check_intervention_point(hf)
        self.hf = hf.eval()
        self.observer = None  # set by observing()
        d = hf.config.to_dict()
        d["architectures"] = [type(hf).__name__]
        self.config = Config.from_hf(d)
        self.rotary = hf.model.rotary_emb
        if rope_scaling is not None:
            self._set_rope(rope_scaling)
        inv_freq, scale = rope_params(self.config)
        if not (torch.allclose(self.rotary.inv_freq.cpu(), inv_freq, rtol=1e-6, atol=0)
                and abs(self.rotary.attention_scaling - scale) <= 1e-6 * scale):
            raise ValueError(f"transformers rotates with other frequencies than model.rope_params for "
                             f"rope_scaling={self.config.rope_scaling}")
        self.layers = [Block(DopeLayer(layer.self_attn, i, self)) for i, layer in enumerate(hf.model.layers)]

    def _set_rope(self, rope_scaling: dict):
        """Make transformers rotate with model.rope_params' frequencies for a static scaling, including the paper's
        "ntk" that transformers lacks: the rotary module's inv_freq buffer is overwritten (transformers recomputes it
        only for dynamic and longrope types, refused here)."""
        s = rope_scaling or {}
        kinds = (s.get("rope_type", s.get("type", "default")), self.rotary.rope_type)
        if any("dynamic" in k or k == "longrope" for k in kinds):
            raise ValueError(f"rope_scaling={rope_scaling} over a {kinds[1]!r} rotary module: only a static scaling "
                             "over a static one can be set on a loaded model (put others in config.json)")
        self.config.rope_scaling = rope_scaling or None
        inv_freq, scale = rope_params(self.config)
        with torch.no_grad():
            self.rotary.inv_freq.copy_(inv_freq)
            self.rotary.original_inv_freq.copy_(inv_freq)
        self.rotary.attention_scaling = scale

    @classmethod
    def from_pretrained(cls, path, dtype=torch.bfloat16, device="cpu", rope_scaling=None, attn_implementation="sdpa",
                        device_map=None) -> "HFModel":
        """Load an HF folder with transformers. Without device_map the weights pass through host memory to `device`;
        device_map (transformers requires accelerate for it) loads them in place: "cuda" for one GPU, "auto" to
        spread the layers over the visible GPUs. rope_scaling overrides the config's, as in model.Transformer."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path} (see weights.md for how to get weights)")
        d = read_json(path / "config.json")
        archs = (d.get("architectures") if isinstance(d, dict) else None) or ["(no architectures)"]
        check_architecture(archs[0])
        # model.py's checks first, so that transformers never sees a damaged or mismatched folder: the files
        # against the folder's MANIFEST.json, the config, and the tensors' names and shapes (from the headers).
        with torch.device("meta"):
            Transformer(open_folder(path)).load_state_dict(load_safetensors(path, meta=True), assign=True, where=path)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map,
                                                               attn_implementation=attn_implementation)
        return cls(hf if device_map is not None else hf.to(device), rope_scaling)

    @property
    def device(self):
        """Where the token ids go: the embedding's device, or, when accelerate offloaded it (its weight is then on
        the meta device), the device accelerate's hook computes it on."""
        emb = self.hf.model.embed_tokens
        hook = getattr(emb, "_hf_hook", None)
        return torch.device(hook.execution_device) if emb.weight.is_meta and hook is not None else emb.weight.device

    @property
    def plan(self):
        """The installed dope.DopePlan, or None."""
        return next((b.self_attn.head_rope.plan for b in self.layers if b.self_attn.head_rope is not None), None)

    def install(self, plan: dope.DopePlan):
        """dope.apply_dope, refusing to replace a plan silently."""
        if self.plan is not None:
            raise RuntimeError(f"a DoPE plan is already installed on heads {self.plan.heads}: remove() it first")
        if not plan.heads:
            raise ValueError("the plan names no heads")
        dope.apply_dope(self, plan)

    def remove(self):
        if self.plan is None:
            raise RuntimeError("no DoPE plan is installed")
        dope.remove_dope(self)

    def rope_inv_freq(self, scaled: bool = True, seq_len: int | None = None) -> torch.Tensor:
        return rope_params(self.config, seq_len, scaled)[0]

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> HFCache:
        return HFCache(transformers.DynamicCache(config=self.hf.config), max_len or self.config.max_pos)

    @contextmanager
    def observing(self, observer):
        """Call observer(layer, q (B, H, T, d), k (B, Hkv, T, d), pos (T,)) with q and k before any rotation in
        every forward inside the with block, as model.Transformer.observing."""
        self.observer = observer
        try:
            yield
        finally:
            self.observer = None

    @contextmanager
    def _hooks(self, observer, pos):
        if observer is None:
            yield
            return
        c, seen, handles = self.config, {}, []

        def heads(x, h):
            return x.view(*x.shape[:2], h, c.head_dim).transpose(1, 2)

        for i, layer in enumerate(self.hf.model.layers):
            a = layer.self_attn  # prepend: run before a DoPE hook replaces the output
            handles.append(a.q_proj.register_forward_hook(lambda m, args, q, i=i: seen.__setitem__(i, q), prepend=True))
            handles.append(a.k_proj.register_forward_hook(
                lambda m, args, k, i=i: observer(i, heads(seen.pop(i), c.n_head), heads(k, c.n_kv_head), pos),
                prepend=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def __call__(self, idx, cache=None, all_logits=False):
        """Logits (B, T or 1, vocab) in float32, as model.Transformer.forward."""
        check_token_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} positions is full: cannot add {T} at position {start}")
        if start:
            self._check_cache_heads(cache)
        idx = idx.to(self.device)
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        with torch.inference_mode(), self._hooks(self.observer, pos):
            out = self.hf(input_ids=idx, position_ids=pos.expand(B, T), use_cache=cache is not None,
                          past_key_values=cache.kv if cache is not None else None,
                          logits_to_keep=0 if all_logits else 1)
        return out.logits.float()

    def _check_cache_heads(self, cache):
        """A layer with a plan writes a key per query head, one without a key per KV head: a plan installed or
        removed while the cache holds positions would append keys of the other kind (as model.KVCache refuses)."""
        for i, (block, layer) in enumerate(zip(self.layers, cache.kv.layers)):
            h = self.config.n_head if block.self_attn.head_rope is not None else self.config.n_kv_head
            if getattr(layer, "is_initialized", False) and layer.keys.shape[1] != h:
                raise ValueError(f"layer {i} writes {h} heads per position into a cache whose {cache.pos} positions "
                                 f"hold {layer.keys.shape[1]}: install or remove a DoPE plan only on an empty cache "
                                 "(rewind(0) or a new one)")

    # The chunked prefill and greedy decoding are model.Transformer's loops, which need only self.config, new_cache
    # and a call with a cache (its checks of chunk and token ids come with them).
    prefill = Transformer.prefill
    generate = Transformer.generate
