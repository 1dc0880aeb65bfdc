"""
Tables, verdicts and pictures for the needle-in-a-haystack records that eval_nih.py writes (one JSON line per prompt
and method). Needs no model: `python eval_nih.py --summarize DIR ...` rebuilds everything from the records.

Decision rules, declared once and used for every row, setting and pooled table:
- accuracy: a method differs from the baseline (or a rule from its random-head control) when Newcombe's paired 95%
  interval of the accuracy difference excludes 0 (stats.paired);
- answer log-probability: it is higher or lower when the exact 95% interval of the median paired difference excludes
  0 (stats.paired_median: the sign test's own interval, so the interval and the test cannot disagree).
The mean of the log-probability differences is shown too, as a description only.
"""

import json
import math
import os
import re
import statistics
import warnings
from pathlib import Path

from nih.stats import median_shift, newcombe_paired, paired, paired_median, paired_table, wilson

RULES = ("Decision rules: an accuracy difference counts when Newcombe's paired 95% interval excludes 0; a "
         "log-probability shift counts when the exact 95% interval of the median paired difference (the sign test's "
         "interval) excludes 0.")


# -----------------------------------------------------------------------------
# Records: append-only JSONL, resumable across machines


def load_done(results: Path) -> dict:
    """cell -> record. A torn last line (an interrupted write: text after the last newline that is not a record) is
    dropped with a warning naming the file and line; any other line that is not a record stops the run, naming the
    file and line."""
    done = {}
    if not results.exists():
        return done
    lines = results.read_bytes().split(b"\n")
    offset = 0
    for i, raw in enumerate(lines):
        torn = i == len(lines) - 1  # no newline after it: the write did not finish
        if raw.strip():
            try:
                r = json.loads(raw)
                if not isinstance(r, dict) or "cell" not in r:
                    raise ValueError("not a record with a 'cell' field")
                done[r["cell"]] = r
                if torn:  # a whole record whose newline was lost: complete it
                    with open(results, "ab") as f:
                        f.write(b"\n")
            except ValueError as e:
                if not torn:
                    raise SystemExit(f"error: {results}, line {i + 1}: not a JSON record ({e}); remove or fix that "
                                     "line (every other line is a finished cell)") from None
                warnings.warn(f"{results}, line {i + 1}: a torn last line (an interrupted write) was dropped; "
                              "its cell runs again")
                with open(results, "r+b") as f:
                    f.truncate(offset)
        offset += len(raw) + 1
    return done


def append_record(results: Path, rec: dict):
    """One line per finished cell, flushed to disk: an interruption loses at most the cell being written."""
    with results.open("ab") as f:
        f.write((json.dumps(rec) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


# -----------------------------------------------------------------------------
# Tables and verdicts


def _prompt(r):
    return r["length"], r["noisy"], r["depth"], r["trial"]


def _pct(x):
    return f"{100 * x:+.1f}"


def shift(lp: dict) -> str:
    """The log-probability rule: higher / lower when the median's interval excludes 0."""
    return "higher" if lp["lo"] > 0 else "lower" if lp["hi"] < 0 else "unchanged"


def verdict(vs_base: dict, vs_ctrl: dict | None) -> str:
    """The accuracy rule: a difference counts only when its 95% interval excludes zero."""
    if vs_base["lo"] > 0:
        if vs_ctrl is None:
            return "gain over the baseline (no control run)"
        return "gain beyond the random-head control" if vs_ctrl["lo"] > 0 else \
            "gain over the baseline, but not beyond the random-head control"
    if vs_base["hi"] < 0:
        return "harm"
    return "no difference"


def control_of(rows_by_name: dict, variant: str):
    """The control a rule is judged against: its variant's first random head set (random0)."""
    for name in (f"{variant}/random0", f"{variant}~random"):  # the second: records of earlier versions
        if name in rows_by_name:
            return name
    return None


def _ival(x, fmt):
    lo = "-inf" if x["lo"] == -math.inf else format(x["lo"], fmt)
    hi = "inf" if x["hi"] == math.inf else format(x["hi"], fmt)
    return f"[{lo}, {hi}]"


def table(grp: list, title: str, label: str) -> tuple[list, list]:
    """The markdown table of one group of rows, and one verdict line per rule."""
    verdicts = []
    lines = ["", f"### {title}", "",
             "| method | role | heads | correct | accuracy [95% CI] | mean log p | vs baseline: accuracy [95% CI] "
             "(b/c) | vs baseline: median log p [95% CI] (-/+) | vs random0: accuracy [95% CI] | "
             "vs random0: median log p [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["method"] for r in grp))
    by = {n: {_prompt(r): r for r in grp if r["method"] == n} for n in names}
    sweep = [n for n in names if next(iter(by[n].values()))["role"] == "sweep"]
    best = max(sweep, key=lambda n: (sum(r["score"] for r in by[n].values()),
                                     sum(r["logprob"] for r in by[n].values()))) if sweep else None
    for n in names:
        cells = by[n]
        first = next(iter(cells.values()))
        s = [r["score"] for r in cells.values()]
        lo, hi = wilson(sum(s), len(s))
        role = first["role"] + (" (best of sweep on the test prompts)" if n == best else "")
        heads = str([tuple(h) for h in first["heads"]]) if first["heads"] else "-"
        if len(heads) > 40:
            heads = f"{len(first['heads'])} heads"
        if label == "pooled" and first["heads"]:
            heads = "per setting"
        row = [n, role, heads, f"{sum(s)}/{len(s)}", f"{100 * sum(s) / len(s):.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]",
               f"{sum(r['logprob'] for r in cells.values()) / len(s):.2f}"]
        vs_base = lp = vs_ctrl = lp_ctrl = None
        common = sorted(set(cells) & set(by.get("none", {})))
        if n != "none" and common:
            vs_base = paired([by["none"][i]["score"] for i in common], [cells[i]["score"] for i in common])
            lp = paired_median([by["none"][i]["logprob"] for i in common], [cells[i]["logprob"] for i in common])
            row += [f"{_pct(vs_base['diff'])} [{_pct(vs_base['lo'])}, {_pct(vs_base['hi'])}] "
                    f"({vs_base['b']}/{vs_base['c']})",
                    f"{lp['diff']:+.3f} {_ival(lp, '+.3f')} ({lp['neg']}-/{lp['pos']}+)"]
        else:
            row += ["", ""]
        ctrl = control_of(by, first["variant"])
        if first["role"] in ("rule", "sweep") and ctrl:
            both = sorted(set(cells) & set(by[ctrl]))
            vs_ctrl = paired([by[ctrl][i]["score"] for i in both], [cells[i]["score"] for i in both])
            lp_ctrl = paired_median([by[ctrl][i]["logprob"] for i in both], [cells[i]["logprob"] for i in both])
            row += [f"{_pct(vs_ctrl['diff'])} [{_pct(vs_ctrl['lo'])}, {_pct(vs_ctrl['hi'])}]",
                    f"{lp_ctrl['diff']:+.3f} {_ival(lp_ctrl, '+.3f')}"]
        else:
            row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
        if first["role"] == "rule" and vs_base is not None:
            v = (f"{label}, DoPE {n}: {verdict(vs_base, vs_ctrl)} (accuracy {_pct(vs_base['diff'])} pts "
                 f"[{_pct(vs_base['lo'])}, {_pct(vs_base['hi'])}]); log p of the answer {shift(lp)} "
                 f"(median {lp['diff']:+.3f} {_ival(lp, '+.3f')})")
            if lp_ctrl is not None:
                v += f"; against its random control the log p is {shift(lp_ctrl)} (median {lp_ctrl['diff']:+.3f})"
            verdicts.append(v)
    lines += spread(by)
    lines += timing(grp)
    return lines, verdicts


def spread(by: dict) -> list:
    """Where a variant has several random head sets, how far apart they land."""
    out = []
    for variant in sorted({next(iter(c.values()))["variant"] for c in by.values()}):
        sets = [n for n in by if n.startswith(f"{variant}/random")]
        if len(sets) > 1:
            acc = [sum(r["score"] for r in by[n].values()) / len(by[n]) for n in sets]
            lp = [statistics.mean(r["logprob"] for r in by[n].values()) for n in sets]
            out.append(f"- {variant}: {len(sets)} random head sets, accuracy {100 * min(acc):.0f}% to "
                       f"{100 * max(acc):.0f}%, mean log p {min(lp):.2f} to {max(lp):.2f}")
    return ["", "Spread of the random-head controls:", ""] + out if out else []


def timing(grp: list) -> list:
    """Seconds spent (wall-clock: read them only from a run on an otherwise idle machine)."""
    if not all("prefill_seconds" in r for r in grp):
        return []
    runs = {(*_prompt(r), r["variant"], json.dumps(r["heads"])): r for r in grp}
    pre = sum(r["prefill_seconds"] for r in runs.values())
    dec = sum(r.get("decode_seconds", 0.0) for r in runs.values())
    modes = sorted({r.get("reuse", "layers") for r in grp})
    return ["", f"Work: {len(runs)} distinct (prompt, head set) runs, {pre:.0f} s of tail prefills and {dec:.0f} s of "
                f"decoding (reuse: {', '.join(modes)}; shared-prefix prefills are not in these rows; wall-clock)."]


def summarize(rows: list, out: Path, earlier: list | None = None) -> list:
    """Per (length, noise): accuracy with a 95% Wilson interval and the mean log-probability of the right answer for
    every method, each method against the baseline and each rule against its random control on the same prompts,
    and a verdict per rule. With several settings, one more table pools their prompts (each prompt is still a pair;
    a method name then means each setting's own rule). With several context multiples (or `earlier` settings, as
    counts from earlier_counts), a table by multiple beside the paper's Table 1. Printed and written to
    out/summary.md with the heatmaps and the plot against the context multiple. Returns the verdict lines."""
    if not rows:
        return []
    lines, verdicts, per_setting = [], [], list(earlier or [])
    groups = sorted({(r["length"], r["noisy"]) for r in rows})
    for L, noisy in groups:
        grp = [r for r in rows if r["length"] == L and r["noisy"] == noisy]
        per_setting += counts(grp)
        n_prompts = len({(r["depth"], r["trial"]) for r in grp})
        title = (f"{grp[0]['model']}, {L} tokens{_multiple(grp[0])}, noisy={noisy}: {n_prompts} prompts "
                 f"({len({r['depth'] for r in grp})} depths x {len({r['trial'] for r in grp})} needles)")
        more, said = table(grp, title, f"{L} tokens, noisy={noisy}")
        lines, verdicts = lines + more, verdicts + said
    if len(groups) > 1:
        title = (f"{rows[0]['model']}, pooled over {len(groups)} settings "
                 f"({', '.join(f'{L}/noisy={n}' for L, n in groups)}): "
                 f"{len({_prompt(r) for r in rows})} prompts; each method is each setting's own rule")
        more, said = table(rows, title, "pooled")
        lines, verdicts = lines + more, verdicts + said
    lines += ["", "Verdicts. " + RULES, ""] + [f"- {v}" for v in verdicts]
    multiples = all(c["native"] for c in per_setting) and len({_times(c) for c in per_setting}) > 1
    if multiples:
        lines += multiple_table(per_setting)
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(text.lstrip() + "\n")
    for noisy in sorted({r["noisy"] for r in rows}):
        plot_heatmap([r for r in rows if r["noisy"] == noisy and r["role"] != "sweep"],
                     out / f"heatmap_noisy{noisy}.png", noisy)
    if multiples:
        plot_by_multiple(per_setting, out / "by_multiple.png")
    return verdicts


def _multiple(r):
    return f" ({r['length'] / r['native']:.0f}x native)" if r.get("native") else ""


def plot_heatmap(rows, path, noisy):
    """gkamradt-style: depth on the y axis, one column per method (and a panel per length), red = miss; a cell is
    the fraction of its needles retrieved."""
    if not rows:
        return
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.figure import Figure

    lengths = sorted({r["length"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    ds = sorted({r["depth"] for r in rows})
    cmap = LinearSegmentedColormap.from_list("nih", ["#F0496E", "#EBB839", "#0CD79F"])
    fig = Figure(figsize=(2.2 + 1.0 * len(names) * len(lengths), 1.5 + 0.35 * len(ds)), layout="constrained")
    axes = fig.subplots(1, len(lengths), squeeze=False)[0]
    for ax, L in zip(axes, lengths):
        grid = [[_mean([r["score"] for r in rows if r["length"] == L and r["method"] == n and r["depth"] == d])
                 for n in names] for d in ds]
        im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, val in enumerate(row):
                if not math.isnan(val):
                    ax.text(j, i, f"{val:.2g}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(names)), [("baseline" if n == "none" else n) for n in names], rotation=30, ha="right")
        ax.set_yticks(range(len(ds)), [f"{100 * d:.0f}%" for d in ds])
        n = len({r["trial"] for r in rows if r["length"] == L})
        ax.set_title(f"{L} tokens ({n} needle{'s' * (n > 1)} per cell)")
        ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=axes, label="fraction retrieved")
    fig.suptitle(f"{rows[0]['model']}: needle in a haystack{' (noisy: %d sinks)' % noisy if noisy else ''}")
    fig.savefig(path, dpi=110)
    print(f"heatmap: {path}")


def plot_by_multiple(per_setting, path):
    """Accuracy and mean answer log-probability against the context multiple (length / native), from counts
    (earlier settings included): a row of panels per noise setting, one colour per variant and reading of the rule
    (the same in every panel), a rule solid and its variant's random head sets dotted, pooled into one line; the
    number of prompts under each point."""
    from matplotlib.figure import Figure

    def label(c):
        return f"{c['variant']}/random" if c["role"] == "random" else c["method"]

    names = list(dict.fromkeys(label(c) for c in per_setting if c["role"] != "sweep"))
    rules = [n for n in names if not n.endswith("/random") and n != "none"]
    colour = {"none": "black"} | {n: f"C{i}" for i, n in enumerate(rules)}
    for n in names:  # a control takes the colour of its variant's first rule
        colour.setdefault(n, next((colour[r] for r in rules if r.split("/")[0] == n.split("/")[0]), "grey"))
    settings = sorted({c["noisy"] > 0 for c in per_setting})
    xs_all = sorted({_times(c) for c in per_setting})
    fig = Figure(figsize=(11, 3.6 * len(settings)), layout="constrained")
    axes = fig.subplots(len(settings), 2, squeeze=False)
    for (ax_acc, ax_lp), noisy in zip(axes, settings):
        mine = [c for c in per_setting if (c["noisy"] > 0) == noisy and c["role"] != "sweep"]
        for name in names:
            pts = {}
            for c in mine:
                if label(c) == name:
                    pts.setdefault(_times(c), []).append(c)
            if not pts:
                continue
            xs = sorted(pts)
            n = [sum(c["n"] for c in pts[x]) for x in xs]
            acc = [100 * sum(c["correct"] for c in pts[x]) / k for x, k in zip(xs, n)]
            lp = [sum(c["logprob"] * c["n"] for c in pts[x]) / k for x, k in zip(xs, n)]
            style = dict(color=colour[name], marker="o", ms=4, label="baseline" if name == "none" else name,
                         ls=":" if name.endswith("/random") else "-", lw=2.2 if name == "none" else 1.4)
            ax_acc.plot(xs, acc, **style)
            ax_lp.plot(xs, lp, **style)
        prompts = {x: max((c["n"] for c in mine if _times(c) == x and c["method"] == "none"), default=0)
                   for x in xs_all}
        for ax, what in ((ax_acc, "accuracy (%)"), (ax_lp, "mean log p of the answer")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [f"{x:g}x\nn={prompts[x]}" if prompts[x] else f"{x:g}x" for x in xs_all])
            ax.minorticks_off()
            ax.set_ylabel(what)
            ax.set_title(f"{'noisy' if noisy else 'original'} needle, by context / native context", fontsize=9)
            ax.grid(alpha=0.3)
        ax_lp.legend(fontsize=7, loc="best")
    fig.suptitle(f"{per_setting[0]['model']}: needle in a haystack against the context multiple")
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# -----------------------------------------------------------------------------
# By context multiple, from counts: what the two rules need, per setting and method

# Table 1 of the paper (LLaMA-3-8B-Instruct, 8K native, Dynamic NTK, 11 depths; accuracy in %): the baseline and the
# best DoPE row of its sweep (picked on the test prompts), by (context multiple, noisy). The paper's noisy prompts
# carry an unstated number of sink tokens (this project's carry 4); it gives no best row for original 24K.
PAPER_TABLE1 = {(3, True): ("75.4", "84.4: by-Gaussian, key, H^32, 3 heads"),
                (3, False): ("91.9", "-"),
                (8, True): ("40.4", "46.0: by-all, key, H^8, 1 head"),
                (8, False): ("60.9", "70.1: by-Gaussian or by-all, query, H^1, 5 heads")}


def _times(c):
    return round(c["length"] / c["native"], 2)


def counts(grp: list) -> list:
    """One setting's records as counts, one dict per method: n, correct, the mean answer log p, and for every method
    but the baseline the paired 2x2 table against the baseline ("base": a, b, c, d) and the sign counts of its log-p
    differences ("base_signs": negative, positive, n); for a rule the same against its random control ("ctrl",
    "ctrl_signs"). Both decision rules are functions of these counts alone (stats.newcombe_paired,
    stats.median_shift), so settings whose per-prompt records were not kept are judged the same way."""
    names = list(dict.fromkeys(r["method"] for r in grp))
    by = {n: {_prompt(r): r for r in grp if r["method"] == n} for n in names}
    out = []
    for n in names:
        cells, first = by[n], next(iter(by[n].values()))
        c = dict(model=first["model"], length=first["length"], noisy=first["noisy"], native=first.get("native"),
                 method=n, variant=first["variant"], role=first["role"], n=len(cells),
                 correct=sum(r["score"] for r in cells.values()), logprob=_mean([r["logprob"] for r in cells.values()]))
        for key, other in (("base", "none" if n != "none" else None),
                           ("ctrl", control_of(by, first["variant"]) if first["role"] in ("rule", "sweep") else None)):
            if other in by:
                common = sorted(set(cells) & set(by[other]))
                c[key] = paired_table([by[other][i]["score"] for i in common], [cells[i]["score"] for i in common])
                lp = paired_median([by[other][i]["logprob"] for i in common], [cells[i]["logprob"] for i in common])
                c[f"{key}_signs"] = (lp["neg"], lp["pos"], len(common))
        out.append(c)
    return out


_EARLIER_NAMES = {"parts": "parts/asc", "gaussian": "gaussian/asc"}  # the 5 lowest H^1 on query/post_ntk


def earlier_counts(path, native: int) -> list:
    """The per-setting tables of a summary.md written by eval_nih.py at commit b671c0d (SmolLM2 at 1x and 2x, whose
    per-prompt records were not kept), read back as counts (see counts). Its columns give each method's correct
    count, mean log p, discordant pairs b/c against the baseline and the control, and the log-p sign counts against
    the baseline (not against the control). Its by-parts and by-Gaussian rules are this version's parts/asc and
    gaussian/asc; its controls drew random heads per prompt."""
    text = Path(path).read_text()
    out, setting = [], None

    def flush():
        if setting:
            out.extend(_earlier_setting(*setting))

    for line in text.splitlines():
        if line.startswith("### "):
            flush()
            m = re.match(r"### (.+?), (\d+) tokens, noisy=(\d+): ", line)
            setting = (m[1], int(m[2]), int(m[3]), native, []) if m else None
        elif setting and line.startswith("| ") and not line.startswith(("| method", "|---")):
            setting[4].append([x.strip() for x in line.strip().strip("|").split("|")])
    flush()
    if not out:
        raise SystemExit(f"error: {path} holds no per-setting table in the format of commit b671c0d's summary.md "
                         "(for results of this version, give their folder to --summarize)")
    return out


def _earlier_setting(model, length, noisy, native, table_rows) -> list:
    def pair(cell):
        m = re.search(r"\((\d+)/(\d+), p=", cell)
        return (int(m[1]), int(m[2])) if m else None

    correct = {r[0]: tuple(map(int, r[3].split("/"))) for r in table_rows}
    out = []
    for r in table_rows:
        name, role = r[0], r[1]
        variant = name.split("~")[0]
        k, n = correct[name]
        c = dict(model=model, length=length, noisy=noisy, native=native, variant=variant, role=role, n=n, correct=k,
                 method=f"{variant}/random" if role == "random" else _EARLIER_NAMES.get(name, name),
                 logprob=float(r[5]))
        if name != "none":
            b, cc = pair(r[6])
            a = correct["none"][0] - b
            c["base"] = (a, b, cc, n - a - b - cc)
            m = re.search(r"\((\d+)-/(\d+)\+", r[7])
            c["base_signs"] = (int(m[1]), int(m[2]), n)
        if role == "rule" and len(r) > 8 and pair(r[8]):
            b, cc = pair(r[8])
            a = correct[f"{variant}~random"][0] - b
            c["ctrl"] = (a, b, cc, n - a - b - cc)
        out.append(c)
    return out


def _pool(cs: list) -> dict:
    """Counts of one method over several settings (each prompt still a pair): every count adds up."""
    c = dict(cs[0], n=sum(x["n"] for x in cs), correct=sum(x["correct"] for x in cs),
             logprob=sum(x["logprob"] * x["n"] for x in cs) / sum(x["n"] for x in cs))
    for key in ("base", "base_signs", "ctrl", "ctrl_signs"):
        if all(key in x for x in cs):
            c[key] = tuple(map(sum, zip(*(x[key] for x in cs))))
        else:
            c.pop(key, None)
    return c


def _judged(c: dict, key: str) -> str:
    """'+' / '−' / '=' for accuracy (Newcombe's interval), then, where sign counts exist, '↑' / '↓' / '=' for the
    answer's log p (stats.median_shift)."""
    lo, hi = newcombe_paired(*c[key])
    acc = "+" if lo > 0 else "−" if hi < 0 else "="
    if f"{key}_signs" not in c:
        return acc
    return acc + " / " + {"higher": "↑", "lower": "↓", "unchanged": "="}[median_shift(*c[f"{key}_signs"])]


def multiple_table(per_setting: list) -> list:
    """The verdicts by context multiple: one row per setting and one pooling the settings of a multiple, a column
    per rule, the paper's Table 1 beside them."""
    top = max(map(_times, per_setting))  # the rules of the longest context first, in their order, then the others
    rules = list(dict.fromkeys([c["method"] for c in per_setting if c["role"] == "rule" and _times(c) == top] +
                               [c["method"] for c in per_setting if c["role"] == "rule"]))
    settings = {}
    for c in per_setting:
        settings.setdefault((_times(c), c["noisy"], c["length"]), {})[c["method"]] = c
    lines = ["", "### By context multiple", "",
             "Each cell: correct / prompts; against the baseline, accuracy (+ gain, − harm, = no difference: "
             "Newcombe's paired 95% interval) / answer log p (↑ higher, ↓ lower, = unchanged: the median's exact "
             "95% interval); then the same against the rule's random-head control. Paper: LLaMA-3-8B-Instruct, Table 1 "
             "(accuracy %, its best DoPE row picked on its test prompts).", "",
             "| multiple | setting | prompts | baseline | " + " | ".join(rules) +
             " | paper: Dynamic NTK | paper: best DoPE |",
             "|---" * (6 + len(rules)) + "|"]

    def row(x, label, methods, paper):
        base = methods.get("none")
        cells = [f"{x:g}x", label, str(base["n"]) if base else "-",
                 f"{base['correct']}/{base['n']} ({100 * base['correct'] / base['n']:.0f}%)" if base else "-"]
        for name in rules:
            c = methods.get(name)
            if c is None:
                cells.append("not run")
                continue
            cell = f"{c['correct']}/{c['n']}"
            if "base" in c:
                cell += f"; {_judged(c, 'base')}"
            if "ctrl" in c:
                cell += f"; vs random {_judged(c, 'ctrl')}"
            cells.append(cell)
        return "| " + " | ".join(cells + list(paper)) + " |"

    for x in sorted({k[0] for k in settings}):
        keys = sorted((k for k in settings if k[0] == x), key=lambda k: (k[1] > 0, k[2]))
        for k in keys:
            label = f"{k[2] // 1024}K {'noisy' if k[1] else 'original'}"
            lines.append(row(x, label, settings[k], PAPER_TABLE1.get((x, k[1] > 0), ("-", "-"))))
        if len(keys) > 1:
            names = dict.fromkeys(m for k in keys for m in settings[k])
            pooled = {m: _pool([settings[k][m] for k in keys if m in settings[k]]) for m in names
                      if all(m in settings[k] for k in keys)}
            lines.append(row(x, "both, pooled", pooled, ("", "")))
    return lines


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_dirs(dirs, out: Path, earlier=None) -> list:
    """--summarize: the summary of finished runs, without loading a model (earlier: a summary.md of settings whose
    records were not kept, read by earlier_counts into the table by multiple)."""
    rows = []
    for d in dirs:
        f = Path(d) / "results.jsonl"
        if not f.is_file():
            raise SystemExit(f"error: {f} does not exist (give folders that an eval_nih.py run wrote to)")
        rows += load_done(f).values()
    if not rows:
        raise SystemExit(f"error: no results in {', '.join(map(str, dirs))}")
    if earlier:
        old = earlier_counts(earlier, rows[0]["native"])
        if old[0]["model"] != rows[0]["model"]:
            raise SystemExit(f"error: {earlier} is about {old[0]['model']}, the results about {rows[0]['model']}")
        return summarize(rows, Path(out), old)
    return summarize(rows, Path(out))
