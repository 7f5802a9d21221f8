"""The training loop: `train_and_evaluate(config, workdir)`.

Order of work: validate the config, find the data, build the model and the
optimizer, restore the latest checkpoint of `workdir` (or initialise), then
train with periodic logging, evaluation and asynchronous checkpoints. A run
killed at any point and started again with the same command continues from the
latest checkpoint and ends with bit-identical parameters (same data order, same
per-step randomness).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from vmoe import sharding
from vmoe.data import pipeline
from vmoe.nn import vit
from vmoe.train import checkpoint as checkpoint_lib
from vmoe.train import metrics_writer
from vmoe.train import optimizer as optimizer_lib
from vmoe.train import steps
from vmoe.train.config_validation import validate_config


class NonFiniteLossError(RuntimeError):
  """Training stopped because the loss or the gradients became NaN/inf."""


class IncompatibleCheckpointError(RuntimeError):
  """The workdir holds a checkpoint of a different model/optimizer."""


class Preempted(Exception):
  """SIGTERM/SIGINT received; a checkpoint was saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(f'received {signal.Signals(signum).name} at step {step}; '
                     'checkpoint saved, run the same command to resume')
    self.signum = signum


class _SignalFlag:
  """Records SIGTERM/SIGINT so the loop can checkpoint and stop cleanly."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Experiment:
  """Everything built from a config before the first step.

  Attributes: mesh, model_fn (split model), tx (optax), abstract_state (with
  shardings), train_step / eval_step (jitted).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.num_classes = pipeline.num_classes(config.dataset)
    self.mesh = sharding.create_mesh(config)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.model_factory = lambda rngs: vit.create_model(
        config.model, num_classes=self.num_classes,
        image_size=config.preprocess.image_size,
        num_channels=config.preprocess.num_channels, rngs=rngs)
    abstract_model = nnx.eval_shape(lambda: self.model_factory(nnx.Rngs(0)))
    self.model_fn = steps.ModelFn(abstract_model)
    self.learning_rate_fn = optimizer_lib.learning_rate_schedule(config)
    self.tx = optimizer_lib.create_optimizer(config)

    abstract_state = jax.eval_shape(self._init_state)
    # Parameters (and their optimizer state) follow config.partitioning.
    self.params_spec = sharding.param_specs(
        abstract_model, config, dict(self.mesh.shape))
    self.state_sharding = sharding.state_shardings(
        self.mesh, abstract_state, self.params_spec)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, self.state_sharding)
    if jax.process_index() == 0:
      print(sharding.sharding_summary(self.abstract_state, self.state_sharding,
                                      self.mesh), flush=True)
    self.init_state = jax.jit(self._init_state,
                              out_shardings=self.state_sharding)
    replicated = sharding.replicated(self.mesh)
    # Traced under the mesh so MoE layers place their own all-to-alls; the
    # outputs (metrics, eval sums) are replicated, i.e. reduced globally.
    self.train_step = jax.jit(
        sharding.with_mesh(steps.make_train_step(
            self.model_fn, self.tx, seed=config.seed,
            label_smoothing=config.label_smoothing,
            learning_rate_fn=self.learning_rate_fn), self.mesh),
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, replicated),
        donate_argnums=0)
    self.eval_step = jax.jit(
        sharding.with_mesh(steps.make_eval_step(self.model_fn), self.mesh),
        in_shardings=(self.state_sharding['params'], self.batch_sharding),
        out_shardings=replicated)

  def _init_state(self) -> dict[str, Any]:
    key = jax.random.key(self.config.seed)
    model = self.model_factory(nnx.Rngs(params=jax.random.fold_in(key, 1)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': self.tx.init(params),
            'nonfinite_step': jnp.full((), -1, jnp.int32)}

  def evaluate(self, params) -> dict[str, float]:
    """One pass over the eval split: accuracy, loss and routing metrics."""
    totals = None
    for batch in pipeline.eval_iterator(
        self.config, process_index=jax.process_index(),
        process_count=jax.process_count()):
      # Padding rows (mask 0) make every device's share equal.
      batch = sharding.pad_batch(batch, jax.local_device_count())
      sums = self.eval_step(params, sharding.global_batch(
          batch, self.batch_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop('count')), 1.0)
    out = {'accuracy': float(totals.pop('correct')) / count,
           'loss': float(totals.pop('loss')) / count}
    out.update({k: float(v) / count for k, v in totals.items()})
    return out


def _mean_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
  host = jax.device_get(history)
  return {k: np.mean([np.asarray(h[k]) for h in host], axis=0)
          for k in host[0]}


def _check_finite(state, last_saved: int | None) -> None:
  bad = int(jax.device_get(state['nonfinite_step']))
  if bad >= 0:
    kept = (f'the last good checkpoint (step {last_saved}) is kept'
            if last_saved is not None else 'no checkpoint was written')
    raise NonFiniteLossError(
        f'loss or gradients became NaN/inf at step {bad}; training stopped, '
        f'{kept}')


def _write_config(config, workdir: str) -> None:
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + '.tmp', path)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Returns the final eval metrics plus 'step' and 'train_seconds'.
  """
  validate_config(config)
  pipeline.prepare_dataset(config.dataset)  # fails fast if data is missing
  is_chief = jax.process_index() == 0
  exp = Experiment(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                     max_to_keep=config.max_to_keep)
  latest = ckpt.latest_step()
  if latest is None:
    state = exp.init_state()
  else:
    try:
      state = ckpt.restore(latest, exp.abstract_state)
    except (ValueError, KeyError, TypeError) as e:
      raise IncompatibleCheckpointError(
          f'{ckpt.directory} holds a checkpoint (step {latest}) that does not '
          f'match this config; use another --workdir ({str(e).splitlines()[0]})'
      ) from None
  start_step = int(jax.device_get(state['step']))
  if is_chief:
    _write_config(config, workdir)
    logging.info('%s at step %d', 'Resuming' if latest else 'Starting',
                 start_step)
  writer = metrics_writer.MetricWriter(workdir, enabled=is_chief,
                                       resume_step=start_step)
  num_steps = config.num_train_steps
  train_iter: Iterator = pipeline.train_iterator(
      config, start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count())
  last_saved = latest
  eval_metrics: dict[str, Any] = {}
  history: list[dict[str, Any]] = []
  t_start = time.perf_counter()
  t_log, step_log = t_start, start_step
  bar = tqdm(total=num_steps, initial=start_step, unit='step',
             disable=not is_chief, dynamic_ncols=True, desc='train')
  try:
    with _SignalFlag() as flag:
      step = start_step
      while step < num_steps:
        batch = sharding.global_batch(next(train_iter), exp.batch_sharding)
        state, metrics = exp.train_step(state, batch)
        step += 1
        history.append(metrics)
        bar.update(1)
        last = step == num_steps
        if step % config.log_every_steps == 0 or last:
          _check_finite(state, last_saved)
          mean = _mean_metrics(history)
          history.clear()
          now = time.perf_counter()
          rate = (step - step_log) / max(now - t_log, 1e-9)
          mean['perf/steps_per_sec'] = rate
          mean['perf/images_per_sec'] = rate * config.batch_size
          t_log, step_log = now, step
          writer.write(step, 'train', mean)
          bar.set_postfix(loss=f"{float(mean['loss']):.4f}",
                          acc=f"{float(mean['accuracy']):.3f}")
        if step % config.eval_every_steps == 0 or last:
          eval_metrics = exp.evaluate(state['params'])
          writer.write(step, 'eval', eval_metrics)
          bar.write(f'step {step}: eval accuracy {eval_metrics["accuracy"]:.4f}'
                    f' loss {eval_metrics["loss"]:.4f}')
        if step % config.checkpoint_every_steps == 0 or last:
          _check_finite(state, last_saved)
          ckpt.save(step, state)
          last_saved = step
        if flag.signum is not None:
          _check_finite(state, last_saved)
          ckpt.save(step, state)
          ckpt.wait()
          raise Preempted(flag.signum, step)
  finally:
    bar.close()
    writer.close()
    ckpt.close()
  eval_metrics = dict(eval_metrics)
  eval_metrics['step'] = num_steps
  eval_metrics['train_seconds'] = time.perf_counter() - t_start
  return eval_metrics


def final_params(workdir: str) -> dict[str, Any] | None:
  """Parameters of the latest checkpoint in `workdir`, as numpy (for tests)."""
  path = os.path.join(workdir, 'checkpoints')
  ckpt = checkpoint_lib.Checkpointer(path, max_to_keep=1000, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    return None
  restored = ckpt.restore_as_saved(step)
  ckpt.close()
  return jax.tree.map(np.asarray, restored['params'])
