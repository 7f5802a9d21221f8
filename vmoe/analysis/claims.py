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
from typing import Any, Mapping, Sequence

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
            ceiling: float | None = None,
            floor: float | None = None) -> Verdict:
  """Is a > b? a[i], b[i] are paired (same seed / same setting). With
  `ceiling` / `floor`: not testable when both means sit at or beyond it
  (e.g. no unused expert on either side)."""
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
  if floor is not None and a.mean() <= floor and b.mean() <= floor:
    return Verdict(NOT_TESTABLE, f'both at the floor {floor}')
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


# -----------------------------------------------------------------------------
# Declared claims: each names what is measured, on which runs, and the rule,
# fixed before any run. `decide` applies the rule to the measured values.
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claim:
  """A published claim and its verdict rule.

  Attributes:
    name: short id.
    claim: the claim as a sentence.
    source: paper and section.
    metric: what is measured per replicate on a trained run (the names of
      `vmoe.analysis.study.measure`).
    a, b: the study configs compared (`configs/routers/<name>_digits.py`);
      for rule 'greater' the claim is a > b.
    rule: 'greater' (a > b: one-sided paired t-test at alpha), 'not_worse'
      (a >= b - margin: the same test on a + margin > b, i.e.
      non-inferiority), 'greater_than_value' (a > `value`, same test against
      a constant).
    margin: the non-inferiority margin of 'not_worse'.
    floor: not testable when both sides are at or below it.
    condition: (config, metric, least) measured properties that must hold
      exactly for the claim to be testable as stated (e.g. the share of
      tokens a mixture-of-depths model skips); if one fails the claim is not
      reproduced.
    replicates: what one replicate is (paired between a and b).
  """
  name: str
  claim: str
  source: str
  metric: str
  a: str
  b: str | None
  rule: str = 'greater'
  margin: float = 0.0
  floor: float | None = None
  value: float = 0.0
  condition: tuple[tuple[str, str, float], ...] = ()
  replicates: str = 'seeds'

  @property
  def configs(self) -> tuple[str, ...]:
    names = [self.a] + ([self.b] if self.b else [])
    return tuple(dict.fromkeys(names + [c for c, _, _ in self.condition]))


RULES = ('greater', 'not_worse', 'greater_than_value')

CLAIMS = (
    Claim(name='moh_heads',
          claim='Mixture-of-head attention keeps accuracy with 50-90% of the '
                'heads (here 75%: 1 shared + top-2 of 3 routed)',
          source='Jin et al. 2024 "MoH", Tables 1-2 (MoH-ViT 75% / 50% heads)',
          metric='accuracy', a='moh_h4_k2', b='dense_h4', rule='not_worse',
          margin=0.01),
    Claim(name='mh_moe_activation',
          claim='Multi-head MoE activates more experts than the sparse MoE '
                'it matches',
          source='Wu et al. 2024 "Multi-Head MoE", Fig. 1 and Sec. 4.4',
          metric='expert_activation', a='mh_tc_k1', b='tc_k1'),
    Claim(name='entropy_unused',
          claim="LIMoE's entropy losses leave fewer unused experts than "
                'training without auxiliary losses',
          source='Mustafa et al. 2022 "LIMoE", Sec. 3.1 and Fig. 4',
          metric='unused_experts', a='tc_k1_noaux', b='tc_k1_entropy',
          floor=0.0),
    Claim(name='targeted_ablation',
          claim="Switching off a class's most distinctive experts lowers "
                "that class's accuracy more than switching off random "
                'experts',
          source='Dahlke et al. 2025 "Mixture of Tunable Experts", Sec. 4',
          metric='targeted_minus_random', a='tc_k2_bpr', b=None,
          rule='greater_than_value', value=0.0,
          replicates='seeds x MoE blocks x classes'),
    Claim(name='mod_accuracy',
          claim='Mixture-of-depths keeps accuracy while its blocks skip 47% '
                'of the tokens (capacity 9 of 17, every other block)',
          source='Raposo et al. 2024 "Mixture-of-Depths", Sec. 4',
          metric='accuracy', a='mod_c50', b='dense', rule='not_worse',
          margin=0.01, condition=(('mod_c50', 'skipped_fraction', 0.47),)),
)


def decide(claim: Claim,
           values: Mapping[tuple[str, str], Mapping[Any, float]], *,
           alpha: float = 0.05) -> Verdict:
  """The verdict of `claim` from values[(config, metric)] = {replicate key:
  value} (keys pair the replicates of a and b; a missing config or metric
  makes the claim not testable)."""
  if claim.rule not in RULES:
    raise ValueError(f'claim {claim.name}: rule {claim.rule!r} is not one of '
                     f'{RULES}')
  needed = [(claim.a, claim.metric)] + (
      [(claim.b, claim.metric)] if claim.b else []) + [
          (c, m) for c, m, _ in claim.condition]
  missing = [f'{c} {m}' for c, m in needed if not values.get((c, m))]
  if missing:
    return Verdict(NOT_TESTABLE, f'not measured: {", ".join(missing)}')
  for config, metric, least in claim.condition:
    got = min(values[(config, metric)].values())
    if got < least:
      return Verdict(NOT_REPRODUCED, f'{config} {metric} {got:.4f} < the '
                                     f'stated {least}')
  a = values[(claim.a, claim.metric)]
  if claim.rule == 'greater_than_value':
    keys = sorted(a)
    return greater([a[k] for k in keys], [claim.value] * len(keys),
                   alpha=alpha, floor=claim.floor)
  b = values[(claim.b, claim.metric)]
  keys = sorted(set(a) & set(b))
  shift = claim.margin if claim.rule == 'not_worse' else 0.0
  return greater([a[k] + shift for k in keys], [b[k] for k in keys],
                 alpha=alpha, floor=claim.floor)
