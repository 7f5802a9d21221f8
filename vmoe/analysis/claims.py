"""Verdicts on published claims from measured values, by rules fixed in
advance (the router study applies them to whatever it measures; nothing here
looks at the expected answer).

The replicate is an independently trained model: values are one number per
model, paired between configs by seed; measurements repeated on one model
(capacity factors, MoE blocks, classes, test images) are averaged per model
first (`per_model`), never counted as replicates.

Verdicts:
  'reproduced': the claimed direction is significant: a one-sided paired
    t-test over the models at level alpha (0.05), or the exact property
    for deterministic measurements;
  'not reproduced': the direction is significantly reversed, or the
    one-sided upper confidence bound of the difference lies below the
    claim's smallest effect of interest (an effect that size is excluded),
    or an exact property fails;
  'inconclusive: underpowered': neither; the detail gives the minimum
    detectable effect at the study's number of models and test images
    (`vmoe.analysis.stats`) and the models per config that would decide.
Properties that hold by construction (Soft MoE drops no token; routing
within an image's own group cannot depend on its batch-mates) are sanity
checks, with their own labels, never counted as reproductions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

from vmoe.analysis import stats

REPRODUCED = 'reproduced'
NOT_REPRODUCED = 'not reproduced'
INCONCLUSIVE = 'inconclusive: underpowered'
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
SANITY_HOLDS = 'sanity check: holds'
SANITY_FAILS = 'sanity check: fails'
POWER = 0.8


@dataclasses.dataclass(frozen=True)
class Verdict:
  status: str
  detail: str
  n: int = 0                     # trained models per side
  mde: float = float('nan')      # minimum detectable effect at that n


def sanity(holds: bool, detail: str) -> Verdict:
  """A property true by construction, checked (not a reproduction)."""
  return Verdict(SANITY_HOLDS if holds else SANITY_FAILS, detail)


def per_model(values: Mapping[Any, float]) -> dict[Any, float]:
  """{seed: mean} of {key: value} whose keys are a seed or a tuple starting
  with the seed (seed, block, class, ...): one value per trained model."""
  groups: dict[Any, list[float]] = {}
  for key, value in values.items():
    seed = key[0] if isinstance(key, tuple) and key else key
    groups.setdefault(seed, []).append(float(value))
  return {seed: float(np.mean(v)) for seed, v in groups.items()}


def _underpowered(test: stats.PairedTest, mde: float, sd: float,
                  smallest_effect: float, alpha: float, where: str) -> str:
  target = smallest_effect if smallest_effect > 0 else abs(test.mean)
  needed = stats.seeds_needed(target, sd, alpha=alpha, power=POWER)
  scale = (f'{needed} models per config would detect {target:.4f}'
           if needed else f'no feasible number of models detects {target:.4f}')
  return (f'{test}; minimum detectable effect {mde:.4f} at n={test.n} '
          f'models{where} (power {POWER:.0%}, alpha {alpha}); {scale}')


def greater(a: Sequence[float], b: Sequence[float], *, alpha: float = 0.05,
            smallest_effect: float = 0.0, test_images: int | None = None,
            ceiling: float | None = None,
            floor: float | None = None) -> Verdict:
  """Is a > b? a[i], b[i]: one value per trained model, paired by seed.

  smallest_effect: the smallest difference the claim is about (declared
    with the claim); an upper confidence bound below it refutes the claim.
  test_images: for accuracies, the test-set size: the binomial noise of the
    test images bounds the spread of the differences from below in the
    minimum detectable effect (`stats.image_noise_floor`).
  ceiling / floor: inconclusive when both means sit at or beyond it (e.g.
    no unused expert on either side).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f'greater: unpaired values {a.shape} vs {b.shape}')
  n = a.size
  where = f' and {test_images} test images' if test_images else ''
  if n < 2:
    mean = float((a - b).mean()) if n else float('nan')
    return Verdict(INCONCLUSIVE, f'{n} trained model(s) per config: no '
                   f'spread to test (difference {mean:+.4f})', n, math.inf)
  if ceiling is not None and a.mean() >= ceiling and b.mean() >= ceiling:
    return Verdict(INCONCLUSIVE, f'both at the ceiling {ceiling}: the claim '
                   'cannot show at this scale', n)
  if floor is not None and a.mean() <= floor and b.mean() <= floor:
    return Verdict(INCONCLUSIVE, f'both at the floor {floor}: the claim '
                   'cannot show at this scale', n)
  test = stats.paired_test(a, b)
  sd = test.sd
  if test_images:
    level = float(np.mean(np.concatenate([a, b])))
    sd = max(sd, stats.image_noise_floor(level, test_images))
  mde = stats.minimum_detectable_effect(n, sd, alpha=alpha, power=POWER)
  if test.p_greater < alpha:
    return Verdict(REPRODUCED, str(test), n, mde)
  if test.p_less < alpha:
    return Verdict(NOT_REPRODUCED, f'reversed: {test}', n, mde)
  upper = test.mean + float(scipy_stats.t.ppf(1 - alpha, n - 1)) * test.se
  if smallest_effect > 0 and upper < smallest_effect:
    return Verdict(NOT_REPRODUCED, f'{test}; an effect of {smallest_effect} '
                   f'or more is excluded (upper {1 - alpha:.0%} bound '
                   f'{upper:+.4f})', n, mde)
  return Verdict(INCONCLUSIVE, _underpowered(test, mde, sd, smallest_effect,
                                             alpha, where), n, mde)


def combine(verdicts: Sequence[Verdict], detail: str) -> Verdict:
  """All reproduced: reproduced; any not reproduced: not reproduced; else
  inconclusive (with the largest minimum detectable effect)."""
  statuses = {v.status for v in verdicts}
  n = min((v.n for v in verdicts), default=0)
  mde = max((v.mde for v in verdicts), default=float('nan'))
  if verdicts and statuses == {REPRODUCED}:
    return Verdict(REPRODUCED, detail, n, mde)
  if NOT_REPRODUCED in statuses:
    return Verdict(NOT_REPRODUCED, detail, n, mde)
  return Verdict(INCONCLUSIVE, detail, n, mde)


def ordering(values: Mapping[str, Sequence[float]], order: Sequence[str], *,
             alpha: float = 0.05, smallest_effect: float = 0.0,
             test_images: int | None = None,
             ceiling: float | None = None) -> Verdict:
  """Does order[0] > order[1] > ... hold (each adjacent pair, `greater`)?

  values: name -> one value per trained model, paired by seed. A missing
  name leaves the claim inconclusive.
  """
  missing = [name for name in order if name not in values]
  if missing:
    return Verdict(INCONCLUSIVE, f'not measured: {", ".join(missing)}')
  verdicts = [(hi, lo, greater(values[hi], values[lo], alpha=alpha,
                               smallest_effect=smallest_effect,
                               test_images=test_images, ceiling=ceiling))
              for hi, lo in zip(order, order[1:])]
  detail = '; '.join(f'{hi} > {lo}: {v.status} ({v.detail})'
                     for hi, lo, v in verdicts)
  return combine([v for _, _, v in verdicts], detail)


def increasing(x: Sequence[float], y: Sequence[float]) -> Verdict:
  """Does y grow with x (never decreasing, last > first)? Deterministic
  values, e.g. dropped fraction against the number of experts."""
  order = np.argsort(np.asarray(x, np.float64))
  y = np.asarray(y, np.float64)[order]
  if y.size < 2:
    return Verdict(INCONCLUSIVE, f'{y.size} point(s)')
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
    floor: inconclusive when both sides are at or below it.
    smallest_effect: the smallest difference the claim is about (for
      'greater'): an upper confidence bound below it refutes the claim.
    condition: (config, metric, least) measured properties that must hold
      exactly for the claim to be testable as stated (e.g. the share of
      tokens a mixture-of-depths model skips); if one fails the claim is not
      reproduced.
    replicates: what one replicate is (paired between a and b): always a
      trained model; measurements within a model are averaged first.
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
  smallest_effect: float = 0.0
  replicates: str = 'trained models (seeds)'

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
          replicates='trained models (seeds); per model the mean over its '
                     'MoE blocks and classes'),
    Claim(name='mod_accuracy',
          claim='Mixture-of-depths keeps accuracy while its blocks skip 47% '
                'of the tokens (capacity 9 of 17, every other block)',
          source='Raposo et al. 2024 "Mixture-of-Depths", Sec. 4',
          metric='accuracy', a='mod_c50', b='dense', rule='not_worse',
          margin=0.01, condition=(('mod_c50', 'skipped_fraction', 0.47),)),
)


def decide(claim: Claim,
           values: Mapping[tuple[str, str], Mapping[Any, float]], *,
           alpha: float = 0.05, test_images: int | None = None) -> Verdict:
  """The verdict of `claim` from values[(config, metric)] = {key: value},
  where a key is a seed or a tuple starting with the seed (`per_model`
  averages each trained model's values first; seeds pair a and b). A missing
  config or metric leaves the claim inconclusive. test_images: the test-set
  size, for the noise floor of 'accuracy' claims."""
  if claim.rule not in RULES:
    raise ValueError(f'claim {claim.name}: rule {claim.rule!r} is not one of '
                     f'{RULES}')
  needed = [(claim.a, claim.metric)] + (
      [(claim.b, claim.metric)] if claim.b else []) + [
          (c, m) for c, m, _ in claim.condition]
  missing = [f'{c} {m}' for c, m in needed if not values.get((c, m))]
  if missing:
    return Verdict(INCONCLUSIVE, f'not measured: {", ".join(missing)}')
  for config, metric, least in claim.condition:
    got = min(values[(config, metric)].values())
    if got < least:
      return Verdict(NOT_REPRODUCED, f'{config} {metric} {got:.4f} < the '
                                     f'stated {least}')
  images = test_images if claim.metric == 'accuracy' else None
  rule = dict(alpha=alpha, floor=claim.floor, test_images=images,
              smallest_effect=claim.smallest_effect)
  a = per_model(values[(claim.a, claim.metric)])
  if claim.rule == 'greater_than_value':
    keys = sorted(a)
    return greater([a[k] for k in keys], [claim.value] * len(keys), **rule)
  b = per_model(values[(claim.b, claim.metric)])
  keys = sorted(set(a) & set(b))
  shift = claim.margin if claim.rule == 'not_worse' else 0.0
  return greater([a[k] + shift for k in keys], [b[k] for k in keys], **rule)
