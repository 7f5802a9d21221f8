"""End-to-end training: loss goes down, determinism, NaN guard, resume."""

import signal

import jax
import numpy as np
import pytest

from tests.conftest import tiny_digits_config
from vmoe.train import checkpoint as checkpoint_lib
from vmoe.train import metrics_writer
from vmoe.train import trainer


def _train_records(workdir):
  return [r for r in metrics_writer.read_metrics(workdir)
          if r['split'] == 'train']


def _deterministic(records):
  return [{k: v for k, v in r.items() if not k.startswith('perf/')}
          for r in records]


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


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(digits_data_dir,
                                                             tmp_path):
  workdir = str(tmp_path)
  config = tiny_digits_config(digits_data_dir, num_train_steps=4)
  trainer.train_and_evaluate(config, workdir)
  good = trainer.final_params(workdir)
  # Continue with a learning rate that blows the parameters up.
  config = tiny_digits_config(digits_data_dir, num_train_steps=12,
                              **{'optimizer.learning_rate': 1e30,
                                 'schedule.name': 'constant',
                                 'schedule.warmup_steps': 0})
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'NaN/inf at step \d+.*last good checkpoint \(step 4\)'):
    trainer.train_and_evaluate(config, workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir + '/checkpoints', max_to_keep=3)
  assert ckpt.all_steps() == [4]
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, good,
               trainer.final_params(workdir))
  for leaf in jax.tree.leaves(good):
    assert np.all(np.isfinite(leaf))
