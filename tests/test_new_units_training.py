"""The digits configs of the units beyond the routers (entropy losses, output
masking, Multi-Head MoE, attention and block kinds): the router study picks
them up, each trains for 10 steps and logs its metrics; the analysis
commands run on trained models."""

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.helpers import REPO, load_config
from vmoe import analysis
from vmoe.analysis import claims
from vmoe.analysis import study
from vmoe.train import metrics_writer
from vmoe.train import trainer

# config -> metrics (under 'moe/') its MoE / attention / block units log.
NEW_CONFIGS = {
    'tc_k1_entropy': ('block_1/local_entropy_loss',
                      'block_3/global_entropy_loss',
                      'block_1/expert_load'),
    'tc_k1_noaux': ('block_1/expert_load', 'block_3/dropped_fraction'),
    'tc_k2_bpr_eom': ('block_1/expert_load', 'block_3/auxiliary_loss'),
    'tc_k2_bpr_fom': ('block_1/expert_load', 'block_3/auxiliary_loss'),
    'mh_tc_k1': ('block_1/expert_activation', 'block_1/expert_load',
                 'block_3/dropped_fraction'),
    'dense_h4': (),
    'moh_h4_k2': ('block_0/attention/heads_per_token',
                  'block_3/attention/balance_loss',
                  'block_2/attention/head_load'),
    'gated_h4': ('block_0/attention/gate_mean',),
    'mod_c50': ('block_1/depth/dropped_fraction',
                'block_3/depth/compute_fraction', 'block_1/depth/capacity'),
    'mone_e4_b50': ('block_0/nested/compute_fraction',
                    'block_3/nested/expert_load',
                    'block_2/nested/effective_capacity'),
}


def test_the_router_study_picks_them_up():
  configs = analysis.runs.study_configs()
  assert set(NEW_CONFIGS) <= set(configs)
  for claim in claims.CLAIMS:
    assert set(claim.configs) <= set(configs), claim.name


def _short(name, data_dir, steps=10):
  config = load_config(f'routers/{name}_digits')
  config.dataset.data_dir = data_dir
  config.batch_size = 32
  config.eval_batch_size = 100
  config.num_train_steps = steps
  config.log_every_steps = 5
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.schedule.warmup_steps = 2
  config.schedule.warmup_fraction = None  # the digits recipe's N / 16
  return config


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(NEW_CONFIGS))
def test_trains_ten_steps_and_logs_its_metrics(name, digits_data_dir,
                                               tmp_path):
  result = trainer.train_and_evaluate(_short(name, digits_data_dir),
                                      str(tmp_path))
  assert math.isfinite(result['loss']) and result['step'] == 10
  records = metrics_writer.read_metrics(str(tmp_path))
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == [5, 10]
  for metric in NEW_CONFIGS[name]:
    value = np.asarray(train[-1][f'moe/{metric}'])
    assert np.all(np.isfinite(value)), (metric, value)
  evals = [r for r in records if r['split'] == 'eval']
  scalars = [m for m in NEW_CONFIGS[name] if 'load' not in m]
  for metric in scalars:
    assert f'moe/{metric}' in evals[-1], metric


@pytest.mark.slow
def test_analysis_commands_on_trained_models(digits_data_dir, tmp_path):
  """The layer-placement report and the budget sweep as commands, the claim
  measurements on a trained MoE model."""
  moe_dir, mone_dir = str(tmp_path / 'moe'), str(tmp_path / 'mone')
  trainer.train_and_evaluate(_short('tc_k1', digits_data_dir), moe_dir)
  trainer.train_and_evaluate(_short('mone_e4_b50', digits_data_dir), mone_dir)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, '-m', 'vmoe.analysis.report', f'--workdir={moe_dir}',
       '--max_examples=100', '--permutations=20'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  frame = pd.read_csv(os.path.join(moe_dir, 'report', 'report.csv'))
  assert list(frame.block) == [1, 3] and 'keep_moe' in frame
  assert frame.nmi_p_value.between(0, 1).all()
  assert frame.norm_top1_agreement.between(0, 1).all()
  assert os.path.getsize(os.path.join(moe_dir, 'report', 'report.png')) > 0
  proc = subprocess.run(
      [sys.executable, '-m', 'vmoe.analysis.budget', f'--workdir={mone_dir}',
       '--budgets=0.125,0.5,1.0', '--max_examples=100'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  sweep = pd.read_csv(os.path.join(mone_dir, 'budget_sweep',
                                   'budget_sweep.csv'))
  assert list(sweep.budget) == [0.125, 0.5, 1.0]
  assert sweep.gflops_per_image.is_monotonic_increasing
  assert sweep.effective_capacity.is_monotonic_increasing
  # A dense model has no MoE layer to report on: one line, exit 2.
  proc = subprocess.run(
      [sys.executable, '-m', 'vmoe.analysis.report', f'--workdir={mone_dir}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2
  assert proc.stderr.strip() == 'error: the model has no MoE layer'
  run = analysis.load(moe_dir)
  batches = list(analysis.eval_batches(run.config, max_examples=100))
  assert 0 < study.measure(run, 'expert_activation', batches)[()] <= 1
  assert study.measure(run, 'unused_experts', batches)[()] >= 0
  drops = study.measure(run, 'targeted_minus_random', batches)
  assert set(b for b, _ in drops) == {1, 3} and len(drops) == 20
