"""The verdict rules of vmoe.analysis.claims: three verdicts, the trained
model as the replicate, the minimum detectable effect in the detail."""

import math

import numpy as np
import pytest

from vmoe.analysis import claims
from vmoe.analysis import stats


def test_a_significant_difference_is_reproduced():
  v = claims.greater([0.9, 0.8, 0.85], [0.7, 0.6, 0.66])
  assert v.status == claims.REPRODUCED and v.n == 3
  assert claims.greater([1, 2, 3], [0, 0, 0]).detail.endswith('p=0.037)')


def test_a_significant_reversal_is_not_reproduced():
  v = claims.greater([0.1, 0.2, 0.15], [0.3, 0.5, 0.36])
  assert v.status == claims.NOT_REPRODUCED and v.detail.startswith('reversed')


def test_an_excluded_effect_is_not_reproduced_and_noise_is_inconclusive():
  # 20 models, differences tightly around 0: an effect of 0.01 is excluded.
  rng = np.random.default_rng(0)
  b = rng.uniform(0.8, 0.9, 20)
  a = b + rng.normal(0, 0.002, 20)
  v = claims.greater(a, b, smallest_effect=0.01)
  assert v.status == claims.NOT_REPRODUCED and 'excluded' in v.detail
  # The same question with 3 noisy models: underpowered, with the numbers.
  v = claims.greater([0.85, 0.80, 0.83], [0.84, 0.82, 0.80],
                     smallest_effect=0.01, test_images=300)
  assert v.status == claims.INCONCLUSIVE
  floor = stats.image_noise_floor(np.mean([0.85, 0.80, 0.83, 0.84, 0.82,
                                           0.80]), 300)
  sd = max(float(np.std(np.subtract([0.85, 0.80, 0.83],
                                    [0.84, 0.82, 0.80]), ddof=1)), floor)
  mde = stats.minimum_detectable_effect(3, sd)
  assert v.mde == pytest.approx(mde)
  assert f'minimum detectable effect {mde:.4f} at n=3 models and 300 test ' \
         'images' in v.detail
  assert f'{stats.seeds_needed(0.01, sd)} models per config' in v.detail


def test_one_model_per_side_and_ceilings_are_inconclusive():
  v = claims.greater([0.9], [0.1])
  assert v.status == claims.INCONCLUSIVE and math.isinf(v.mde)
  assert claims.greater([1.0, 1.0], [1.0, 1.0], ceiling=1.0).status == (
      claims.INCONCLUSIVE)
  with pytest.raises(ValueError, match='unpaired'):
    claims.greater([1, 2], [1, 2, 3])


def test_ordering_combines_the_adjacent_pairs():
  values = {'soft': [3, 3.1, 3.2], 'ec': [2, 2.2, 2.1], 'tc': [1, 1.1, 1.0]}
  assert claims.ordering(values, ['soft', 'ec', 'tc']).status == (
      claims.REPRODUCED)
  assert claims.ordering(values, ['ec', 'soft', 'tc']).status == (
      claims.NOT_REPRODUCED)
  assert claims.ordering(values, ['soft', 'x']).status == claims.INCONCLUSIVE
  noisy = {'a': [1.0, 0.0, 2.0], 'b': [0.5, 0.4, 0.6], 'c': [0.1, 0.2, 0.0]}
  assert claims.ordering(noisy, ['a', 'b', 'c']).status == claims.INCONCLUSIVE


def test_increasing_and_sanity_labels():
  assert claims.increasing([4, 16, 8], [0.1, 0.3, 0.2]).status == (
      claims.REPRODUCED)
  assert claims.increasing([4, 8, 16], [0.1, 0.3, 0.2]).status == (
      claims.NOT_REPRODUCED)
  assert claims.sanity(True, 'x').status == claims.SANITY_HOLDS
  assert claims.sanity(False, 'x').status == claims.SANITY_FAILS
  assert claims.SANITY_HOLDS not in claims.VERDICTS


def test_per_model_averages_within_a_model():
  values = {(0, 1, 'a'): 0.1, (0, 3, 'b'): 0.3, (1, 1, 'a'): 0.5, 2: 0.7}
  assert claims.per_model(values) == {0: pytest.approx(0.2), 1: 0.5, 2: 0.7}
