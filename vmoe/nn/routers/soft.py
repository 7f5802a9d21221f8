"""Soft MoE (Puigcerver et al. 2023, https://arxiv.org/abs/2308.00951).

Every expert has p slots; each slot is a convex combination of all tokens of
the group (dispatch weights: softmax over tokens) and each token a convex
combination of all slot outputs (combine weights: softmax over slots), both
from the same logits scale * <x / |x|, phi / |phi|>. No token is dropped and
the decision is the logits (`vmoe.nn.routing.soft_routing`).

With `model.moe.kernels` selecting 'soft' (`pallas_kernels/soft_moe.py`) the
decision carries the router input and the normalised slot parameters
instead, the fused kernels form the logits tile by tile, and the metrics
come from the kernels' per-token / per-slot statistics (computed in `decide`,
per group, where the groups are): the [g, s, n] logits are never stored.
"""

from __future__ import annotations

import dataclasses

from flax import nnx
import jax.numpy as jnp

from vmoe.kernels import registry as kernel_registry
from vmoe.config import is_int
from vmoe.nn import routing as rt
from vmoe.nn.layers import AUX_LOSS_KEY, param
from vmoe.nn.routers import base
from vmoe.nn.routers import registry


@registry.register('soft')
class SoftRouter(base.Router):
  """Soft MoE slot parameters phi [e, p, d] and the learnable scalar scale.

  Options: num_slots (p; None = from the capacity factor and group_size,
  rounded by `capacity_rounding`: google-research/vmoe rounds with 'round').
  Only the z-loss (on the slot logits) enters its auxiliary loss. vmoe's
  Soft MoE rounds the dispatched tokens and expert outputs to bfloat16: set
  `model.moe.bf16_dispatch=True` to do the same.
  """
  OPTIONS = dict(num_slots=None)
  DECISION = rt.SoftRouting

  @classmethod
  def validate(cls, c, need):
    need(c.num_slots is None or (is_int(c.num_slots)
                                 and c.num_slots >= 1),
         'num_slots', 'must be None or an integer >= 1')
    need(c.num_slots is not None or c.group_size is not None, 'router',
         'needs model.moe.num_slots or model.moe.group_size to size the '
         'slot parameters')

  @classmethod
  def fine_grained(cls, c, m):
    # m times more experts of h / m hidden units with the same slots each.
    if c.num_slots is not None:
      return {}
    return dict(capacity_factor=c.capacity_factor * m)

  def __init__(self, dim, c, *, param_dtype=jnp.float32, rngs):
    super().__init__(dim, c, param_dtype=param_dtype, rngs=rngs)
    e = c.num_experts
    p = c.num_slots or self._capacity(c.group_size, c.capacity_factor, 1)
    self.phi = param(rngs, nnx.initializers.normal(stddev=dim ** -0.5),
                     (e, p, dim), ('expert', None, 'embed'), param_dtype)
    self.scale = param(rngs, nnx.initializers.ones_init(), (), (), param_dtype)
    self.kernels = c.kernels  # model.moe.kernels: XLA or the fused kernels

  def _kernel(self):
    """The fused Soft MoE kernel module, or None (the XLA path)."""
    return kernel_registry.lookup(self.kernels, 'soft', 'SoftRouting')

  def __call__(self, x):
    """[g, s, d] -> SoftRouting with [g, s, e*p] logits."""
    return rt.soft_routing(x, self.phi[...], self.scale[...])

  def capacity(self, s, capacity_factor):
    return self.phi.shape[1]  # a parameter shape: fixed after construction

  def logits(self, x, *, train, rngs):
    r = self(x)
    kernel = self._kernel()
    if kernel is not None:
      r = dataclasses.replace(r, tokens=x, slot_params=kernel.slot_params(
          self.phi[...], self.scale[...]))
    return r

  def decide(self, logits, *, capacity):
    kernel = self._kernel()
    if kernel is None or logits.tokens is None:
      return logits
    return dataclasses.replace(logits, stats=kernel.decision_stats(logits))

  def metrics(self, r, logits, *, train):
    zero = jnp.zeros((), jnp.float32)
    if r.stats is None:
      losses = dict(importance_loss=zero, load_loss=zero, balance_loss=zero,
                    z_loss=rt.z_loss(r.logits))
      return self.routing_metrics(r, losses, r.combine_weights())
    # The same metrics from the kernels' statistics (no logits).
    z_loss, entropy, expert_load = self._kernel().decision_metrics(r)
    losses = dict(importance_loss=zero, load_loss=zero, balance_loss=zero,
                  z_loss=z_loss)
    return {AUX_LOSS_KEY: self.auxiliary_loss(losses), **losses,
            'dropped_fraction': zero, 'router_entropy': entropy,
            'capacity': jnp.asarray(r.capacity, jnp.float32),
            'expert_load': expert_load}
