"""End-to-end training: loss goes down, determinism, NaN guard, resume."""

import signal

import jax
import numpy as np
import pytest

from tests.helpers import tiny_digits_config
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.train import metrics_writer
from vmoe.train import trainer


def _train_records(workdir):
  return [r for r in metrics_writer.read_metrics(workdir)
          if r['split'] == 'train']


def _deterministic(records):
  return [{k: v for k, v in r.items() if not k.startswith('perf/')}
          for r in records]


@pytest.mark.slow
def test_training_reduces_loss_and_writes_outputs(digits_data_dir, tmp_path):
  config = tiny_digits_config(digits_data_dir, num_train_steps=60,
                              batch_size=64, log_every_steps=20,
                              eval_every_steps=60, checkpoint_every_steps=30)
  result = trainer.train_and_evaluate(config, str(tmp_path))
  records = _train_records(str(tmp_path))
  assert [r['step'] for r in records] == [20, 40, 60]
  assert records[-1]['loss'] < 0.85 * records[0]['loss']
  assert result['accuracy'] > 0.3 and result['step'] == 60
  evals = [r for r in metrics_writer.read_metrics(str(tmp_path))
           if r['split'] == 'eval']
  assert evals and evals[-1]['accuracy'] == result['accuracy']
  assert (tmp_path / 'tensorboard' / 'train').is_dir()
  assert (tmp_path / 'config.json').is_file()
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'),
                                     max_to_keep=3)
  assert ckpt.all_steps() == [30, 60]
  ckpt.close()


@pytest.mark.slow
def test_same_seed_same_metrics(digits_data_dir, tmp_path):
  config = tiny_digits_config(digits_data_dir, **{'model.dropout': 0.1})
  trainer.train_and_evaluate(config, str(tmp_path / 'a'))
  trainer.train_and_evaluate(config, str(tmp_path / 'b'))
  a = _deterministic(metrics_writer.read_metrics(str(tmp_path / 'a')))
  b = _deterministic(metrics_writer.read_metrics(str(tmp_path / 'b')))
  assert a == b
  pa = trainer.final_params(str(tmp_path / 'a'))
  pb = trainer.final_params(str(tmp_path / 'b'))
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


def _preempt_at(monkeypatch, stop_at):
  """Makes the trainer receive SIGTERM right after step `stop_at`."""
  real_init = trainer.Experiment.__init__

  def init(self, cfg):
    real_init(self, cfg)
    step_fn = self.train_step

    def step_then_signal(state, batch):
      state, metrics = step_fn(state, batch)
      if int(state['step']) == stop_at:
        signal.raise_signal(signal.SIGTERM)
      return state, metrics

    self.train_step = step_then_signal

  monkeypatch.setattr(trainer.Experiment, '__init__', init)


@pytest.mark.slow
def test_preemption_saves_and_resume_is_exact(digits_data_dir, tmp_path,
                                              monkeypatch):
  """SIGTERM after step 7 (no periodic checkpoint there), then rerun."""
  config = tiny_digits_config(digits_data_dir, **{'model.dropout': 0.1})
  trainer.train_and_evaluate(config, str(tmp_path / 'full'))
  workdir = str(tmp_path / 'resumed')
  with monkeypatch.context() as m:
    _preempt_at(m, stop_at=7)
    with pytest.raises(trainer.Preempted, match='SIGTERM at step 7'):
      trainer.train_and_evaluate(config, workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir + '/checkpoints', max_to_keep=3)
  assert ckpt.all_steps() == [4, 7]
  ckpt.close()
  trainer.train_and_evaluate(config, workdir)
  full = trainer.final_params(str(tmp_path / 'full'))
  resumed = trainer.final_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, full, resumed)
  # Logged means of windows not interrupted by the restart match too (the
  # window 5..8 is averaged over steps 8..8 only after resuming at 7).
  full_log = _deterministic(metrics_writer.read_metrics(str(tmp_path / 'full')))
  resumed_log = _deterministic(metrics_writer.read_metrics(workdir))
  assert ([r for r in full_log if r['step'] != 8]
          == [r for r in resumed_log if r['step'] != 8])


def _corrupt_at(monkeypatch, step_at, kind):
  """Step `step_at` sees a NaN image ('loss') or ends with an inf parameter
  although its loss and gradients were finite ('params')."""
  real_init = trainer.Experiment.__init__

  def init(self, cfg):
    real_init(self, cfg)
    step_fn = self.train_step

    def corrupted(state, batch):
      if int(state['step']) + 1 == step_at and kind == 'loss':
        batch = dict(batch, image=batch['image'].at[0].set(np.nan))
      state, metrics = step_fn(state, batch)
      if int(state['step']) == step_at and kind == 'params':
        params = dict(state['params'])
        params['head'] = jax.tree.map(lambda x: x.at[0].set(np.inf),
                                      params['head'])
        state = dict(state, params=params)
      return state, metrics

    self.train_step = corrupted

  monkeypatch.setattr(trainer.Experiment, '__init__', init)


@pytest.mark.parametrize('kind,step_at,message', [
    ('loss', 6, r'loss or gradients became NaN/inf at step 6; training stopped, '
             r'the last good checkpoint \(step 4\) is kept'),
    ('params', 8, r'parameters or optimizer state became NaN/inf between steps '
               r'5 and 8 .*the last good checkpoint \(step 4\) is kept'),
])
def test_nonfinite_state_is_never_saved(digits_data_dir, tmp_path,
                                        monkeypatch, kind, step_at, message):
  """A NaN loss (step 6) or an inf parameter after a finite step (step 8,
  not seen by the step's own guard) stops at the next log or save (step 8)
  and keeps checkpoint 4 only."""
  workdir = str(tmp_path)
  config = tiny_digits_config(digits_data_dir, num_train_steps=12,
                              log_every_steps=4, checkpoint_every_steps=4)
  _corrupt_at(monkeypatch, step_at, kind)
  with pytest.raises(trainer.NonFiniteLossError, match=message):
    trainer.train_and_evaluate(config, workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir + '/checkpoints', max_to_keep=3)
  assert ckpt.all_steps() == [4]
  ckpt.close()
  for leaf in jax.tree.leaves(trainer.final_params(workdir)):
    assert np.all(np.isfinite(leaf))
