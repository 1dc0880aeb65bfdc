"""Why DoPE does what it does: are the detector's heads attention-sink heads, and where does DoPE send their attention?

The paper's mechanism (Xiong et al., arXiv 2511.09146, v1 Sec. 4.2, v2 Lemma 3.1 and Sec. 5.4, Figures 2-4 and 6):
a head whose slow RoPE bands add up coherently has a rank-one spike in its query Gram matrix (a low truncated matrix
entropy) and pours its attention onto the first tokens (an attention sink); removing those heads' positional encoding
is meant to hand that attention back to the content, the needle. This measures each link on one prompt:

  1. every head's score (H^1 on query/post_ntk, the default rule; p1; vanilla H) against its sink mass (mean attention
     of the last 32 query positions on the first token), Spearman's rank correlation over all heads with a 95%
     bootstrap interval (heads resampled), and where the rule's heads and the random control heads sit;
  2. with --methods, the same prompt under each of the grid's methods: the denoised heads' sink and needle mass, and
     every head's needle mass, beside the baseline's.

    python -m nih.sinks                                  # 4K tokens, ~45 s on 2 cores: pictures + sinks.json
    python -m nih.sinks --len 24k --calib-dir docs/results/regime/24k --out docs/results/sinks/24k
    python -m nih.sinks --plot docs/results/sinks/8k docs/results/sinks/16k ... --out docs/results/sinks

The prompt is the setting's calibration prompt (its own key and needle, never a test prompt), so the heads and the
attention are read on the same tokens. Each setting's summary is written atomically as it finishes, so a long run
that stops keeps every setting it finished and recomputes only the rest.
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import entropy
import eval_nih
from model import Tokenizer, parse_len
from nih import cli, records
from nih.models import load_model
from tools.setup_weights import DEFAULT_MODEL_DIR, ensure_weights

RULES = {  # the grid's two readings of the rule (eval_nih.methods_for) and the score they rank by
    "asc": dict(k=5, criterion="query/post_ntk", metric="trunc", r=1, order="asc"),
    "flat": dict(k=5, criterion="query/post_ntk", metric="spectral", r=1, order="asc"),
}
SCORES = {"h1": ("trunc", 1), "p1": ("spectral", 1), "vanilla": ("vanilla", 1)}
QUERIES = 32  # the last 32 positions: the question and the answer prefix
WINDOW = 256  # the attention map and the query similarity of the picture: the first 256 positions


def ranks(v) -> torch.Tensor:
    """Ranks 0 .. n-1 of a tensor's values (flattened), ties sharing their mean rank."""
    v = torch.as_tensor(v, dtype=torch.float64).flatten()
    s, order = v.sort()
    _, run, count = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    end = count.cumsum(0)  # a run of equal values holds the sorted positions end - count .. end - 1
    r = torch.empty_like(v)
    r[order] = ((2 * end - count - 1).to(v.dtype) / 2)[run]  # their mean
    return r


def pearson(a, b) -> float:
    """Pearson's correlation of two centred 1-D tensors."""
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum())))


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties) of two 1-D tensors."""
    a, b = ranks(x), ranks(y)
    return pearson(a - a.mean(), b - b.mean())


def centred_layer_ranks(v) -> torch.Tensor:
    """(L, H) -> each layer's ranks among its own heads, minus their mean. Ties (the many heads of the lower layers
    with no sink at all) share their mean rank."""
    r = torch.stack([ranks(row) for row in torch.as_tensor(v, dtype=torch.float64)])
    return r - r.mean(1, keepdim=True)


def within_layers(x, y, layers=None) -> float:
    """Spearman's rho with the layer held fixed: ranks taken among each layer's heads, centred per layer, pooled
    (does the score tell sink heads apart inside a layer, beyond both growing with depth?). x, y: (L, H)."""
    a, b = centred_layer_ranks(x), centred_layer_ranks(y)
    layers = list(range(a.shape[0]) if layers is None else layers)
    return pearson(a[layers].flatten(), b[layers].flatten())


def bootstrap_interval(x, y, draws: int = 2000, seed: int = 0, level: float = 0.95) -> list:
    """Percentile interval of Spearman's rho over heads resampled with replacement."""
    x, y = torch.as_tensor(x).flatten(), torch.as_tensor(y).flatten()
    g = torch.Generator().manual_seed(seed)
    rhos = sorted(spearman(x[i], y[i]) for i in (torch.randint(0, len(x), (len(x),), generator=g)
                                                 for _ in range(draws)))
    lo = rhos[int((1 - level) / 2 * draws)]
    return [lo, rhos[int((1 + level) / 2 * draws) - 1]]


def layer_bootstrap(x, y, draws: int = 2000, seed: int = 0, level: float = 0.95) -> list:
    """Percentile interval of within_layers(x, y) over layers resampled with replacement (a layer's ranks are its
    own whichever layers are drawn with it: computed once)."""
    g = torch.Generator().manual_seed(seed)
    a, b = centred_layer_ranks(x), centred_layer_ranks(y)
    L = a.shape[0]
    rhos = sorted(pearson(a[i].flatten(), b[i].flatten())
                  for i in (torch.randint(0, L, (L,), generator=g).tolist() for _ in range(draws)))
    return [rhos[int((1 - level) / 2 * draws)], rhos[int((1 + level) / 2 * draws) - 1]]


def spans_of(tok, p: eval_nih.Prompt, noisy: int, needle: str) -> dict:
    """Key ranges the summaries read: the first token, the first four, the needle sentence, the noisy sink tokens."""
    n = len(tok.encode(" " + needle.format(key=p.key, value=p.value) + " "))
    spans = {"first": (0, 1), "first4": (0, 4), "needle": (p.needle_at, p.needle_at + n)}
    if noisy:
        spans["sinks"] = (p.needle_at + n, p.needle_at + n + noisy)
    return spans


def head_table(mass: dict) -> dict:
    return {name: [[round(float(v), 6) for v in row] for row in m] for name, m in mass.items()}


def measure(args) -> dict:
    """Measurement 1 on one setting (and 2 with --methods); returns the summary written to sinks.json."""
    length, noisy = args.len, args.noisy
    model_path = Path(args.model)
    grid = eval_nih.parse_args(["--len", str(length), "--noisy", str(noisy), "--model", str(model_path),
                                "--variant", "parts,gaussian", "--order", "parts:asc,parts:flat,gaussian:asc",
                                "--depths", str(args.depths), "--out", str(args.calib_dir or args.out)])
    cfg = cli.check_inputs(grid, 5)
    tok = Tokenizer(model_path)
    model, factor = load_model(model_path, length, cfg.max_pos, grid)
    builder = eval_nih.PromptBuilder(tok, eval_nih.FILLER, model.config.bos_token_id)
    ident = records.identity(grid, records.model_id(model_path), eval_nih.FILLER, factor)
    Path(grid.out).mkdir(parents=True, exist_ok=True)
    calib = eval_nih.calibrate(model, builder, length, noisy, grid, Path(grid.out), ident)
    sel = eval_nih.Selector(calib)
    scores = {name: sel.scores(dict(criterion="query/post_ntk", metric=m, r=r)) for name, (m, r) in SCORES.items()}

    L, H = model.config.n_layer, model.config.n_head
    bad = [h for h in args.heads or [] if not (0 <= h[0] < L and 0 <= h[1] < H)]
    if bad:
        raise SystemExit(f"--heads {','.join(f'{a}:{b}' for a, b in bad)}: not a head of the model, which has "
                         f"{L} layers x {H} heads (layer:head, from 0)")
    methods = eval_nih.methods_for(sel, grid, L, H, length, noisy)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = json.loads((out / "sinks.json").read_text()) if (out / "sinks.json").exists() else {}
    if [done.get(k) for k in ("length", "noisy", "model_id")] == [length, noisy, ident["model"]]:
        print(f"{out / 'sinks.json'}: this setting's scores and sink masses are on disk; not probed again")
        summary = done
    else:
        summary = probe_calibration(model, tok, builder, grid, scores, methods, factor, ident, args, out)
    if args.test_depths:
        summary["tests"] = by_method(model, tok, builder, methods, grid, args, out)
        if args.pictures:
            draw_tests(summary["tests"], out)
        records.write_atomic(out / "sinks.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return summary


def probe_calibration(model, tok, builder, grid, scores, methods, factor, ident, args, out: Path) -> dict:
    """Measurement 1: the calibration prompt's attention against each head's score."""
    length, noisy, model_path = grid.len[0], grid.noisy[0], Path(grid.model)
    p = builder.build(length, 0.5, eval_nih.CALIB_KEY, eval_nih.needle_value(grid.seed, "calib", length), noisy)
    spans = spans_of(tok, p, noisy, grid.needle)
    t0 = time.time()
    weights, queries = entropy.attention_probe(model, p.ids, range(length - QUERIES, length), chunk=args.chunk,
                                               progress=True)
    seconds = time.time() - t0
    mass = entropy.attention_mass(weights.cpu(), queries, spans)
    last_row = weights[:, :, -1].cpu()  # (L, H, T): the answer position's attention, for the picture
    del weights
    H = model.config.n_head
    sets = {m.name: [list(h) for h in m.heads] for m in methods if m.heads}
    first = mass["first"].flatten()
    order = first.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    placed = {name: [dict(head=h, sink=round(float(mass["first"][h[0], h[1]]), 4), rank=int(rank[h[0] * H + h[1]]),
                          h1=round(float(scores["h1"][h[0], h[1]]), 4), p1=round(float(scores["p1"][h[0], h[1]]), 4))
                     for h in heads] for name, heads in sets.items()}
    summary = dict(
        length=length, noisy=noisy, multiple=length / model.config.max_pos, ntk_factor=factor, model=model_path.name,
        model_id=ident["model"], queries=[int(queries[0]), int(queries[-1])], spans=spans, probe_seconds=seconds,
        native=model.config.max_pos,
        spearman_h1_sink=spearman(scores["h1"], first), spearman_h1_sink_ci=bootstrap_interval(scores["h1"], first),
        spearman_p1_sink=spearman(scores["p1"], first), spearman_p1_sink_ci=bootstrap_interval(scores["p1"], first),
        spearman_vanilla_sink=spearman(scores["vanilla"], first),
        spearman_vanilla_sink_ci=bootstrap_interval(scores["vanilla"], first),
        # from the table below (6 decimals), so that --plot recomputes the same number from the committed file
        spearman_h1_sink_within_layers=within_layers(scores["h1"], head_table(mass)["first"]),
        spearman_h1_sink_within_layers_ci=layer_bootstrap(scores["h1"], head_table(mass)["first"]),
        interval="95% percentile bootstrap over heads (2000 resamples, seed 0); within layers: over layers",
        sink_heads=float(entropy.sink_heads(mass["first"]).float().mean()), sink_threshold=entropy.SINK_THRESHOLD,
        head_sets=placed, scores={k: [[round(float(v), 6) for v in row] for row in s] for k, s in scores.items()},
        mass=head_table(mass))
    if args.pictures:
        heads = args.heads or [placed["parts/asc"][0]["head"], placed["parts/flat"][0]["head"]]
        window = window_maps(model, p.ids[:WINDOW], heads)
        draw_setting(summary, last_row, window, out)
    records.write_atomic(out / "sinks.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return summary


def window_maps(model, ids, heads) -> dict:
    """For each head, over the first len(ids) positions: the attention map (queries x keys) and the cosine similarity
    of its rotated queries (the Gram matrix the score is computed from, normalised)."""
    qs = {}
    layers = {h[0] for h in heads}

    def keep(layer, q, k, pos):
        if layer in layers:
            qs[layer] = q[0].float()  # (H, T, d)

    w, _ = entropy.attention_probe(model, ids, range(len(ids)), chunk=len(ids))
    with torch.inference_mode(), model.probing(keep):
        model(torch.tensor([ids], device=next(model.parameters()).device))
    out = {}
    for layer, head in heads:
        q = torch.nn.functional.normalize(qs[layer][head], dim=-1)
        out[(layer, head)] = dict(attention=w[layer, head].cpu(), similarity=(q @ q.T).cpu())
    return out


def by_method(model, tok, builder, methods, grid, args, out: Path) -> list:
    """Measurement 2: test prompts the grid answered (trial 0 at each of --test-depths), under each of its methods:
    every head's sink and needle mass, beside the record's answer and log p. One file per (depth, method), written
    as it finishes; a rerun skips the ones on disk."""
    from dope import DopePlan, apply_dope, remove_dope

    answered = {}
    if args.records:
        for line in (Path(args.records) / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            answered[(r["depth"], r["trial"], r["method"])] = r
    prompts = {d: p for d, t, p in eval_nih.setting_prompts(builder, grid.len[0], grid.noisy[0], grid) if t == 0}
    rows = []
    for depth in args.test_depths:
        if depth not in prompts:
            raise ValueError(f"--test-depths {depth}: the grid's depths at this setting are {sorted(prompts)}")
        p = prompts[depth]
        spans = spans_of(tok, p, grid.noisy[0], grid.needle)
        for m in methods:
            path = out / f"test_{depth:g}_{m.name.replace('/', '-')}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                continue
            if m.heads:
                apply_dope(model, DopePlan([tuple(h) for h in m.heads], m.variant, seed=grid.seed))  # as the grid
            try:
                w, q = entropy.attention_probe(model, p.ids, range(len(p.ids) - QUERIES, len(p.ids)),
                                               chunk=args.chunk, progress=True)
            finally:
                remove_dope(model)
            mass = entropy.attention_mass(w.cpu(), q, spans)
            profile = w[:, :, -1].mean(dim=(0, 1)).cpu()  # (T,): the answer position's attention, mean over heads
            del w
            r = answered.get((depth, 0, m.name), {})
            row = dict(depth=depth, method=m.name, heads=[list(h) for h in m.heads], spans=spans,
                       answer=r.get("answer"), score=r.get("score"), logprob=r.get("logprob"), expected=p.value,
                       mass=head_table(mass), profile=binned(profile))
            records.write_atomic(path, lambda f: f.write(json.dumps(row).encode()))
            rows.append(row)
    return rows


def binned(row, bins: int = 512) -> dict:
    """A (T,) attention row summed into `bins` equal spans of positions (the last may be shorter)."""
    width = -(-len(row) // bins)
    sums = torch.nn.functional.pad(row, (0, width * bins - len(row))).view(bins, width).sum(-1)
    return dict(width=width, mass=[round(float(v), 7) for v in sums])


RETRIEVAL = 0.1  # a retrieval head: the baseline's last 32 queries give the needle at least this share on average


def test_table(rows: list) -> list:
    """Measurement 2's summaries, one line per (depth, method) beside the baseline of that prompt: (a) the denoised
    heads' summed sink mass, (b) the needle mass summed over the heads of the layers above the lowest denoised one,
    (c) the retrieval heads (baseline needle mass >= RETRIEVAL) and how many of them the method denoises."""
    base = {r["depth"]: r for r in rows if r["method"] == "none"}
    out = []
    for r in rows:
        b = base.get(r["depth"])
        if b is None or r["method"] == "none":
            continue
        heads = [tuple(h) for h in r["heads"]]
        first = min(layer for layer, _ in heads)
        sink = lambda x: sum(x["mass"]["first"][layer][h] for layer, h in heads)  # noqa: E731
        above = lambda x: sum(sum(row) for row in x["mass"]["needle"][first + 1:])  # noqa: E731
        retrieval = [(layer, h) for layer, row in enumerate(b["mass"]["needle"]) for h, v in enumerate(row)
                     if v >= RETRIEVAL]
        out.append(dict(depth=r["depth"], method=r["method"], sink_before=sink(b), sink_after=sink(r),
                        needle_above_before=above(b), needle_above_after=above(r), first_layer=first,
                        retrieval=retrieval, retrieval_denoised=[h for h in retrieval if h in heads],
                        logprob_before=b["logprob"], logprob_after=r["logprob"], answer=r["answer"],
                        score=r["score"], score_before=b["score"]))
    return out


def draw_tests(rows: list, out: Path):
    """(c) The answer position's attention along the prompt (mean over heads, summed per bin), per test prompt: the
    baseline and each method, the needle marked."""
    from matplotlib.figure import Figure

    depths = sorted({r["depth"] for r in rows})
    fig = Figure(figsize=(10, 2.8 * len(depths)), layout="constrained")
    for i, d in enumerate(depths):
        ax = fig.add_subplot(len(depths), 1, i + 1)
        for r in (r for r in rows if r["depth"] == d):
            x = [j * r["profile"]["width"] for j in range(len(r["profile"]["mass"]))]
            lp = "" if r["logprob"] is None else f", log p {r['logprob']:.2f}"
            ax.semilogy(x, [max(v, 1e-7) for v in r["profile"]["mass"]], lw=1.4 if r["method"] == "none" else 0.7,
                        label=f"{r['method']}{lp}", color="black" if r["method"] == "none" else None)
        a, b = rows[[r["depth"] for r in rows].index(d)]["spans"]["needle"]
        ax.axvspan(a, b, color="red", alpha=0.3)
        ax.set_title(f"needle at depth {d:.0%} (red): the answer position's attention, mean over heads", fontsize=9)
        ax.set_ylabel("mass per bin")
        ax.legend(fontsize=7, ncol=3)
    ax.set_xlabel("key position")
    fig.savefig(out / "answer_attention_by_method.png", dpi=110)


def draw_setting(summary: dict, last_row, window: dict, out: Path):
    """(a) each head's H^1 against its sink mass, the rule's and the random heads marked; (b) one rule head and the
    highest-entropy head over the first positions: attention map and query similarity; (c) the answer position's
    attention along the prompt, averaged over heads, the needle marked."""
    from matplotlib.figure import Figure

    h1 = torch.tensor(summary["scores"]["h1"]).flatten()
    sink = torch.tensor(summary["mass"]["first"]).flatten()
    H = len(summary["scores"]["h1"][0])
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(h1, sink, s=10, c="0.6", label="all heads")
    marks = {"parts/asc": ("red", "o"), "parts/flat": ("tab:blue", "s"), "parts/random0": ("black", "x"),
             "gaussian/random0": ("tab:green", "+")}
    for name, (color, marker) in marks.items():
        for i, h in enumerate(summary["head_sets"].get(name, [])):
            j = h["head"][0] * H + h["head"][1]
            face = dict(facecolors="none", edgecolors=color) if marker in "os" else dict(c=color)
            ax.scatter(h1[j], sink[j], s=40, marker=marker, label=name if i == 0 else None, **face)
    ax.set_xlabel("H^1 = -p1 ln p1 (query/post_ntk)")
    ax.set_ylabel("attention on the first token (last 32 queries)")
    ax.set_title(f"{summary['length'] // 1024}K{' noisy' if summary['noisy'] else ''}: Spearman "
                 f"{summary['spearman_h1_sink']:+.2f} [{summary['spearman_h1_sink_ci'][0]:+.2f}, "
                 f"{summary['spearman_h1_sink_ci'][1]:+.2f}]")
    ax.legend(fontsize=8)
    fig.savefig(out / "scores_vs_sink.png", dpi=120)

    fig = Figure(figsize=(9, 8), layout="constrained")
    for r, ((layer, head), maps) in enumerate(window.items()):
        for c, (name, m) in enumerate(maps.items()):
            ax = fig.add_subplot(2, 2, 2 * r + c + 1)
            im = ax.imshow(m.clamp_min(1e-4).log10() if name == "attention" else m, cmap="magma", aspect="auto",
                           interpolation="nearest")
            fig.colorbar(im, ax=ax, label="log10 weight" if name == "attention" else "cosine")
            j = layer * H + head
            ax.set_title(f"head ({layer}, {head}), H^1 {h1[j]:.2f}, sink {sink[j]:.2f}: {name}", fontsize=9)
            ax.set_xlabel("key position" if name == "attention" else "query position")
            ax.set_ylabel("query position")
    fig.savefig(out / "window_maps.png", dpi=110)

    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.semilogy(last_row.mean(dim=(0, 1)).clamp_min(1e-9), lw=0.6)
    a, b = summary["spans"]["needle"]
    ax.axvspan(a, b, color="red", alpha=0.3, label="needle")
    ax.set_xlabel("key position")
    ax.set_ylabel("attention (mean over heads)")
    ax.set_title("the answer position's attention along the prompt")
    ax.legend(fontsize=8)
    fig.savefig(out / "answer_attention.png", dpi=120)


def plot_multiples(folders, out: Path):
    """One panel per setting: H^1 against sink mass, the rule's and the random heads marked."""
    from matplotlib.figure import Figure

    rows = sorted((json.loads((Path(f) / "sinks.json").read_text()) for f in folders),
                  key=lambda s: (s["length"], s["noisy"]))
    fig = Figure(figsize=(3.2 * len(rows), 3.4), layout="constrained")
    for i, s in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        h1, sink = torch.tensor(s["scores"]["h1"]).flatten(), torch.tensor(s["mass"]["first"]).flatten()
        H = len(s["scores"]["h1"][0])
        ax.scatter(h1, sink, s=6, c="0.6")
        for name, color in (("parts/asc", "red"), ("parts/flat", "tab:blue"), ("parts/random0", "black")):
            j = [h["head"][0] * H + h["head"][1] for h in s["head_sets"].get(name, [])]
            ax.scatter(h1[j], sink[j], s=30, facecolors="none", edgecolors=color, label=name)
        ax.set_title(f"{s['multiple']:g}x{' noisy' if s['noisy'] else ''}: rho {s['spearman_h1_sink']:+.2f}",
                     fontsize=9)
        ax.set_xlabel("H^1")
        if i == 0:
            ax.set_ylabel("attention on the first token")
            ax.legend(fontsize=7)
    fig.savefig(out / "scores_vs_sink_by_multiple.png", dpi=120)
    return rows


def heads_arg(text: str) -> list:
    try:
        heads = [[int(v) for v in item.split(":")] for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: heads are layer:head pairs, e.g. 19:0,11:1") from None
    if any(len(h) != 2 for h in heads):
        raise argparse.ArgumentTypeError(f"{text!r}: heads are layer:head pairs, e.g. 19:0,11:1")
    return heads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Attention sinks against head scores (python -m nih.sinks).")
    p.add_argument("--len", type=parse_len, default=4096, help="prompt length (4k, 24k, ...; default 4k)")
    p.add_argument("--noisy", type=int, default=0, help="sink tokens after the needle (the paper's noisy setting)")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--out", default="results/sinks", help="where sinks.json and the pictures go")
    p.add_argument("--calib-dir", default=None, help="folder of the setting's calibration (default: --out)")
    p.add_argument("--chunk", type=int, default=0,
                   help="prefill chunk of the probe; 0 (default) = the whole prompt in one pass, as the grid ran")
    p.add_argument("--test-depths", type=lambda v: [float(x) for x in v.split(",")], default=None,
                   help="also probe the grid's test prompts at these depths (trial 0) under each grid method")
    p.add_argument("--records", default=None, help="the grid's folder of results.jsonl, for answers and log p")
    p.add_argument("--no-pictures", dest="pictures", action="store_false")
    p.add_argument("--heads", type=heads_arg, default=None,
                   help="heads whose attention map and query similarity are drawn, as layer:head,... (default: the "
                        "spikiest head, parts/asc's first, and the flattest, parts/flat's first)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--depths", type=int, default=11, help="the grid's depths per setting (6 at 64K): its test prompts")
    p.add_argument("--plot", nargs="+", default=None, help="folders with sinks.json: the by-multiple panel")
    a = p.parse_args(argv)
    if a.noisy < 0:
        p.error(f"--noisy {a.noisy}: the number of sink tokens cannot be negative")
    if a.chunk < 0:
        p.error(f"--chunk {a.chunk}: must be >= 1, or 0 for one pass")
    a.chunk = a.chunk or a.len
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = plot_multiples(args.plot, out)
        for folder in map(Path, args.plot):
            tests = [json.loads(f.read_text()) for f in sorted(folder.glob("test_*.json"))]
            if tests:
                draw_tests(tests, folder)
                print(f"{folder}: measurement 2, {len(tests)} (depth, method) probes")
                for t in test_table(tests):
                    lp = ("" if t["logprob_before"] is None else
                          f"  log p {t['logprob_before']:+.3f} -> {t['logprob_after']:+.3f}")
                    print(f"  depth {t['depth']:.0%} {t['method']:>17}: denoised heads' sink {t['sink_before']:.3f} "
                          f"-> {t['sink_after']:.3f}; needle mass above layer {t['first_layer']} "
                          f"{t['needle_above_before']:.3f} -> {t['needle_above_after']:.3f}; retrieval heads "
                          f"{len(t['retrieval'])}, denoised {t['retrieval_denoised']}{lp}")
        for s in rows:
            h1, first = s["scores"]["h1"], s["mass"]["first"]
            lo, hi = layer_bootstrap(h1, first)
            print(f"{s['length']:>6} noisy={s['noisy']}  rho(H1, sink) {s['spearman_h1_sink']:+.3f} "
                  f"[{s['spearman_h1_sink_ci'][0]:+.3f}, {s['spearman_h1_sink_ci'][1]:+.3f}]  within layers "
                  f"{within_layers(h1, first):+.3f} [{lo:+.3f}, {hi:+.3f}]  rho(p1, sink) {s['spearman_p1_sink']:+.3f}"
                  f"  sink heads {s['sink_heads']:.0%}  median sink of " + ", ".join(
                      f"{name} {statistics.median(h['sink'] for h in heads):.2f}"
                      for name, heads in s["head_sets"].items() if name.startswith("parts")))
        return 0
    if Path(args.model) == DEFAULT_MODEL_DIR:
        ensure_weights()
    s = measure(args)
    print(json.dumps({k: s[k] for k in ("length", "noisy", "spearman_h1_sink", "spearman_h1_sink_ci",
                                        "spearman_p1_sink", "spearman_vanilla_sink", "sink_heads")}, indent=1))
    for name, heads in s["head_sets"].items():
        print(f"{name:>18}: sink mass {[h['sink'] for h in heads]}, rank among {len(s['mass']['first']) * len(s['mass']['first'][0])} heads "
              f"{[h['rank'] for h in heads]}")
    print(f"wrote {Path(args.out) / 'sinks.json'}" + (" and its pictures" if args.pictures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
