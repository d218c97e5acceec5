"""Across-seed interval arithmetic and the matched-KL difference of `fusealign compare`, on hand-computed cases."""

import math

import pytest

from fusealign.engine.study.report import headline, matched_differences
from fusealign.engine.study.stats import interpolate, mean_interval, t_quantile, t_two_sided_mass


def test_t_quantiles_closed_forms_and_table():
    """ν = 1 (Cauchy): F(t) = ½ + atan(t)/π, so t_0.975 = tan(0.475 π). ν = 2: F(t) = ½ + t / (2√(2 + t²)), so
    t/√(2 + t²) = 0.95 gives t² = 0.9025·2 / 0.0975 = 18.5128…, t = 4.3026527297. ν = 3, 10, 30: printed tables."""
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-12)
    assert t_quantile(0.975, 2) == pytest.approx(math.sqrt(1.805 / 0.0975), rel=1e-12)
    for dof, table in ((3, 3.182446), (4, 2.776445), (10, 2.228139), (30, 2.042272)):
        assert t_quantile(0.975, dof) == pytest.approx(table, abs=2e-6)
    assert t_quantile(0.95, 2) == pytest.approx(2.919986, abs=2e-6)
    assert t_two_sided_mass(0.0, 5) == 0.0 and t_two_sided_mass(1e6, 5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        t_quantile(0.3, 2)


def test_mean_interval_hand_computed():
    """[1, 2, 3]: mean 2, s = 1, half-width t(0.975, 2)·1/√3 = 4.3026527297 / 1.7320508076 = 2.4841377118.
    [0.5, 0.7]: mean 0.6, s = 0.1414213562, half-width 12.7062047362 · 0.1414213562 / √2 = 1.2706204736."""
    iv = mean_interval([1, 2, 3])
    assert iv["mean"] == 2.0 and iv["n"] == 3 and iv["values"] == [1.0, 2.0, 3.0]
    assert iv["ci"] == pytest.approx(2.4841377118, abs=1e-9)
    assert mean_interval([0.5, 0.7])["ci"] == pytest.approx(1.2706204736, abs=1e-9)
    assert mean_interval([0.25])["ci"] is None  # one seed: no interval
    assert mean_interval([0.3, 0.3, 0.3])["ci"] == 0.0
    with pytest.raises(ValueError):
        mean_interval([])


def test_interpolate_no_extrapolation():
    pts = [(4.0, 1.5), (0.0, 0.0), (2.0, 1.0)]  # unsorted on purpose
    assert interpolate(pts, 1.0) == 0.5
    assert interpolate(pts, 3.0) == 1.25
    assert interpolate(pts, 4.0) == 1.5 and interpolate(pts, 0.0) == 0.0
    assert interpolate(pts, 4.01) is None and interpolate(pts, -0.1) is None


def _row(method, knob, kl, reward, setting="in"):
    return {"method": method, "setting": setting, "knob": knob, "stage": f"{method}-{setting}-{knob}",
            "gt_reward": reward, "kl_to_sft": kl}


def test_matched_differences_hand_computed():
    """The frontier is piecewise linear in √KL (d) through SFT (d = 0) and the PPO points.
    Seed 0: (0, 0), (1, 0.6), (2, 1.0); DPO at KL 2.25 (d 1.5) has 0.3 → PPO there = 0.8, Δ = 0.5.
    Seed 1: (0, 0.1), (1, 0.5), (2, 0.9); DPO at KL 0.25 (d 0.5) has 0.1 → PPO there = 0.3, Δ = 0.2.
    Δ: mean 0.35, s = 0.2121320344, half-width 12.7062047362 · 0.2121320344 / √2 = 1.9059307104.
    On-policy DPO at KL 1 (0.6) and KL 4 (0.85): Δ = 0.0, 0.05 → improvement over offline per seed 0.5, 0.15.
    A row at KL 5 lies beyond PPO's largest KL (4) in seed 0: no difference."""
    per_seed = {
        0: [_row("SFT", None, 0.0, 0.0), _row("PPO", 0.2, 1.0, 0.6), _row("PPO", 0.05, 4.0, 1.0),
            _row("DPO", 0.5, 2.25, 0.3), _row("DPO-onpolicy", 0.5, 1.0, 0.6), _row("DPO", 0.1, 5.0, 0.1)],
        1: [_row("SFT", None, 0.0, 0.1), _row("PPO", 0.2, 1.0, 0.5), _row("PPO", 0.05, 4.0, 0.9),
            _row("DPO", 0.5, 0.25, 0.1), _row("DPO-onpolicy", 0.5, 4.0, 0.85), _row("DPO", 0.1, 3.0, 0.1)],
    }
    diffs = matched_differences(per_seed)
    assert [d["method"] for d in diffs] == ["DPO", "DPO-onpolicy", "DPO"]
    dpo, onpolicy, beyond = diffs
    assert dpo["ppo_minus"]["values"] == pytest.approx([0.5, 0.2])
    assert dpo["ppo_minus"]["mean"] == pytest.approx(0.35)
    assert dpo["ppo_minus"]["ci"] == pytest.approx(1.9059307104, abs=1e-9)
    assert onpolicy["ppo_minus"]["values"] == pytest.approx([0.0, 0.05])
    assert beyond["ppo_minus"] is None and beyond["beyond_ppo_kl_in_seeds"] == [0]
    head = headline(diffs, 0.5)["in"]  # the rows at the main β; the β 0.1 row is not quoted
    assert head["offline"] is dpo and head["variants"]["DPO-onpolicy"]["row"] is onpolicy
    assert head["variants"]["DPO-onpolicy"]["improvement"]["values"] == pytest.approx([0.5, 0.15])
    assert headline(diffs, 0.1)["in"]["offline"] is None  # beyond PPO's sweep: no matched comparison


def test_sentences_follow_the_intervals():
    """The generated findings name a winner only when the interval excludes 0, and say when one seed gives none."""
    from fusealign.engine.study.report import sentences

    def iv(mean, ci):
        return {"mean": mean, "ci": ci, "n": 3, "values": []}

    def row(method, mean, ci):
        return {"method": method, "setting": "in", "knob": 0.5, "ppo_minus": iv(mean, ci)}

    head = {"in": {"beta": 0.5, "offline": row("DPO", 0.30, 0.10), "offline_run": True,
                   "variants": {"DPO-onpolicy": {"row": row("DPO-onpolicy", 0.05, 0.08), "improvement": iv(0.25, 0.05)},
                                "DPO-iterative": {"row": row("DPO-iterative", 0.20, 0.05),
                                                  "improvement": iv(0.10, 0.04)}}},
            "ood": {"beta": 0.5, "offline": row("DPO", -0.02, 0.05), "offline_run": True,
                    "variants": {"DPO-onpolicy": {"row": row("DPO-onpolicy", 0.20, 0.05),
                                                  "improvement": iv(-0.22, 0.04)}}}}
    s_in, s_ood, s_on = sentences(head)
    assert "PPO − DPO (β 0.5) at matched KL is +0.300 (95 % interval +0.200 to +0.400): PPO wins" in s_in
    assert "no winner" in s_ood
    assert s_on.count("; ") == 4  # "β 0.5; [95 % interval]", then per setting: differences; improvements: verdict
    assert "on-policy data closes the gap, iterative data narrows the gap but PPO stays ahead" in s_on
    assert "offline DPO had no resolved gap to close (on-policy DPO is behind PPO and worse than offline DPO)" in s_on
    head["in"]["variants"]["DPO-onpolicy"]["improvement"] = iv(0.1, 0.14)
    assert "on-policy data does not measurably narrow the gap" in sentences(head)[2]
    head["in"]["variants"]["DPO-onpolicy"] = {"row": row("DPO-onpolicy", -0.2, 0.05), "improvement": iv(0.5, 0.05)}
    assert "on-policy data closes the gap and overtakes PPO" in sentences(head)[2]
    head["in"]["offline"]["ppo_minus"] = iv(-0.3, 0.1)
    assert "DPO wins" in sentences(head)[0]
    head["in"]["offline"]["ppo_minus"] = {"mean": 0.3, "ci": None, "n": 1, "values": [0.3]}
    assert "one seed" in sentences(head)[0] and "one seed cannot tell" in sentences(head)[2]
    head["in"]["offline"] = None
    assert "no matched-KL comparison with DPO at β 0.5 (its KL lies beyond PPO's sweep" in sentences(head)[0]


def test_seeds_to_resolve_hand_computed():
    """The smallest n with t(0.975, n − 1)·s/√n < |mean| (t from printed tables):
    mean 1, s 1: n = 6: 2.570582/√6 = 2.570582/2.449490 = 1.04944 ≥ 1; n = 7: 2.446912/2.645751 = 0.92485 < 1 → 7.
    mean 0.2, s 0.1 (ratio 2): n = 3: 4.302653/1.732051 = 2.48414 ≥ 2; n = 4: 3.182446/2 = 1.59122 < 2 → 4.
    mean −1.005, s 1.99/√2 = 1.407143 (ratio 0.714213): n = 10: 2.262157/3.162278 = 0.715356 ≥ 0.714213;
    n = 11: 2.228139/3.316625 = 0.671810 < 0.714213 → 11 (the sign does not matter).
    s = 0: the first n with an interval, 2."""
    from fusealign.engine.study.stats import seeds_to_resolve

    assert seeds_to_resolve(1.0, 1.0) == 7
    assert seeds_to_resolve(0.2, 0.1) == 4
    assert seeds_to_resolve(-1.005, 1.99 / math.sqrt(2)) == 11
    assert seeds_to_resolve(0.3, 0.0) == 2
    with pytest.raises(ValueError):
        seeds_to_resolve(0.0, 1.0)


def test_resolution_rule_and_its_cap():
    """[0.1, 0.2, 0.3]: mean 0.2, s 0.1, half-width 2.48414·0.1 = 0.248 > 0.2: not resolved at 3, 4 would
    (above). [0.1, 0.2, 0.3, 0.2] … resolved: mean 0.2, s = √(0.02/3) = 0.0816497, half-width
    3.182446·0.0816497/2 = 0.129924 < 0.2, needs 3: t(2)·s/√3 = 4.302653·0.0816497/1.732051 = 0.202832 ≥ 0.2, 4.
    ≈ 0 when |mean| ≤ s/√n: [0, 2]: mean 1 = s/√2 = √2/√2 exactly → ≈ 0; [0.01, 2]: mean 1.005 > 0.995 → 11
    seeds (above). The cap it implies, |mean| just above s/√n: n = 3, ratio 1/√3 = 0.577350: t(13)/√14 =
    2.160369/3.741657 = 0.577380 ≥, t(14)/√15 = 2.144787/3.872983 = 0.553782 < → 15; n = 10, ratio 0.316228:
    t(39)/√40 = 2.022691/6.324555 = 0.319818 ≥, t(40)/√41 = 2.021075/6.403124 = 0.315638 < → 41."""
    from fusealign.engine.study.stats import APPROX_ZERO, resolution, seeds_to_resolve

    r = resolution(mean_interval([0.1, 0.2, 0.3]))
    assert r["sd"] == pytest.approx(0.1) and not r["resolved"] and r["seeds_needed"] == 4 and r["note"] is None
    r = resolution(mean_interval([0.1, 0.2, 0.3, 0.2]))
    assert r["resolved"] and r["seeds_needed"] == 4 and r["sd"] == pytest.approx(0.0816497, abs=1e-7)
    assert resolution(mean_interval([0.0, 2.0])) == {"sd": pytest.approx(math.sqrt(2)), "resolved": False,
                                                     "seeds_needed": None, "note": APPROX_ZERO}
    assert resolution(mean_interval([0.01, 2.0]))["seeds_needed"] == 11
    assert resolution(mean_interval([-0.1, 0.0, 0.13]))["note"] == APPROX_ZERO  # mean 0.01, s/√3 = 0.0666
    assert resolution(mean_interval([0.0, 0.0]))["note"] == APPROX_ZERO  # s = 0, mean 0
    assert resolution(mean_interval([0.2, 0.2]))["resolved"]  # s = 0, mean ≠ 0: resolved at 2
    assert resolution(mean_interval([0.4])) is None  # one seed: no spread
    for n, cap in ((3, 15), (10, 41)):
        assert seeds_to_resolve(1 / math.sqrt(n) * (1 + 1e-9), 1.0) == cap
    # resolved at the run's seeds exactly when the seeds needed are at most the run's (t·s/√n falls with n)
    for xs in ([0.3, 0.1, 0.25], [0.05, 0.3, 0.12, 0.2], [-0.2, -0.1, 0.05, -0.3, -0.15]):
        r = resolution(mean_interval(xs))
        assert r["resolved"] == (r["seeds_needed"] <= len(xs)), xs


def test_resolution_wording():
    """resolved_text and the diff table's two columns, on the cases above."""
    from fusealign.engine.study.report import diff_table, resolved_text

    unresolved, resolved, zero = (mean_interval(xs) for xs in ([0.1, 0.2, 0.3], [0.2, 0.25, 0.3], [-0.1, 0.0, 0.13]))
    assert resolved_text(unresolved) == "not resolved at 3 seeds; 4 would resolve it at this mean and spread"
    assert resolved_text(resolved) == "resolved at 3 seeds"  # s 0.05, half-width 0.124 < 0.25
    assert resolved_text(zero) == "not resolved at 3 seeds; not resolvable: mean ≈ 0"
    assert resolved_text(mean_interval([0.3])) == "one seed: no spread"
    assert [resolved_text(iv, short=True) for iv in (unresolved, resolved, zero)] == ["needs 4 seeds", "resolved",
                                                                                       "mean ≈ 0"]
    rows = [{"stage": s, "kl_to_sft": mean_interval([1.0, 1.0, 1.0])} for s in "abcd"]
    diffs = [{"method": "DPO", "setting": "in", "knob": 0.5, "stage": s, "ppo_minus": iv, "beyond_ppo_kl_in_seeds": b}
             for s, iv, b in (("a", unresolved, []), ("b", resolved, []), ("c", zero, []), ("d", None, [1]))]
    lines = diff_table(diffs, rows).splitlines()
    assert lines[0].endswith("| resolved at 3 seeds | seeds to resolve |")
    assert lines[2].endswith("| 0.200 ± 0.248 | no | 4 |")
    assert lines[3].endswith("| 0.250 ± 0.124 | yes | 3 |")
    assert lines[4].endswith("| no | not resolvable: mean ≈ 0 |")
    assert lines[5].endswith("beyond PPO's largest KL (seeds [1]) | – | – |")
