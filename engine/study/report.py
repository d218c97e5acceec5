"""`fusealign compare`'s results across seeds: intervals, matched-KL differences, findings, table, plot, report.md.

Every metric of every row is summarised over seeds by `stats.mean_interval` (mean ± 95 % Student-t interval).
"PPO or DPO?" is answered by paired differences at matched KL:

    matched KL.  For a seed, PPO's frontier is the piecewise-linear curve of ground-truth reward against √KL
    through the SFT policy (KL 0) and that seed's PPO sweep points, sorted by KL. For another row X of the same
    setting (a DPO variant, GRPO), Δ_s = frontier_s(√KL of X in seed s) − reward of X in seed s: PPO's reward at
    exactly X's KL minus X's. No extrapolation: if X's KL lies beyond PPO's largest KL in any seed, Δ is not
    reported. √KL is the axis on which reward grows most evenly (Gao et al. 2022 fit RL's gold reward as
    d(α − β log d), d = √KL), so the straight segments follow the curve closely; that curve is still concave,
    so the segment between two sweep points lies below it and Δ errs in X's favour.

The findings quote, per setting, the DPO rows at the preset's main β (DPOConfig's default, 0.5; fixed in
advance, not picked from the results): offline, on-policy and iterative, each as PPO − X at matched KL, and
each on-policy variant's improvement over offline DPO, (PPO − offline) − (PPO − on-policy), paired by seed.
A finding names a winner only when its 95 % interval excludes 0, and says whether it is resolved at the run's
seeds; if not, how many seeds would resolve it at the observed mean and spread (`stats.resolution`: the
smallest n with t(0.975, n − 1)·s/√n < |mean|), or "not resolvable: mean ≈ 0" when |mean| ≤ s/√n.
`claims.py` turns the findings into verdicts on the seed document's three claims.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .stats import interpolate, mean_interval, resolution

METRICS = ("gt_reward", "kl_to_sft", "win_rate_vs_sft", "eos_rate")
MATCHED_KL = ("Matched KL: for each seed, PPO's frontier is the piecewise-linear interpolation of ground-truth reward "
              "against √KL through the SFT policy (KL 0) and that seed's PPO sweep points (√KL: the axis on which RL's "
              "reward grows most evenly, Gao et al. 2022); PPO − X is that frontier at X's KL minus X's reward, per "
              "seed, then mean ± 95 % t-interval over seeds (paired: same SFT policy and reward model). No "
              "extrapolation beyond PPO's largest KL. The frontier is concave, so a segment between two sweep points "
              "lies below it: the difference errs in X's favour. The findings quote the DPO rows at the preset's main "
              "β (DPOConfig's default), fixed before the runs, not picked from them.")
RESOLVE = ("Seeds to resolve: the smallest n with t(0.975, n − 1)·s/√n < |mean|, s the per-seed spread of the paired "
           "differences — the seeds whose 95 % interval would exclude 0 if the mean and spread held (a projection: "
           "more seeds move both). \"not resolvable: mean ≈ 0\" when |mean| ≤ s/√n, the mean within one standard "
           "error of 0: such a mean is about as consistent with the opposite sign, so no count is projected from it "
           "(so at most 15 seeds are projected from 3, 41 from 10).")


# --- across seeds ------------------------------------------------------------------------------------------
def aggregate(per_seed: dict) -> list:
    """{seed: rows} -> one row per (method, setting, knob): each metric as mean_interval over seeds."""
    seeds = list(per_seed)
    out = []
    for i, row in enumerate(per_seed[seeds[0]]):
        runs = [per_seed[s][i] for s in seeds]
        assert all(r["stage"] == row["stage"] for r in runs), "every seed runs the same stages"
        out.append({k: row[k] for k in ("method", "setting", "knob", "stage")} | {"loss_type": row.get("loss_type")}
                   | {m: mean_interval([r[m] for r in runs]) for m in METRICS})
    return out


def frontier(rows: list, setting: str) -> list:
    """One seed's PPO frontier of a setting: (√KL, reward) of the SFT policy (KL 0) and of every PPO row."""
    sft = next(r for r in rows if r["method"] == "SFT")
    return [(0.0, sft["gt_reward"])] + [(_root(r["kl_to_sft"]), r["gt_reward"]) for r in rows
                                        if r["method"] == "PPO" and r["setting"] == setting]


def _root(kl: float) -> float:
    return max(kl, 0.0) ** 0.5  # an exact KL can come out a rounding error below 0


def matched_differences(per_seed: dict) -> list:
    """PPO − X at matched KL (module docstring) for every non-PPO, non-SFT row X, paired by seed."""
    seeds = list(per_seed)
    out = []
    for i, row in enumerate(per_seed[seeds[0]]):
        if row["method"] in ("SFT", "PPO"):
            continue
        deltas, beyond = [], []
        for s in seeds:
            x = per_seed[s][i]
            ppo = interpolate(frontier(per_seed[s], x["setting"]), _root(x["kl_to_sft"]))
            if ppo is None:
                beyond.append(s)
            else:
                deltas.append(ppo - x["gt_reward"])
        d = {k: row[k] for k in ("method", "setting", "knob", "stage")} | {"loss_type": row.get("loss_type")}
        d["ppo_minus"] = mean_interval(deltas) if not beyond else None
        d["beyond_ppo_kl_in_seeds"] = beyond
        d["resolution"] = resolution(d["ppo_minus"]) if d["ppo_minus"] else None
        out.append(d)
    return out


def headline(diffs: list, beta: float) -> dict:
    """Per setting, the rows the findings quote — DPO at the preset's main β (offline, on-policy, iterative), all
    fixed in advance — with PPO − X at matched KL, and each on-policy variant's improvement over offline DPO,
    per seed: (PPO − offline) − (PPO − on-policy)."""
    out = {}
    for setting in dict.fromkeys(d["setting"] for d in diffs):
        rows = [d for d in diffs if d["setting"] == setting and d["knob"] == beta]
        pick = {d["method"]: d for d in rows if d["ppo_minus"]}
        h = {"beta": beta, "offline": pick.get("DPO"), "offline_run": any(d["method"] == "DPO" for d in rows),
             "variants": {}}
        for method in ("DPO-onpolicy", "DPO-iterative"):
            if method in pick and h["offline"]:
                off, on = h["offline"]["ppo_minus"]["values"], pick[method]["ppo_minus"]["values"]
                imp = mean_interval([a - b for a, b in zip(off, on)])
                h["variants"][method] = {"row": pick[method], "improvement": imp,
                                         "improvement_resolution": resolution(imp)}
        out[setting] = h
    return out


# --- outputs -----------------------------------------------------------------------------------------------
def _pm(iv: Optional[dict], digits: int = 3) -> str:
    if iv is None:
        return "–"
    return f"{iv['mean']:.{digits}f}" + ("" if iv["ci"] is None else f" ± {iv['ci']:.{digits}f}")


def _range(iv: dict, digits: int = 3, *, short: bool = False) -> str:
    """"+0.123 (95 % interval +0.050 to +0.196)", or with short=True "+0.123 [+0.050, +0.196]"."""
    if iv["ci"] is None:
        return f"{iv['mean']:+.{digits}f} (one seed: no interval)"
    lo, hi = iv["mean"] - iv["ci"], iv["mean"] + iv["ci"]
    if short:
        return f"{iv['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return f"{iv['mean']:+.{digits}f} (95 % interval {lo:+.{digits}f} to {hi:+.{digits}f})"


def _knob(r) -> str:
    """The row's knob, and a GRPO row's loss type (TRL's name) when its results record it."""
    if r["knob"] is None:
        return "–"
    knob = f"{'β' if r['method'].startswith('DPO') else 'KL coef'} {r['knob']:g}"
    return f"{knob}, {r['loss_type']} loss" if r.get("loss_type") else knob


def table(rows: list, timing: Optional[dict] = None) -> str:
    """The results as a markdown table: mean ± 95 % interval across seeds."""
    lines = ["| method | pairs | knob | gt reward | KL→SFT | win vs SFT | EOS | wall s / seed |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        walls = [t[r["stage"]]["wall_s"] for t in (timing or {}).values() if r["stage"] in t]
        wall = f"{sum(walls) / len(walls):.1f}" if walls else "–"
        lines.append(f"| {r['method']} | {r['setting']} | {_knob(r)} | {_pm(r['gt_reward'])} | "
                     f"{_pm(r['kl_to_sft'], 2)} | {_pm(r['win_rate_vs_sft'])} | {_pm(r['eos_rate'], 2)} | {wall} |")
    return "\n".join(lines)


def diff_table(diffs: list, rows: list) -> str:
    """PPO − X per row X, whether its interval excludes 0 at the run's seeds (n), and the seeds that would resolve
    it at the observed mean and spread (`stats.resolution`; "not resolvable: mean ≈ 0" when |mean| ≤ s/√n)."""
    kl = {r["stage"]: r["kl_to_sft"] for r in rows}
    n = next((d["ppo_minus"]["n"] for d in diffs if d["ppo_minus"]), None)
    at = "the run's seeds" if n is None else f"{n} seed{'s' if n != 1 else ''}"
    lines = [f"| X | pairs | knob | KL→SFT of X | PPO − X (gt reward at X's KL) | resolved at {at} | "
             f"seeds to resolve |", "|---|---|---|---:|---:|:---:|---:|"]
    for d in diffs:
        cell = _pm(d["ppo_minus"]) if d["ppo_minus"] else f"beyond PPO's largest KL (seeds {d['beyond_ppo_kl_in_seeds']})"
        res = resolution(d["ppo_minus"]) if d["ppo_minus"] else None  # recomputed: older compare.json lack it
        done = "–" if res is None else "yes" if res["resolved"] else "no"
        need = "–" if res is None else res["note"] or str(res["seeds_needed"])
        lines.append(f"| {d['method']} | {d['setting']} | {_knob(d)} | {_pm(kl[d['stage']], 2)} | {cell} | {done} | "
                     f"{need} |")
    return "\n".join(lines)


def resolved_text(iv: dict, *, short: bool = False) -> str:
    """Whether a paired difference is resolved at its seeds and, if not, how many seeds would resolve it:
    "resolved at 3 seeds" · "not resolved at 3 seeds; 5 would resolve it at this mean and spread" ·
    "not resolved at 3 seeds; not resolvable: mean ≈ 0" · "one seed: no spread"; with short=True "resolved",
    "needs 5 seeds", "mean ≈ 0", "one seed"."""
    res = resolution(iv)
    if res is None:
        return "one seed" if short else "one seed: no spread"
    if short:
        return "resolved" if res["resolved"] else "mean ≈ 0" if res["note"] else f"needs {res['seeds_needed']} seeds"
    head = f"{'resolved' if res['resolved'] else 'not resolved'} at {iv['n']} seeds"
    if res["resolved"]:
        return head
    return f"{head}; {res['note']}" if res["note"] else f"{head}; {res['seeds_needed']} would resolve it at this " \
                                                         f"mean and spread"


def _side(iv: dict) -> Optional[int]:
    """+1 / −1 when the 95 % interval lies above / below 0, 0 when it contains 0, None with one seed."""
    if iv["ci"] is None:
        return None
    return 1 if iv["mean"] - iv["ci"] > 0 else -1 if iv["mean"] + iv["ci"] < 0 else 0


def _winner(iv: dict, other: str) -> str:
    return {None: "one seed cannot say which wins", 1: "PPO wins", -1: f"{other} wins",
            0: "the interval contains 0: no winner at this number of seeds"}[_side(iv)]


KINDS = {"DPO-onpolicy": "on-policy", "DPO-iterative": "iterative"}


def _onpolicy_verdict(head: dict) -> str:
    """What on-policy data did to DPO's gap in one setting, from the signs of the intervals of PPO − offline DPO,
    PPO − on-policy DPO and the improvement, for each on-policy variant."""
    off = _side(head["offline"]["ppo_minus"])
    signs = {KINDS[m]: (_side(v["row"]["ppo_minus"]), _side(v["improvement"])) for m, v in head["variants"].items()}
    if off is None or any(None in s for s in signs.values()):
        return "one seed cannot tell whether on-policy data closes the gap"
    if off != 1:  # offline DPO was not resolved behind PPO: there was no gap to close
        groups = {}  # variants with the same standing share one clause
        for kind, (rem, imp) in signs.items():
            groups.setdefault((rem, imp), []).append(kind)
        return "offline DPO had no resolved gap to close (" + ", ".join(
            f"{' and '.join(kinds)} DPO {'is' if len(kinds) == 1 else 'are'} "
            f"{dict(((1, 'behind PPO'), (0, 'level with PPO'), (-1, 'ahead of PPO')))[rem]} and "
            f"{dict(((1, 'better than'), (0, 'not resolved from'), (-1, 'worse than')))[imp]} offline DPO"
            for (rem, imp), kinds in groups.items()) + ")"

    def effect(rem, imp):
        if imp != 1:
            return "does not measurably narrow the gap" if imp == 0 else "widens the gap"
        if rem == 1:
            return "narrows the gap but PPO stays ahead"
        return "closes the gap" + (" and overtakes PPO" if rem == -1 else "")

    return ", ".join(f"{kind} data {effect(*s)}" for kind, s in signs.items())


def sentences(head: dict) -> list:
    """Three sentences generated from the numbers: in-distribution, out-of-distribution, on-policy data."""
    out = []
    for setting, where in (("in", "With in-distribution preference pairs"),
                           ("ood", "With out-of-distribution preference pairs")):
        if setting not in head:
            continue
        off = head[setting]["offline"]
        if off is None:
            why = ("its KL lies beyond PPO's sweep in some seed" if head[setting]["offline_run"]
                   else "offline DPO was not run")
            out.append(f"{where}: no matched-KL comparison with DPO at β {head[setting]['beta']:g} ({why}).")
            continue
        out.append(f"{where}, PPO − DPO ({_knob(off)}) at matched KL is {_range(off['ppo_minus'])}: "
                   f"{_winner(off['ppo_minus'], 'DPO')} ({resolved_text(off['ppo_minus'])}).")
    parts = []
    for setting, where in (("in", "in-distribution"), ("ood", "out-of-distribution")):
        h = head.get(setting)
        if not h or not h["variants"] or h["offline"] is None:
            continue
        vs = h["variants"].items()
        off = h["offline"]["ppo_minus"]
        parts.append(
            f"{where}, PPO − DPO at matched KL is {_range(off, short=True)} offline ({resolved_text(off, short=True)}), "
            + " and ".join(f"{_range(v['row']['ppo_minus'], short=True)} {KINDS[m]} "
                           f"({resolved_text(v['row']['ppo_minus'], short=True)})" for m, v in vs)
            + "; the improvement over offline is "
            + " and ".join(f"{_range(v['improvement'], short=True)} {KINDS[m]} "
                           f"({resolved_text(v['improvement'], short=True)})" for m, v in vs)
            + f": {_onpolicy_verdict(h)}")
    beta = next(iter(head.values()))["beta"] if head else None
    if parts:
        n = next(h["offline"]["ppo_minus"]["n"] for h in head.values() if h["variants"] and h["offline"])
        out.append(f"On-policy pairs labelled by the reward model (β {beta:g}; [95 % interval] (resolved at {n} seeds / "
                   f"seeds needed at this mean and spread / mean ≈ 0)) — " + "; ".join(parts) + ".")
    elif any(h["offline_run"] for h in head.values()):
        out.append(f"Whether on-policy data closes DPO's gap is not measured: offline DPO at β {beta:g} (or the "
                   f"on-policy rows) lie beyond PPO's KL sweep in some seed.")
    else:
        out.append("On-policy DPO was not run beside offline DPO at the same β, so whether it closes the gap is "
                   "not measured.")
    return out


def report_markdown(r: dict, *, image: str = "frontier.png", level: int = 1, title: Optional[str] = None,
                    results_table: bool = True) -> str:
    """report.md (and the README's compare section): findings, the seed document's claims, table, matched-KL
    differences, plot, rules. `title` replaces the heading's text; results_table=False leaves the table of every
    row out (the README's 10-seed block: report.md has it)."""
    from .claims import RULE, claims_markdown, judge  # claims.py builds on this module

    h = "#" * level
    p, seeds = r["preset"], r["seeds"]
    n = len(seeds)
    command = f"fusealign compare --preset {r['config']['preset']}" + (
        f" --seeds {r['config']['seeds']}" if r["config"].get("seeds") else "")
    results = [
        f"{h}# Results",
        "",
        table(r["rows"], r.get("timing", {}).get("stages")),
        "",
        "knob: KL coefficient β of the reward penalty for PPO and GRPO, β for DPO. pairs: what the reward model "
        "(and offline DPO) trained on. DPO-onpolicy: pairs sampled once from the SFT policy, labelled by that "
        "setting's reward model; DPO-iterative: re-sampled from the current DPO policy every "
        f"{p['resample_every']} steps.",
        "",
    ]
    return "\n".join([
        f"{h} {title or f'PPO or DPO? `{command}`'}",
        "",
        f"Built-in task, {n} seed{'s' if n > 1 else ''} ({', '.join(map(str, seeds))}), each re-running the whole "
        f"pipeline (SFT → reward model → PPO / GRPO, and DPO from the same SFT policy); device {r['device']}, "
        f"{r['threads']} thread{'s' if r['threads'] != 1 else ''} per stage; {p['eval_prompts']} held-out prompts per seed. ± is the half-width of the 95 % "
        f"Student-t interval across seeds, t(0.975, n−1) · s/√n (n = {n}). Generated from `compare.json` by "
        f"`fusealign compare`; nothing here is typed by hand.",
        "",
        f"{h}# Findings",
        "",
        *[f"- {s}" for s in sentences(r["headline"])],
        "",
        f"{h}# The seed document's claims",
        "",
        *claims_markdown(judge(r)),
        "",
        RULE,
        "",
        *(results if results_table else []),
        f"{h}# PPO − X at matched KL",
        "",
        diff_table(r["differences"], r["rows"]),
        "",
        r["matched_kl"],
        "",
        RESOLVE,
        "",
        f"![reward vs KL]({image})",
        "",
    ])


def plot(rows: list, path: Path) -> bool:
    """Reward-vs-KL frontier with 95 % intervals across seeds on both axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a declared dependency; say so rather than skip the plot silently
        import sys

        print("fusealign compare: matplotlib is not installed (pip install matplotlib): no frontier plot",
              file=sys.stderr)
        return False
    styles = {"SFT": ("*", "k"), "PPO": ("o", "C0"), "GRPO": ("D", "C2"), "DPO": ("s", "C1"),
              "DPO-onpolicy": ("^", "C3"), "DPO-iterative": ("v", "C4")}
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for method, (marker, color) in styles.items():
        for setting, fill in (("in", True), ("ood", False)):
            pts = sorted((r["kl_to_sft"]["mean"], r["gt_reward"]["mean"], r["kl_to_sft"]["ci"] or 0.0,
                          r["gt_reward"]["ci"] or 0.0) for r in rows if r["method"] == method and r["setting"] == setting)
            if not pts:
                continue
            xs, ys, xe, ye = zip(*pts)
            ax.errorbar(xs, ys, xerr=xe, yerr=ye, marker=marker, color=color, linestyle="-" if len(pts) > 1 else "",
                        markersize=8, capsize=3, fillstyle="full" if fill else "none",
                        label=method if method == "SFT" else f"{method} ({setting}-distribution pairs)",
                        clip_on=method != "SFT")  # SFT sits on the axis, at KL 0
    ax.set_xscale("function", functions=(lambda x: np.sqrt(np.maximum(x, 0)), np.square))  # the matched-KL axis
    top = max(r["kl_to_sft"]["mean"] + (r["kl_to_sft"]["ci"] or 0.0) for r in rows)
    ax.set_xlim(0, top * 1.05)
    ax.set_xticks([t for t in (0, 0.5, 1, 2, 4, 8, 16, 32, 64, 128) if t <= top * 1.05])
    ax.set_xticklabels([f"{t:g}" for t in ax.get_xticks()])
    ax.set_xlabel("KL(π ‖ π_SFT) per completion (exact, nats; √ scale: the matched-KL axis)")
    ax.set_ylabel("ground-truth reward of samples")
    ax.set_title("Reward vs KL, built-in task (mean ± 95 % interval over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return True


def render(out_dir: Path) -> None:
    """Re-render report.md and frontier.png of a finished study from its compare.json (the numbers are not
    touched): `python -m fusealign.engine.study.report runs/compare`."""
    import json

    r = json.loads((Path(out_dir) / "compare.json").read_text())
    plot(r["rows"], Path(out_dir) / "frontier.png")
    (Path(out_dir) / "report.md").write_text(report_markdown(r))


if __name__ == "__main__":
    import sys

    render(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/compare"))
