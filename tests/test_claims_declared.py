"""The declared claims (vmoe.analysis.claims.CLAIMS): their rules on
hand-made values, and every claim names study configs and known metrics."""

import pytest

from vmoe.analysis import claims


def _values(a, b, metric='accuracy', names=('x', 'y')):
  return {(names[0], metric): dict(enumerate(a)),
          (names[1], metric): dict(enumerate(b))}


def test_greater_not_worse_and_against_a_value():
  greater = claims.Claim(name='g', claim='', source='', metric='accuracy',
                         a='x', b='y')
  values = _values([0.9, 0.8, 0.85], [0.7, 0.6, 0.66])
  assert claims.decide(greater, values).status == claims.REPRODUCED
  not_worse = claims.Claim(name='n', claim='', source='', metric='accuracy',
                           a='x', b='y', rule='not_worse', margin=0.05)
  # 1 point below, margin 5 points: non-inferior.
  assert claims.decide(not_worse, _values(
      [0.80, 0.71, 0.62], [0.81, 0.72, 0.63])).status == claims.REPRODUCED
  # 10 points below: not.
  assert claims.decide(not_worse, _values(
      [0.70, 0.61, 0.52], [0.81, 0.72, 0.63])).status == claims.NOT_REPRODUCED
  value = claims.Claim(name='v', claim='', source='', metric='m', a='x',
                       b=None, rule='greater_than_value', value=0.0)
  # Values per (seed, block): the seeds are the replicates (n=3, not 5).
  verdict = claims.decide(value, {('x', 'm'): {
      (0, 1): 0.2, (0, 2): 0.1, (1, 1): 0.3, (1, 2): 0.25, (2, 1): 0.2}})
  assert verdict.status == claims.REPRODUCED and verdict.n == 3
  # Two models are not enough for 0.15 and 0.3 (p = 0.10): inconclusive.
  verdict = claims.decide(value, {('x', 'm'): {(0, 1): 0.2, (0, 2): 0.1,
                                               (1, 1): 0.3}})
  assert verdict.status == claims.INCONCLUSIVE and verdict.n == 2


def test_floor_conditions_and_missing_runs():
  floor = claims.Claim(name='f', claim='', source='', metric='u', a='x',
                       b='y', floor=0.0)
  verdict = claims.decide(floor, _values([0, 0], [0, 0], metric='u'))
  assert verdict.status == claims.INCONCLUSIVE and 'floor' in verdict.detail
  cond = claims.Claim(name='c', claim='', source='', metric='accuracy',
                      a='x', b='y', rule='not_worse', margin=0.01,
                      condition=(('x', 'skipped', 0.4),))
  values = _values([0.9, 0.9], [0.9, 0.9])
  values['x', 'skipped'] = {0: 0.3}
  verdict = claims.decide(cond, values)
  assert verdict.status == claims.NOT_REPRODUCED
  assert 'skipped 0.3000 < the stated 0.4' in verdict.detail
  verdict = claims.decide(cond, _values([0.9], [0.9]))
  assert verdict.status == claims.INCONCLUSIVE
  assert verdict.detail == 'not measured: x skipped'


def test_declared_claims_are_well_formed():
  from vmoe.analysis import runs  # pylint: disable=g-import-not-at-top
  configs = runs.study_configs()
  names = [c.name for c in claims.CLAIMS]
  assert len(set(names)) == len(names) == 5
  for claim in claims.CLAIMS:
    assert claim.rule in claims.RULES
    assert set(claim.configs) <= set(configs), claim.name
    assert claim.metric in ('accuracy', 'expert_activation', 'unused_experts',
                            'skipped_fraction', 'targeted_minus_random')
  with pytest.raises(ValueError, match="rule 'bigger' is not one of"):
    claims.decide(claims.Claim(name='b', claim='', source='', metric='m',
                               a='x', b='y', rule='bigger'), {})
