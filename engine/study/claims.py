"""The seed document's three claims about PPO and DPO, judged from one `fusealign compare` result by fixed rules.

Every verdict is read off the signs of paired 95 % intervals over seeds (`report._side`: above 0, below 0, or
containing 0), all at the preset's main β (DPOConfig's default, fixed before any run):

  1. PPO beats DPO.  One cell per setting (in-, out-of-distribution pairs): G = PPO − offline DPO at matched KL
     (the findings' first two sentences). A cell supports when G lies above 0, contradicts when it lies below.
  2. DPO degrades with out-of-distribution preference data.  One cell: per seed
         D = [F(√KL of DPO_ood) − r(DPO_ood)] − [F(√KL of DPO_in) − r(DPO_in)]
     with F that seed's in-distribution PPO frontier (report.frontier) as one ruler for both DPO policies, which
     start from the same SFT policy: how much further below the reward PPO reaches at the same KL offline DPO
     lands when it trains on out-of-distribution pairs instead of pairs from the SFT policy. Equivalently
     r(DPO_in) − r(DPO_ood), corrected along F for their different KLs. Supports when D lies above 0,
     contradicts when below (out-of-distribution pairs left DPO closer to the frontier).
  3. On-policy / iterative DPO closes the gap (Xu et al. 2024).  One cell per setting and variant (on-policy,
     iterative), with G as above, R = PPO − the variant and I = G − R, the variant's improvement over offline
     DPO (paired by seed, the headline's "improvement"). A cell supports when G and I lie above 0 and R does not
     (there was a gap, the variant narrowed it measurably, and no gap is left measurably), contradicts when R
     lies above 0 (PPO stays measurably ahead of the variant, narrowed or not).
  A cell that neither supports nor contradicts cannot tell at this number of seeds. A claim supports when at
  least one of its cells supports and none contradicts, contradicts in the reverse case, is mixed when cells of
  both kinds exist, and otherwise cannot tell at n seeds.

"Contradicts" needs a resolved interval on the wrong side; a difference that stays near 0 over many seeds is
"cannot tell" (no equivalence margin was fixed in advance), and its text says how many seeds would resolve it
or that its mean is ≈ 0 (`report.resolved_text`).
"""

from __future__ import annotations

from typing import Optional

from .report import _range, _side, frontier, resolved_text, _root
from .stats import interpolate, mean_interval

CLAIMS = {  # key: the claim as the seed document words it
    "ppo_beats_dpo": "PPO beats DPO",
    "dpo_degrades_ood": "DPO degrades with out-of-distribution preference data",
    "onpolicy_closes_gap": "On-policy / iterative DPO closes the gap (Xu et al. 2024)",
}
RULE = ("How a verdict is decided (engine/study/claims.py), from paired 95 % intervals over seeds at the main β: "
        "*PPO beats DPO* — per setting, PPO − offline DPO at matched KL: supports when the interval lies above 0, "
        "contradicts when below. *DPO degrades with out-of-distribution data* — per seed, how much further below "
        "the in-distribution PPO frontier offline DPO lands (at its own KL) when trained on out-of-distribution "
        "pairs than on in-distribution ones: supports when above 0, contradicts when below. *On-policy / iterative "
        "DPO closes the gap* — per setting and variant: supports when PPO − offline DPO and the variant's "
        "improvement over offline both lie above 0 and PPO − variant does not; contradicts when PPO − variant "
        "lies above 0. Otherwise a cell cannot tell at this number of seeds. A claim supports when some cell "
        "supports and none contradicts, contradicts in the reverse case, is mixed when both occur, and otherwise "
        "cannot tell. A difference near 0 never contradicts: no equivalence margin was fixed in advance.")
WHERE = {"in": "in-distribution", "ood": "out-of-distribution"}
VARIANTS = {"DPO-onpolicy": "on-policy", "DPO-iterative": "iterative"}
_SIGN = {1: "supports", -1: "contradicts", 0: "cannot tell", None: "cannot tell"}


def _row(rows: list, method: str, setting: str, knob: float) -> Optional[dict]:
    return next((r for r in rows if r["method"] == method and r["setting"] == setting and r["knob"] == knob), None)


def ood_degradation(per_seed: dict, beta: float) -> Optional[dict]:
    """D of claim 2 (module docstring) per seed, as a mean_interval; None when either DPO row is missing or lies
    beyond the in-distribution PPO frontier's largest KL in some seed (no extrapolation)."""
    deltas = []
    for rows in per_seed.values():
        f = frontier(rows, "in")
        gaps = []
        for setting in ("ood", "in"):
            x = _row(rows, "DPO", setting, beta)
            ppo = interpolate(f, _root(x["kl_to_sft"])) if x else None
            if ppo is None:
                return None
            gaps.append(ppo - x["gt_reward"])
        deltas.append(gaps[0] - gaps[1])
    return mean_interval(deltas)


def _cell(where: str, quantity: str, iv: Optional[dict], verdict: Optional[str] = None, missing: str = "") -> dict:
    if iv is None:
        return {"where": where, "verdict": "cannot tell", "text": f"{quantity}: not measured ({missing})",
                "interval": None}
    verdict = verdict or _SIGN[_side(iv)]
    return {"where": where, "verdict": verdict, "interval": iv,
            "text": f"{quantity} {_range(iv, short=True)} ({resolved_text(iv, short=True)})"}


def _combine(cells: list) -> str:
    kinds = {c["verdict"] for c in cells}
    if "supports" in kinds and "contradicts" in kinds:
        return "mixed"
    return "supports" if "supports" in kinds else "contradicts" if "contradicts" in kinds else "cannot tell"


def judge(r: dict) -> dict:
    """compare.json (a dict) -> {claim key: {"claim", "verdict", "n_seeds", "cells": [{"where", "verdict",
    "text", "interval"}]}}, by the rules of the module docstring. verdict: supports, contradicts, mixed or
    cannot tell."""
    head, beta, n = r["headline"], r["preset"]["main_beta"], len(r["seeds"])
    out = {}
    cells = []
    for setting, h in head.items():
        missing = "offline DPO was not run" if not h["offline_run"] else "its KL lies beyond PPO's sweep in some seed"
        cells.append(_cell(WHERE[setting], f"PPO − DPO (β {beta:g}) at matched KL",
                           h["offline"]["ppo_minus"] if h["offline"] else None, missing=missing))
    out["ppo_beats_dpo"] = cells
    if "ood" in head:
        d = ood_degradation(r["per_seed"], beta)
        out["dpo_degrades_ood"] = [_cell("in- vs out-of-distribution pairs", "DPO's extra shortfall below the "
                                         "in-distribution PPO frontier with out-of-distribution pairs", d,
                                         missing="a DPO row is missing or beyond PPO's KL sweep in some seed")]
    else:
        out["dpo_degrades_ood"] = [_cell("in- vs out-of-distribution pairs", "DPO with out-of-distribution pairs",
                                         None, missing="the out-of-distribution setting was not run")]
    cells = []
    for setting, h in head.items():
        for method, v in h["variants"].items():
            g, rem, imp = h["offline"]["ppo_minus"], v["row"]["ppo_minus"], v["improvement"]
            sides = (_side(g), _side(rem), _side(imp))
            verdict = ("cannot tell" if None in sides else "supports" if sides[0] == 1 and sides[2] == 1 and
                       sides[1] != 1 else "contradicts" if sides[1] == 1 else "cannot tell")
            c = _cell(f"{WHERE[setting]}, {VARIANTS[method]}", f"PPO − {VARIANTS[method]} DPO", rem, verdict)
            c["text"] += f", improvement over offline {_range(imp, short=True)} ({resolved_text(imp, short=True)})"
            c["intervals"] = {"ppo_minus_offline": g, "improvement": imp}
            cells.append(c)
    out["onpolicy_closes_gap"] = cells or [_cell("", "On-policy / iterative DPO beside offline DPO", None,
                                                 missing="not run at the same β, or beyond PPO's KL sweep")]
    return {k: {"claim": CLAIMS[k], "verdict": _combine(cells), "n_seeds": n, "cells": cells}
            for k, cells in out.items()}


def verdict_text(c: dict) -> str:
    return f"cannot tell at {c['n_seeds']} seed{'s' if c['n_seeds'] != 1 else ''}" if c["verdict"] == "cannot tell" \
        else c["verdict"]


def claims_markdown(judged: dict) -> list:
    """One bullet per claim: the verdict, then each cell's verdict and the numbers behind it (claim 3's cells
    leave PPO − offline DPO to claim 1's); in parentheses, as in the findings: resolved at the run's seeds, the
    seeds that would resolve it at this mean and spread, or mean ≈ 0."""
    return [f"- **{c['claim']}**: {verdict_text(c)}. "
            + "; ".join(f"{x['where'] + ': ' if x['where'] else ''}{x['text']}: {x['verdict']}" for x in c["cells"])
            + "." for c in judged.values()]
