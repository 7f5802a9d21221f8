"""Every router x dispatch trains on digits from its config and logs routing
metrics; evaluation at another capacity factor needs no retraining."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import load_config
from vmoe.evaluate import capacity_sweep
from vmoe.train import metrics_writer
from vmoe.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ('vmoe_s32_last2_digits', 'vmoe_b16_digits', 'ec_moe_b16_digits',
           'soft_moe_b16_digits', 'soft_moe_s16_digits')
ROUTING_METRICS = ('auxiliary_loss', 'dropped_fraction', 'router_entropy',
                   'capacity', 'expert_load', 'importance_loss', 'load_loss',
                   'balance_loss', 'z_loss')


def _short(name, data_dir, **moe_overrides):
  config = load_config(name)
  config.dataset.data_dir = data_dir
  config.batch_size = 32
  config.eval_batch_size = 100
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 4
  config.schedule.update(warmup_steps=1, warmup_fraction=None)
  config.model.moe.update(moe_overrides)
  return config


# Every router trains with the default dispatch, token choice also with the
# other two; the agreement of all strategies for every router (outputs and
# gradients) is tested at layer level in test_dispatch.py.
@pytest.mark.parametrize('name,dispatch', [
    ('vmoe_b16_digits', 'indices'),
    ('vmoe_b16_digits', 'einsum'),
    ('vmoe_b16_digits', 'dropless'),
    ('ec_moe_b16_digits', 'indices'),
    ('ec_moe_b16_digits', 'einsum'),
    ('soft_moe_b16_digits', 'indices'),
    ('soft_moe_b16_digits', 'einsum'),
])
@pytest.mark.slow
def test_router_and_dispatch_train_and_report_metrics(name, dispatch,
                                                      digits_data_dir,
                                                      tmp_path):
  config = _short(name, digits_data_dir, dispatch=dispatch)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  assert math.isfinite(result['loss'])
  records = metrics_writer.read_metrics(str(tmp_path))
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == [2, 4]
  blocks = {k.split('/')[1] for k in train[-1] if k.startswith('moe/block_')}
  assert blocks == {'block_1', 'block_3'} if name != 'soft_moe_b16_digits' else {
      'block_2', 'block_3'}
  for block in blocks:
    for metric in ROUTING_METRICS:
      assert f'moe/{block}/{metric}' in train[-1], (block, metric)
    load = train[-1][f'moe/{block}/expert_load']
    assert len(load) == config.model.moe.num_experts
  evals = [r for r in records if r['split'] == 'eval']
  assert f'moe/{sorted(blocks)[0]}/dropped_fraction' in evals[-1]


@pytest.mark.parametrize('name', CONFIGS)
def test_paper_digits_configs_build(name):
  config = load_config(name)
  from vmoe.train.config_validation import validate_config  # pylint: disable=g-import-not-at-top
  validate_config(config)


@pytest.mark.slow
def test_eval_at_another_capacity_without_retraining(digits_data_dir,
                                                     tmp_path):
  config = _short('vmoe_b16_digits', digits_data_dir)
  trainer.train_and_evaluate(config, str(tmp_path))
  low, high = capacity_sweep.sweep(config, str(tmp_path), [0.25, 2.0])
  assert low['step'] == high['step'] == 4
  assert low['dropped_fraction'] > 0.05
  # A token is dropped only if all its k experts are full: at capacity
  # factor 2 that takes a router sending over half the group to two experts,
  # rare but not impossible after 4 steps.
  assert high['dropped_fraction'] < min(0.01, low['dropped_fraction'] / 10)
  # The command line (the run's config read from its checkpoint) prints the
  # same numbers as a table and writes them.
  proc = subprocess.run(
      [sys.executable, '-m', 'vmoe.evaluate.capacity_sweep',
       f'--workdir={tmp_path}', '--capacity_factors=0.25,2.0'],
      cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"| 0.25 | {low['accuracy']:.4f} |" in proc.stdout, proc.stdout
  with open(tmp_path / 'capacity_sweep.json') as f:
    assert [r['capacity_factor'] for r in json.load(f)] == [0.25, 2.0]
