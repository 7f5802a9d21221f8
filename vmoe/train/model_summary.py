"""Parameter and FLOP counts of a config's model, without training.

`python main.py --config=configs/soft_moe_b16.py --config.dry_run=True`

Counts use abstract shapes only (no parameter is allocated). FLOPs per image
come from XLA's cost analysis of the lowered inference forward pass at the
eval capacity (one multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vmoe.nn import moe as moe_lib
from vmoe.nn import vit
from vmoe.train import steps


def _num_classes(config) -> int:
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    return pipeline.num_classes(config.dataset)
  except pipeline.DatasetNotFoundError:
    return 1000  # data not prepared here: count with an ImageNet-sized head


def expert_applications_per_token(config: ml_collections.ConfigDict,
                                  tokens_per_image: int) -> float:
  """Expert MLP applications per token at eval (how many experts' weights a
  token's computation touches on average): k for token choice, the capacity
  factor for expert choice, slots / tokens for Soft MoE."""
  moe = moe_lib.default_moe_config()
  moe.update(dict(config.model.moe))
  cf = moe.eval_capacity_factor or moe.capacity_factor
  if moe.router == 'token_choice':
    return float(moe.k)
  if moe.router == 'expert_choice':
    return float(cf)
  group = moe.group_size or tokens_per_image
  slots_per_expert = moe.num_slots or math.ceil(group * cf / moe.num_experts)
  return moe.num_experts * slots_per_expert / group


def summarize(config: ml_collections.ConfigDict) -> str:
  num_classes = _num_classes(config)
  size = config.preprocess.image_size
  channels = config.preprocess.num_channels
  factory = lambda: vit.create_model(
      config.model, num_classes=num_classes, image_size=size,
      num_channels=channels, rngs=nnx.Rngs(0))
  abstract = nnx.eval_shape(factory)
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(int(x.size) for _, x in flat)
  expert = sum(int(x.size) for path, x in flat
               if any(getattr(p, 'key', None) == 'experts' for p in path))
  tokens = vit.num_tokens(config.model, size)
  active = total
  if config.model.moe is not None:
    per_expert = expert / config.model.moe.num_experts
    active = total - expert + per_expert * expert_applications_per_token(
        config, tokens)

  model_fn = steps.ModelFn(abstract)
  moe = config.model.moe
  # Smallest batch whose tokens fill whole routing groups.
  group = (moe.get('group_size') or tokens) if moe is not None else tokens
  batch_size = group // math.gcd(group, tokens)
  images = jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32)
  lowered = jax.jit(lambda p, x: model_fn(p, x, train=False)[0]).lower(
      params, images)
  cost = lowered.cost_analysis() or {}
  gflops = float(cost.get('flops', float('nan'))) / batch_size / 1e9
  lines = [
      f'model: {config.model.variant} '
      f"({'dense' if moe is None else moe.router + ' MoE'}), "
      f'{size}x{size}x{channels} images, {num_classes} classes',
      f'total parameters:  {total:,}',
      f'active parameters per token: {active:,.0f}',
      f'inference GFLOPs per image:  {gflops:.3f}',
  ]
  return '\n'.join(lines)
