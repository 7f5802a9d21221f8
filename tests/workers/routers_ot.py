"""Expert parallelism of the optimal-transport routers on 8 simulated devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m tests.routers_ot_worker

For the OT routers x dispatch strategies of `CASES`, one MoE layer's
training-mode loss, outputs, metrics and gradients on a (data 2, expert 4)
mesh ('dropless': (8, 1), it has no expert-parallel form) against one
device. Prints one JSON
line prefixed 'RESULT ': {router/dispatch: max differences and HLO counts}.
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

D, H, E, S = 8, 16, 8, 8
ROUTERS = ('sinkhorn_token_choice', 'sinkhorn_expert_choice',
           'sparsity_constrained_expert_choice')
# Dispatch strategies per router (each compiles two programs; every router x
# strategy is compared with references on one device in test_routers_ot.py).
CASES = {
    'sinkhorn_token_choice': ('indices', 'einsum', 'dropless'),
    'sinkhorn_expert_choice': ('indices', 'einsum'),
    'sparsity_constrained_expert_choice': ('indices', 'einsum'),
}


def compare(router: str, dispatch: str, mesh_shape: tuple[int, int]) -> dict:
  layer = build(lambda rngs: moe.MoeLayer(D, H, config=moe_config(
      router=router, num_experts=E, group_size=S, dispatch=dispatch, k=2,
      batch_priority=True, noise_std=0.5, z_loss_weight=0.1), rngs=rngs))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (16, S, D))   # 16 groups
  w = jax.random.normal(jax.random.key(2), x.shape)
  key = jax.random.key(3)

  def loss(state, x, key):
    y, metrics = nnx.merge(graphdef, state)(x, train=True,
                                            rngs=nnx.Rngs(gating=key))
    return jnp.sum(w * y) + metrics['auxiliary_loss'], (y, metrics)

  grad_fn = jax.value_and_grad(loss, has_aux=True)
  (_, (y1, m1)), g1 = jit(grad_fn)(state, x, key)
  mesh = jax.make_mesh(mesh_shape, sharding.MESH_AXES,
                       axis_types=(AxisType.Auto,) * 2)
  rep = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P(sharding.BATCH_AXES))
  state_sharding = jax.tree.map(lambda _: rep, state)
  sharded = jit(sharding.with_mesh(grad_fn, mesh),
                in_shardings=(state_sharding, batch, None))
  args = (jax.device_put(state, state_sharding), jax.device_put(x, batch),
          key)
  text = sharded.lower(*args).compile().as_text()
  (_, (y2, m2)), g2 = sharded(*args)
  return dict(y=max_diff(y1, y2), metrics=max_diff(m1, m2),
              grads=max_diff(g1, g2),
              moved=float(jnp.abs(g2['router']['kernel'][...]).sum()),
              all_to_all=text.count(' all-to-all('))


def main():
  assert jax.device_count() == 8, jax.devices()
  out = {}
  for router in ROUTERS:
    for dispatch in CASES[router]:
      shape = (8, 1) if dispatch == 'dropless' else (2, 4)
      out[f'{router}/{dispatch}'] = compare(router, dispatch, shape)
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
