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
import re
import statistics
from pathlib import Path

from nih.records import load_done, write_atomic
from nih.stats import (detectable_gain, detectable_shift, gain_power, holm, mean_interval, median_p, median_shift,
                       newcombe_p, newcombe_paired, paired_median, wilson)

RULES = ("Decision rules: an accuracy difference counts when Newcombe's paired 95% interval excludes 0; a "
         "log-probability shift counts when the exact 95% interval of the median paired difference (the sign test's "
         "interval) excludes 0. Pooled, a prompt that settings share (they differ only in sink tokens) counts once: "
         "the mean of its settings' pairs.")


# -----------------------------------------------------------------------------
# Pairs: one per prompt, and a prompt that several settings share counted once


def _prompt(r):
    return r["length"], r["noisy"], r["depth"], r["trial"]


def _unit(prompt):
    """The prompt behind a _prompt key whatever its sink tokens: settings that differ only in noise share the
    haystack, the depth and the needle (eval_nih seeds the needle by length, depth and trial), so their answers are
    not independent samples; pooled, such a prompt is one unit."""
    return prompt[0], prompt[2], prompt[3]


def strict(answer: str, expected: str) -> int:
    """The strict match: 1 when the answer's first number (its first run of the digits 0-9) is the expected number,
    digit for digit. RULER's string match (what eval_nih scores) also counts the number inside a longer one
    ("824772727" for 8247727) or after another number; the strict match is right only where the string match is."""
    m = re.search(r"[0-9]+", answer)
    return int(m is not None and m.group() == expected)


def _per_unit(cells: dict, value) -> list:
    """value(record) per unit, the mean over the unit's settings: one number per unit."""
    units = {}
    for p, r in cells.items():
        units.setdefault(_unit(p), []).append(value(r))
    return [sum(v) / len(v) for v in units.values()]


def _strict_count(cells: dict):
    """Strict-match answers, counted per unit as the scores are (None when the records keep no answers)."""
    if not all("answer" in r and "expected" in r for r in cells.values()):
        return None
    return sum(_per_unit(cells, lambda r: strict(r["answer"], r["expected"])))


def pairs(base: dict, method: dict) -> tuple:
    """method against base ({prompt: record} each) on their common prompts, one pair per unit: the paired table
    (a, b, c, d) of the 0/1 scores (both right, base only, method only, both wrong), the K settings of a unit
    weighing 1/K each (cells may then be fractional), and each unit's log-p difference, the mean over its settings.
    Settings that share no prompt give the plain paired table and differences."""
    units = {}
    for p in sorted(set(base) & set(method)):
        units.setdefault(_unit(p), []).append((base[p], method[p]))
    cells, diffs = [0, 0, 0, 0], []
    for prs in units.values():
        for x, y in prs:
            cells[0 if x["score"] and y["score"] else 1 if x["score"] else 2 if y["score"] else 3] += \
                1 if len(prs) == 1 else 1 / len(prs)
        diffs.append(sum(y["logprob"] - x["logprob"] for x, y in prs) / len(prs))
    return tuple(cells), diffs


def compare(base: dict, method: dict) -> tuple[dict, dict]:
    """Both decision rules for method against base, on pairs(base, method): accuracy (diff, lo, hi, b, c, p, table)
    by Newcombe's interval, answer log p (diff = the median, lo, hi, mean, neg, pos, p, diffs) by the median's
    exact interval; p is each rule's own p-value (stats.newcombe_p, stats.median_p), for Holm's correction."""
    table, diffs = pairs(base, method)
    a, b, c, d = table
    lo, hi = newcombe_paired(*table)
    acc = dict(diff=(c - b) / len(diffs), lo=lo, hi=hi, b=b, c=c, p=newcombe_p(*table), table=table)
    lp = paired_median([0.0] * len(diffs), diffs)
    lp.update(p=median_p(lp["neg"], lp["pos"], len(diffs)), diffs=diffs)
    return acc, lp


# -----------------------------------------------------------------------------
# Tables and verdicts


def _pct(x):
    return f"{100 * x:+.1f}"


def _n(x):
    """A count: whole, or to one decimal where units average settings (8.5 of 11)."""
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def shift(lp: dict) -> str:
    """The log-probability rule: higher / lower when the median's interval excludes 0."""
    return "higher" if lp["lo"] > 0 else "lower" if lp["hi"] < 0 else "unchanged"


EXTENSION_NAMES = {"yarn": "YaRN", "selfextend": "Self-Extend"}  # eval_nih's other training-free extensions


def verdict(vs_base: dict, vs_ctrl: list | dict | None) -> str:
    """The accuracy rule: a difference counts only when its 95% interval excludes zero; a gain is the entropy rule's
    only when it also beats every random-head control (with several, each at 95%: an intersection-union test)."""
    ctrls = [vs_ctrl] if isinstance(vs_ctrl, dict) else list(vs_ctrl or [])
    if vs_base["lo"] > 0:
        if not ctrls:
            return "gain over the baseline (no control run)"
        if all(c["lo"] > 0 for c in ctrls):
            return "gain beyond the random-head control" + (f"s (all {len(ctrls)})" if len(ctrls) > 1 else "")
        return "gain over the baseline, but not beyond the random-head control" + ("s" if len(ctrls) > 1 else "")
    if vs_base["hi"] < 0:
        return "harm"
    return "no difference"


def controls_of(rows_by_name: dict, variant: str) -> list:
    """The controls a rule is judged against: its variant's random head sets (random0, random1, ...)."""
    sets = sorted((n for n in rows_by_name if re.fullmatch(re.escape(variant) + r"/random\d+", n)),
                  key=lambda n: int(n.rsplit("random", 1)[1]))
    legacy = f"{variant}~random"  # records of earlier versions
    return sets or ([legacy] if legacy in rows_by_name else [])


def control_of(rows_by_name: dict, variant: str):
    """The control shown beside a rule in the tables: its variant's first random head set (random0)."""
    sets = controls_of(rows_by_name, variant)
    return sets[0] if sets else None


def _ival(x, fmt):
    lo = "-inf" if x["lo"] == -math.inf else format(x["lo"], fmt)
    hi = "inf" if x["hi"] == math.inf else format(x["hi"], fmt)
    return f"[{lo}, {hi}]"


def _acc_text(x):
    return f"{_pct(x['diff'])} [{_pct(x['lo'])}, {_pct(x['hi'])}]"


def table(grp: list, title: str, label: str) -> tuple[list, list, list, list]:
    """The markdown table of one group of rows (a setting, or settings pooled by unit), one verdict line per rule,
    the comparisons it judged (for Holm's correction) and each rule's power (what these prompts could detect)."""
    verdicts, comps, power = [], [], []
    lines = ["", f"### {title}", "",
             "| method | role | heads | correct | strict match | accuracy [95% CI] | mean log p | vs baseline: "
             "accuracy [95% CI] (b/c) | vs baseline: median log p [95% CI] (-/+) | vs random0: accuracy [95% CI] | "
             "vs random0: median log p [95% CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(r["method"] for r in grp))
    by = {n: {_prompt(r): r for r in grp if r["method"] == n} for n in names}
    most = max(len(by[n]) for n in names)
    if label != "pooled" and any(len(by[n]) < most for n in names):  # pooled: a method of fewer settings, by design
        short = ", ".join(f"{n} {len(by[n])}" for n in names if len(by[n]) < most)
        lines[3:3] = [f"**Incomplete**: not every method has answered every prompt ({short} of {most}: a run still "
                      "going, or stopped). Each comparison pairs only the prompts both sides answered; a "
                      "pre-declared run is read only once complete.", ""]
    sweep = [n for n in names if next(iter(by[n].values()))["role"] == "sweep"]
    best = max(sweep, key=lambda n: (sum(r["score"] for r in by[n].values()),
                                     sum(r["logprob"] for r in by[n].values()))) if sweep else None
    for n in names:
        cells = by[n]
        first = next(iter(cells.values()))
        s = _per_unit(cells, lambda r: r["score"])
        k, m = sum(s), len(s)
        lo, hi = wilson(k, m)
        role = first["role"] + (" (best of sweep on the test prompts)" if n == best else "")
        heads = str([tuple(h) for h in first["heads"]]) if first["heads"] else "-"
        if len(heads) > 40:
            heads = f"{len(first['heads'])} heads"
        if label == "pooled" and first["heads"]:
            heads = "per setting"
        st = _strict_count(cells)
        row = [n, role, heads, f"{_n(k)}/{m}", "-" if st is None else f"{_n(st)}/{m}",
               f"{100 * k / m:.1f}% [{100 * lo:.0f}, {100 * hi:.0f}]",
               f"{_mean(_per_unit(cells, lambda r: r['logprob'])):.2f}"]
        vs_base = lp = None
        if n != "none" and set(cells) & set(by.get("none", {})):
            vs_base, lp = compare(by["none"], cells)
            row += [f"{_acc_text(vs_base)} ({_n(vs_base['b'])}/{_n(vs_base['c'])})",
                    f"{lp['diff']:+.3f} {_ival(lp, '+.3f')} ({lp['neg']}-/{lp['pos']}+)"]
        else:
            row += ["", ""]
        ctrls = controls_of(by, first["variant"]) if first["role"] in ("rule", "sweep") else []
        vs_ctrl = [compare(by[c], cells) for c in ctrls if set(cells) & set(by[c])]
        if vs_ctrl:
            row += [_acc_text(vs_ctrl[0][0]), f"{vs_ctrl[0][1]['diff']:+.3f} {_ival(vs_ctrl[0][1], '+.3f')}"]
        else:
            row += ["", ""]
        lines.append("| " + " | ".join(row) + " |")
        if first["role"] in ("rule", "extension") and vs_base is not None:
            what = f"DoPE {n}" if first["role"] == "rule" else EXTENSION_NAMES.get(n, n)
            said = verdict(vs_base, [a for a, _ in vs_ctrl]) if first["role"] == "rule" else \
                verdict(vs_base, []).removesuffix(" (no control run)")  # another extension: no head set to control
            v = (f"{label}, {what}: {said} (accuracy {_pct(vs_base['diff'])} "
                 f"pts [{_pct(vs_base['lo'])}, {_pct(vs_base['hi'])}]); log p of the answer {shift(lp)} "
                 f"(median {lp['diff']:+.3f} {_ival(lp, '+.3f')})")
            if len(vs_ctrl) == 1:
                x = vs_ctrl[0][1]
                v += f"; against its random control the log p is {shift(x)} (median {x['diff']:+.3f})"
            elif vs_ctrl:
                v += (f"; against its {len(vs_ctrl)} random controls: accuracy gain beyond "
                      f"{sum(a['lo'] > 0 for a, _ in vs_ctrl)} of them, log p higher than "
                      f"{sum(x['lo'] > 0 for _, x in vs_ctrl)}")
            pw = power_of(label, n, vs_base, lp)
            v += f"; {power_text(pw)}"
            verdicts.append(v)
            power.append(pw)
            comps += _comparisons(label, n, vs_base, lp, vs_ctrl)
    lines += spread(by)
    if label != "pooled":
        lines += strict_changes(by)
    lines += timing(grp)
    return lines, verdicts, comps, power


def _comparisons(label, rule, vs_base, lp, vs_ctrl) -> list:
    """The rule's comparisons, as Holm's procedure counts them: accuracy and log p against the baseline, and
    against the random controls (with several, one comparison per measure whose p is the largest of theirs: the
    rule must beat each, an intersection-union test)."""
    out = [dict(label=label, rule=rule, what="accuracy vs baseline", p=vs_base["p"], called=vs_base["lo"] > 0 or
                vs_base["hi"] < 0, est=f"{_acc_text(vs_base)} pts"),
           dict(label=label, rule=rule, what="log p vs baseline", p=lp["p"], called=shift(lp) != "unchanged",
                est=f"{lp['diff']:+.3f} {_ival(lp, '+.3f')} nats")]
    if vs_ctrl:
        k = len(vs_ctrl)
        name = "random control" if k == 1 else f"all {k} random controls"
        for i, what in ((0, "accuracy"), (1, "log p")):
            worst = max((c[i] for c in vs_ctrl), key=lambda x: x["p"])
            same = all(math.copysign(1, c[i]["diff"]) == math.copysign(1, worst["diff"]) for c in vs_ctrl)
            called = same and all((c[i]["lo"] > 0 or c[i]["hi"] < 0) for c in vs_ctrl)
            est = (f"{_acc_text(worst)} pts" if i == 0 else f"{worst['diff']:+.3f} {_ival(worst, '+.3f')} nats")
            out.append(dict(label=label, rule=rule, what=f"{what} vs {name}", p=worst["p"] if same else 1.0,
                            called=called, est=est + (" (the weakest)" if k > 1 else "")))
    return out


PAPER_GAIN = 0.09  # the paper's DoPE gains over Dynamic NTK in Table 1: +8.9, +9.1 and +5.6 points


def power_of(label, rule, vs_base: dict, lp: dict) -> dict:
    """What a rule's comparison with the baseline could detect at its number of prompts (stats.detectable_gain,
    stats.detectable_shift), the power at the largest gain its table leaves room for, and at the paper's."""
    t = vs_base["table"]
    room = t[3] / sum(t)
    return dict(label=label, rule=rule, n=len(lp["diffs"]), table=t, acc=vs_base, lp=lp, room=room,
                gain=detectable_gain(t), shift=detectable_shift(lp["diffs"]), at_room=gain_power(t, room),
                at_paper=gain_power(t, PAPER_GAIN) if PAPER_GAIN <= room else None)


def power_text(pw: dict) -> str:
    """What these prompts could detect, as the verdict states it (of the accuracy, only where no gain was
    detected: the power to find a gain already found says nothing)."""
    acc = "" if pw["acc"]["lo"] > 0 else \
        f"an accuracy gain of at least +{100 * pw['gain']:.1f} points and " if pw["gain"] is not None else \
        (f"no accuracy gain (winning all {100 * pw['room']:.1f} points the baseline leaves has "
         f"{100 * pw['at_room']:.0f}% power) and ")
    lp = (f"a median log-p shift above +{pw['shift']:.3f} nats" if pw["shift"] is not None else
          "no log-p shift (too few prompts for a median's interval)")
    return f"with 80% power these {pw['n']} prompts detect {acc}{lp}"


def power_lines(power: list) -> list:
    """The table of what each rule's comparison with the baseline could detect."""
    if not power:
        return []
    lines = ["", "### What these prompts could detect", "",
             "The smallest gain each declared rule calls with 80% power at the table's number of prompts (a prompt "
             "shared by settings counted once), both exact. Accuracy (stats.gain_power): the observed paired table "
             "made symmetric (both-right and both-wrong prompts kept, its discordant pairs split evenly into wins "
             "and losses: no effect), then that share of the both-wrong prompts turned into wins, over every table "
             "the prompts could give; \"none\": not even winning every both-wrong prompt reaches 80% (its power "
             "in brackets); the power at +9 points, the paper's DoPE gains over Dynamic NTK being +8.9 (24K noisy), "
             "+9.1 (64K original) and +5.6 (64K noisy). Log p (stats.shift_power): the observed paired differences "
             "resampled, moved to median 0 and then by the shift; the rule needs n + 1 - k of n above 0 (k: the "
             "median interval's rank), at 11 prompts 10 of 11, which resampling 11 differences reaches with 80% "
             "power only once all 11 lie above 0: the smallest shift is then the median's distance to the lowest "
             "difference.", "",
             "| table | rule | prompts | discordant (b + c) | both wrong | observed: accuracy, points | detectable "
             "accuracy gain, points | power at +9 points | observed: median log p | detectable median log p shift, "
             "nats |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pw in power:
        a, b, c, d = pw["table"]
        gain = "gain detected" if pw["acc"]["lo"] > 0 else f"+{100 * pw['gain']:.1f}" if pw["gain"] is not None \
            else f"none (all {100 * pw['room']:.1f} left: {100 * pw['at_room']:.0f}%)"
        at_paper = "-" if pw["acc"]["lo"] > 0 else f"{100 * pw['at_paper']:.0f}%" if pw["at_paper"] is not None \
            else "no room"
        shift = f"> +{pw['shift']:.3f}" if pw["shift"] is not None else "none"
        lines.append(f"| {pw['label']} | {pw['rule']} | {pw['n']} | {_n(b + c)} | {_n(d)} | {_acc_text(pw['acc'])} | "
                     f"{gain} | {at_paper} | {pw['lp']['diff']:+.3f} {_ival(pw['lp'], '+.3f')} | {shift} |")
    return lines


def power_projection(rows: list, prompts: list) -> list:
    """What one setting's rules could detect with more prompts (more needles per depth): for each rule and number of
    prompts, the smallest accuracy gain and median log-p shift its rule calls with 80% power, and the power at the
    paper's +9 points, from the setting's observed paired table and log-p differences (as power_lines)."""
    if len({(r["length"], r["noisy"]) for r in rows}) != 1:
        raise SystemExit("error: a power projection is of one setting: give one folder of one (length, noise)")
    names = list(dict.fromkeys(r["method"] for r in rows))
    by = {n: {_prompt(r): r for r in rows if r["method"] == n} for n in names}
    if "none" not in by:
        raise SystemExit("error: these records hold no baseline (method none) to compare the rules with")
    lines = [f"What {rows[0]['length']} tokens, noisy={rows[0]['noisy']} ({len(by['none'])} prompts recorded) could "
             "detect at other numbers of prompts, with 80% power (the observed rates and differences, resampled):", "",
             "| rule | prompts | detectable accuracy gain, points | power at +9 points | detectable median log p "
             "shift, nats |", "|---|---|---|---|---|"]
    for n in (n for n in names if next(iter(by[n].values()))["role"] in ("rule", "extension")):
        acc, lp = compare(by["none"], by[n])
        for k in prompts:
            gain, shift = detectable_gain(acc["table"], k), detectable_shift(lp["diffs"], k)
            lines.append(f"| {n} | {k} | " + (f"+{100 * gain:.1f}" if gain is not None else "none") +
                         f" | {100 * gain_power(acc['table'], PAPER_GAIN, k):.0f}% | " +
                         (f"> +{shift:.3f}" if shift is not None else "none") + " |")
    return lines


def holm_lines(comps: list) -> list:
    """Each comparison that passes its 95% rule, and whether Holm's procedure keeps it: within its table (a
    setting's family) and across every comparison of DoPE in the summary (YaRN's and Self-Extend's against the
    baseline ask whether another extension works, not DoPE: within their table only)."""
    if not comps:
        return []
    tables = list(dict.fromkeys(c["label"] for c in comps))
    within = {}
    for t in tables:
        fam = [c for c in comps if c["label"] == t]
        for c, keep in zip(fam, holm([c["p"] for c in fam])):
            within[id(c)] = (keep, len(fam))
    dope = [c for c in comps if c["rule"] not in EXTENSION_NAMES]  # YaRN and Self-Extend ask another question
    across = dict(zip(map(id, dope), holm([c["p"] for c in dope])))
    lines = ["", "### Many comparisons", "",
             f"Each table judges its rules' accuracy and log p against the baseline and against their random "
             f"controls; this summary judges {len(dope)} comparisons of DoPE in all"
             + (f" (and {len(comps) - len(dope)} of YaRN and Self-Extend against the baseline, another question, "
                "corrected within their table)" if len(dope) < len(comps) else "") +
             ". p: the smallest alpha at which the "
             "rule's own interval excludes 0 (stats.newcombe_p, stats.median_p; against several random controls, the "
             "largest of theirs). A comparison that passes the declared 95% rule is a finding only where Holm's "
             "procedure at 5% keeps it (within its table, and across the summary for a claim across settings); "
             "otherwise it is a lead.", ""]
    called = [c for c in comps if c["called"]]
    if not called:
        return lines + ["No comparison passes the 95% rule."]
    lines += ["| table | rule | comparison | estimate [95% CI] | p | Holm in its table | Holm across the summary |",
              "|---|---|---|---|---|---|---|"]
    for c in called:
        keep, m = within[id(c)]
        lines.append(f"| {c['label']} | {c['rule']} | {c['what']} | {c['est']} | {c['p']:.2g} | "
                     f"{'kept' if keep else 'lead'} (m = {m}) | " +
                     (f"{'kept' if across[id(c)] else 'lead'} (M = {len(dope)}) |" if id(c) in across else "- |"))
    return lines


def strict_changes(by: dict) -> list:
    """The answers the string match counts right and the strict match (strict) does not, per method."""
    out = []
    for n, cells in by.items():
        if _strict_count(cells) is None:
            return []
        for r in cells.values():
            if r["score"] and not strict(r["answer"], r["expected"]):
                where = f"depth {100 * r['depth']:.0f}%" + (f", needle {r['trial']}" if r["trial"] else "")
                out.append(f"{n} at {where} ({r['answer'].strip()!r} for {r['expected']})")
    head = ("Strict match (the answer's first number is the needle, digit for digit) against the string match "
            "scored above: ")
    return ["", head + ("the same answers for every method." if not out else
                        f"{len(out)} answer{'s' * (len(out) > 1)} right by the string match only: " +
                        "; ".join(out) + ".")]


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
    """The summary of records, written to out/summary.md (and printed) with its pictures; returns the verdict lines.
    Records of different runs (runs_of: cells that name different identities) are never paired or pooled: each run
    gets its own section, headed by what sets it apart, and its pictures a _run<i> suffix."""
    if not rows:
        return []
    runs = runs_of(rows)
    lines, verdicts = [], []
    if len(runs) > 1:
        lines = ["", f"These records come from {len(runs)} runs that differ in what moves a token or a logit; each is "
                 "summarized on its own, never paired or pooled with another."]
    for i, (what, part) in enumerate(runs, start=1):
        suffix = f"_run{i}" if len(runs) > 1 else ""
        if len(runs) > 1:
            lines += ["", f"## Run {i}: {what} ({len(part)} records; pictures *{suffix}.png)"]
        more, said = run_summary(part, out, earlier, suffix)
        lines, verdicts = lines + more, verdicts + said
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "summary.md", lambda f: f.write((text.lstrip() + "\n").encode()))
    return verdicts


def runs_of(rows: list) -> list:
    """[(what sets the run apart, its records)]: the records grouped by the identity their cells name (the model
    and its tokenizer, the haystack, every flag that moves a logit, the engine), less the Dynamic NTK factor, which
    --ntk auto sets per length (a setting's own, like the length). Where one setting holds several factors (--ntk 2
    and --ntk none into one folder), each factor is a run of its own. Records whose cells name no identity (another
    layout) are one run. One run: what = ""."""
    groups = {}
    for r in rows:
        ident = _identity(r)
        key = json.dumps({k: v for k, v in ident.items() if k != "ntk"}, sort_keys=True) if ident else None
        groups.setdefault(key, []).append(r)
    runs = []
    for key, part in groups.items():
        factors = {}
        for r in part:
            factors.setdefault((r["length"], r["noisy"]), set()).add(r.get("ntk_factor"))
        if any(len(f) > 1 for f in factors.values()):
            for f in sorted({r.get("ntk_factor") for r in part}, key=lambda x: x or 0):
                ident = dict(json.loads(key) if key else {}, ntk=f)
                runs.append((ident, [r for r in part if r.get("ntk_factor") == f]))
        else:
            runs.append((json.loads(key) if key else None, part))
    if len(runs) == 1:
        return [("", rows)]
    keys = sorted({k for ident, _ in runs if ident for k in ident})
    differ = [k for k in keys if len({json.dumps((ident or {}).get(k)) for ident, _ in runs}) > 1]
    return [(", ".join(f"{k}={(ident or {}).get(k)}" for k in differ) if ident is not None
             else "records whose cells name no identity", part) for ident, part in runs]


def _identity(r) -> dict | None:
    try:
        ident = json.loads(r["cell"])[0]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return ident if isinstance(ident, dict) else None


def run_summary(rows: list, out: Path, earlier: list | None = None, suffix: str = "") -> tuple[list, list]:
    """One run's records: per (length, noise), accuracy with a 95% Wilson interval, the strict-match count and the
    mean log-probability of the right answer for every method, each method against the baseline and each rule
    against its random control on the same prompts, and a verdict per rule with what its prompts could detect. With
    several settings, one more table pools them (each prompt still a pair, a prompt that settings share counted
    once; a method name then means each setting's own rule; a method of one setting alone is left out: pooling it
    would copy its comparisons into the count Holm corrects for). Then the power table, and which comparisons survive
    Holm's correction. With several context multiples (or `earlier` settings, as counts from earlier_counts), a
    table by multiple beside the paper's Table 1. Draws its heatmaps and the plot against the context multiple
    (their names end in suffix); returns the lines and the verdict lines."""
    lines, verdicts, comps, power, per_setting = [], [], [], [], list(earlier or [])
    groups = sorted({(r["length"], r["noisy"]) for r in rows})
    for L, noisy in groups:
        grp = [r for r in rows if r["length"] == L and r["noisy"] == noisy]
        per_setting += counts(grp)
        n_prompts = len({(r["depth"], r["trial"]) for r in grp})
        title = (f"{_model(grp)}, {L} tokens{_multiple(grp[0])}, noisy={noisy}: {n_prompts} prompts "
                 f"({len({r['depth'] for r in grp})} depths x {len({r['trial'] for r in grp})} needles)")
        more, said, cs, pw = table(grp, title, f"{L} tokens, noisy={noisy}")
        lines, verdicts, comps, power = lines + more, verdicts + said, comps + cs, power + pw
    if len(groups) > 1:
        units = len({_unit(_prompt(r)) for r in rows})
        shared = units < len({_prompt(r) for r in rows})
        title = (f"{_model(rows)}, pooled over {len(groups)} settings "
                 f"({', '.join(f'{L}/noisy={n}' for L, n in groups)}): {units} prompts"
                 + (" (a prompt that settings share, differing only in sink tokens, counted once: the mean of its "
                    "settings)" if shared else "") + "; each method is each setting's own rule, and a method "
                 "run in one setting only is not pooled")
        several = {m for m in {r["method"] for r in rows}
                   if len({(r["length"], r["noisy"]) for r in rows if r["method"] == m}) > 1}
        more, said, cs, pw = table([r for r in rows if r["method"] in several], title, "pooled")
        lines, verdicts, comps, power = lines + more, verdicts + said, comps + cs, power + pw
    lines += ["", "Verdicts. " + RULES, ""] + [f"- {v}" for v in verdicts]
    lines += power_lines(power) + holm_lines(comps)
    multiples = all(c["native"] for c in per_setting) and len({_times(c) for c in per_setting}) > 1
    if multiples:
        pooled = {}
        for x in sorted({_times(c) for c in per_setting}):
            grp = [r for r in rows if r.get("native") and _times(r) == x]
            if len({(r["length"], r["noisy"]) for r in grp}) > 1:
                pooled[x] = {c["method"]: c for c in counts(grp)}
        lines += multiple_table(per_setting, pooled)
    out.mkdir(parents=True, exist_ok=True)
    for noisy in sorted({r["noisy"] for r in rows}):
        plot_heatmap([r for r in rows if r["noisy"] == noisy and r["role"] != "sweep"],
                     out / f"heatmap_noisy{noisy}{suffix}.png", noisy)
    if multiples:
        plot_by_multiple(per_setting, out / f"by_multiple{suffix}.png")
    return lines, verdicts


def _model(rows) -> str:
    """The model's name as its records give it: every name, when they give several (a renamed folder, an edit)."""
    return " / ".join(dict.fromkeys(r["model"] for r in rows))


def _multiple(r):
    return f" ({_times(r):g}x native)" if r.get("native") else ""


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
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))  # never a 0-byte picture
    print(f"heatmap: {path}")


def plot_by_multiple(per_setting, path):
    """Accuracy and mean answer log-probability against the context multiple (length / native), from counts
    (earlier settings included): a row of panels per noise setting, one colour per variant and reading of the rule
    (the same in every panel), a rule solid and its variant's random head sets dotted, pooled into one line, YaRN
    and Self-Extend as diamonds; the number of prompts under each point. Each point of one setting carries its 95%
    interval: Wilson's for the accuracy, Student's t for the mean log p where per-prompt values were kept (counts
    from an earlier summary have none); points are nudged apart along x so that the intervals do not hide each
    other."""
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
    fig = Figure(figsize=(11, 3.6 * len(settings) + 0.3), layout="constrained")
    axes = fig.subplots(len(settings), 2, squeeze=False)
    for (ax_acc, ax_lp), noisy in zip(axes, settings):
        mine = [c for c in per_setting if (c["noisy"] > 0) == noisy and c["role"] != "sweep"]
        for i, name in enumerate(names):
            pts = {}
            for c in mine:
                if label(c) == name:
                    pts.setdefault(_times(c), []).append(c)
            if not pts:
                continue
            xs = sorted(pts)
            nudge = 2 ** (0.025 * (i - (len(names) - 1) / 2))  # the x axis is log 2
            n = [sum(c["n"] for c in pts[x]) for x in xs]
            acc = [100 * sum(c["correct"] for c in pts[x]) / k for x, k in zip(xs, n)]
            lp = [sum(c["logprob"] * c["n"] for c in pts[x]) / k for x, k in zip(xs, n)]
            style = dict(color=colour[name], marker="D" if name in EXTENSION_NAMES else "o", ms=4,
                         label="baseline" if name == "none" else EXTENSION_NAMES.get(name, name),
                         ls=":" if name.endswith("/random") else "-", lw=2.2 if name == "none" else 1.4)
            ax_acc.plot([x * nudge for x in xs], acc, **style)
            ax_lp.plot([x * nudge for x in xs], lp, **style)
            for x, a, m in zip(xs, acc, lp):
                if len(pts[x]) != 1:  # several random sets on the same prompts: no single interval
                    continue
                c = pts[x][0]
                lo, hi = wilson(c["correct"], c["n"])
                ax_acc.errorbar([x * nudge], [a], yerr=[[a - 100 * lo], [100 * hi - a]], color=colour[name],
                                lw=0.8, capsize=2)
                ci = c.get("logprob_ci")
                if ci and all(math.isfinite(v) for v in ci):
                    ax_lp.errorbar([x * nudge], [m], yerr=[[m - ci[0]], [ci[1] - m]], color=colour[name], lw=0.8,
                                   capsize=2)
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
    fig.suptitle(f"{per_setting[0]['model']}: needle in a haystack against the context multiple\n"
                 "bars: 95% intervals (accuracy: Wilson; mean log p: Student's t, only where per-prompt values "
                 "were kept)", fontsize=10)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))  # never a 0-byte picture
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
    """The records of one setting (or of several, pooled by unit) as counts, one dict per method: n (units), correct
    and strict (sums over units; strict None where the records keep no answers), the mean answer log p with its
    Student's t interval (logprob_ci), and for every method but the baseline the paired table against the baseline
    ("base": a, b, c, d) and the sign counts of its log-p differences ("base_signs": negative, positive, n); for a
    rule the same against its first random control ("ctrl", "ctrl_signs"). Both decision rules are functions of
    these counts alone (stats.newcombe_paired, stats.median_shift), so settings whose per-prompt records were not
    kept are judged the same way."""
    names = list(dict.fromkeys(r["method"] for r in grp))
    by = {n: {_prompt(r): r for r in grp if r["method"] == n} for n in names}
    out = []
    for n in names:
        cells, first = by[n], next(iter(by[n].values()))
        s, lp = _per_unit(cells, lambda r: r["score"]), _per_unit(cells, lambda r: r["logprob"])
        c = dict(model=first["model"], length=first["length"], noisy=first["noisy"], native=first.get("native"),
                 method=n, variant=first["variant"], role=first["role"], n=len(s), correct=sum(s),
                 strict=_strict_count(cells), logprob=_mean(lp), logprob_ci=mean_interval(lp))
        for key, other in (("base", "none" if n != "none" else None),
                           ("ctrl", control_of(by, first["variant"]) if first["role"] in ("rule", "sweep") else None)):
            if other in by and set(cells) & set(by[other]):
                acc, x = compare(by[other], cells)
                c[key], c[f"{key}_signs"] = acc["table"], (x["neg"], x["pos"], len(x["diffs"]))
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


def _judged(c: dict, key: str) -> str:
    """'+' / '−' / '=' for accuracy (Newcombe's interval), then, where sign counts exist, '↑' / '↓' / '=' for the
    answer's log p (stats.median_shift)."""
    lo, hi = newcombe_paired(*c[key])
    acc = "+" if lo > 0 else "−" if hi < 0 else "="
    if f"{key}_signs" not in c:
        return acc
    return acc + " / " + {"higher": "↑", "lower": "↓", "unchanged": "="}[median_shift(*c[f"{key}_signs"])]


def multiple_table(per_setting: list, pooled: dict | None = None) -> list:
    """The verdicts by context multiple: one row per setting, a column per rule and then per other extension (YaRN,
    Self-Extend: judged against the baseline only), the paper's Table 1 beside them, and where a multiple has
    several settings with records, a row pooling them by unit (pooled: {multiple: {method: counts}}). Settings of
    one multiple share their prompts (the same length, depths and needles; only the sink tokens differ), so counts
    without records cannot be pooled: such a multiple gets no pooled row."""
    pooled = pooled or {}
    top = max(map(_times, per_setting))  # the rules of the longest context first, in their order, then the others
    rules = list(dict.fromkeys([c["method"] for c in per_setting if c["role"] == "rule" and _times(c) == top] +
                               [c["method"] for c in per_setting if c["role"] == "rule"] +
                               [c["method"] for c in per_setting if c["role"] == "extension"]))
    settings = {}
    for c in per_setting:
        settings.setdefault((_times(c), c["noisy"], c["length"]), {})[c["method"]] = c
    lines = ["", "### By context multiple", "",
             "Each cell: correct / prompts (and the strict-match count where it differs); against the baseline, "
             "accuracy (+ gain, − harm, = no difference: Newcombe's paired 95% interval) / answer log p (↑ higher, "
             "↓ lower, = unchanged: the median's exact 95% interval); then the same against the rule's first "
             "random-head control (random0); YaRN and Self-Extend, the other training-free extensions, against the "
             "baseline only. A pooled row counts each prompt once (the mean of the settings that share it); "
             "settings kept only as counts are not pooled. Paper: LLaMA-3-8B-Instruct, Table 1 (accuracy %, its "
             "best DoPE row picked on its test prompts).", "",
             "| multiple | setting | prompts | baseline | " + " | ".join(EXTENSION_NAMES.get(n, n) for n in rules) +
             " | paper: Dynamic NTK | paper: best DoPE |",
             "|---" * (6 + len(rules)) + "|"]

    def count(c):
        strict = c.get("strict")
        more = f" (strict {_n(strict)})" if strict is not None and abs(strict - c["correct"]) > 1e-9 else ""
        return f"{_n(c['correct'])}/{c['n']}{more}"

    def row(x, label, methods, paper):
        base = methods.get("none")
        cells = [f"{x:g}x", label, str(base["n"]) if base else "-",
                 f"{count(base)} ({100 * base['correct'] / base['n']:.0f}%)" if base else "-"]
        for name in rules:
            c = methods.get(name)
            if c is None:
                cells.append("not run")
                continue
            cell = count(c)
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
        if x in pooled:
            lines.append(row(x, "both, each prompt once", pooled[x], ("", "")))
    return lines


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_dirs(dirs, out: Path, earlier=None) -> list:
    """--summarize: the summary of finished runs, without loading a model (earlier: a summary.md of settings whose
    records were not kept, read by earlier_counts into the table by multiple)."""
    cells = {}  # the same cell in two folders (a copy, a folder given twice) is one record
    for d in dirs:
        f = Path(d) / "results.jsonl"
        if not f.is_file():
            raise SystemExit(f"error: {f} does not exist (give folders that an eval_nih.py run wrote to)")
        cells.update(load_done(f, repair=False))  # read only: a torn last line is skipped, not cut off
    rows = list(cells.values())
    if not rows:
        raise SystemExit(f"error: no results in {', '.join(map(str, dirs))}")
    if earlier:
        old = earlier_counts(earlier, rows[0]["native"])
        if old[0]["model"] != rows[0]["model"]:
            raise SystemExit(f"error: {earlier} is about {old[0]['model']}, the results about {rows[0]['model']}")
        return summarize(rows, Path(out), old)
    return summarize(rows, Path(out))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="What a finished setting's rules could detect with more prompts")
    p.add_argument("folder", help="a folder an eval_nih.py run wrote results.jsonl to (one setting)")
    p.add_argument("--prompts", default="11,33,55,88,110", help="numbers of prompts (default: %(default)s)")
    a = p.parse_args()
    recs = list(load_done(Path(a.folder) / "results.jsonl", repair=False).values())
    print("\n".join(power_projection(recs, [int(x) for x in a.prompts.split(",")])))
