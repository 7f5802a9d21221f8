"""One trained Mixture-of-Nested-Experts model at several compute budgets:
accuracy against FLOPs (MoNE, Jain et al. 2024, Sec. 4: a single model
evaluated at different inference budgets).

  python -m vmoe.analysis.budget --workdir=/tmp/mone \
      --budgets=0.125,0.25,0.5,0.75,1.0

prints the table and writes budget_sweep.csv and budget_sweep.png into
--out (default <workdir>/budget_sweep). The FLOPs per image are XLA's cost
analysis of the compiled inference forward pass at that budget (the nested
experts run their sliced matmuls, so the count falls with the budget).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from vmoe.analysis import loading
from vmoe.nn.blocks import mone


def budget_sweep(trained: loading.Trained, budgets: Sequence[float], *,
                 batches: Sequence[dict[str, np.ndarray]] | None = None,
                 max_examples: int | None = None) -> pd.DataFrame:
  """One row per budget: budget, effective_capacity (the one the token
  counts realise, mean over nested blocks), gflops_per_image and accuracy
  on the eval split (or `batches`)."""
  model = trained.model
  if not any(isinstance(m, mone.NestedExperts)
             for _, m in nnx.iter_modules(model)):
    raise ValueError('budget_sweep: the model has no nested-experts block '
                     "(config.model.block='mone')")
  batches = list(batches if batches is not None else loading.eval_batches(
      trained.config, max_examples=max_examples))
  rows = []
  previous = [m.eval_budget for _, m in nnx.iter_modules(model)
              if isinstance(m, mone.NestedExperts)]
  try:
    for budget in budgets:
      mone.set_budget(model, float(budget))
      graphdef, state = nnx.split(model)

      def forward(state, images):
        return nnx.merge(graphdef, state)(images, train=False)

      run = jax.jit(forward)
      one = jnp.asarray(batches[0]['image'][:1])
      cost = run.lower(state, one).cost_analysis() or {}
      correct = count = 0
      capacities = []
      for batch in batches:
        logits, metrics = run(state, jnp.asarray(batch['image']))
        real = np.asarray(batch['mask']) > 0
        correct += int(np.sum((np.argmax(np.asarray(logits), -1)
                               == np.asarray(batch['label']))[real]))
        count += int(real.sum())
        capacities.append(np.mean([
            float(v) for k, v in metrics.items()
            if k.endswith('nested/effective_capacity')]))
      rows.append(dict(budget=float(budget),
                       effective_capacity=float(np.mean(capacities)),
                       gflops_per_image=float(cost.get('flops', np.nan)) / 1e9,
                       accuracy=correct / max(count, 1)))
  finally:
    blocks = [m for _, m in nnx.iter_modules(model)
              if isinstance(m, mone.NestedExperts)]
    for m, value in zip(blocks, previous):
      m.eval_budget = value
  return pd.DataFrame(rows)


def plot(frame: pd.DataFrame, path: str, title: str = '') -> str:
  """Accuracy against GFLOPs per image, one point per budget (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  ax.plot(frame.gflops_per_image, frame.accuracy, marker='o')
  for row in frame.itertuples():
    ax.annotate(f'e_c={row.budget:g}', (row.gflops_per_image, row.accuracy),
                fontsize=7, xytext=(3, 3), textcoords='offset points')
  ax.set_xlabel('GFLOPs per image (XLA cost analysis)')
  ax.set_ylabel('test accuracy')
  ax.set_title(title or 'one MoNE model at several budgets', fontsize=9)
  ax.grid(alpha=0.3)
  fig.savefig(path, dpi=90, bbox_inches='tight')
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--budgets', default='0.125,0.25,0.5,0.75,1.0')
  parser.add_argument('--max_examples', type=int, default=None)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  try:
    budgets = [float(b) for b in args.budgets.split(',') if b.strip()]
    trained = loading.load(args.workdir)
    frame = budget_sweep(trained, budgets, max_examples=args.max_examples)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.workdir, 'budget_sweep')
  os.makedirs(out, exist_ok=True)
  frame.to_csv(os.path.join(out, 'budget_sweep.csv'), index=False)
  plot(frame, os.path.join(out, 'budget_sweep.png'))
  print(frame.to_string(index=False, float_format=lambda v: f'{v:.4f}'))
  print(f'wrote {out}/budget_sweep.csv and budget_sweep.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
