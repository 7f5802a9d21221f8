"""Two real processes on localhost (jax.distributed) train like one process.

Each process has 4 simulated CPU devices; together they form a (2, 4) mesh
with experts split over the 4 devices of each process and the batch over all
8. The loss curve must match one process with 8 devices fed the same global
batches, and the checkpoint they write restores in a single process.
"""

import pytest
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from tests.helpers import tiny_digits_config_file
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.train import metrics_writer
from vmoe.train import trainer

# End-to-end: trains models or runs main.py in subprocesses.
pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 420


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', **extra)
  env.pop('XLA_FLAGS', None)
  return env


def _losses(workdir):
  return [(r['step'], r['loss']) for r in metrics_writer.read_metrics(workdir)
          if r['split'] == 'train']


def test_two_processes_match_one_process(digits_data_dir, tmp_path):
  config = tiny_digits_config_file(
      tmp_path, digits_data_dir,
      moe=dict(layers=(1, 3), router='token_choice', num_experts=8, k=2,
               group_size=17, batch_priority=True),
      eval_batch_size=96, num_train_steps=4, log_every_steps=1,
      eval_every_steps=4, checkpoint_every_steps=4,
      **{'mesh.expert': 4, 'schedule.warmup_steps': 1})
  work2 = tmp_path / 'two'
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, 'main.py', f'--config={config}', f'--workdir={work2}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
       f'--process_id={i}', '--num_cpu_devices=4'],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # Only process 0 reports and writes logs.
  assert outs[0][0].strip().splitlines()[-1].startswith('done: step 4')
  assert 'done:' not in outs[1][0] and 'sharding:' not in outs[1][0]
  assert "'data': 2, 'expert': 4" in outs[0][0]

  work1 = tmp_path / 'one'
  ref = subprocess.run(
      [sys.executable, '-m', 'tests.workers.multihost_reference', f'--config={config}',
       f'--workdir={work1}', '--num_cpu_devices=8'],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
  assert ref.returncode == 0, ref.stderr[-3000:]

  two, one = _losses(str(work2)), _losses(str(work1))
  assert [s for s, _ in two] == [1, 2, 3, 4] == [s for s, _ in one]
  np.testing.assert_allclose([l for _, l in two], [l for _, l in one],
                             rtol=1e-5)
  evals = [[r['accuracy'] for r in metrics_writer.read_metrics(str(w))
            if r['split'] == 'eval'] for w in (work2, work1)]
  assert evals[0] == evals[1] and len(evals[0]) == 1

  # A single process (one device here) restores the two-process checkpoint
  # onto its own mesh, as a resumed run would.
  params2, params1 = (_restore_here(config, w) for w in (work2, work1))
  # The key bias (qkv_bias[1]) has an identically zero gradient (softmax is
  # shift invariant), so Adam turns the rounding noise of the two reduction
  # orders into updates of up to the learning rate: compare it to that bound.
  for p in (params2, params1):
    for block in p['blocks'].values():
      key_bias = block['attn']['qkv_bias'][1]
      assert np.abs(key_bias).max() <= 8 * 3e-3  # 4 steps, lr 3e-3
      block['attn']['qkv_bias'] = block['attn']['qkv_bias'][::2]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               params2, params1)


def _restore_here(config_path, workdir):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      'moe_config', config_path).get_config()
  config.mesh.data, config.mesh.expert = -1, 1
  exp = trainer.Experiment(config)
  ckpt = checkpoint_lib.Checkpointer(str(pathlib.Path(workdir) / 'checkpoints'),
                                     max_to_keep=3, async_save=False)
  state = ckpt.restore(ckpt.latest_step(), exp.abstract_state)
  ckpt.close()
  assert int(state['step']) == 4
  return jax.tree.map(np.asarray, state['params'])


def test_bad_process_flags_fail_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/vit_digits.py',
       f'--workdir={tmp_path / "w"}', '--coordinator_address=127.0.0.1:1',
       '--num_processes=2', '--process_id=2'],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --process_id=2 must be in [0, --num_processes=2)')
  assert not (tmp_path / 'w').exists()
