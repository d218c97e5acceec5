"""Across-seed statistics of `fusealign compare`: mean and a 95 % Student-t interval, and matched-KL differences.

With n seeds x_1 … x_n (each one a whole training run), the interval is

    x̄ ± t_{0.975, n−1} · s / √n,        s² = Σ (x_i − x̄)² / (n − 1)

— the t-interval with n − 1 degrees of freedom, the honest choice for a handful of runs (with 3 seeds
t = 4.303, against 1.96 for a normal interval that would claim twice the confidence it has). It assumes the
run-to-run spread is roughly normal; with 3 seeds nothing sharper can be checked. One seed: no interval.

A paired difference (PPO − DPO on the same seed, hence the same SFT policy and reward model) is summarised
the same way over its per-seed differences, which removes the spread the two share.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence


def t_two_sided_mass(t: float, dof: int) -> float:
    """P(|T| ≤ t) for Student's t with an integer number of degrees of freedom (closed form, Abramowitz &
    Stegun 26.7.3–4): with θ = atan(t / √ν),
        ν odd:  (2/π) (θ + sin θ · [cos θ + (2/3) cos³θ + … + (2·4⋯(ν−3))/(1·3⋯(ν−2)) cos^{ν−2}θ])
        ν even: sin θ · [1 + (1/2) cos²θ + (1·3)/(2·4) cos⁴θ + … + (1·3⋯(ν−3))/(2·4⋯(ν−2)) cos^{ν−2}θ]
    """
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    theta = math.atan(abs(t) / math.sqrt(dof))
    c, s = math.cos(theta), math.sin(theta)
    if dof % 2:
        series, term = 0.0, c
        for k in range(1, (dof - 1) // 2 + 1):  # terms cos^1, cos^3, …, cos^{ν−2}
            series += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * series) if dof > 1 else 2 * theta / math.pi
    series, term = 0.0, 1.0
    for k in range(1, dof // 2 + 1):  # terms cos^0, cos^2, …, cos^{ν−2}
        series += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * series


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile (p > ½) of Student's t with `dof` degrees of freedom, by bisection on the closed form."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must lie in (0.5, 1), got {p}")
    mass = 2 * p - 1  # two-sided: P(|T| ≤ q) = 2p − 1
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, dof) < mass:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided_mass(mid, dof) < mass else (lo, mid)
        if hi - lo < 1e-13 * max(1.0, hi):
            break
    return (lo + hi) / 2


def mean_interval(xs: Sequence[float], level: float = 0.95) -> dict:
    """{"mean", "ci": half-width of the `level` t-interval (None with fewer than 2 values), "n", "values"}."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    mean = sum(xs) / n
    ci: Optional[float] = None
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        ci = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci": ci, "n": n, "values": xs}


def interpolate(points: Sequence[tuple], x: float) -> Optional[float]:
    """Piecewise-linear y(x) through (x, y) points (sorted here by x); None outside [min x, max x]: no extrapolation."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point, x equal to it


# --- how many seeds would resolve a difference ------------------------------------------------------------
APPROX_ZERO = "not resolvable: mean ≈ 0"


def seeds_to_resolve(mean: float, sd: float, level: float = 0.95) -> int:
    """The smallest n ≥ 2 with t_{(1+level)/2, n−1} · sd / √n < |mean|: the number of seeds whose `level`
    t-interval would exclude 0 if the mean and the per-seed spread sd stayed as observed (a projection, not a
    power calculation: the next seeds move both). mean ≠ 0. t_{·, n−1}/√n falls strictly as n grows (both
    factors do), so the first n found by doubling and then bisecting is the smallest."""
    if mean == 0:
        raise ValueError("a mean of exactly 0 is resolved by no number of seeds")
    p = 0.5 + level / 2

    def resolves(n: int) -> bool:
        return t_quantile(p, n - 1) * sd / math.sqrt(n) < abs(mean)

    hi = 2
    while not resolves(hi):
        hi *= 2
    lo = hi // 2  # resolves(lo) is False, or lo = 1 (below the smallest n with an interval)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if resolves(mid) else (mid, hi)
    return hi


def resolution(iv: dict, level: float = 0.95) -> Optional[dict]:
    """Is a paired difference (a `mean_interval` over seeds) resolved at its seeds, and how many would resolve it?

    -> {"sd": s, "resolved": the interval excludes 0, "seeds_needed": `seeds_to_resolve(mean, s)` or None,
        "note": None or APPROX_ZERO}; None with one seed (no spread, no interval).

    "≈ 0", the rule: |mean| ≤ s/√n, the observed mean lies within one standard error of 0 (|t| ≤ 1). Then the
    data are about as consistent with the opposite sign as with this one (0 is inside the interval's central
    part, ±1 s.e. of ±t·s.e.), so a seed count projected from this mean would be a projection from noise. It
    is a cap in disguise: with |mean| > s/√n the count reported is at most 11, 15, 22, 41 for n = 2, 3, 5, 10
    (about 4 n; tests/engine/test_stats.py). A ≈ 0 difference is never resolved at the run's own seeds, since
    t(0.975, ·) > 1. A mean of exactly 0 with s = 0 is ≈ 0 too; s = 0 with a non-zero mean is resolved at 2."""
    if iv["ci"] is None:
        return None
    xs, n, mean = iv["values"], iv["n"], iv["mean"]
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    resolved = abs(mean) > iv["ci"]
    if abs(mean) <= sd / math.sqrt(n):
        return {"sd": sd, "resolved": False, "seeds_needed": None, "note": APPROX_ZERO}
    return {"sd": sd, "resolved": resolved, "seeds_needed": seeds_to_resolve(mean, sd, level), "note": None}
