"""The router interface: one routing algorithm is one `Router` subclass.

A router owns its parameters (a gate projection, Soft MoE slot parameters),
maps tokens to router logits, turns the logits into a routing *decision* (a
small pytree of `vmoe.nn.routing`: `TokenChoiceRouting`,
`ExpertChoiceRouting` or `SoftRouting`) and reports the routing metrics that
every MoE layer logs. `vmoe.nn.moe.MoeLayer` is the plumbing around it:

    logits = router.logits(x, train=..., rngs=...)   # per token: plain SPMD
    r = router.decide(logits, capacity=c)             # per group: runs inside
                                                      # the expert-parallel
                                                      # shard_map
    metrics = router.metrics(r, logits, train=...)    # METRIC_KEYS

and moves tokens with any strategy of `vmoe.nn.dispatch`, which only sees the
decision. A new router is a module of this package defining a subclass
registered by name (`@registry.register('name')`) plus one import line in
`vmoe/nn/routers/__init__.py`; its config options are its `OPTIONS`.

Axis letters: g groups, s tokens per group, e experts, c capacity, d model
dim, k choices per token, p Soft MoE slots per expert.
"""

from __future__ import annotations

import math
import types
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from vmoe.config import Need, is_int, is_number
from vmoe.nn import routing as rt
from vmoe.nn.layers import AUX_LOSS_KEY, DType, param

LOSS_KEYS = ('importance_loss', 'load_loss', 'balance_loss', 'z_loss')
METRIC_KEYS = (AUX_LOSS_KEY, *LOSS_KEYS, 'dropped_fraction', 'router_entropy',
               'capacity', 'expert_load')

class Router(nnx.Module):
  """Base class of routers (see the module docstring).

  Class attributes:
    OPTIONS: router-specific `model.moe` fields and their defaults; they join
      the common fields of `vmoe.nn.moe.default_moe_config`. Routers sharing
      an option (e.g. `k`) must give it the same default.
    LOSSES: the auxiliary losses (of `LOSS_KEYS`) that enter this router's
      `auxiliary_loss`, each weighted by `model.moe.<loss>_weight`; all four
      are reported either way (`load_loss` as 0 by routers that do not
      list it).
    DECISION: the decision type `decide` returns.
  """
  OPTIONS: ClassVar[dict[str, Any]] = {}
  LOSSES: ClassVar[tuple[str, ...]] = ('z_loss',)
  DECISION: ClassVar[type] = rt.TokenChoiceRouting
  # Whether `force` can force experts on / off (`vmoe.nn.moe.set_forcing`).
  SUPPORTS_FORCING: ClassVar[bool] = False

  @classmethod
  def validate(cls, c: types.SimpleNamespace, need: Need) -> None:
    """Checks this router's options in the merged config `c`."""

  @classmethod
  def fine_grained(cls, c: types.SimpleNamespace, m: int) -> dict[str, Any]:
    """Option overrides for granularity m (each expert split into m experts
    with h / m hidden units; num_experts is multiplied by the layer). They
    must keep the active expert FLOPs of m = 1."""
    del c, m
    return {}

  def __init__(self, dim: int, c: types.SimpleNamespace, *,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    del dim, param_dtype, rngs
    self.num_experts = c.num_experts
    self.capacity_override = c.capacity
    self.capacity_multiple = c.capacity_multiple
    self.capacity_rounding = c.capacity_rounding
    self.loss_weights = {name: float(getattr(c, f'{name}_weight'))
                         for name in LOSS_KEYS}

  # -- the interface ---------------------------------------------------------

  def capacity(self, s: int, capacity_factor: float) -> int:
    """Slots per expert for groups of s tokens at this capacity factor."""
    return self._capacity(s, capacity_factor, num_selected=1)

  def applications_per_token(self, s: int, capacity: int) -> float:
    """Expert MLP applications per token (active compute) at this capacity:
    e * c / s for routers that fill every slot."""
    return self.num_experts * capacity / s

  def logits(self, x: jax.Array, *, train: bool,
             rngs: nnx.Rngs | None) -> Any:
    """Tokens [g, s, d] -> a pytree of [g, ...] arrays for `decide`."""
    raise NotImplementedError

  def decide(self, logits: Any, *, capacity: int) -> rt.Routing:
    """Pure function of `logits` (per group) -> the routing decision."""
    raise NotImplementedError

  def metrics(self, r: rt.Routing, logits: Any, *,
              train: bool) -> dict[str, jax.Array]:
    """The `METRIC_KEYS` of decision r."""
    raise NotImplementedError

  def force(self, logits: Any, forcing: jax.Array) -> Any:
    """`logits` with experts forced on / off: forcing [g, s, e] of
    `vmoe.nn.routing.FORCE_OFF` / `FORCE_FREE` / `FORCE_ON` (routers with
    SUPPORTS_FORCING)."""
    raise NotImplementedError(
        f'router {type(self).__name__} does not support expert forcing')

  # -- helpers for subclasses ------------------------------------------------

  def _capacity(self, s: int, capacity_factor: float, num_selected: int
                ) -> int:
    return rt.compute_capacity(
        s, self.num_experts, capacity_factor=capacity_factor,
        num_selected=num_selected, capacity=self.capacity_override,
        multiple=self.capacity_multiple, rounding=self.capacity_rounding)

  def auxiliary_loss(self, losses: dict[str, jax.Array]) -> jax.Array:
    """Weighted sum of this router's `LOSSES`."""
    total = jnp.zeros((), jnp.float32)
    for name in self.LOSSES:
      w = self.loss_weights[name]
      if w > 0:  # skip ill-defined losses that are switched off
        total = total + w * losses[name]
    return total

  def routing_metrics(self, r: rt.Routing, losses: dict[str, jax.Array],
                      entropy_of: jax.Array) -> dict[str, jax.Array]:
    """All `METRIC_KEYS` from the four losses and the routing distribution
    whose entropy is reported ([..., e] or [..., n], rows summing to 1)."""
    return {
        AUX_LOSS_KEY: self.auxiliary_loss(losses),
        **losses,
        'dropped_fraction': rt.dropped_fraction(r),
        'router_entropy': rt.entropy(entropy_of),
        'capacity': jnp.asarray(r.capacity, jnp.float32),
        'expert_load': rt.expert_load(r),
    }


class GateRouter(Router):
  """A router whose logits are a linear gate: logits = x @ W^T, W [e, d].

  No bias, float32 logits whatever the activation dtype (V-MoE). The kernel
  is stored expert-major like every expert parameter; on CPU this layout also
  makes the projection and its gradients about 2x faster than [d, e] (the
  skinny [tokens, e] matmuls contract the long axis of both operands).
  Training adds Gaussian noise of std `noise_std` (None = 1 / e, V-MoE) to
  the logits used for routing.

  `logits` returns {'logits': clean [g, s, e], 'noisy': [g, s, e]} (the same
  array without noise).

  Every gate router can add LIMoE's entropy losses (Mustafa et al. 2022,
  https://arxiv.org/abs/2206.02770, Sec. 3.1) on the softmax of its clean
  logits: `local_entropy_loss_weight` (mean per-token entropy, minimised)
  and `global_entropy_loss_weight` (minus the entropy of the group's mean
  distribution, or LIMoE's thresholded max(0, tau - H) with
  `global_entropy_threshold` tau). They are reported as
  'local_entropy_loss' / 'global_entropy_loss' when their weight is > 0.
  """
  OPTIONS: ClassVar[dict[str, Any]] = dict(
      noise_std=None, local_entropy_loss_weight=0.0,
      global_entropy_loss_weight=0.0, global_entropy_threshold=None)

  @classmethod
  def validate(cls, c, need):
    need(c.noise_std is None or (is_number(c.noise_std) and c.noise_std >= 0),
         'noise_std', "must be None (the router's default: 1/num_experts, "
         'none for sparsity-constrained expert choice) or a number >= 0')
    for w in ('local_entropy_loss_weight', 'global_entropy_loss_weight'):
      need(is_number(getattr(c, w)) and getattr(c, w) >= 0, w,
           'must be a number >= 0')
    top = math.log(c.num_experts) if is_int(c.num_experts) else math.inf
    need(c.global_entropy_threshold is None
         or (is_number(c.global_entropy_threshold)
             and 0 < c.global_entropy_threshold <= top),
         'global_entropy_threshold',
         f'must be None or a number in (0, log(num_experts)={top:.4g}] nats')

  def __init__(self, dim, c, *, param_dtype=jnp.float32, rngs):
    super().__init__(dim, c, param_dtype=param_dtype, rngs=rngs)
    init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
    self.kernel = param(rngs, init, (c.num_experts, dim), ('expert', 'embed'),
                        param_dtype)
    self.noise_std = float(1.0 / c.num_experts if c.noise_std is None
                           else c.noise_std)
    self.entropy_weights = (float(c.local_entropy_loss_weight),
                            float(c.global_entropy_loss_weight))
    self.global_entropy_threshold = (
        None if c.global_entropy_threshold is None
        else float(c.global_entropy_threshold))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[g, s, d] -> [g, s, e] float32 logits (no noise)."""
    return jnp.einsum('gsd,ed->gse', x.astype(jnp.float32),
                      self.kernel[...].astype(jnp.float32))

  def train_noise_std(self, train: bool) -> float:
    return self.noise_std if train else 0.0

  def logits(self, x, *, train, rngs):
    logits = self(x)
    noisy = logits
    std = self.train_noise_std(train)
    if std > 0:
      if rngs is None:
        raise ValueError('MoeLayer with train=True and noise_std > 0 needs '
                         "rngs with a 'gating' stream")
      noisy = rt.add_gating_noise(logits, std, rngs.gating())
    return {'logits': logits, 'noisy': noisy}

  def force(self, logits, forcing):
    return {name: rt.force_logits(value, forcing)
            for name, value in logits.items()}

  def gate_metrics(self, r: rt.Routing, logits: dict[str, jax.Array], *,
                   train: bool, num_selected: int = 1,
                   ranked: jax.Array | None = None) -> dict[str, jax.Array]:
    """Metrics of a gate router from its softmax gates.

    Importance loss on the clean gates, load loss from the noisy-gating
    estimate (training only, V-MoE), balance loss on the noisy gates, z-loss
    on the clean logits, entropy of the noisy gates. `ranked`: [g, s, >= k]
    experts of each token by descending noisy gate, if the decision already
    has them (token choice), to avoid ranking again.
    """
    clean, noisy = logits['logits'], logits['noisy']
    std = self.train_noise_std(train)
    gates = jax.nn.softmax(clean, axis=-1)
    gates_noisy = jax.nn.softmax(noisy, axis=-1)
    zero = jnp.zeros((), jnp.float32)
    losses = dict(
        importance_loss=rt.importance_loss(gates),
        # Defined only with noise; V-MoE reports it in training only.
        load_loss=(rt.load_loss(clean, noisy, std, num_selected,
                                selected=ranked)
                   if std > 0 and 'load_loss' in self.LOSSES else zero),
        balance_loss=rt.balance_loss(
            gates_noisy, None if ranked is None else ranked[..., 0]),
        z_loss=rt.z_loss(clean))
    metrics = self.routing_metrics(r, losses, gates_noisy)
    return self.add_entropy_losses(metrics, clean)

  def add_entropy_losses(self, metrics: dict[str, jax.Array],
                         clean: jax.Array) -> dict[str, jax.Array]:
    """`metrics` with LIMoE's entropy losses of the clean logits [g, s, e]
    added (reported and weighted into the auxiliary loss) where their
    weights are > 0."""
    local_w, global_w = self.entropy_weights
    if local_w > 0:
      metrics['local_entropy_loss'] = rt.local_entropy_loss(clean)
      metrics[AUX_LOSS_KEY] += local_w * metrics['local_entropy_loss']
    if global_w > 0:
      metrics['global_entropy_loss'] = rt.global_entropy_loss(
          clean, self.global_entropy_threshold)
      metrics[AUX_LOSS_KEY] += global_w * metrics['global_entropy_loss']
    return metrics

