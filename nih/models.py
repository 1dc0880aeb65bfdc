"""
The model a needle-in-a-haystack run loads for one length: this project's model.py, or the checkpoint loaded by
Hugging Face transformers with engines/hf_dope.py (--engine transformers), with the RoPE scaling of that length.
"""

from pathlib import Path

import torch

from model import Transformer


def load_model(path: Path, length: int, native: int, args):
    """The model with the RoPE scaling of this length: --ntk auto is the paper's static Dynamic NTK to the length."""
    factor = None
    if args.ntk == "auto":
        factor = length / native if length > native else None
    elif args.ntk != "none":
        factor = float(args.ntk)
    scaling = {"rope_type": "ntk", "factor": factor} if factor else {}
    if args.engine == "transformers":  # the same experiment on the engine people run (hf_dope.py)
        from engines.hf_dope import HFModel

        model = HFModel.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device,
                                        rope_scaling=scaling, attn_implementation=args.attn,
                                        device_map=args.device_map)
    else:
        model = Transformer.from_pretrained(path, dtype=getattr(torch, args.dtype), device=args.device,
                                            rope_scaling=scaling)
    return model, factor


def describe_rope(cfg, factor) -> str:
    if not factor:
        return "no scaling"
    new_base = cfg.rope_theta * (factor * factor - factor + 1) ** (cfg.head_dim / (cfg.head_dim - 2))
    return f"Dynamic NTK x{factor:.3g} (static, base {cfg.rope_theta:g} -> {new_base:.4g})"
