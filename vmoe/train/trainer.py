"""The training loop: `train_and_evaluate(config, workdir)`.

Order of work, every error before anything is written where it can be known:

  1. validate the config; check the data (splits, features, files);
  2. chief process: create and lock the workdir (object stores cannot be
     locked: a warning says so), remove the temporary directories of killed
     saves, compare the config with the one the newest checkpoint records
     (config.json for older checkpoints; only `workdir.RESUME_CHANGEABLE`
     fields may differ);
  3. build the model and optimizer (abstract shapes), check the free space;
     then the lock file names this run;
  4. restore the newest checkpoint that restores and whose content digests
     match: a corrupt one (unreadable metadata or data, other values than
     were saved) is renamed `<step>.corrupt` and the previous one is tried,
     each with one line on stderr; a checkpoint of another model or
     optimizer is an error. No checkpoint: initialise;
  5. the evaluations recorded as due at the restored step and missing from
     metrics.jsonl run first (an evaluation killed last time);
  6. a run already at or past num_train_steps returns (`already_trained`);
  7. train with periodic logging, checkpoints and evaluation (in that order:
     an evaluation error never costs the step's checkpoint, which records
     the evaluations due at its step and the config). Before each save the
     run checks that it still holds the workdir's lock. SIGTERM/SIGINT save
     a checkpoint and stop (SIGINT twice: exit at once, status 130); a data
     error saves the current step and stops; a non-finite loss, gradient or
     state stops without saving it.

A run killed at any point and started again with the same command continues
from the latest checkpoint and ends with bit-identical parameters (same data
order, same per-step randomness).

Logged train metrics are means over the steps since the previous log record
of the same process: after a resume at step t the first record averages the
steps from t + 1 only (the per-step metrics of an interrupted window are not
checkpointed). With checkpoint_every_steps a multiple of log_every_steps (as
in every shipped config) that only happens after a preemption or a kill.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
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
from vmoe import workdir as workdir_lib
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.checkpoints import init_from
from vmoe.checkpoints import layout
from vmoe.config import ConfigError
from vmoe.data import pipeline
from vmoe.evaluate import fewshot
from vmoe.nn import vit
from vmoe.train import cost
from vmoe.train import metrics_writer
from vmoe.train import optimizer as optimizer_lib
from vmoe.train import steps
from vmoe.train.config_validation import validate_config

IncompatibleCheckpointError = checkpoint_lib.IncompatibleCheckpointError
WorkdirError = workdir_lib.WorkdirError


class NonFiniteLossError(RuntimeError):
  """Training stopped: the loss, gradients or the state became NaN/inf."""


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint of the workdir is corrupt (each was set aside)."""


# Errors a user causes (config, data, workdir, checkpoints): `main.py` prints
# their one-line message and exits with status 2.
USER_ERRORS = (ConfigError, pipeline.DataError, WorkdirError,
               IncompatibleCheckpointError, NoUsableCheckpointError,
               checkpoint_lib.CheckpointWriteError)


class Preempted(Exception):
  """SIGTERM/SIGINT received; a checkpoint was saved (if training started)."""

  def __init__(self, signum: int, step: int | None):
    name = signal.Signals(signum).name
    if step is None:
      message = (f'received {name} while starting; nothing was trained, run '
                 'the same command to start again')
    else:
      message = (f'received {name} at step {step}; checkpoint saved, run the '
                 'same command to resume')
    super().__init__(message)
    self.signum = signum


class Experiment:
  """Everything built from a config before the first step.

  Attributes: mesh, model_fn (split model), tx (optax), abstract_state (with
  shardings), train_step / eval_step (jitted).
  """

  def __init__(self, config: ml_collections.ConfigDict,
               num_classes: int | None = None):
    """num_classes: None = the dataset's (the dry run passes its own)."""
    self.config = config
    self.num_classes = (pipeline.num_classes(config.dataset)
                        if num_classes is None else num_classes)
    self.mesh = sharding.create_mesh(config)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.model_factory = self._model_factory(config.model)
    self.learning_rate_fn = optimizer_lib.learning_rate_schedule(config)
    self.tx = optimizer_lib.create_optimizer(config)
    abstract_model, self.abstract_state, self.state_sharding = (
        self._abstract_state(self.model_factory))
    self.model_fn = steps.ModelFn(abstract_model)
    if jax.process_index() == 0:
      print(sharding.sharding_summary(self.abstract_state, self.state_sharding,
                                      self.mesh), flush=True)
    self.init_state = jax.jit(self._init_state,
                              out_shardings=self.state_sharding)
    replicated = sharding.replicated(self.mesh)
    loss = config.get('loss', 'softmax_xent')
    # Traced under the mesh so MoE layers place their own all-to-alls; the
    # outputs (metrics, eval sums) are replicated, i.e. reduced globally.
    self.train_step = jax.jit(
        sharding.with_mesh(steps.make_train_step(
            self.model_fn, self.tx, seed=config.seed,
            label_smoothing=config.label_smoothing,
            learning_rate_fn=self.learning_rate_fn, loss=loss,
            grad_accum_steps=config.get('grad_accum_steps', 1),
            batch_shards=self.mesh.devices.size), self.mesh),
        in_shardings=(self.state_sharding, self.batch_sharding),
        out_shardings=(self.state_sharding, replicated),
        donate_argnums=0)
    self.eval_step = jax.jit(
        sharding.with_mesh(steps.make_eval_step(self.model_fn, loss),
                           self.mesh),
        in_shardings=(self.state_sharding['params'], self.batch_sharding),
        out_shardings=replicated)
    # NaN/inf anywhere in the parameters or optimizer state (one pass over
    # them; run before every save and log, not every step).
    self.state_finite = jax.jit(
        lambda state: steps.all_finite((state['params'], state['opt_state'])),
        in_shardings=(self.state_sharding,), out_shardings=replicated)

  def _model_factory(self, model_cfg):
    return lambda rngs: vit.create_model(
        model_cfg, num_classes=self.num_classes,
        image_size=self.config.preprocess.image_size,
        num_channels=self.config.preprocess.num_channels, rngs=rngs)

  def _abstract_state(self, model_factory):
    """(abstract model, abstract train state with shardings, shardings)."""
    abstract_model = nnx.eval_shape(lambda: model_factory(nnx.Rngs(0)))
    abstract_state = jax.eval_shape(lambda: self._init_state(model_factory))
    # Parameters (and their optimizer state) follow config.partitioning.
    params_spec = sharding.param_specs(
        abstract_model, self.config, dict(self.mesh.shape))
    state_sharding = sharding.state_shardings(
        self.mesh, abstract_state, params_spec)
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, state_sharding)
    return abstract_model, abstract_state, state_sharding

  def abstract_state_in_layout(self, scanned: bool):
    """The abstract train state of this model in the scanned or unscanned
    layout (`model.scan_layers`), to restore a checkpoint saved in it."""
    model_cfg = ml_collections.ConfigDict(self.config.model.to_dict())
    model_cfg.scan_layers = scanned
    return self._abstract_state(self._model_factory(model_cfg))[1]

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The train batch as the train step sees it (global shapes)."""
    pp = self.config.preprocess
    b = self.config.batch_size
    return {'image': jax.ShapeDtypeStruct(
                (b, pp.image_size, pp.image_size, pp.num_channels),
                jnp.float32, sharding=self.batch_sharding),
            'labels': jax.ShapeDtypeStruct((b, self.num_classes), jnp.float32,
                                           sharding=self.batch_sharding)}

  @property
  def checkpoint_bytes(self) -> int:
    """Bytes of one checkpoint of the train state (uncompressed)."""
    return sum(int(x.size) * x.dtype.itemsize
               for x in jax.tree.leaves(self.abstract_state))

  def _init_state(self, model_factory=None) -> dict[str, Any]:
    key = jax.random.key(self.config.seed)
    model = (model_factory or self.model_factory)(
        nnx.Rngs(params=jax.random.fold_in(key, 1)))
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


def exit_at_once() -> None:
  """Ctrl-C twice: exit with status 130 now, with one line and without the
  tracebacks a KeyboardInterrupt prints from orbax's, jax's and the
  interpreter's shutdown (an unfinished save is a temporary directory that
  the next run removes; the lock goes with the process)."""
  print('\nstopped: interrupted twice; exited without waiting (the last '
        'complete checkpoint is kept: run the same command to resume)',
        file=sys.stderr, flush=True)
  os._exit(130)  # pylint: disable=protected-access


class _SignalFlag:
  """Records SIGTERM/SIGINT so the run can checkpoint and stop cleanly.

  A second SIGINT (Ctrl-C twice) exits at once (`exit_at_once`).
  """

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
    if signum == signal.SIGINT and self.signum is not None:
      exit_at_once()
    self.signum = signum

  def stop_if_signalled(self) -> None:
    """Before training starts: stop without writing anything."""
    if self.signum is not None:
      raise Preempted(self.signum, None)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _agree(error: Exception | None, what: str) -> None:
  """Raises `error`; with several processes each learns whether process 0
  (the only one that did `what`) failed, so that none waits forever."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    failed = int(multihost_utils.broadcast_one_to_all(
        np.int32(error is not None)))
    if failed and error is None:
      error = WorkdirError(f'process 0 could not {what} (see its error)')
  if error is not None:
    raise error


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _broadcast_flags(flags: list[bool]) -> list[bool]:
  """Process 0's booleans on every process."""
  if jax.process_count() == 1:
    return flags
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return [bool(v) for v in np.asarray(multihost_utils.broadcast_one_to_all(
      np.asarray(flags, np.int32)))]


def _prepare_workdir(config, workdir: str, lock: workdir_lib.Lock,
                     ckpt_dir: str) -> bool:
  """Chief only: create + lock the workdir, clean up, check the config;
  returns whether the workdir was created."""
  created = workdir_lib.prepare(workdir)
  lock.acquire()
  try:
    for path in checkpoint_lib.remove_stale_tmp(ckpt_dir):
      logging.info('removed %s (a save that was killed)', path)
  except OSError as e:
    raise WorkdirError(f'cannot remove a stale checkpoint directory in '
                       f'{ckpt_dir}: {e}') from None
  if checkpoint_lib.has_checkpoints(ckpt_dir):
    # The config the checkpoints record: deleting config.json unlocks
    # nothing. (Older checkpoints record none: config.json then.)
    recorded = checkpoint_lib.stored_config(ckpt_dir)
    if recorded is None:
      workdir_lib.check_resume_config(config, workdir)
    else:
      step, stored = recorded
      workdir_lib.check_resume_config(
          config, workdir, stored,
          source=f'the config recorded by checkpoint {step}')
  return created


def _state_problem(exp: Experiment, state, step: int) -> str | None:
  """Why a restored state cannot be resumed from, or None."""
  stored = int(jax.device_get(state['step']))
  if stored != step:
    return f'it holds step {stored}'
  if (int(jax.device_get(state['nonfinite_step'])) >= 0
      or not bool(exp.state_finite(state))):
    return 'it holds NaN/inf values'
  return None


def _restore_step(ckpt: checkpoint_lib.Checkpointer, step: int,
                  exp: Experiment):
  """(state, info): checkpoint `step` as the run's state, its digests
  verified, also when it was saved in the other layout (`model.scan_layers`
  changed on resume): then restored and verified in that layout and
  converted on the devices."""
  try:
    info = ckpt.check_structure(step, exp.abstract_state)
  except IncompatibleCheckpointError as error:
    other = exp.abstract_state_in_layout(
        not exp.config.model.get('scan_layers', False))
    try:
      info = ckpt.check_structure(step, other)
    except IncompatibleCheckpointError:
      raise error from None
    return layout.convert_state(ckpt.restore(step, other, info),
                                exp.abstract_state), info
  return ckpt.restore(step, exp.abstract_state, info), info


def _restore_newest(ckpt: checkpoint_lib.Checkpointer, exp: Experiment,
                    is_chief: bool):
  """(state, step, info) of the newest checkpoint that restores and
  verifies; (None, None, None) if there is none. Newer ones that did not
  restore are set aside (one line on stderr each) only once an older one has
  restored: when none restores the cause may be this run's (memory,
  permissions, a mount), so nothing moves."""

  def attempt(step: int):
    state, info = _restore_step(ckpt, step, exp)
    problem = _state_problem(exp, state, step)
    if problem is not None:
      raise checkpoint_lib.CorruptCheckpointError(step, problem)
    return state, info

  step, restored, failed = checkpoint_lib.newest_first(
      ckpt.all_steps, attempt, agree=_all_processes)
  if step is not None:
    if failed:
      try:
        if is_chief:
          for bad, why in failed:
            moved = ckpt.set_aside(bad)
            print(f'warning: skipped checkpoint {bad} in {ckpt.directory} '
                  f'({why or "unreadable on another process"}); moved it '
                  f'to {moved}', file=sys.stderr, flush=True)
      finally:
        _barrier('vmoe_checkpoints_set_aside')
        ckpt.reload()
    state, info = restored
    return state, step, info
  if failed:
    step, why = failed[0]
    raise NoUsableCheckpointError(
        f'no checkpoint in {ckpt.directory} restores (steps '
        f'{", ".join(str(s) for s, _ in sorted(failed))}; checkpoint {step}: '
        f'{why or "unreadable on another process"}); nothing was moved: fix '
        f'the cause, or move them aside (e.g. to <step>'
        f'{checkpoint_lib.CORRUPT_SUFFIX}) to start from step 0')
  return None, None, None


def _due_evaluations(config, step: int, last: bool, fewshot_eval
                     ) -> tuple[str, ...]:
  """The evaluations a run does at `step` (`last`: its final step)."""
  due = []
  if step % config.eval_every_steps == 0 or last:
    due.append('eval')
  if fewshot_eval is not None and fewshot_eval.due(step, last):
    due.append('fewshot')
  return tuple(due)


def _pending_evaluations(config, workdir: str, step: int,
                         info: checkpoint_lib.StepInfo, fewshot_eval
                         ) -> list[str]:
  """The evaluations due at the restored `step` that metrics.jsonl lacks
  (the run was killed during them), the same on every process."""
  if info.arrays is None:  # a checkpoint from before steps recorded them
    due = _due_evaluations(config, step, step >= config.num_train_steps,
                           fewshot_eval)
  else:
    due = info.evaluations
  wanted = [name for name in checkpoint_lib.EVALUATIONS
            if name in due and (name != 'fewshot' or fewshot_eval is not None)]
  missing = [metrics_writer.last_record(workdir, name, step=step) is None
             for name in checkpoint_lib.EVALUATIONS]
  missing = _broadcast_flags(missing)
  return [name for name, m in zip(checkpoint_lib.EVALUATIONS, missing)
          if m and name in wanted]


def _warn_nonfinite(step: int, metrics: dict[str, Any]) -> None:
  for name in ('loss', 'accuracy'):
    value = metrics.get(name)
    if value is not None and not math.isfinite(value):
      print(f'warning: step {step}: eval {name} is {value} (logged as '
            'it is): the model gives a true class probability 0 or '
            'computes NaN', file=sys.stderr, flush=True)


def _already_trained(workdir: str, step: int) -> dict[str, Any]:
  """The result of a run whose checkpoint is at or past num_train_steps."""
  out = {'step': step, 'already_trained': True, 'train_seconds': 0.0}
  record = metrics_writer.last_record(workdir, 'eval', step=step)
  if record:
    out.update({k: v for k, v in record.items() if k not in ('step', 'split')})
  return out


def _close(resource) -> None:
  """Closes `resource`; its error surfaces only if nothing else failed."""
  if resource is None:
    return
  if sys.exc_info()[0] is None:
    resource.close()
    return
  try:
    resource.close()
  except Exception:  # pylint: disable=broad-except
    pass


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint).

  Returns the final eval metrics plus 'step' and 'train_seconds'; for a run
  already trained to num_train_steps (or beyond) 'already_trained': True and
  the eval metrics logged at its last step (evaluated first if a kill lost
  that evaluation), without training.
  """
  with _SignalFlag() as flag:
    workdir = checkpoint_lib.normal_directory(workdir)
    validate_config(config, resuming=checkpoint_lib.has_checkpoints(
        checkpoint_dir(workdir)))
    pipeline.check_data(config, process_count=jax.process_count())
    fewshot.check_data(config)
    lock = workdir_lib.Lock(workdir)
    try:
      return _run(config, workdir, lock, flag)
    finally:
      lock.release()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, 'checkpoints')


def _run(config, workdir: str, lock: workdir_lib.Lock,
         flag: _SignalFlag) -> dict[str, Any]:
  is_chief = jax.process_index() == 0
  ckpt_dir = checkpoint_dir(workdir)
  error = None
  created = False
  if is_chief:
    try:
      created = _prepare_workdir(config, workdir, lock, ckpt_dir)
    except WorkdirError as e:
      error = e
    except OSError as e:  # the other processes must not wait for process 0
      error = WorkdirError(f'--workdir={workdir}: {e}')
  _agree(error, f'prepare --workdir={workdir}')
  try:
    flag.stop_if_signalled()
    exp = Experiment(config)
    fewshot_eval = fewshot.evaluator_from_config(config, exp)  # None when off
    error = None
    if is_chief:
      try:
        workdir_lib.check_free_space(workdir, exp.checkpoint_bytes)
        lock.announce()
      except WorkdirError as e:
        error = e
      except OSError as e:
        error = WorkdirError(f'--workdir={workdir}: {e}')
    _agree(error, f'find free space in --workdir={workdir}')
  except BaseException:
    if created:  # a run that failed its checks leaves nothing behind
      workdir_lib.remove_if_empty(workdir)
    raise
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, max_to_keep=config.max_to_keep)
  config_record = json.loads(workdir_lib.config_json(config))
  writer = bar = None
  try:
    state, latest, info = _restore_newest(ckpt, exp, is_chief)
    flag.stop_if_signalled()
    if state is None:
      state = exp.init_state()
      # config.init_from: a checkpoint's weights for step 0 (new runs only).
      state = init_from.initialize_state(config, state, tx=exp.tx,
                                         state_sharding=exp.state_sharding)
    start_step = int(jax.device_get(state['step']))
    num_steps = config.num_train_steps
    eval_metrics: dict[str, Any] = {}
    pending = (_pending_evaluations(config, workdir, start_step, info,
                                    fewshot_eval) if latest else [])
    if pending or start_step < num_steps:
      writer = metrics_writer.MetricWriter(workdir, enabled=is_chief,
                                           resume_step=start_step)
    # Evaluations of the restored step that a kill interrupted.
    for name in pending:
      if name == 'eval':
        eval_metrics = exp.evaluate(state['params'])
        _warn_nonfinite(start_step, eval_metrics)
        writer.write(start_step, 'eval', eval_metrics)
      else:
        writer.write(start_step, 'fewshot', fewshot_eval(state['params']))
    if start_step >= num_steps:
      _close(writer)
      writer = None
      return _already_trained(workdir, start_step)
    logging.info('%s at step %d', 'Resuming' if latest else 'Starting',
                 start_step)
    train_iter: Iterator = pipeline.train_iterator(
        config, start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())
    last_saved, last_checked = latest, start_step
    config_written = False
    history: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    compile_seconds = 0.0
    if is_chief:
      note = _warmup_note(config)
      if note:
        print(note, flush=True)
    peak, peak_source = cost.peak_flops(config)
    meter = cost.Meter(batch_size=config.batch_size,
                       flops_per_step=cost.model_flops(config, exp.num_classes),
                       num_devices=jax.device_count(), peak=peak)
    profiler = cost.Profiler(workdir, config.get('profile_steps'),
                             enabled=is_chief)
    run_perf: list[dict[str, float]] = []

    def check_finite(step: int) -> None:
      """NonFiniteLossError unless the state of `step` may be saved."""
      nonlocal last_checked
      if last_checked == step:  # a log step that is also a save step
        return
      kept = (f'the last good checkpoint (step {last_saved}) is kept'
              if last_saved is not None else 'no checkpoint was written')
      bad = int(jax.device_get(state['nonfinite_step']))
      if bad >= 0:
        # State step `bad` ran the (bad + 1)-th step, the one that
        # checkpoint `bad + 1` would hold.
        raise NonFiniteLossError(
            f'loss or gradients became NaN/inf at step {bad + 1}; training '
            f'stopped, {kept}')
      if not bool(exp.state_finite(state)):
        raise NonFiniteLossError(
            'parameters or optimizer state became NaN/inf between steps '
            f'{last_checked + 1} and {step} with finite loss and gradients '
            '(an update overflowed: is config.optimizer.learning_rate too '
            f'large?); training stopped, {kept}')
      last_checked = step

    def save(step: int) -> None:
      nonlocal last_saved, config_written
      check_finite(step)
      lock_error = None
      if is_chief:
        try:
          lock.check(f'saving step {step}')
        except WorkdirError as e:
          lock_error = e
      _agree(lock_error, f'keep the lock of --workdir={workdir}')
      # config.json, a readable copy of the config each checkpoint records,
      # is written with the first one of this run, so that a run that fails
      # before it leaves the old one.
      if is_chief and not config_written:
        workdir_lib.write_config(config, workdir)
        config_written = True
      writer.flush()  # the records up to the checkpoint (object stores)
      ckpt.save(step, state, config=config_record,
                evaluations=_due_evaluations(config, step, step == num_steps,
                                             fewshot_eval))
      last_saved = step

    step = start_step
    try:
      batch = sharding.global_batch(next(train_iter), exp.batch_sharding)
      train_step, compile_seconds = _compile(exp, state, batch, is_chief,
                                             peak_source)
      # The bar starts after compilation and moves only at log points, when
      # the steps are done: its rate and ETA count completed steps.
      bar = tqdm(total=num_steps, initial=start_step, unit='step',
                 disable=not is_chief, dynamic_ncols=True, desc='train')
      meter.start(step)
      while step < num_steps:
        if batch is None:
          batch = sharding.global_batch(next(train_iter), exp.batch_sharding)
        profiler.before(step + 1)
        state, metrics = train_step(state, batch)
        batch = None
        step += 1
        profiler.after(step, metrics)
        history.append(metrics)
        last = step == num_steps
        if step % config.log_every_steps == 0 or last:
          check_finite(step)
          mean = _mean_metrics(history)  # waits for the steps to finish
          history.clear()
          perf = meter.measure(step)
          mean.update(perf)
          run_perf.append(perf)
          writer.write(step, 'train', mean)
          bar.update(step - bar.n)
          bar.set_postfix_str(
              f"loss={float(mean['loss']):.4f}, "
              f"acc={float(mean['accuracy']):.3f}, "
              f"{perf['perf/images_per_sec']:,.0f} img/s"
              + (f", MFU {100 * perf['perf/mfu']:.1f}%"
                 if 'perf/mfu' in perf else ''))
        # Saved before evaluating, so that an evaluation error never costs
        # the step's checkpoint; the checkpoint records the evaluations due
        # at its step, so that a resume runs those a kill interrupted. Their
        # time is not training time.
        t_other = None
        if step % config.checkpoint_every_steps == 0 or last:
          t_other = _wait(state)
          save(step)
        if step % config.eval_every_steps == 0 or last:
          t_other = t_other or _wait(state)
          eval_metrics = exp.evaluate(state['params'])
          _warn_nonfinite(step, eval_metrics)
          writer.write(step, 'eval', eval_metrics)
          bar.write(f'step {step}: eval accuracy {eval_metrics["accuracy"]:.4f}'
                    f' loss {eval_metrics["loss"]:.4f}'
                    + (f'; train {cost.perf_line(run_perf[-1])}'
                       if run_perf else ''))
        if fewshot_eval is not None and fewshot_eval.due(step, last):
          t_other = t_other or _wait(state)
          writer.write(step, 'fewshot', fewshot_eval(state['params']))
        if t_other is not None:
          meter.exclude(time.perf_counter() - t_other)
        if flag.signum is not None:
          save(step)
          ckpt.wait()
          raise Preempted(flag.signum, step)
    except pipeline.DataError:
      # Keep the steps done so far: the run resumes here once the data is
      # fixed.
      if step > start_step:
        try:
          save(step)
        except NonFiniteLossError:
          pass
      raise
  finally:
    if 'profiler' in locals():
      profiler.stop()
    if bar is not None:
      bar.close()
    try:
      _close(writer)
    finally:  # wait for an async save even if the writer fails to close
      _close(ckpt)
  eval_metrics = dict(eval_metrics)
  eval_metrics['step'] = num_steps
  eval_metrics['train_seconds'] = time.perf_counter() - t_start
  eval_metrics['compile_seconds'] = compile_seconds
  eval_metrics.update(_run_perf(run_perf))
  return eval_metrics


def _wait(state) -> float:
  """Blocks until the steps so far are done; returns the time then."""
  jax.block_until_ready(state['step'])
  return time.perf_counter()


def _compile(exp: Experiment, state, batch, is_chief: bool,
             peak_source: str):
  """(compiled train step, seconds), with one line on the program's cost."""
  if not hasattr(exp.train_step, 'lower'):  # a wrapped step (tests)
    return exp.train_step, 0.0
  t0 = time.perf_counter()
  compiled = exp.train_step.lower(state, batch).compile()
  seconds = time.perf_counter() - t0
  if is_chief:
    memory = cost.program_memory(compiled)
    capacity, _ = cost.memory_capacity(exp.config)
    of = f' of {cost.format_bytes(capacity)}' if capacity else ''
    print(f'compiled the train step in {seconds:.1f} s; per device '
          f"{cost.format_bytes(memory['total'])}{of} (temporaries "
          f"{cost.format_bytes(memory['temporaries'])}); MFU against "
          f'{peak_source}', flush=True)
  return compiled, seconds


def _run_perf(records: list[dict[str, float]]) -> dict[str, float]:
  """Means of the perf metrics over the run's log intervals (the first one
  dropped when there are others: it warms caches up)."""
  if len(records) > 1:
    records = records[1:]
  if not records:
    return {}
  keys = [k for k in records[0] if k.startswith('perf/')]
  return {k: float(np.mean([r[k] for r in records if k in r])) for k in keys}


def _warmup_note(config) -> str | None:
  """A line saying how schedule.warmup_steps was taken, if not as given:
  clamped to num_train_steps, or in place of the recipe's fraction."""
  sched = config.schedule
  steps, fraction = sched.get('warmup_steps'), sched.get('warmup_fraction')
  if steps is None:
    return None
  notes = []
  if fraction is not None:
    notes.append(f'overrides schedule.warmup_fraction={fraction:g}')
  if steps > config.num_train_steps:
    notes.append(f'clamped to num_train_steps={config.num_train_steps}')
  return (f'note: schedule.warmup_steps={steps} ' + ' and '.join(notes)
          if notes else None)


def final_params(workdir: str) -> dict[str, Any] | None:
  """Parameters of the latest checkpoint in `workdir`, as numpy (for tests)."""
  directory = checkpoint_dir(workdir)
  if not checkpoint_lib.has_checkpoints(directory):
    return None
  restored = checkpoint_lib.read(directory)
  return jax.tree.map(np.asarray, restored.state['params'])
