"""The layer-placement report's statistics against plain computations:
Spearman correlations (scipy), norm statistics by hand, the NMI
permutation null on synthetic traces."""

import numpy as np
import pytest
from scipy import stats

from vmoe import analysis
from vmoe.analysis import report


def test_row_spearman_equals_scipy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
  b[3] = a[3] * 2 + 1                       # perfectly monotone row
  got = report._spearman_rows(a, b)  # pylint: disable=protected-access
  ref = [stats.spearmanr(x, y).statistic for x, y in zip(a, b)]
  np.testing.assert_allclose(got, ref, atol=1e-12)
  assert got[3] == pytest.approx(1.0)


def test_norm_statistics_by_hand():
  norms = np.array([[1., 3., 2.], [5., 1., 1.]])
  probs = np.array([[.2, .7, .1], [.1, .1, .8]])
  s = report.norm_statistics(norms, probs)
  # Token 0: top expert 1 is also the largest norm; token 1: expert 2 (norm
  # 1) against the largest norm of expert 0.
  assert s['norm_top1_agreement'] == 0.5
  assert s['norm_top1_ratio'] == pytest.approx((3 / 1.5 + 1 / 3) / 2)


def _trace(assigned, labels):
  m, n, e = assigned.shape
  layer = analysis.LayerTrace(
      block=0, router='token_choice', num_experts=e, capacity=n,
      group_size=n, top_expert=np.argmax(assigned, -1).astype(np.int32),
      assigned=assigned, dropped=~assigned.any(-1),
      entropy=np.zeros((m, n)), gate_mass=np.zeros((m, e)))
  return analysis.Trace(layers={0: layer}, labels=labels,
                        logits=np.zeros((m, 2)), num_prefix_tokens=0,
                        grid=(1, n))


def test_nmi_null_separates_specialised_from_class_blind_routing():
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(4), 10)
  specialised = np.zeros((40, 6, 4), bool)
  specialised[np.arange(40), :, labels] = True    # class c -> expert c
  observed, null = report.nmi_null(_trace(specialised, labels), 0,
                                   permutations=50)
  assert observed == pytest.approx(1.0) and null.max() < 0.5
  blind = np.zeros((40, 6, 4), bool)
  blind[np.arange(40)[:, None], np.arange(6)[None], rng.integers(
      0, 4, (40, 6))] = True
  observed, null = report.nmi_null(_trace(blind, labels), 0, permutations=50)
  assert (1 + np.sum(null >= observed)) / 51 > 0.05
