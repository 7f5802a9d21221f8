"""Training runs for studies and what they cost: train a config quietly,
summarise its metrics.jsonl, count its training FLOPs, measure its few-shot
accuracy.

  result = train(config, '/tmp/study/tc_k2')   # trainer.train_and_evaluate
  flops = train_flops_per_step(config)
  shots = fewshot_accuracy(loading.load('/tmp/study/tc_k2'))
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import pandas as pd

from vmoe.analysis import loading
from vmoe.evaluate import fewshot as fewshot_lib


def train(config: ml_collections.ConfigDict, workdir: str, *,
          quiet: bool = True) -> dict[str, Any]:
  """Runs `vmoe.train.trainer.train_and_evaluate` (resuming if `workdir`
  holds a checkpoint) and returns `run_summary(workdir)`. quiet: swallow the
  progress bar and sharding summary (errors still raise)."""
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  sink = io.StringIO()
  with (contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink)
        if quiet else contextlib.nullcontext()):
    trainer.train_and_evaluate(config, workdir)
  return run_summary(workdir)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_summary(workdir: str) -> dict[str, Any]:
  """Final numbers of a run from its metrics.jsonl.

  Keys: step, accuracy, loss (last eval), dropped_fraction (last eval, mean
  over MoE blocks; 0 for dense), steps_per_sec (median over the log intervals
  after the first, which includes compilation), train_seconds (num steps /
  steps_per_sec: training time without compilation and evaluation), and the
  last few-shot record's '<dataset>/<n>shot' entries if any.
  """
  records = read_metrics(workdir)
  evals = [r for r in records if r['split'] == 'eval']
  trains = [r for r in records if r['split'] == 'train']
  if not evals or not trains:
    raise ValueError(f'{workdir}/metrics.jsonl has no train/eval records')
  last = evals[-1]
  rates = [r['perf/steps_per_sec'] for r in trains]
  rate = float(np.median(rates[1:] if len(rates) > 1 else rates))
  # MoE layers' own drops ('moe/block_<i>/dropped_fraction'), not those of
  # other block parts (mixture-of-depths' skipped tokens: '.../depth/...').
  dropped = [v for k, v in last.items()
             if re.fullmatch(r'moe/block_\d+/dropped_fraction', k)]
  out = dict(step=last['step'], accuracy=last['accuracy'], loss=last['loss'],
             dropped_fraction=float(np.mean(dropped)) if dropped else 0.0,
             steps_per_sec=rate, train_seconds=last['step'] / rate)
  shots = [r for r in records if r['split'] == 'fewshot']
  if shots:
    out.update({k: v for k, v in shots[-1].items()
                if k not in ('step', 'split')})
  return out


def _abstract_batch(exp, config, train: bool):
  b = config.batch_size if train else config.eval_batch_size
  size, channels = config.preprocess.image_size, config.preprocess.num_channels
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=exp.batch_sharding)
  image = spec((b, size, size, channels), np.float32)
  if train:
    return {'image': image, 'labels': spec((b, exp.num_classes), np.float32)}
  return {'image': image, 'label': spec((b,), np.int32),
          'mask': spec((b,), np.float32)}


def train_flops_per_step(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one training step (forward, backward, optimizer update) at
  config.batch_size: XLA's cost analysis of the trainer's jitted step.

  It counts what the program executes, so MoE layers pay for every expert
  slot (filled or not) and for routing, dispatch and combine. XLA counts the
  body of a while loop once, so iterative routers (e.g. Sinkhorn) are
  undercounted by their iteration count in the routing part.
  """
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):
    exp = trainer.Experiment(config)
  lowered = exp.train_step.lower(exp.abstract_state,
                                 _abstract_batch(exp, config, train=True))
  cost = lowered.cost_analysis() or {}
  return float(cost.get('flops', float('nan')))


def fewshot_accuracy(trained: loading.Trained, *,
                     shots: Sequence[int] = fewshot_lib.SHOTS,
                     seeds: int = fewshot_lib.NUM_SEEDS,
                     l2_reg: float = fewshot_lib.L2_REG,
                     dataset: str | None = None, train_split: str = 'train',
                     test_split: str = 'test') -> pd.DataFrame:
  """One row per (seed, shots): n-shot ridge accuracy on the trained model's
  frozen pre-logits (see `vmoe.evaluate.fewshot`)."""
  from vmoe.train import steps  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(trained.config.to_dict())
  config.fewshot = fewshot_lib.default_config()
  config.fewshot.update(dict(shots=tuple(shots), seeds=seeds, l2_reg=l2_reg,
                             dataset=dataset, train_split=train_split,
                             test_split=test_split))
  evaluator = fewshot_lib.FewShotEvaluator(config, steps.ModelFn(
      trained.model))
  acc = evaluator.accuracies(trained.params)
  return pd.DataFrame([dict(seed=s, shots=n, accuracy=a)
                       for (s, n, _), a in sorted(acc.items())])


def study_configs(directory: str = 'configs/routers',
                  suffix: str = '_digits') -> dict[str, ml_collections.ConfigDict]:
  """{name: config} of every `<directory>/<name><suffix>.py` (its
  get_config()), sorted by name; a relative `directory` is looked up in the
  working directory, then in the source checkout this package belongs to.
  New router configs appear here without any change to the callers."""
  from vmoe import config_flag  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(directory):
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    directory = os.path.join(checkout, directory)
  out = {}
  for file in sorted(os.listdir(directory)):
    if file.endswith(f'{suffix}.py'):
      out[file[:-len(suffix) - 3]] = config_flag.load_config_file(
          os.path.join(directory, file))
  return dict(sorted(out.items()))


def retarget(config: ml_collections.ConfigDict, dataset: str, *,
             data_dir: str | None = None, download: bool = False,
             image_size: int | None = None, train_split: str = 'train',
             eval_split: str = 'test') -> ml_collections.ConfigDict:
  """A copy of a digits study config for another TFDS dataset.

  The channels come from the dataset; with a new `image_size` the routing
  groups keep their number of images and Soft MoE its slots per token
  (model.moe.group_size and num_slots scale with the tokens per image), so
  the active compute per token is unchanged. Natural images get random
  horizontal flips.
  """
  from vmoe.data import base  # pylint: disable=g-import-not-at-top
  base.source_class('tfds')  # one line naming the pip install without TFDS
  from vmoe.data import tfds_source  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.dataset.source = 'tfds'
  cfg.dataset.name = dataset
  cfg.dataset.download = bool(download)
  cfg.dataset.train_split, cfg.dataset.eval_split = train_split, eval_split
  if data_dir:
    cfg.dataset.data_dir = data_dir
  builder = tfds_source.prepare_dataset(cfg.dataset)
  shape = builder.info.features[cfg.dataset.image_key].shape
  cfg.preprocess.num_channels = int(shape[-1]) if shape and shape[-1] else 3
  cfg.preprocess.flip = dataset != 'digits'
  if image_size and image_size != config.preprocess.image_size:
    from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
    old = vit.num_tokens(config.model, config.preprocess.image_size)
    cfg.preprocess.image_size = int(image_size)
    new = vit.num_tokens(cfg.model, cfg.preprocess.image_size)
    moe = cfg.model.get('moe')
    if moe is not None:
      if moe.get('group_size'):
        if moe.group_size % old:
          raise ValueError(f'model.moe.group_size={moe.group_size} is not a '
                           f'whole number of {old}-token images')
        moe.group_size = moe.group_size // old * new
      if moe.get('num_slots'):
        moe.num_slots = max(1, round(moe.num_slots * new / old))
  return cfg
