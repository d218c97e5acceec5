"""Across-seed interval arithmetic of `fusealign compare`, on hand-computed cases."""

import math

import pytest

from fusealign.engine.stats import interpolate, mean_interval, t_quantile, t_two_sided_mass


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
