"""The benchmark code runs and judges its targets right (tiny sizes, no timing
claims: the benchmarks themselves live in bench/ and are not tests)."""

import os

import pytest
from flax import nnx

from bench import common
from bench import model as model_bench
from bench import moe_layer as ml
from bench import scaling
from bench import targets


def test_run_section_times_a_case_against_its_dense_reference():
  rows = ml.run_section('smoke', [ml.Case('token_choice', 2, 1, k=1)],
                        images=1, repeats=1, peak=100.0)
  moe = [r for r in rows if r['layer'] != 'dense MLP']
  dense = [r for r in rows if r['layer'] == 'dense MLP']
  assert len(moe) == 1 and len(dense) == 1
  row = moe[0]
  # 197 tokens, 2 experts, capacity ceil(197 / 2) = 99: 198 slots.
  assert row['slots'] == 198 == dense[0]['tokens']
  assert row['rows_per_expert'] == 99
  assert row['fwd_ms'] > 0 and row['fwd_bwd_ms'] > row['fwd_ms'] / 10
  assert row['fwd_bwd_ratio'] > 0 and row['peak_mb'] >= row['temp_mb'] > 0
  md = common.markdown_table(moe, ml.LAYER_COLUMNS, ml.LAYER_HEADERS)
  assert md.count('\n') == 2 and 'token choice k=1' in md


def test_breakdown_parts_of_a_layer():
  cases = [ml.Case('token_choice', 2, 1, k=2, bpr=True), ml.Case('soft', 2, 1)]
  rows = ml.breakdown_rows(images=1, repeats=1, cases=cases)
  assert [r['layer'] for r in rows] == ['token choice k=2 bpr', 'soft']
  for r in rows:
    assert r['dense_ms'] > 0 and r['layer_ms'] > 0 and r['routing'] > 0
    parts = 1 + r['routing'] + r['dispatch_combine'] + r['experts_beyond_dense']
    assert abs(parts - r['ratio']) < 1e-9
  assert rows[0]['slots'] == 2 * 197  # k=2, capacity factor 1
  md = common.markdown_table(rows, ml.BREAKDOWN_COLUMNS, ml.BREAKDOWN_HEADERS)
  assert md.count('\n') == 3


@pytest.mark.parametrize('train', [False, True])
def test_overhead_losses_agree_across_dispatch_methods(train):
  """Routing + dispatch + combine (experts x2): einsum and indices agree."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(3), (2, ml.SEQ, 384))
  key = jax.random.key(4)
  out = {}
  for method in ('einsum', 'indices'):
    layer = ml.make_layer(ml.Case('token_choice', 4, 1, k=2, bpr=True,
                                  method=method))
    layer.experts = None
    graphdef, state = nnx.split(layer)
    losses = ml.overhead_losses(graphdef, ml.SEQ, method, train)
    out[method] = [jax.value_and_grad(f, argnums=(0, 1))(state, x, key)
                   for f in losses.values()]
  for (v1, g1), (v2, g2) in zip(out['einsum'], out['indices']):
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    # Float rounding relative to the gradient's scale (sums of ~400 terms).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * np.max(np.abs(b))), g1, g2)
  assert out['indices'][1][0] > out['indices'][0][0]


def test_dispatch_memory_is_linear_in_tokens_with_indices():
  """Compiled only: indices scratch per token is flat, einsum's grows."""
  rows = ml.dispatch_memory_rows(quick=True)
  per_token = {m: [r['mb_per_1k_tokens'] for r in rows if r['dispatch'] == m]
               for m in ('indices', 'einsum')}
  assert max(per_token['indices']) / min(per_token['indices']) < 1.1
  assert per_token['einsum'][-1] > 2 * per_token['einsum'][0]


def _layer_rows(tc=1.1, einsum=1.6, soft=1.3):
  rows = []
  for e, g in ((8, 1), (8, 4), (32, 1), (32, 4)):
    rows.append(dict(section='targets', layer='token choice k=2 bpr',
                     dispatch='indices', experts=e, group_images=g,
                     fwd_bwd_ratio=tc, fwd_bwd_ms=100.0))
  rows.append(dict(section='targets', layer='token choice k=2 bpr',
                   dispatch='einsum', experts=32, group_images=4,
                   fwd_bwd_ratio=1.7, fwd_bwd_ms=100.0 * einsum))
  rows.append(dict(section='targets', layer='soft', dispatch='indices',
                   experts=32, group_images=1, fwd_bwd_ratio=soft))
  memory = [dict(dispatch='indices', mb_per_1k_tokens=v) for v in (3.3, 3.4)]
  return rows, memory


@pytest.mark.parametrize('kw, holds', [
    (dict(), ['yes', 'yes', 'no', 'yes']),
    (dict(tc=1.2, einsum=1.4, soft=1.1), ['no', 'no', 'yes', 'yes']),
])
def test_layer_targets(kw, holds):
  out = targets.layer_targets(*_layer_rows(**kw))
  assert [r['holds'] for r in out] == holds
  assert 'e=32 g=4' in out[0]['measured']


def test_scaling_and_model_targets():
  scaling_rows = [dict(layer='soft', experts=8, ratio_vs_8=1.0),
                  dict(layer='soft', experts=256, ratio_vs_8=1.2),
                  dict(layer='token choice k=2 bpr', experts=256,
                       ratio_vs_8=1.35)]
  (check,) = targets.scaling_targets(scaling_rows, quick=False)
  assert check['holds'] == 'no' and 'soft 1.20x' in check['measured']
  model_rows = [dict(model='ViT-S/16 dense', train_vs_dense=1.0, mfu_pct=55.0),
                dict(model='V-MoE-S/16 32E top-1', train_vs_dense=0.9)]
  speed, mfu = targets.model_targets(model_rows, quick=True)
  assert speed['holds'] == 'yes' and 'V-MoE 32E top-1 0.90x' in speed['measured']
  assert mfu['holds'] == 'yes' and mfu['measured'] == '55%'
  assert 'quick' in speed['note']
  md, rows = targets.evaluate(None, scaling_rows, model_rows, quick=False)
  assert len(rows) == 3 and md.startswith('### Targets')


def test_unmeasured_target_is_not_a_pass():
  (check,) = targets.scaling_targets([], quick=False)
  assert check['holds'] == '-' and check['measured'] == 'not measured'


def test_scaling_plot_writes_a_png(tmp_path):
  rows = [dict(layer='dense MLP', fwd_bwd_ms=10.0),
          dict(layer='soft', experts=8, ratio_vs_8=1.0),
          dict(layer='soft', experts=256, ratio_vs_8=1.2)]
  path = os.path.join(tmp_path, 'plot.png')
  scaling.plot(rows, path)
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_scaling_holds_the_active_compute_fixed():
  for _, cases, images in scaling.sections(quick=False):
    slots = {ml.slots_of(nnx.eval_shape(lambda c=c: ml.make_layer(c)),
                         images * ml.SEQ) for c in cases}
    assert len(slots) == 1
    assert min(c.capacity or c.num_slots for c in cases) >= 8


def test_model_configs():
  cfg = model_bench.model_config('V-MoE-S/16 32E top-1')
  assert (cfg.moe.num_experts, cfg.moe.k, cfg.moe.router) == (
      32, 1, 'token_choice')
  cfg = model_bench.model_config('Soft MoE-S/16 8E')
  assert (cfg.moe.num_experts, cfg.moe.router) == (8, 'soft')
  assert model_bench.model_config('ViT-S/16 dense').moe is None


@pytest.mark.slow  # about 16 programs compiled
def test_unit_rows_time_every_new_unit_against_its_counterpart(monkeypatch):
  """The units section at tiny sizes: one row per attention / block kind
  with its counterpart, the MoE units as layer rows."""
  monkeypatch.setitem(ml.DIMS, 'S', (64, 128))
  monkeypatch.setattr(ml, 'SEQ', 17)
  monkeypatch.setattr(ml, 'unit_moe_cases', lambda: [
      ml.Case('token_choice', 4, 1, k=1),
      ml.Case('token_choice', 4, 1, k=1,
              extra=(('kind', 'multi_head'), ('mh_heads', 2)),
              label='multi-head')])
  rows = ml.run_units(images=1, repeats=1, peak=100.0)
  kinds = [r for r in rows if 'counterpart' in r]
  assert [r['layer'].split(' ')[0] for r in kinds] == [
      'moh', 'gated', 'mixture-of-depths', 'nested-experts']
  assert all(r['fwd_bwd_ratio'] > 0 for r in kinds)
  assert kinds[2]['counterpart'] == 'standard block on 9 tokens'
  assert 0.3 < kinds[3]['flop_ratio'] < 1
  layers = [r['layer'] for r in rows if 'counterpart' not in r]
  assert 'token choice k=1 multi-head' in layers
  mh = [r for r in rows if r['layer'] == 'token choice k=1 multi-head'][0]
  plain = [r for r in rows if r['layer'] == 'token choice k=1'][0]
  # Matched sizing: about the slots (active FLOPs) of the sparse layer.
  assert abs(mh['slots'] / plain['slots'] - 1) < 0.25
