"""What the declared claims (`vmoe.analysis.claims.CLAIMS`) measure on a
trained study run, as {replicate key: value} (key () for one value per
run, (block, label) for per-class measurements).

  values = measure(loading.load(workdir), 'expert_activation')
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from vmoe.analysis import forcing
from vmoe.analysis import loading
from vmoe.analysis import runs
from vmoe.analysis import trace as trace_lib
from vmoe.analysis.statistics import unused_experts


def _activation(trace: trace_lib.Trace) -> float:
  shares = [float(np.mean(layer.assigned.sum(axis=(0, 1)) > 0))
            for layer in trace.layers.values()]
  return float(np.mean(shares))


def _eval_metric(workdir: str, pattern: str) -> list[float]:
  record = [r for r in runs.read_metrics(workdir) if r['split'] == 'eval'][-1]
  return [float(v) for k, v in record.items() if re.fullmatch(pattern, k)]


def measure(trained: loading.Trained, metric: str,
            batches: Sequence[dict[str, np.ndarray]] | None = None
            ) -> dict[Any, float]:
  """The claim metric `metric` of a trained run (see the module docstring).

  accuracy: the last eval accuracy (metrics.jsonl); expert_activation: the
  share of experts that received any token of the eval split, mean over MoE
  layers; unused_experts: experts that received none, summed over MoE
  layers; skipped_fraction: the share of tokens skipping the
  mixture-of-depths blocks (mean over them); targeted_minus_random: per
  (MoE block, class), the accuracy drop of switching off the class's most
  distinctive expert minus that of random experts
  (`vmoe.analysis.forcing.targeted_ablation`). Empty when the run has
  nothing to measure (a dense model's experts)."""
  if metric == 'accuracy':
    return {(): float(runs.run_summary(trained.workdir)['accuracy'])}
  if metric == 'skipped_fraction':
    values = _eval_metric(trained.workdir,
                          r'moe/block_\d+/depth/dropped_fraction')
    return {(): float(np.mean(values))} if values else {}
  batches = list(batches if batches is not None
                 else loading.eval_batches(trained.config))
  if metric in ('expert_activation', 'unused_experts'):
    trace = trace_lib.collect(trained.model, batches)
    if not trace.layers:
      return {}
    if metric == 'expert_activation':
      return {(): _activation(trace)}
    return {(): float(unused_experts(trace).num_unused.sum())}
  if metric == 'targeted_minus_random':
    frame = forcing.targeted_ablation(trained.model, batches)
    return {(r.block, r.label): float(r.targeted_minus_random)
            for r in frame.itertuples()}
  raise ValueError(f'unknown claim metric {metric!r}')
