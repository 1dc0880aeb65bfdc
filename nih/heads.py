"""
What the detector sees in a needle-in-a-haystack run: the heads each rule picks, as JSON and on the layers x heads
heatmap of its score, and the spectral share p1 per layer (`python eval_nih.py --report-heads`); the random heads of
the controls, and the rules of --sweep.
"""

import json
import math
import random
from pathlib import Path

import entropy
from nih import records


def rule_name(variant: str, rule: dict) -> str:
    return f"{variant}[{rule['criterion']} {rule['metric']} r={rule['r']} k={rule['k']} {rule['order']}]"


def control_heads(n_layer: int, n_head: int, k: int, exclude, seed, *parts) -> list:
    """k (layer, head) pairs drawn uniformly at random among the heads not in `exclude`, reproducible from
    (seed, *parts)."""
    exclude = {tuple(h) for h in exclude}
    pool = [(layer, h) for layer in range(n_layer) for h in range(n_head) if (layer, h) not in exclude]
    if not 1 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} control heads from the {len(pool)} heads outside the selection")
    return sorted(random.Random("|".join(map(str, (seed, "control", *parts)))).sample(pool, k))


def sweep_rules(args):
    return [dict(k=k, criterion=c, metric=m, r=r, order=o) for c in args.sweep_criterion for m in args.sweep_metric
            for r in (args.sweep_r if m in ("trunc", "renorm") else [1])
            for k in args.sweep_k for o in args.sweep_order]


def save_heads(sel, methods, length, noisy, out: Path, model_name: str):
    """Each rule's heads as JSON and on the layers x heads heatmap of its score (sel: eval_nih.Selector)."""
    for m in methods:
        if m.role != "rule":
            continue
        scores = sel.scores(m.rule)
        stem = out / f"heads_{length}_noisy{noisy}_{m.name.replace('/', '_')}"
        records.write_atomic(stem.with_suffix(".png"), lambda f: entropy.plot_scores(  # whole or absent
            scores, m.heads, f, title=f"{model_name} at {length} tokens: heads for DoPE {m.name}",
            label=f"{m.rule['metric']} r={m.rule['r']} ({m.rule['criterion']})"))
        text = json.dumps({"rule": m.rule, "heads": m.heads, "scores": [scores[h].item() for h in m.heads],
                           "p1": [sel.spectra[m.rule["criterion"]][h][0].item() for h in m.heads]}, indent=1)
        records.write_atomic(stem.with_suffix(".json"), lambda f: f.write(text.encode() + b"\n"))


def report_heads(calib, sel, methods, length, noisy, out: Path, model_name: str):
    """Print the spectral share p1 per layer (min / median / max over heads) for each criterion, and the heads each
    of `methods` picks (every variant's rule in each order); save the heatmaps."""
    print(f"-- noisy={noisy}\n   calibration pass: {calib['seconds']:.0f} s")
    for crit in ("query/post_ntk", "key/post_ntk", "query/pre_ntk"):
        p1 = entropy.spectrum_scores(calib["spectra"][crit], "spectral")  # (L, H)
        spike = (p1 >= 1 / math.e).float().mean().item()
        print(f"   p1 = ||S||_2 / tr S, {crit}: {100 * spike:.0f}% of heads in the spike regime p1 >= 1/e")
        print("   layer " + " ".join(f"{i:>4}" for i in range(p1.shape[0])))
        for name, f in (("min", lambda x: x.min(-1).values), ("median", lambda x: x.median(-1).values),
                        ("max", lambda x: x.max(-1).values)):
            print(f"   {name:>5} " + " ".join(f"{v:4.2f}" for v in f(p1).tolist()))
        png = out / f"p1_{length}_noisy{noisy}_{crit.replace('/', '_')}.png"
        records.write_atomic(png, lambda f: entropy.plot_scores(p1, [], f, title=f"{model_name} at {length} tokens",
                                                                label=f"spectral share p1 ({crit})"))
    for m in methods[1:]:
        p1 = [sel.spectra[m.rule["criterion"]][h][0].item() for h in m.heads]
        print(f"   DoPE {m.name}: {m.rule} -> heads {m.heads} (p1 {', '.join(f'{x:.2f}' for x in p1)})")
    save_heads(sel, methods, length, noisy, out, model_name)
    print(f"   plots: {out}/p1_{length}_noisy{noisy}_*.png, {out}/heads_{length}_noisy{noisy}_*.png")
