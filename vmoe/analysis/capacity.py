"""Accuracy against the evaluation capacity factor, with and without Batch
Priority Routing, from trained models (V-MoE, Riquelme et al. 2021, Sec. 4.1:
BPR lets a model trained at capacity ~1 be evaluated far below it).

Every point is the trainer's eval step (`vmoe.train.steps.make_eval_step`)
with `eval_capacity_factor` and `batch_priority` of every MoE layer changed;
`python -m vmoe.evaluate.capacity_sweep` is the command line of this
function. Capacities are static shapes, so each (factor, priority) setting is
compiled once and then evaluates every given model: the seeds of one config
share the compilations.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import numpy as np
import pandas as pd
from flax import nnx

from vmoe.analysis.loading import Trained
from vmoe.nn import moe as moe_lib
from vmoe.nn import vit
from vmoe.train import steps


def _has_priority(layer: moe_lib.MoeLayer) -> bool:
  return 'batch_priority' in type(layer.router).OPTIONS


def capacity_sweep(runs: Trained | Sequence[Trained],
                   capacity_factors: Sequence[float], *,
                   batch_priority: Sequence[bool] = (True, False),
                   batches: Iterable[dict[str, np.ndarray]] | None = None
                   ) -> pd.DataFrame:
  """One row per (run, capacity_factor, batch_priority): accuracy, loss and
  dropped_fraction (mean over MoE blocks) on the eval split.

  Args:
    runs: one trained model or several of the same config (e.g. seeds); the
      row's `run` is its index here.
    capacity_factors: eval capacity factors (Soft MoE has none: its slots
      are parameters).
    batch_priority: settings to evaluate, for routers with that option
      (token choice); for the others `batch_priority` is None in every row.
    batches: eval batches (default: `loading.eval_batches` of the first
      run's config), materialised once.
  """
  from vmoe.analysis import loading  # pylint: disable=g-import-not-at-top
  runs = [runs] if isinstance(runs, Trained) else list(runs)
  config = runs[0].config
  if config.model.get('moe') is None:
    raise ValueError('capacity_sweep: config.model.moe is None (a dense '
                     'model has no capacity)')
  batches = list(batches if batches is not None
                 else loading.eval_batches(config))
  model = nnx.eval_shape(lambda: vit.create_model(
      config.model, num_classes=runs[0].num_classes,
      image_size=config.preprocess.image_size,
      num_channels=config.preprocess.num_channels, rngs=nnx.Rngs(0)))
  layers = list(moe_lib.moe_layers(model).values())
  settings = (tuple(batch_priority) if any(map(_has_priority, layers))
              else (None,))
  params = [run.params for run in runs]
  rows = []
  for bpr in settings:
    for factor in capacity_factors:
      moe_lib.set_capacity_factor(model, eval=float(factor))
      for layer in layers:
        if bpr is not None and _has_priority(layer):
          layer.router.batch_priority = bool(bpr)
      eval_step = jax.jit(steps.make_eval_step(steps.ModelFn(model)))
      for index, run in enumerate(runs):
        totals = None
        for batch in batches:
          sums = eval_step(params[index], batch)
          totals = sums if totals is None else jax.tree.map(
              lambda a, b: a + b, totals, sums)
        totals = jax.device_get(totals)
        count = max(float(totals['count']), 1.0)
        dropped = [float(v) / count for k, v in totals.items()
                   if k.endswith('/dropped_fraction')]
        rows.append(dict(run=index, step=run.step,
                         capacity_factor=float(factor), batch_priority=bpr,
                         accuracy=float(totals['correct']) / count,
                         loss=float(totals['loss']) / count,
                         dropped_fraction=float(np.mean(dropped))
                         if dropped else 0.0))
  return pd.DataFrame(rows)
