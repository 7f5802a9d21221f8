"""Mixture-of-Experts layer: router -> dispatch -> experts -> combine.

`MoeLayer` has the MLP-slot signature of `vmoe.nn.layers.MlpBlock`:

    y, metrics = layer(x, train=..., rngs=...)     # x, y: [b, n, d]

The layer splits the b*n tokens into groups of `group_size` tokens (tokens of
several images may share a group, as in V-MoE), routes each group
independently with one of

  * 'token_choice': V-MoE top-k with capacity and optional Batch Priority
    Routing (Riquelme et al. 2021, https://arxiv.org/abs/2106.05974),
  * 'expert_choice': Zhou et al. 2022 (https://arxiv.org/abs/2202.09368),
  * 'soft': Soft MoE (Puigcerver et al. 2023, https://arxiv.org/abs/2308.00951),

moves the tokens with a strategy of `vmoe.nn.dispatch` and runs all experts
as one batched MLP. Routing math lives in `vmoe.nn.routing`.

Axis letters: g groups, s tokens per group, e experts, c capacity, d model
dim, h hidden dim, k choices per token, p Soft MoE slots per expert.
"""

from __future__ import annotations

import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vmoe import sharding
from vmoe.nn import batched_mlp
from vmoe.nn import dispatch as dp
from vmoe.nn import layers
from vmoe.nn import routing as rt
from vmoe.nn.layers import AUX_LOSS_KEY, DType, param

ROUTERS = ('token_choice', 'expert_choice', 'soft')
LOSS_KEYS = ('importance_loss', 'load_loss', 'balance_loss', 'z_loss')
METRIC_KEYS = (AUX_LOSS_KEY, *LOSS_KEYS, 'dropped_fraction', 'router_entropy',
               'capacity', 'expert_load')
# Fields that may sit in the same config but belong to the model placing the
# MoE layers (`vmoe.nn.vit`: which blocks are MoE); ignored here.
MODEL_KEYS = ('layers',)


# ----------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------


def default_moe_config() -> ml_collections.ConfigDict:
  """All MoE options with V-MoE defaults.

  Fields:
    router: 'token_choice' | 'expert_choice' | 'soft'.
    num_experts: e.
    group_size: tokens per routing group; None = the tokens of one image. Must
      divide batch * tokens_per_image.
    k: experts per token (token choice only).
    capacity_factor: training capacity factor. Token choice:
      c = ceil(k * s * cf / e); expert choice: c = ceil(s * cf / e);
      Soft MoE: p = ceil(s * cf / e) slots per expert when num_slots is None.
    eval_capacity_factor: capacity factor at evaluation (None = same as
      training). Changeable after training, see `set_capacity_factor`.
    capacity: explicit per-expert capacity, overrides the factors.
    capacity_multiple: round the capacity up to a multiple of this.
    batch_priority: Batch Priority Routing (token choice).
    noise_std: std of the Gaussian noise added to router logits in training
      (token and expert choice); None = 1 / num_experts (V-MoE); 0.0 = off.
    renormalize_gates: combine with the top-k gates divided by their sum.
    num_slots: Soft MoE slots per expert (None = from capacity_factor).
    dispatch: 'indices' (default, fast on CPU) | 'einsum' (reference) |
      'dropless' (sorted grouped matmuls; token choice then never drops).
    *_loss_weight: weights of the auxiliary losses in `auxiliary_loss`.
      Importance, load and balance losses balance token choice and only enter
      its auxiliary loss; the z-loss applies to every router (on the slot
      logits for Soft MoE). The unweighted values are always reported.
  """
  return ml_collections.ConfigDict(dict(
      router='token_choice',
      num_experts=8,
      group_size=None,
      k=2,
      capacity_factor=1.05,
      eval_capacity_factor=None,
      capacity=None,
      capacity_multiple=None,
      batch_priority=False,
      noise_std=None,
      renormalize_gates=False,
      num_slots=None,
      dispatch='indices',
      importance_loss_weight=0.005,
      load_loss_weight=0.005,
      balance_loss_weight=0.0,
      z_loss_weight=0.0,
  ))


def _merged(cfg) -> types.SimpleNamespace:
  """Defaults overridden by `cfg` (ConfigDict or dict), as plain attributes."""
  values = default_moe_config().to_dict()
  values.update(dict(cfg.items()))
  return types.SimpleNamespace(**values)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_moe_config(cfg: ml_collections.ConfigDict,
                        prefix: str = 'model.moe') -> None:
  """Raises ValueError with one readable line for the first bad field."""
  def fail(msg):
    raise ValueError(msg)

  known = set(default_moe_config().keys())
  for key in cfg.keys():
    if key not in known and key not in MODEL_KEYS:
      fail(f'{prefix}.{key} is not a known MoE option '
           f'(known: {", ".join(sorted(known))})')
  c = _merged(cfg)

  def need(cond, field, what):
    if not cond:
      fail(f'{prefix}.{field}={getattr(c, field)!r} {what}')

  need(c.router in ROUTERS, 'router', f'is not one of {ROUTERS}')
  need(c.dispatch in dp.METHODS, 'dispatch', f'is not one of {dp.METHODS}')
  need(_is_int(c.num_experts) and c.num_experts >= 1, 'num_experts',
       'must be an integer >= 1')
  need(c.group_size is None or (_is_int(c.group_size) and c.group_size >= 1),
       'group_size', 'must be None or an integer >= 1')
  need(_is_int(c.k) and c.k >= 1, 'k', 'must be an integer >= 1')
  if c.router == 'token_choice' and c.k > c.num_experts:
    fail(f'{prefix}.k={c.k} exceeds {prefix}.num_experts={c.num_experts}')
  need(_is_num(c.capacity_factor) and c.capacity_factor > 0,
       'capacity_factor', 'must be a number > 0')
  need(c.eval_capacity_factor is None
       or (_is_num(c.eval_capacity_factor) and c.eval_capacity_factor > 0),
       'eval_capacity_factor', 'must be None or a number > 0')
  need(c.capacity is None or (_is_int(c.capacity) and c.capacity >= 1),
       'capacity', 'must be None or an integer >= 1')
  need(c.capacity_multiple is None
       or (_is_int(c.capacity_multiple) and c.capacity_multiple >= 1),
       'capacity_multiple', 'must be None or an integer >= 1')
  need(isinstance(c.batch_priority, bool), 'batch_priority', 'must be a bool')
  need(isinstance(c.renormalize_gates, bool), 'renormalize_gates',
       'must be a bool')
  need(c.noise_std is None or (_is_num(c.noise_std) and c.noise_std >= 0),
       'noise_std', 'must be None (= 1/num_experts) or a number >= 0')
  need(c.num_slots is None or (_is_int(c.num_slots) and c.num_slots >= 1),
       'num_slots', 'must be None or an integer >= 1')
  for w in ('importance_loss_weight', 'load_loss_weight',
            'balance_loss_weight', 'z_loss_weight'):
    need(_is_num(getattr(c, w)) and getattr(c, w) >= 0, w,
         'must be a number >= 0')
  if c.router == 'soft' and c.num_slots is None and c.group_size is None:
    fail(f'{prefix}.router=\'soft\' needs {prefix}.num_slots or '
         f'{prefix}.group_size to size the slot parameters')


def _num_shards(placement) -> int:
  axes, sizes = placement
  out = 1
  for a in axes:
    out *= sizes[a]
  return out


# ----------------------------------------------------------------------------
# Modules owning parameters.
# ----------------------------------------------------------------------------


class Experts(nnx.Module):
  """e expert MLPs as one batched MLP: Dense(d->h) -> GELU -> dropout -> Dense.

  Params: kernel1 [e, d, h], bias1 [e, h], kernel2 [e, h, d], bias2 [e, d];
  the leading 'expert' axis is the one expert parallelism shards.
  """

  def __init__(self, num_experts: int, dim: int, hidden_dim: int, *,
               dropout_rate: float = 0.0, dtype: DType | None = None,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    e, d, h = num_experts, dim, hidden_dim
    kinit = nnx.initializers.xavier_uniform(in_axis=-2, out_axis=-1,
                                            batch_axis=(0,))
    binit = nnx.initializers.normal(stddev=1e-6)  # as MlpBlock
    self.kernel1 = param(rngs, kinit, (e, d, h), ('expert', 'embed', 'mlp'),
                         param_dtype)
    self.bias1 = param(rngs, binit, (e, h), ('expert', 'mlp'), param_dtype)
    self.kernel2 = param(rngs, kinit, (e, h, d), ('expert', 'mlp', 'embed'),
                         param_dtype)
    self.bias2 = param(rngs, binit, (e, d), ('expert', 'embed'), param_dtype)
    self.dropout_rate = dropout_rate
    self.dtype = dtype

  def weights(self, dtype: DType) -> tuple[jax.Array, ...]:
    """(kernel1 [e, d, h], bias1 [e, h], kernel2 [e, h, d], bias2 [e, d])."""
    return tuple(w[...].astype(dtype) for w in
                 (self.kernel1, self.bias1, self.kernel2, self.bias2))

  def __call__(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Expert buffers [e, g, c, d] -> [e, g, c, d] (see `apply_experts`)."""
    dtype = self.dtype or x.dtype
    return apply_experts(self.weights(dtype), x.astype(dtype),
                         dropout_rate=self.dropout_rate,
                         dropout_key=layers.dropout_key(
                             self.dropout_rate, train, rngs))

  def ragged(self, x: jax.Array, group_sizes: jax.Array, expert_id: jax.Array,
             *, train: bool = False, rngs: nnx.Rngs | None = None) -> jax.Array:
    """Rows sorted by expert [m, d] -> [m, d] with grouped matmuls.

    group_sizes [e] counts the rows of each expert; rows past their sum are
    padding (their output is unspecified and must be ignored by the caller).
    expert_id [m] is the expert of each row (used for the biases).
    """
    dtype = self.dtype or x.dtype
    return apply_experts_ragged(self.weights(dtype), x.astype(dtype),
                                group_sizes, expert_id,
                                dropout_rate=self.dropout_rate,
                                dropout_key=layers.dropout_key(
                                    self.dropout_rate, train, rngs))


def apply_experts(weights: tuple[jax.Array, ...], x: jax.Array, *,
                  dropout_rate: float = 0.0,
                  dropout_key: jax.Array | None = None) -> jax.Array:
  """Expert MLPs on buffers: x [e, g, c, d] -> [e, g, c, d].

  Each expert's g*c rows are contiguous, so this is one `batched_mlp.mlp` on
  [e, g*c, d], the same code as a dense MlpBlock. Inside the expert-parallel
  shard_map its VJP sums the weight gradients over the mesh axes along which
  the rows vary.

  weights: `Experts.weights()` of the e experts in x (all experts, or the
  local ones inside the expert-parallel shard_map).
  """
  e, g, c, d = x.shape
  keep = layers.dropout_multiplier(dropout_rate, dropout_key,
                                   (e, g * c, weights[0].shape[-1]), x.dtype)
  y = batched_mlp.mlp(x.reshape(e, g * c, d), *weights, keep)
  return y.reshape(e, g, c, d)


def apply_experts_ragged(weights: tuple[jax.Array, ...], x: jax.Array,
                         group_sizes: jax.Array, expert_id: jax.Array, *,
                         dropout_rate: float = 0.0,
                         dropout_key: jax.Array | None = None) -> jax.Array:
  """Expert MLPs on expert-sorted rows [m, d] -> [m, d] (`Experts.ragged`)."""
  k1, b1, k2, b2 = weights
  eid = jnp.clip(expert_id, 0, k1.shape[0] - 1)
  h = jax.lax.ragged_dot(x, k1, group_sizes) + b1[eid]
  h = nnx.gelu(h, approximate=False)
  keep = layers.dropout_multiplier(dropout_rate, dropout_key, h.shape, h.dtype)
  if keep is not None:
    h = h * keep
  y = jax.lax.ragged_dot(h, k2, group_sizes)
  return y + b2[eid]


class TopRouter(nnx.Module):
  """Gate projection for token and expert choice: logits = x @ W^T, W [e, d].

  No bias, float32 logits whatever the activation dtype (V-MoE). The kernel
  is stored expert-major like every expert parameter; on CPU this layout also
  makes the projection and its gradients about 2x faster than [d, e] (the
  skinny [tokens, e] matmuls contract the long axis of both operands).
  """

  def __init__(self, dim: int, num_experts: int, *,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
    self.kernel = param(rngs, init, (num_experts, dim), ('expert', 'embed'),
                        param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[g, s, d] -> [g, s, e] float32 logits."""
    return jnp.einsum('gsd,ed->gse', x.astype(jnp.float32),
                      self.kernel[...].astype(jnp.float32))


class SoftRouter(nnx.Module):
  """Soft MoE slot parameters phi [e, p, d] and the learnable scalar scale."""

  def __init__(self, dim: int, num_experts: int, num_slots: int, *,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.phi = param(rngs, nnx.initializers.normal(stddev=dim ** -0.5),
                     (num_experts, num_slots, dim), ('expert', None, 'embed'),
                     param_dtype)
    self.scale = param(rngs, nnx.initializers.ones_init(), (), (), param_dtype)

  def __call__(self, x: jax.Array) -> rt.SoftRouting:
    """[g, s, d] -> SoftRouting with [g, s, e*p] logits."""
    return rt.soft_routing(x, self.phi[...], self.scale[...])


# ----------------------------------------------------------------------------
# The layer.
# ----------------------------------------------------------------------------


class MoeLayer(nnx.Module):
  """Drop-in replacement of `MlpBlock` with a Mixture of Experts.

  `capacity_factor` (training) and `eval_capacity_factor` are plain attributes;
  change them (e.g. with `set_capacity_factor`) to evaluate at another
  capacity without retraining. For Soft MoE the number of slots is a parameter
  shape and cannot change after construction.
  """

  def __init__(self, dim: int, hidden_dim: int, *,
               config: ml_collections.ConfigDict, dropout_rate: float = 0.0,
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               rngs: nnx.Rngs):
    validate_moe_config(config)
    c = _merged(config)
    e = c.num_experts
    self.router_type = c.router
    self.num_experts = e
    self.group_size = c.group_size
    self.k = c.k
    self.capacity_factor = float(c.capacity_factor)
    self.eval_capacity_factor = float(c.eval_capacity_factor
                                      if c.eval_capacity_factor is not None
                                      else c.capacity_factor)
    self.capacity = c.capacity
    self.capacity_multiple = c.capacity_multiple
    self.batch_priority = c.batch_priority
    self.noise_std = float(1.0 / e if c.noise_std is None else c.noise_std)
    self.renormalize_gates = c.renormalize_gates
    self.dispatch = c.dispatch
    self.loss_weights = dict(
        importance_loss=float(c.importance_loss_weight),
        load_loss=float(c.load_loss_weight),
        balance_loss=float(c.balance_loss_weight),
        z_loss=float(c.z_loss_weight))
    self.dtype = dtype
    if c.router == 'soft':
      p = c.num_slots or rt.compute_capacity(
          c.group_size, e, capacity_factor=c.capacity_factor,
          capacity=c.capacity, multiple=c.capacity_multiple)
      self.router = SoftRouter(dim, e, p, param_dtype=param_dtype, rngs=rngs)
    else:
      self.router = TopRouter(dim, e, param_dtype=param_dtype, rngs=rngs)
    self.experts = Experts(e, dim, hidden_dim, dropout_rate=dropout_rate,
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def capacity_for(self, s: int, train: bool) -> int:
    """Slots per expert and group for groups of s tokens (Soft MoE: p)."""
    if self.router_type == 'soft':
      return self.router.phi.shape[1]
    if self.router_type == 'token_choice' and self.dispatch == 'dropless':
      return s  # dropless: every pair has a place
    cf = self.capacity_factor if train else self.eval_capacity_factor
    k = self.k if self.router_type == 'token_choice' else 1
    return rt.compute_capacity(s, self.num_experts, capacity_factor=cf,
                               num_selected=k, capacity=self.capacity,
                               multiple=self.capacity_multiple)

  def route(self, x: jax.Array, *, train: bool = False,
            rngs: nnx.Rngs | None = None) -> tuple[rt.Routing, dict]:
    """Groups x [g, s, d] -> (routing decision, metrics)."""
    logits, noisy, std = self._logits(x, train=train, rngs=rngs)
    r = self._decide(noisy, train=train)
    return r, self._metrics(r, logits, noisy, std)

  def _logits(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None
              ) -> tuple[Any, jax.Array | None, float]:
    """(clean logits [g, s, e], noisy logits, noise std) of groups x [g, s, d].

    Soft MoE: (SoftRouting, SoftRouting, 0.0); its decision is the logits.
    """
    if self.router_type == 'soft':
      r = self.router(x)
      return r, r, 0.0
    logits = self.router(x)  # [g, s, e] float32
    std = self.noise_std if train else 0.0
    noisy = logits
    if std > 0:
      if rngs is None:
        raise ValueError('MoeLayer with train=True and noise_std > 0 needs '
                         "rngs with a 'gating' stream")
      noisy = rt.add_gating_noise(logits, std, rngs.gating())
    return logits, noisy, std

  def _decide(self, noisy: Any, *, train: bool) -> rt.Routing:
    """Routing decision from (noisy) logits [g, s, e]; per group."""
    if self.router_type == 'soft':
      return noisy
    capacity = self.capacity_for(noisy.shape[1], train)
    if self.router_type == 'token_choice':
      return rt.token_choice(noisy, num_selected=self.k, capacity=capacity,
                             batch_priority=self.batch_priority,
                             renormalize=self.renormalize_gates)
    return rt.expert_choice(noisy, capacity=capacity)

  def _metrics(self, r: rt.Routing, logits: Any, noisy: jax.Array | None,
               std: float) -> dict:
    if self.router_type == 'soft':
      return self._soft_metrics(r)
    return self._hard_metrics(r, logits, noisy, std)

  def __call__(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """x [b, n, d] -> (y [b, n, d], metrics)."""
    b, n, d = x.shape
    s = self.group_size or n
    if (b * n) % s:
      raise ValueError(f'model.moe.group_size={s} does not divide the {b * n} '
                       f'tokens of the batch ({b} x {n})')
    dtype = self.dtype or x.dtype
    xg = x.reshape(b * n // s, s, d)
    placement = sharding.context_batch_axes()
    if placement is not None and xg.shape[0] % _num_shards(placement):
      placement = None  # groups do not split evenly: let XLA place them
    if placement is None:
      r, metrics = self.route(xg, train=train, rngs=rngs)

      def expert_fn(buffers):
        return self.experts(buffers, train=train, rngs=rngs)

      def ragged_fn(xs, sizes, expert_id):
        return self.experts.ragged(xs, sizes, expert_id, train=train,
                                   rngs=rngs)

      y = dp.moe_apply(r, xg.astype(dtype), expert_fn, method=self.dispatch,
                       ragged_fn=ragged_fn)
    else:
      # Logits (and their noise) are per token: plain SPMD code. The decision
      # and the token movement run per device inside the shard_map.
      logits, noisy, std = self._logits(xg, train=train, rngs=rngs)
      y, r = self._apply_sharded(noisy, xg.astype(dtype), placement,
                                 train=train, rngs=rngs)
      metrics = self._metrics(r, logits, noisy, std)
    return y.reshape(b, n, d).astype(x.dtype), metrics

  def _apply_sharded(self, noisy: Any, xg: jax.Array, placement, *,
                     train: bool, rngs: nnx.Rngs | None
                     ) -> tuple[jax.Array, rt.Routing]:
    """Route -> dispatch -> experts -> combine per device, experts split.

    Runs under `jax.shard_map` on the context mesh. Each device holds
    g_l = g / (data * expert) groups and routes them locally (routing is per
    group); its buffers [e, g_l, c, d] are exchanged with one all-to-all over
    the 'expert' axis (X devices) into [e / X, X * g_l, c, d]: the tokens of X
    devices' groups for the e / X experts stored on this device. After the
    expert MLPs a second all-to-all sends the outputs back, and each device
    combines its own groups. With X = 1 this is plain data parallelism.

    Args:
      noisy: [g, s, e] logits used for routing (Soft MoE: its SoftRouting).
      xg: [g, s, d] tokens in the compute dtype.
      placement: (batch mesh axes, mesh axis sizes) of the context mesh.
      train, rngs: capacity factor and dropout in the experts.

    Returns:
      (y [g, s, d], the routing decision with [g, ...] arrays).
    """
    axes, sizes = placement
    num_shards = sizes['expert']
    if self.num_experts % num_shards:
      raise ValueError(f'model.moe.num_experts={self.num_experts} is not a '
                       f'multiple of the expert mesh axis size {num_shards}')
    if (self.dispatch == 'dropless' and num_shards > 1
        and self.router_type != 'soft'):
      raise ValueError("model.moe.dispatch='dropless' does not support an "
                       "expert mesh axis > 1; use 'indices' or 'einsum'")
    batch = jax.sharding.PartitionSpec(axes)
    expert = jax.sharding.PartitionSpec('expert')
    weights = self.experts.weights(xg.dtype)
    rate = self.experts.dropout_rate
    key = layers.dropout_key(rate, train, rngs)
    use_dropout = key is not None
    if not use_dropout:  # shard_map takes arrays only; unused inside
      key = jnp.zeros((), jnp.uint32)
    method = self.dispatch

    def local(noisy, x, weights, key):
      r = self._decide(noisy, train=train)
      if use_dropout:  # distinct masks on every device
        for axis in axes:
          key = jax.random.fold_in(key, jax.lax.axis_index(axis))
      else:
        key = None

      def expert_fn(buffers):  # [e, g_l, c, d]
        if num_shards > 1:  # -> [e / X, X * g_l, c, d]
          buffers = jax.lax.all_to_all(buffers, 'expert', split_axis=0,
                                       concat_axis=1, tiled=True)
        y = apply_experts(weights, buffers, dropout_rate=rate,
                          dropout_key=key)
        if num_shards > 1:
          y = jax.lax.all_to_all(y, 'expert', split_axis=1, concat_axis=0,
                                 tiled=True)
        return y

      def ragged_fn(xs, group_sizes, expert_id):  # only with num_shards == 1
        return apply_experts_ragged(weights, xs, group_sizes, expert_id,
                                    dropout_rate=rate, dropout_key=key)

      y = dp.moe_apply(r, x, expert_fn, method=method, ragged_fn=ragged_fn)
      return y, r

    r_shape = jax.eval_shape(lambda z: self._decide(z, train=train), noisy)
    return jax.shard_map(
        local,
        in_specs=(jax.tree.map(lambda _: batch, noisy), batch,
                  (expert,) * len(weights), jax.sharding.PartitionSpec()),
        out_specs=(batch, jax.tree.map(lambda _: batch, r_shape)),
    )(noisy, xg, weights, key)

  # -- metrics ---------------------------------------------------------------

  def _aux(self, losses: dict, applicable: tuple[str, ...]) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for name in applicable:
      w = self.loss_weights[name]
      if w > 0:  # skip ill-defined losses that are switched off
        total = total + w * losses[name]
    return total

  def _hard_metrics(self, r: rt.Routing, logits: jax.Array,
                    noisy: jax.Array, std: float) -> dict:
    gates = jax.nn.softmax(logits, axis=-1)
    gates_noisy = jax.nn.softmax(noisy, axis=-1)
    zero = jnp.zeros((), jnp.float32)
    # Token choice already ranked the experts of every token: reuse that.
    ranked = (r.expert_index if isinstance(r, rt.TokenChoiceRouting)
              else None)
    losses = dict(
        importance_loss=rt.importance_loss(gates),
        # Defined only with noise; V-MoE reports it in training only.
        load_loss=(rt.load_loss(logits, noisy, std, self.k, selected=ranked)
                   if std > 0 and self.router_type == 'token_choice'
                   else zero),
        balance_loss=rt.balance_loss(
            gates_noisy, None if ranked is None else ranked[..., 0]),
        z_loss=rt.z_loss(logits))
    applicable = (LOSS_KEYS if self.router_type == 'token_choice'
                  else ('z_loss',))
    return {
        AUX_LOSS_KEY: self._aux(losses, applicable),
        **losses,
        'dropped_fraction': rt.dropped_fraction(r),
        'router_entropy': rt.entropy(gates_noisy),
        'capacity': jnp.asarray(r.capacity, jnp.float32),
        'expert_load': rt.expert_load(r),
    }

  def _soft_metrics(self, r: rt.SoftRouting) -> dict:
    zero = jnp.zeros((), jnp.float32)
    losses = dict(importance_loss=zero, load_loss=zero, balance_loss=zero,
                  z_loss=rt.z_loss(r.logits))
    return {
        AUX_LOSS_KEY: self._aux(losses, ('z_loss',)),
        **losses,
        'dropped_fraction': rt.dropped_fraction(r),
        'router_entropy': rt.entropy(r.combine_weights()),
        'capacity': jnp.asarray(r.capacity, jnp.float32),
        'expert_load': rt.expert_load(r),
    }


# pylint: disable-next=redefined-builtin
def set_capacity_factor(model: nnx.Module, train: float | None = None,
                        eval: float | None = None) -> int:
  """Sets the train and/or eval capacity factor of every MoeLayer in `model`.

  Capacity factors are static attributes: re-split the model (`nnx.split`) and
  re-jit after calling this. Returns the number of layers updated.
  """
  for name, value in (('train', train), ('eval', eval)):
    if value is not None and not (_is_num(value) and value > 0):
      raise ValueError(f'{name} capacity factor={value!r} must be a number > 0')
  count = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, MoeLayer):
      if train is not None:
        module.capacity_factor = float(train)
      if eval is not None:
        module.eval_capacity_factor = float(eval)
      count += 1
  return count
