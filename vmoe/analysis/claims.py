"""Verdicts on published claims from measured values, by rules fixed in
advance (the router study applies them to whatever it measures; nothing here
looks at the expected answer).

Statuses:
  'reproduced': the claimed direction holds and is significant: a one-sided
    paired t-test over seeds (or other paired replicates) at level alpha
    (0.05) when comparing noisy numbers, or the exact property for
    deterministic ones;
  'not reproduced': the direction is reversed, or the difference is within
    the replicate noise (the detail says which);
  'not testable at this scale': fewer than two replicates, or the numbers sit
    at a ceiling where the claim cannot show.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

REPRODUCED = 'reproduced'
NOT_REPRODUCED = 'not reproduced'
NOT_TESTABLE = 'not testable at this scale'


@dataclasses.dataclass(frozen=True)
class Verdict:
  status: str
  detail: str


def greater(a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05,
            ceiling: float | None = None) -> Verdict:
  """Is a > b? a[i], b[i] are paired (same seed / same setting)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f'greater: unpaired values {a.shape} vs {b.shape}')
  n = a.size
  diff = a - b
  mean = float(diff.mean()) if n else float('nan')
  if n < 2:
    return Verdict(NOT_TESTABLE, f'{n} replicate(s); difference {mean:+.4f}')
  if ceiling is not None and a.mean() >= ceiling and b.mean() >= ceiling:
    return Verdict(NOT_TESTABLE, f'both at the ceiling {ceiling}')
  sd = float(diff.std(ddof=1))
  if sd == 0:
    p = 0.0 if mean > 0 else 1.0
  else:
    p = float(stats.t.sf(mean / (sd / np.sqrt(n)), n - 1))
  detail = f'difference {mean:+.4f} +- {sd / np.sqrt(n):.4f} (n={n}, p={p:.3f})'
  if p < alpha:
    return Verdict(REPRODUCED, detail)
  why = 'reversed' if mean < 0 else 'within noise'
  return Verdict(NOT_REPRODUCED, f'{why}: {detail}')


def ordering(values: Mapping[str, Sequence[float]], order: Sequence[str], *,
             alpha: float = 0.05, ceiling: float | None = None) -> Verdict:
  """Does order[0] > order[1] > ... hold (pairwise, adjacent pairs)?

  values: name -> paired replicates. Missing names make it not testable.
  """
  missing = [name for name in order if name not in values]
  if missing:
    return Verdict(NOT_TESTABLE, f'not measured: {", ".join(missing)}')
  verdicts = [(hi, lo, greater(values[hi], values[lo], alpha=alpha,
                               ceiling=ceiling))
              for hi, lo in zip(order, order[1:])]
  detail = '; '.join(f'{hi} > {lo}: {v.status} ({v.detail})'
                     for hi, lo, v in verdicts)
  statuses = {v.status for _, _, v in verdicts}
  if NOT_TESTABLE in statuses:
    return Verdict(NOT_TESTABLE, detail)
  if statuses == {REPRODUCED}:
    return Verdict(REPRODUCED, detail)
  return Verdict(NOT_REPRODUCED, detail)


def increasing(x: Sequence[float], y: Sequence[float]) -> Verdict:
  """Does y grow with x (never decreasing, last > first)? Deterministic
  values, e.g. dropped fraction against the number of experts."""
  order = np.argsort(np.asarray(x, np.float64))
  y = np.asarray(y, np.float64)[order]
  if y.size < 2:
    return Verdict(NOT_TESTABLE, f'{y.size} point(s)')
  detail = ' -> '.join(f'{v:.4f}' for v in y)
  if np.all(np.diff(y) >= 0) and y[-1] > y[0]:
    return Verdict(REPRODUCED, detail)
  return Verdict(NOT_REPRODUCED, detail)
