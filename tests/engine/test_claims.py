"""The seed document's claims judged from a compare result (engine/study/claims.py), on hand-computed cases."""

import pytest

from fusealign.engine.study.claims import _combine, claims_markdown, judge, ood_degradation
from fusealign.engine.study.report import headline, matched_differences, sentences
from fusealign.engine.study.stats import mean_interval

ABOVE, LEVEL, BELOW = [0.3, 0.35, 0.4], [-0.05, 0.0, 0.06], [-0.4, -0.35, -0.3]  # 3 seeds: sides +, 0, −


def _row(method, setting, knob, kl, reward):
    return {"method": method, "setting": setting, "knob": knob, "stage": f"{method}-{setting}-{knob}",
            "gt_reward": reward, "kl_to_sft": kl}


def _seed(dpo_in, dpo_ood):
    """One seed: the in-distribution PPO frontier in d = √KL runs through (0, 0), (1, 0.6), (2, 1.0); the
    out-of-distribution one through (0, 0), (1, 0.5), (2, 0.9). dpo_*: (KL, reward) of offline DPO at β 0.5."""
    return [_row("SFT", "in", None, 0.0, 0.0), _row("PPO", "in", 0.2, 1.0, 0.6), _row("PPO", "in", 0.05, 4.0, 1.0),
            _row("DPO", "in", 0.5, *dpo_in), _row("PPO", "ood", 0.2, 1.0, 0.5), _row("PPO", "ood", 0.05, 4.0, 0.9),
            _row("DPO", "ood", 0.5, *dpo_ood)]


def test_ood_degradation_hand_computed():
    """D = [F_in(d of DPO_ood) − r(DPO_ood)] − [F_in(d of DPO_in) − r(DPO_in)], F_in the in-distribution frontier.
    Seed 0: DPO_in at KL 1 (d 1), reward 0.4: 0.6 − 0.4 = 0.2; DPO_ood at KL 2.25 (d 1.5), reward 0.5:
    F_in = 0.8, 0.8 − 0.5 = 0.3; D = 0.1. (Its own, out-of-distribution frontier would give 0.7 − 0.5 = 0.2:
    D measures both DPO policies with one ruler.) Seed 1: DPO_in at KL 0.25 (d 0.5), reward 0.1: 0.3 − 0.1 =
    0.2; DPO_ood at KL 1, reward 0.35: 0.6 − 0.35 = 0.25; D = 0.05. A DPO row beyond F_in's largest KL (4):
    no D."""
    per_seed = {"0": _seed((1.0, 0.4), (2.25, 0.5)), "1": _seed((0.25, 0.1), (1.0, 0.35))}
    d = ood_degradation(per_seed, 0.5)
    assert d["values"] == pytest.approx([0.1, 0.05]) and d["mean"] == pytest.approx(0.075)
    assert ood_degradation({"0": _seed((1.0, 0.4), (5.0, 0.5))}, 0.5) is None
    assert ood_degradation(per_seed, 0.1) is None  # no DPO row at that β


def _iv(xs):
    return mean_interval(xs)


def _report(g_in, g_ood, variants, per_seed=None):
    """A compare.json-shaped dict whose headline holds the given per-seed differences (3 seeds)."""
    def diff(method, setting, xs):
        return {"method": method, "setting": setting, "knob": 0.5, "ppo_minus": _iv(xs)}

    head = {}
    for setting, g in (("in", g_in), ("ood", g_ood)):
        h = {"beta": 0.5, "offline": diff("DPO", setting, g), "offline_run": True, "variants": {}}
        for (s, method), rem in variants.items():
            if s == setting:
                h["variants"][method] = {"row": diff(method, setting, rem),
                                         "improvement": _iv([a - b for a, b in zip(g, rem)])}
        head[setting] = h
    per_seed = per_seed or {str(k): _seed((1.0, 0.4), (2.25, 0.5 - 0.1 * k)) for k in range(3)}  # D = 0.1, 0.2, 0.3
    return {"headline": head, "preset": {"main_beta": 0.5}, "seeds": [0, 1, 2], "per_seed": per_seed}


def test_claim_verdicts_follow_the_rules():
    """Claim 1 per setting from PPO − offline DPO; claim 2 from D (0.1, 0.2, 0.3: mean 0.2, s 0.1, half-width
    0.248: contains 0); claim 3 per cell: supports when G and the improvement I = G − R lie above 0 and R does
    not; contradicts when R lies above 0."""
    big = [0.6, 0.7, 0.8]  # G, resolved above 0; G − LEVEL = [0.65, 0.7, 0.74]: I above 0
    r = _report(big, LEVEL, {("in", "DPO-onpolicy"): LEVEL, ("in", "DPO-iterative"): ABOVE})
    j = judge(r)
    assert [c["verdict"] for c in j["ppo_beats_dpo"]["cells"]] == ["supports", "cannot tell"]
    assert j["ppo_beats_dpo"]["verdict"] == "supports"
    assert j["dpo_degrades_ood"]["verdict"] == "cannot tell" and j["dpo_degrades_ood"]["n_seeds"] == 3
    assert j["dpo_degrades_ood"]["cells"][0]["interval"]["values"] == pytest.approx([0.1, 0.2, 0.3])
    on, it = j["onpolicy_closes_gap"]["cells"]
    assert on["verdict"] == "supports"  # gap above 0, improvement above 0, nothing left measurably
    assert it["verdict"] == "contradicts"  # PPO stays measurably ahead of iterative DPO (narrowed: I = 0.3 > 0)
    assert j["onpolicy_closes_gap"]["verdict"] == "mixed"
    # PPO − DPO below 0 in both settings: contradicts; a degradation resolved above 0: supports
    per_seed = {str(k): _seed((1.0, 0.4), (2.25, 0.5 - 0.01 * k)) for k in range(3)}  # D = 0.1, 0.11, 0.12
    j = judge(_report(BELOW, BELOW, {}, per_seed))
    assert j["ppo_beats_dpo"]["verdict"] == "contradicts" and j["dpo_degrades_ood"]["verdict"] == "supports"
    assert j["onpolicy_closes_gap"]["verdict"] == "cannot tell"  # not run: one "not measured" cell
    assert "not measured" in j["onpolicy_closes_gap"]["cells"][0]["text"]
    # no resolved gap (G contains 0): a variant level with PPO cannot tell; one behind PPO contradicts
    j = judge(_report(LEVEL, LEVEL, {("in", "DPO-onpolicy"): LEVEL, ("ood", "DPO-onpolicy"): ABOVE}))
    assert [c["verdict"] for c in j["onpolicy_closes_gap"]["cells"]] == ["cannot tell", "contradicts"]
    assert j["onpolicy_closes_gap"]["verdict"] == "contradicts"
    assert _combine([{"verdict": "cannot tell"}, {"verdict": "cannot tell"}]) == "cannot tell"


def test_claims_wording():
    big = [0.6, 0.7, 0.8]
    lines = claims_markdown(judge(_report(big, LEVEL, {("in", "DPO-onpolicy"): LEVEL})))
    assert len(lines) == 3
    assert lines[0].startswith("- **PPO beats DPO**: supports. in-distribution: PPO − DPO (β 0.5) at matched KL "
                               "+0.700 [+0.452, +0.948] (resolved): supports; out-of-distribution: ")
    assert "(mean ≈ 0): cannot tell." in lines[0]  # LEVEL: mean 0.00333, s/√3 = 0.0318
    assert lines[1].startswith("- **DPO degrades with out-of-distribution preference data**: cannot tell at 3 "
                               "seeds. ") and "+0.200 [-0.048, +0.448] (needs 4 seeds): cannot tell." in lines[1]
    assert lines[2].startswith("- **On-policy / iterative DPO closes the gap (Xu et al. 2024)**: supports. "
                               "in-distribution, on-policy: PPO − on-policy DPO ")


def test_findings_say_whether_resolved():
    """The findings' sentences carry the resolution: G = [0.1, 0.2, 0.3] is not resolved at 3 seeds, 4 would;
    LEVEL = [−0.05, 0, 0.06]: mean 0.00333, s = 0.0550757, s/√3 = 0.0317980 ≥ |mean|: ≈ 0;
    ± 4.302653·0.0317980 = 0.136816: [0.003333 − 0.136816, 0.003333 + 0.136816] = [−0.133483, +0.140149]."""
    head = _report([0.1, 0.2, 0.3], [0.2, 0.25, 0.3], {("in", "DPO-onpolicy"): LEVEL})["headline"]
    s_in, s_ood, s_on = sentences(head)
    assert s_in.endswith("no winner at this number of seeds (not resolved at 3 seeds; 4 would resolve it at this "
                         "mean and spread).")
    assert s_ood.endswith(": PPO wins (resolved at 3 seeds).")
    assert "+0.200 [-0.048, +0.448] offline (needs 4 seeds), +0.003 [-0.133, +0.140] on-policy (mean ≈ 0)" in s_on


def test_matched_differences_store_the_resolution():
    """compare.json gains, per difference and per improvement, the resolution (additive keys)."""
    per_seed = {str(k): _seed((1.0, 0.4 - 0.05 * k), (2.25, 0.5)) for k in range(3)}  # PPO − DPO_in 0.2, 0.25, 0.3
    diffs = matched_differences(per_seed)
    d = next(x for x in diffs if x["setting"] == "in")
    assert d["ppo_minus"]["values"] == pytest.approx([0.2, 0.25, 0.3])
    assert d["resolution"]["resolved"] and d["resolution"]["seeds_needed"] == 3
    assert headline(diffs, 0.5)["in"]["variants"] == {}
