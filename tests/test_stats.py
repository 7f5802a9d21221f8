"""vmoe.analysis.stats against scipy and hand values."""

import math

import numpy as np
import pytest
from scipy import stats as sp

from vmoe.analysis import stats


def test_accuracy_interval_is_wilson():
  ci = stats.accuracy_interval(85, 100)
  # Wilson score interval of 85/100 at 95% (hand computation).
  assert ci.estimate == 0.85
  assert ci.low == pytest.approx(0.7672, abs=1e-4)
  assert ci.high == pytest.approx(0.9069, abs=1e-4)
  edge = stats.accuracy_interval(300, 300)
  assert edge.high == pytest.approx(1.0) and 0.98 < edge.low < 1.0
  with pytest.raises(ValueError):
    stats.accuracy_interval(0, 0)


def test_seed_interval_is_student_t():
  x = [0.81, 0.84, 0.79, 0.86]
  ci = stats.seed_interval(x)
  low, high = sp.t.interval(0.95, 3, loc=np.mean(x), scale=sp.sem(x))
  assert (ci.low, ci.high) == pytest.approx((low, high))
  assert math.isnan(stats.seed_interval([0.8]).low)


def test_paired_test_matches_scipy():
  rng = np.random.default_rng(0)
  a = rng.normal(0.85, 0.01, 6)
  b = a - rng.normal(0.004, 0.006, 6)
  test = stats.paired_test(a, b)
  want = sp.ttest_rel(a, b, alternative='greater')
  assert test.p_greater == pytest.approx(want.pvalue)
  assert test.p_less == pytest.approx(
      sp.ttest_rel(a, b, alternative='less').pvalue)
  assert test.n == 6 and test.mean == pytest.approx(np.mean(a - b))
  assert math.isnan(stats.paired_test([1.0], [0.0]).p_greater)
  with pytest.raises(ValueError):
    stats.paired_test([1.0, 2.0], [1.0])


def test_minimum_detectable_effect_has_the_stated_power():
  """At the MDE, the exact power of the one-sided paired t-test (noncentral
  t) is close to the asked 0.8, and the MDE shrinks with more seeds."""
  sd = 0.01
  for n in (3, 6, 12):
    mde = stats.minimum_detectable_effect(n, sd)
    critical = sp.t.ppf(0.95, n - 1)
    power = sp.nct.sf(critical, n - 1, mde / (sd / math.sqrt(n)))
    assert 0.75 < power < 0.85, (n, power)
  assert (stats.minimum_detectable_effect(12, sd)
          < stats.minimum_detectable_effect(6, sd)
          < stats.minimum_detectable_effect(3, sd))
  assert stats.minimum_detectable_effect(1, sd) == math.inf


def test_seeds_needed_is_the_first_n_that_detects():
  n = stats.seeds_needed(0.01, 0.02)
  assert stats.minimum_detectable_effect(n, 0.02) <= 0.01
  assert stats.minimum_detectable_effect(n - 1, 0.02) > 0.01
  assert stats.seeds_needed(0.0, 0.02) is None
  assert stats.seeds_needed(1e-6, 1.0, limit=50) is None


def test_image_noise_floor():
  assert stats.image_noise_floor(0.85, 300) == pytest.approx(
      math.sqrt(2 * 0.85 * 0.15 / 300))
