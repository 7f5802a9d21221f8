"""The MoE layer on Pallas kernels with its experts split over 2 devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python -m tests.pallas_ep_worker

For token choice (k=2, BPR, router noise), expert choice and Soft MoE, one
MoE layer's training-mode loss, outputs, metrics and gradients with
kernels='pallas' on a (data 1, expert 2) mesh, where the routing, dispatch
and Soft MoE kernels run per device inside the expert-parallel shard_map
(interpreted: the TPU interpreter, see `vmoe.kernels.compat.resolve_for`),
against kernels='xla' on one device. Prints one JSON line prefixed 'RESULT '.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from tests.helpers import build, max_diff, moe_config
from tests.helpers import fast_jit as jit
from vmoe import sharding
from vmoe.nn import moe

D, H, E, S = 8, 16, 4, 8


def pallas_calls(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == 'pallas_call'
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          count += pallas_calls(inner)
  return count


def compare(router: str) -> dict:
  def make(kernels):
    return build(lambda rngs: moe.MoeLayer(D, H, config=moe_config(
        router=router, num_experts=E, group_size=S, k=2, batch_priority=True,
        noise_std=0.5, kernels=kernels), rngs=rngs))
  x = jax.random.normal(jax.random.key(1), (4, S, D))   # 4 groups
  w = jax.random.normal(jax.random.key(2), x.shape)
  key = jax.random.key(3)

  def grad_fn(layer):
    graphdef, state = nnx.split(layer)

    def loss(state, x, key):
      y, metrics = nnx.merge(graphdef, state)(x, train=True,
                                              rngs=nnx.Rngs(gating=key))
      return jnp.sum(w * y) + metrics['auxiliary_loss'], (y, metrics)
    return jax.value_and_grad(loss, has_aux=True), state

  xla_fn, state = grad_fn(make('xla'))
  (_, (y1, m1)), g1 = jit(xla_fn)(state, x, key)
  pallas_fn, state = grad_fn(make('pallas'))
  mesh = jax.make_mesh((1, 2), sharding.MESH_AXES,
                       axis_types=(AxisType.Auto,) * 2)
  rep = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
  state_sharding = jax.tree.map(lambda _: rep, state)
  sharded = jit(sharding.with_mesh(pallas_fn, mesh),
                in_shardings=(state_sharding, batch, None))
  args = (jax.device_put(state, state_sharding), jax.device_put(x, batch),
          key)
  traced = sharded.trace(*args)
  text = traced.lower().compile().as_text()
  (_, (y2, m2)), g2 = sharded(*args)
  return dict(y=max_diff(y1, y2), metrics=max_diff(m1, m2),
              grads=max_diff(g1, g2), pallas_calls=pallas_calls(
                  traced.jaxpr.jaxpr), all_to_all=text.count(' all-to-all('))


def main():
  assert jax.device_count() == 2, jax.devices()
  out = {router: compare(router)
         for router in ('token_choice', 'expert_choice', 'soft')}
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
