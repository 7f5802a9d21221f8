"""Expert ablation: per-class accuracy with one expert switched off.

Switching expert e of a block off zeroes its output (what
`MoeLayer.disabled_experts` does): tokens routed to it get only their other
experts' outputs (and the residual). Here the same effect comes from
parameters: an expert whose second kernel and bias are zero outputs exactly
zero, so every ablation runs with one compiled program, with no re-jit per
expert. `tests/test_analysis.py` checks both give the same logits.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from vmoe.analysis.trace import moe_blocks


def without_experts(params: dict, block: int, experts: Sequence[int]) -> dict:
  """A copy of the pure parameter dict with the outputs of `experts` of MoE
  `block` zeroed (their kernel2 [e, h, d] and bias2 [e, d] rows set to 0;
  for a Multi-Head MoE block those of its inner layer)."""
  ids = jnp.asarray(tuple(experts), jnp.int32)
  mlp = params['blocks'][block]['mlp']
  inner = 'moe' in mlp and 'experts' not in mlp
  layer = mlp['moe'] if inner else mlp
  experts_params = dict(layer['experts'])
  experts_params['kernel2'] = jnp.asarray(experts_params['kernel2']).at[
      ids].set(0)
  experts_params['bias2'] = jnp.asarray(experts_params['bias2']).at[ids].set(0)
  layer = dict(layer, experts=experts_params)
  blocks = dict(params['blocks'])
  blocks[block] = dict(params['blocks'][block],
                       mlp=dict(mlp, moe=layer) if inner else layer)
  return dict(params, blocks=blocks)


def expert_ablation(model: nnx.Module,
                    batches: Iterable[dict[str, np.ndarray]], *,
                    blocks: Sequence[int] | None = None) -> pd.DataFrame:
  """One row per (block, expert, label): accuracy of the images of that
  class with the expert off, base_accuracy (nothing off) and delta. Rows
  with block = expert = -1 hold the base accuracy itself.

  The batches are materialised once (every ablation sees the same images).
  """
  batches = list(batches)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  @jax.jit
  def predict(params, images):
    s = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(s, params)
    logits, _ = nnx.merge(graphdef, s)(images, train=False)
    return jnp.argmax(logits, axis=-1)

  labels = np.concatenate([np.asarray(b['label'])[np.asarray(b['mask']) > 0]
                           for b in batches])
  num_classes = int(model.head.kernel.shape[-1])

  def per_class_accuracy(p):
    preds = np.concatenate([
        np.asarray(predict(p, b['image']))[np.asarray(b['mask']) > 0]
        for b in batches])
    correct = preds == labels
    return np.array([correct[labels == c].mean() if np.any(labels == c)
                     else np.nan for c in range(num_classes)])

  base = per_class_accuracy(params)
  rows = [dict(block=-1, expert=-1, label=c, accuracy=a, base_accuracy=a,
               delta=0.0) for c, a in enumerate(base)]
  layers = moe_blocks(model)
  for i in (layers if blocks is None else blocks):
    if i not in layers:
      raise ValueError(f'expert_ablation: block {i} is not an MoE block '
                       f'(MoE blocks: {list(layers)})')
    for e in range(layers[i].num_experts):
      acc = per_class_accuracy(without_experts(params, i, (e,)))
      rows.extend(dict(block=i, expert=e, label=c, accuracy=a,
                       base_accuracy=b, delta=a - b)
                  for c, (a, b) in enumerate(zip(acc, base)))
  return pd.DataFrame(rows)
