"""Statistics of small studies, with the trained model as the replicate.

A router study compares configs trained with several seeds and evaluated on
one test set. Two sources of noise set what it can decide:

  * the test set: an accuracy over N images has a binomial standard error
    sqrt(p (1 - p) / N) (0.021 at p = 0.85, N = 300), `accuracy_interval`;
  * training: models of different seeds differ; a comparison of configs A
    and B pairs their models by seed and tests the mean of the n paired
    differences (`paired_test`). The spread of those differences includes
    the test-set noise, since every model is scored on the same images.

Measurements made on one trained model (several capacity factors, several
images) are not independent replicates: average them per model first.

`minimum_detectable_effect` is the smallest true difference a one-sided
paired t-test at level alpha detects with the given power from n models,
given the spread of the differences; where the study has no spread yet it
falls back to the test-set floor, the difference the binomial noise of two
accuracies on N images alone would hide.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate with a two-sided confidence interval."""
  estimate: float
  low: float
  high: float
  level: float
  basis: str  # what the interval is over ('test images', 'seeds')

  def __str__(self) -> str:
    return (f'{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}] '
            f'({self.level:.0%} over {self.basis})')


def accuracy_interval(correct: int, total: int, level: float = 0.95
                      ) -> Interval:
  """Wilson score interval of one model's accuracy over `total` test images
  (binomial noise of the test set only)."""
  if total <= 0:
    raise ValueError(f'total={total} must be positive')
  p = correct / total
  z = float(stats.norm.ppf(0.5 + level / 2))
  denominator = 1 + z * z / total
  centre = (p + z * z / (2 * total)) / denominator
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)
                       ) / denominator
  return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level,
                  f'{total} test images')


def seed_interval(values: Sequence[float], level: float = 0.95) -> Interval:
  """Student-t interval of the mean over independently trained models
  (seeds); nan bounds with fewer than two."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean()) if x.size else float('nan')
  if x.size < 2:
    return Interval(mean, float('nan'), float('nan'), level,
                    f'{x.size} seed(s)')
  half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1)
               / math.sqrt(x.size))
  return Interval(mean, mean - half, mean + half, level, f'{x.size} seeds')


@dataclasses.dataclass(frozen=True)
class PairedTest:
  """One-sided paired t-test of mean(a - b) > 0 over n paired models."""
  n: int
  mean: float       # mean paired difference
  sd: float         # standard deviation of the differences (ddof 1)
  p_greater: float  # p-value of 'a > b'
  p_less: float     # p-value of 'a < b'

  @property
  def se(self) -> float:
    return self.sd / math.sqrt(self.n) if self.n else float('nan')

  def __str__(self) -> str:
    return (f'difference {self.mean:+.4f} +- {self.se:.4f} (n={self.n}, '
            f'p={self.p_greater:.3f})')


def paired_test(a: Sequence[float], b: Sequence[float]) -> PairedTest:
  """a[i], b[i]: one value per trained model, paired (same seed)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f'paired_test: unpaired values {a.shape} vs {b.shape}')
  n = a.size
  diff = a - b
  mean = float(diff.mean()) if n else float('nan')
  if n < 2:
    return PairedTest(n, mean, float('nan'), float('nan'), float('nan'))
  sd = float(diff.std(ddof=1))
  if sd == 0:
    greater = 0.0 if mean > 0 else 1.0
    return PairedTest(n, mean, sd, greater, 0.0 if mean < 0 else 1.0)
  t = mean / (sd / math.sqrt(n))
  return PairedTest(n, mean, sd, float(stats.t.sf(t, n - 1)),
                    float(stats.t.cdf(t, n - 1)))


def image_noise_floor(accuracy: float, test_images: int) -> float:
  """The standard error of a difference of two accuracies near `accuracy`,
  each over `test_images` images, if the images' noise were independent: a
  floor under the spread of paired differences that seeds cannot remove."""
  p = min(max(accuracy, 0.0), 1.0)
  return math.sqrt(2 * p * (1 - p) / test_images)


def minimum_detectable_effect(n: int, sd: float, *, alpha: float = 0.05,
                              power: float = 0.8) -> float:
  """Smallest true mean difference a one-sided paired t-test at `alpha`
  detects with probability `power` from n pairs whose differences have
  standard deviation `sd` (the noncentral-t approximation
  (t_{1-alpha} + t_{power}) sd / sqrt(n), n - 1 degrees of freedom)."""
  if n < 2 or not math.isfinite(sd):
    return float('inf')
  df = n - 1
  return float((stats.t.ppf(1 - alpha, df) + stats.t.ppf(power, df))
               * sd / math.sqrt(n))


def seeds_needed(effect: float, sd: float, *, alpha: float = 0.05,
                 power: float = 0.8, limit: int = 10_000) -> int | None:
  """Fewest paired models that detect `effect` with `power` (None beyond
  `limit`): the scale a study would need to decide."""
  if effect <= 0 or not math.isfinite(sd):
    return None
  if sd == 0:
    return 2
  for n in range(2, limit + 1):
    if minimum_detectable_effect(n, sd, alpha=alpha, power=power) <= effect:
      return n
  return None
