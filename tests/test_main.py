"""The command line: clear one-line errors, SIGKILL + rerun resumes exactly."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from tests.helpers import tiny_digits_config_file
from vmoe.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, 'main.py', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('override,message', [
    ('--config.model.variant=X/16', "config.model.variant='X/16'"),
    ('--config.preprocess.image_size=9', 'config.preprocess.image_size=9 is not divisible'),
    ('--config.optimizer.learning_rate=-0.001', 'config.optimizer.learning_rate=-0.001 must be positive'),
    ('--config.optimizer.name=adagradx', "config.optimizer.name='adagradx'"),
    ('--config.dataset.name=cifar10', "'cifar10'"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, override, message):
  workdir = tmp_path / 'work'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  marker = workdir / 'checkpoints' / '4' / 'marker'
  marker.write_text('previous checkpoint')
  extra = []
  if 'cifar10' in override:
    extra = [f'--config.dataset.data_dir={tmp_path / "empty"}']
  start = time.time()
  proc = _run('--config=configs/vit_digits.py', f'--workdir={workdir}',
              override, *extra, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines and lines[-1].startswith('error: '), proc.stderr
  assert message in lines[-1]
  assert 'Traceback' not in proc.stderr + proc.stdout
  assert len([l for l in lines if l.startswith('error')]) == 1
  assert marker.read_text() == 'previous checkpoint'
  assert sorted(p.name for p in workdir.rglob('*')) == ['4', 'checkpoints',
                                                       'marker']
  assert time.time() - start < 60


def test_missing_required_field(tmp_path):
  path = tmp_path / 'broken.py'
  path.write_text(textwrap.dedent('''\
      from vmoe.recipes import common

      def get_config():
        config = common.digits_recipe(common.get_base_config())
        del config.optimizer['learning_rate']
        return config
      '''))
  proc = _run(f'--config={path}', f'--workdir={tmp_path / "w"}')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: config.optimizer.learning_rate is missing (required field)')
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_sigkill_and_rerun_gives_identical_parameters(digits_data_dir,
                                                      tmp_path):
  """Kill -9 at a random point (saves every step, so likely mid-save), then
  corrupt the newest complete checkpoint: the rerun sets it aside, resumes
  from the one before and still ends bit-identical."""
  config = tiny_digits_config_file(
      tmp_path, digits_data_dir, num_train_steps=16, eval_every_steps=16,
      checkpoint_every_steps=1, **{'model.dropout': 0.1,
                                   'optimizer.learning_rate': 1e-3})
  full = tmp_path / 'full'
  proc = _run(f'--config={config}', f'--workdir={full}')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith('done: step 16')

  killed = tmp_path / 'killed'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  child = subprocess.Popen(
      [sys.executable, 'main.py', f'--config={config}', f'--workdir={killed}'],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  ckpt_dir = killed / 'checkpoints'
  while time.time() < deadline and child.poll() is None:
    steps = [p.name for p in ckpt_dir.glob('*') if p.name.isdigit()]
    if len(steps) >= 3:
      break
    time.sleep(0.05)
  assert child.poll() is None, 'run finished before it could be killed'
  child.send_signal(signal.SIGKILL)
  child.wait()
  newest = max(int(p.name) for p in ckpt_dir.glob('*') if p.name.isdigit())
  for data in (ckpt_dir / str(newest)).glob('default/ocdbt.process_0/d/*'):
    with open(data, 'r+b') as f:
      f.truncate(data.stat().st_size // 2)

  proc = _run(f'--config={config}', f'--workdir={killed}')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith('done: step 16')
  warnings = [l for l in proc.stderr.splitlines() if l.startswith('warning')]
  assert len(warnings) == 1 and warnings[0].startswith(
      f'warning: skipped checkpoint {newest} in {ckpt_dir} (')
  assert (ckpt_dir / f'{newest}.corrupt').is_dir()
  assert not list(ckpt_dir.glob('*orbax-checkpoint-tmp*'))
  assert 'Traceback' not in proc.stderr, proc.stderr[-4000:]
  jax.tree.map(np.testing.assert_array_equal, trainer.final_params(str(full)),
               trainer.final_params(str(killed)))
