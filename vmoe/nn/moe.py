"""Mixture-of-Experts layer: router -> dispatch -> experts -> combine.

`MoeLayer` has the MLP-slot signature of `vmoe.nn.layers.MlpBlock`:

    y, metrics = layer(x, train=..., rngs=...)     # x, y: [b, n, d]

The layer is plumbing. It splits the b*n tokens into groups of `group_size`
tokens (tokens of several images may share a group, as in V-MoE), asks its
router (`vmoe.nn.routers`, chosen by `model.moe.router`: token choice with
Batch Priority Routing, expert choice, Soft MoE, ...) for a routing decision
per group, moves the tokens with a strategy of `vmoe.nn.dispatch`, runs all
experts as one batched MLP, combines, and adds the optional shared experts.
With an 'expert' mesh axis it runs the decision and the token movement per
device with two all-to-alls (expert parallelism). It never branches on the
router's name.

Options beyond the router's own (see `default_moe_config`): shared experts
(always-on MLPs applied to every token beside the routed ones: DeepSeekMoE,
Dai et al. 2024, https://arxiv.org/abs/2401.06066; ViMoE) and fine-grained
experts (each expert split into m experts of h / m hidden units and k scaled
by m, at equal active FLOPs and expert parameters: DeepSeekMoE; Krajewski et
al. 2024, https://arxiv.org/abs/2402.07871).

Axis letters: g groups, s tokens per group, e experts, c capacity, d model
dim, h hidden dim, k choices per token, p Soft MoE slots per expert.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vmoe.kernels import registry as kernel_registry
from vmoe import sharding
from vmoe.config import ConfigError, is_bool, is_int, is_number
from vmoe.nn import batched_mlp
from vmoe.nn import dispatch as dp
from vmoe.nn import layers
from vmoe.nn import moe_kinds
from vmoe.nn import routers
from vmoe.nn import routing as rt
from vmoe.nn.layers import DType, param
# Re-exported: the metrics every MoE layer reports.
from vmoe.nn.routers.base import LOSS_KEYS, METRIC_KEYS

# Fields that may sit in the same config but belong to the model placing the
# MoE layers (`vmoe.nn.vit`: which blocks are MoE, the experts' dropout
# rate); ignored here.
MODEL_KEYS = ('layers', 'dropout')


# ----------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------


def default_moe_config() -> ml_collections.ConfigDict:
  """All MoE options with V-MoE defaults.

  Fields of the layer:
    router: a registered router name (`vmoe.nn.routers.names()`):
      'token_choice' | 'expert_choice' | 'soft' | ...
    num_experts: e.
    group_size: tokens per routing group; None = the tokens of one image. Must
      divide batch * tokens_per_image.
    capacity_factor: training capacity factor. Token choice:
      c = ceil(k * s * cf / e); expert choice: c = ceil(s * cf / e);
      Soft MoE: p = ceil(s * cf / e) slots per expert when num_slots is None.
    eval_capacity_factor: capacity factor at evaluation (None = same as
      training). Changeable after training, see `set_capacity_factor`.
    capacity: explicit per-expert capacity, overrides the factors.
    capacity_multiple: round the capacity up to a multiple of this.
    capacity_rounding: 'ceil' (default) or 'round' (Python round, as
      google-research/vmoe offers, and uses for Soft MoE slot counts; it
      rejects a capacity that rounds below 1).
    dispatch: 'indices' (default, fast on CPU) | 'einsum' (reference) |
      'dropless' (sorted grouped matmuls; token choice then never drops).
    kernels: which parts of the layer run as Pallas kernels
      (`pallas_kernels/`): 'xla' (none), 'pallas' (every part with a kernel
      for this router and dispatch), 'pallas:routing,dispatch' (the listed
      parts of routing, dispatch, gmm, soft), 'auto' (default: XLA on every
      platform until a kernel is measured faster there). Interpreted on a
      CPU host (slow: for tests). Parts without a kernel for the decision
      at hand run their XLA code (`vmoe.kernels.registry`).
    bf16_dispatch: round the tokens entering dispatch and the expert outputs
      entering combine to bfloat16 and back (google-research/vmoe's
      Bfloat16Dispatcher, on in its Soft MoE and in its V-MoE paper configs,
      even in float32; the casts round the gradients too, as there). Off by
      default; on to reproduce imported vmoe models to the last bit.
    num_shared_experts: always-on expert MLPs applied to every token and added
      to the routed output (0 = none); not split over the expert mesh axis.
    shared_hidden_dim: hidden size of each shared expert (None = the MLP
      hidden size of the block).
    granularity: m >= 1 splits every expert into m experts of h / m hidden
      units: num_experts is multiplied by m and the router keeps the active
      FLOPs of m = 1 (token choice: k * m; expert choice and Soft MoE: the
      same slots per expert). Expert parameters and active FLOPs stay those
      of m = 1; only the router (e * m gates or slot vectors) grows.
    kind: the kind of layer (`vmoe.nn.moe_kinds`): 'moe' (this layer) or
      'multi_head' (Multi-Head MoE over sub-tokens: `mh_heads`,
      `mh_sizing`); build any kind with `build_layer`.
    expert_output_mask_rate: Expert Output Masking (EOM; Elbayad et al.
      2023, https://arxiv.org/abs/2212.07571, fairseq `moe_eom`): in
      training, each expert buffer slot's output (one token's output of one
      expert) is zeroed with this probability, without rescaling; at
      evaluation the expert outputs are scaled by 1 - rate (the reference
      code's convention).
    final_output_mask_rate: Final Output Masking (FOM, fairseq `moe_fom`):
      in training, each token's whole MoE output (routed and shared
      experts) is zeroed with this probability, without rescaling; scaled
      by 1 - rate at evaluation.
    *_loss_weight: weights of the auxiliary losses in `auxiliary_loss`.
      Importance and load losses enter the auxiliary loss of token choice and
      Sinkhorn token choice (as in vmoe), the balance loss that of token
      choice only; the z-loss applies to every router (on the slot logits for
      Soft MoE). The unweighted values are always reported.

  Router options (each router's `OPTIONS`, `vmoe.nn.routers`), among them:
    k: experts per token (token choice).
    batch_priority: Batch Priority Routing (token choice).
    noise_std: std of the Gaussian noise added to router logits in training
      (gate routers); None = the router's default: 1 / num_experts (V-MoE),
      none for sparsity-constrained expert choice; 0.0 = off.
    renormalize_gates: combine with the top-k gates divided by their sum.
    num_slots: Soft MoE slots per expert (None = from capacity_factor).
    sinkhorn_iterations, sinkhorn_mode: the Sinkhorn routers' fixed iteration
      count (20, as vmoe) and arithmetic ('kernel' as vmoe | 'log').
    ot_combine_weights: combine weights of the optimal-transport routers:
      'softmax' (default) | 'clean_softmax' | 'plan'.
    sparse_ot_steps, sparse_ot_learning_rate: the Adam budget of the
      sparsity-constrained plan (20 steps, 1e-2).
    local_entropy_loss_weight, global_entropy_loss_weight,
      global_entropy_threshold: LIMoE's entropy losses (gate routers, see
      `vmoe.nn.routers.base.GateRouter`).
  """
  return ml_collections.ConfigDict(dict(
      kind='moe',
      router='token_choice',
      num_experts=8,
      group_size=None,
      capacity_factor=1.05,
      eval_capacity_factor=None,
      capacity=None,
      capacity_multiple=None,
      capacity_rounding='ceil',
      dispatch='indices',
      kernels='auto',
      bf16_dispatch=False,
      num_shared_experts=0,
      shared_hidden_dim=None,
      granularity=1,
      expert_output_mask_rate=0.0,
      final_output_mask_rate=0.0,
      importance_loss_weight=0.005,
      load_loss_weight=0.005,
      balance_loss_weight=0.0,
      z_loss_weight=0.0,
      **routers.default_options(),
      **moe_kinds.default_options(),
  ))


def _merged(cfg) -> types.SimpleNamespace:
  """Defaults overridden by `cfg` (ConfigDict or dict), as plain attributes."""
  values = default_moe_config().to_dict()
  values.update(dict(cfg.items()))
  return types.SimpleNamespace(**values)


def validate_moe_config(cfg: ml_collections.ConfigDict,
                        prefix: str = 'model.moe',
                        mlp_dim: int | None = None,
                        other_router_options: bool = True,
                        dim: int | None = None) -> None:
  """Raises ConfigError (a ValueError) with one line naming the first bad
  field.

  mlp_dim: the MLP hidden size of the model, to check that `granularity`
  divides it and the layer kind's sizes; skipped when None.
  dim: the model width, for the layer kind's checks (skipped when None).
  other_router_options: accept options of other routers (ignored by the
  layer). A run's config refuses them when they differ from their defaults,
  since they would do nothing (`--config.model.moe.k=4` on expert choice).
  """
  def fail(msg):
    raise ConfigError(msg)

  known = set(default_moe_config().keys())
  for key in cfg.keys():
    if key not in known and key not in MODEL_KEYS:
      fail(f'{prefix}.{key} is not a known MoE option '
           f'(known: {", ".join(sorted(known))})')
  c = _merged(cfg)

  def need(cond, field, what):
    if not cond:
      fail(f'{prefix}.{field}={getattr(c, field)!r} '
           f'{what.replace("model.moe.", prefix + ".")}')

  need(c.kind in moe_kinds.names(), 'kind',
       f'is not one of {moe_kinds.names()}')
  need(c.router in routers.names(), 'router',
       f'is not one of {routers.names()}')
  need(c.dispatch in dp.METHODS, 'dispatch', f'is not one of {dp.METHODS}')
  need(is_int(c.num_experts) and c.num_experts >= 1, 'num_experts',
       'must be an integer >= 1')
  need(c.group_size is None or (is_int(c.group_size) and c.group_size >= 1),
       'group_size', 'must be None or an integer >= 1')
  need(is_number(c.capacity_factor) and c.capacity_factor > 0,
       'capacity_factor', 'must be a number > 0')
  need(c.eval_capacity_factor is None
       or (is_number(c.eval_capacity_factor) and c.eval_capacity_factor > 0),
       'eval_capacity_factor', 'must be None or a number > 0')
  need(c.capacity is None or (is_int(c.capacity) and c.capacity >= 1),
       'capacity', 'must be None or an integer >= 1')
  need(c.capacity_multiple is None
       or (is_int(c.capacity_multiple) and c.capacity_multiple >= 1),
       'capacity_multiple', 'must be None or an integer >= 1')
  need(c.capacity_rounding in rt.CAPACITY_ROUNDINGS, 'capacity_rounding',
       f'is not one of {rt.CAPACITY_ROUNDINGS}')
  need(is_bool(c.bf16_dispatch), 'bf16_dispatch', 'must be a bool')
  need(is_int(c.num_shared_experts) and c.num_shared_experts >= 0,
       'num_shared_experts', 'must be an integer >= 0')
  need(c.shared_hidden_dim is None
       or (is_int(c.shared_hidden_dim) and c.shared_hidden_dim >= 1),
       'shared_hidden_dim', 'must be None or an integer >= 1')
  need(is_int(c.granularity) and c.granularity >= 1, 'granularity',
       'must be an integer >= 1')
  if mlp_dim is not None:
    need(mlp_dim % c.granularity == 0, 'granularity',
         f'does not divide the MLP hidden size {mlp_dim}')
  for w in ('importance_loss_weight', 'load_loss_weight',
            'balance_loss_weight', 'z_loss_weight'):
    need(is_number(getattr(c, w)) and getattr(c, w) >= 0, w,
         'must be a number >= 0')
  for rate in ('expert_output_mask_rate', 'final_output_mask_rate'):
    need(is_number(getattr(c, rate)) and 0 <= getattr(c, rate) < 1, rate,
         'must be a number in [0, 1)')
  kernel_registry.validate(c.kernels, f'{prefix}.kernels')
  router = routers.get(c.router)
  # Another router's option set away from its default would be ignored.
  for key, default in routers.default_options().items():
    if (not other_router_options and key in cfg.keys()
        and key not in router.OPTIONS and cfg[key] != default):
      need(False, key, f'is not an option of router {c.router!r}')
  router.validate(c, need)
  kind = moe_kinds.get(c.kind)
  if not other_router_options:
    for key in moe_kinds.KINDS.foreign_options(c.kind, cfg):
      need(False, key, f'is not an option of model.moe.kind={c.kind!r}')
  kind.validate(c, need, dim=dim, mlp_dim=mlp_dim)


def build_layer(dim: int, hidden_dim: int, *,
                config: ml_collections.ConfigDict, **kw) -> nnx.Module:
  """The MLP slot of an MoE block: the layer of kind `config.kind`
  (`vmoe.nn.moe_kinds`; 'moe' is `MoeLayer`). kw: as for MoeLayer."""
  validate_moe_config(config, mlp_dim=hidden_dim, dim=dim)
  c = _merged(config)
  return moe_kinds.get(c.kind).build(MoeLayer, dim, hidden_dim,
                                     config=config, options=c, **kw)


def _num_shards(placement) -> int:
  axes, sizes = placement
  out = 1
  for a in axes:
    out *= sizes[a]
  return out


def output_mask(y: jax.Array, rate: float, key: jax.Array | None,
                shape: tuple[int, ...]) -> jax.Array:
  """Output masking of Elbayad et al. 2023 (EOM / FOM, fairseq's
  convention): with a key (training), y times a {0, 1} mask of `shape`
  (broadcast against y) that is 0 with probability `rate`, no rescaling;
  without a key (evaluation), y * (1 - rate)."""
  if rate == 0.0:
    return y
  if key is None:
    return y * jnp.asarray(1.0 - rate, y.dtype)
  keep = jax.random.bernoulli(key, 1.0 - rate, shape)
  return jnp.where(keep, y, jnp.zeros((), y.dtype))


# ----------------------------------------------------------------------------
# Experts.
# ----------------------------------------------------------------------------


class Experts(nnx.Module):
  """e expert MLPs as one batched MLP: Dense(d->h) -> GELU -> dropout -> Dense.

  Params: kernel1 [e, d, h], bias1 [e, h], kernel2 [e, h, d], bias2 [e, d];
  the leading axis has the logical name `axis` ('expert': the axis expert
  parallelism shards).
  """

  def __init__(self, num_experts: int, dim: int, hidden_dim: int, *,
               dropout_rate: float = 0.0, gelu: str = batched_mlp.DEFAULT_GELU,
               axis: str = 'expert', dtype: DType | None = None,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    e, d, h = num_experts, dim, hidden_dim
    kinit = nnx.initializers.xavier_uniform(in_axis=-2, out_axis=-1,
                                            batch_axis=(0,))
    binit = nnx.initializers.normal(stddev=1e-6)  # as MlpBlock
    self.kernel1 = param(rngs, kinit, (e, d, h), (axis, 'embed', 'mlp'),
                         param_dtype)
    self.bias1 = param(rngs, binit, (e, h), (axis, 'mlp'), param_dtype)
    self.kernel2 = param(rngs, kinit, (e, h, d), (axis, 'mlp', 'embed'),
                         param_dtype)
    self.bias2 = param(rngs, binit, (e, d), (axis, 'embed'), param_dtype)
    self.dropout_rate = dropout_rate
    self.approximate_gelu = batched_mlp.gelu_approximate(gelu)
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
                             self.dropout_rate, train, rngs),
                         approximate_gelu=self.approximate_gelu)

  def ragged(self, x: jax.Array, group_sizes: jax.Array, expert_id: jax.Array,
             *, train: bool = False, rngs: nnx.Rngs | None = None,
             kernels: str = 'xla') -> jax.Array:
    """Rows sorted by expert [m, d] -> [m, d] with grouped matmuls.

    group_sizes [e] counts the rows of each expert; rows past their sum are
    padding (their output is unspecified and must be ignored by the caller).
    expert_id [m] is the expert of each row (used for the biases).
    kernels: `model.moe.kernels` (the grouped matmul may be a kernel).
    """
    dtype = self.dtype or x.dtype
    return apply_experts_ragged(self.weights(dtype), x.astype(dtype),
                                group_sizes, expert_id,
                                dropout_rate=self.dropout_rate,
                                dropout_key=layers.dropout_key(
                                    self.dropout_rate, train, rngs),
                                approximate_gelu=self.approximate_gelu,
                                kernels=kernels)

  def as_one_mlp(self, x: jax.Array, *, train: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
    """The sum of all e MLPs on every row: x [t, d] -> [t, d].

    Computed as one MLP of e * h hidden units (the kernels concatenated, the
    output biases summed), which is the same function: shared experts.
    """
    dtype = self.dtype or x.dtype
    k1, b1, k2, b2 = self.weights(dtype)
    e, d, h = k1.shape
    w1 = jnp.transpose(k1, (1, 0, 2)).reshape(1, d, e * h)
    w2 = k2.reshape(1, e * h, d)
    rows = x.astype(dtype)[None]
    keep = layers.dropout_multiplier(
        self.dropout_rate, layers.dropout_key(self.dropout_rate, train, rngs),
        (1, rows.shape[1], e * h), dtype)
    y = batched_mlp.mlp(rows, w1, b1.reshape(1, e * h), w2,
                        jnp.sum(b2, axis=0, keepdims=True), keep,
                        self.approximate_gelu)
    return y[0]


def apply_experts(weights: tuple[jax.Array, ...], x: jax.Array, *,
                  dropout_rate: float = 0.0,
                  dropout_key: jax.Array | None = None,
                  approximate_gelu: bool = False) -> jax.Array:
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
  y = batched_mlp.mlp(x.reshape(e, g * c, d), *weights, keep,
                      approximate_gelu)
  return y.reshape(e, g, c, d)


def apply_experts_ragged(weights: tuple[jax.Array, ...], x: jax.Array,
                         group_sizes: jax.Array, expert_id: jax.Array, *,
                         dropout_rate: float = 0.0,
                         dropout_key: jax.Array | None = None,
                         approximate_gelu: bool = False,
                         kernels: str = 'xla') -> jax.Array:
  """Expert MLPs on expert-sorted rows [m, d] -> [m, d] (`Experts.ragged`).

  The grouped matmuls are `jax.lax.ragged_dot`, or the 'gmm' kernel that
  `kernels` (`model.moe.kernels`) selects (`vmoe.kernels.registry`).
  """
  ragged_dot = kernel_registry.lookup(kernels, 'gmm', 'ragged_dot',
                                      jax.lax.ragged_dot)
  k1, b1, k2, b2 = weights
  eid = jnp.clip(expert_id, 0, k1.shape[0] - 1)
  h = ragged_dot(x, k1, group_sizes) + b1[eid]
  h = jax.nn.gelu(h, approximate=approximate_gelu)
  keep = layers.dropout_multiplier(dropout_rate, dropout_key, h.shape, h.dtype)
  if keep is not None:
    h = h * keep
  y = ragged_dot(h, k2, group_sizes)
  return y + b2[eid]


# ----------------------------------------------------------------------------
# The layer.
# ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Captured:
  """What an MoE layer routed in one call (see `capture_routing`).

  Attributes:
    decision: the routing decision of its [g, ...] groups.
    logits: the router's logits pytree (e.g. {'logits', 'noisy'} [g, s, e]
      for gate routers; the SoftRouting for Soft MoE).
    group_size: static s; token t of group i is token (i * s + t) of the
      flattened [b * n] batch, i.e. image (i * s + t) // n, position
      (i * s + t) % n.
    tokens: [g, s, d] the tokens the layer routed (its input, grouped).
  """
  decision: Any
  logits: Any
  group_size: int = dataclasses.field(metadata=dict(static=True))
  tokens: Any = None


class MoeLayer(nnx.Module):
  """Drop-in replacement of `MlpBlock` with a Mixture of Experts.

  `capacity_factor` (training) and `eval_capacity_factor` are plain attributes;
  change them (e.g. with `set_capacity_factor`) to evaluate at another
  capacity without retraining. For Soft MoE the number of slots is a parameter
  shape and cannot change after construction.

  Analysis hooks (static attributes; re-split and re-jit after changing them):
  `disabled_experts` (expert ids whose outputs are zeroed: expert ablation)
  and `capture` (sow a `Captured` as `nnx.Intermediate` 'routing'; see
  `capture_routing`). `forcing` (None, or int [b, e] / [b, n, e] of
  `vmoe.nn.routing.FORCE_OFF` / `FORCE_FREE` / `FORCE_ON`, per image or per
  token) forces experts on or off (`set_forcing`, at inference; routers
  with `SUPPORTS_FORCING`).

  Params: router/... (the router's own), experts/{kernel1, bias1, kernel2,
  bias2} [e, ...], shared_experts/... [num_shared_experts, ...] if any.
  """

  def __init__(self, dim: int, hidden_dim: int, *,
               config: ml_collections.ConfigDict, dropout_rate: float = 0.0,
               gelu: str = batched_mlp.DEFAULT_GELU, dtype: DType | None = None,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    validate_moe_config(config, mlp_dim=hidden_dim)
    c = _merged(config)
    if c.kind != 'moe':
      raise ValueError(f'model.moe.kind={c.kind!r}: build the layer with '
                       'vmoe.nn.moe.build_layer (MoeLayer is the kind "moe")')
    router_cls = routers.get(c.router)
    shared_hidden = c.shared_hidden_dim or hidden_dim
    m = c.granularity
    if m > 1:
      c = types.SimpleNamespace(**{**vars(c), **router_cls.fine_grained(c, m),
                                   'num_experts': c.num_experts * m})
      hidden_dim //= m
    self.router_type = c.router
    self.num_experts = c.num_experts
    self.group_size = c.group_size
    self.capacity_factor = float(c.capacity_factor)
    self.eval_capacity_factor = float(c.eval_capacity_factor
                                      if c.eval_capacity_factor is not None
                                      else c.capacity_factor)
    self.dispatch = c.dispatch
    self.kernels = c.kernels
    self.bf16_dispatch = c.bf16_dispatch
    self.dtype = dtype
    self.expert_output_mask_rate = float(c.expert_output_mask_rate)
    self.final_output_mask_rate = float(c.final_output_mask_rate)
    self.disabled_experts: tuple[int, ...] = ()
    self.capture = False
    self.forcing = None
    self.router = router_cls(dim, c, param_dtype=param_dtype, rngs=rngs)
    self.experts = Experts(c.num_experts, dim, hidden_dim,
                           dropout_rate=dropout_rate, gelu=gelu, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    self.shared_experts = (
        Experts(c.num_shared_experts, dim, shared_hidden,
                dropout_rate=dropout_rate, gelu=gelu, axis='shared_expert',
                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if c.num_shared_experts else None)

  @property
  def dropless(self) -> bool:
    """Every (token, choice) pair has a place: the 'dropless' dispatch of a
    token-choice decision (other decisions keep their capacity)."""
    return (self.dispatch == 'dropless'
            and self.router.DECISION is rt.TokenChoiceRouting)

  def capacity_for(self, s: int, train: bool) -> int:
    """Slots per expert and group for groups of s tokens (Soft MoE: p)."""
    if self.dropless:
      return s
    cf = self.capacity_factor if train else self.eval_capacity_factor
    return self.router.capacity(s, cf)

  def route(self, x: jax.Array, *, train: bool = False,
            rngs: nnx.Rngs | None = None) -> tuple[rt.Routing, dict]:
    """Groups x [g, s, d] -> (routing decision, metrics)."""
    logits = self.router.logits(x, train=train, rngs=rngs)
    r = self.router.decide(logits, capacity=self.capacity_for(x.shape[1],
                                                              train))
    return r, self.router.metrics(r, logits, train=train)

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
    capacity = self.capacity_for(s, train)
    # Logits (and their noise) are per token: plain SPMD code either way.
    logits = self.router.logits(xg, train=train, rngs=rngs)
    forcing = self._forcing(b, n, s)
    if forcing is not None:
      logits = self.router.force(logits, forcing)
    placement = sharding.context_batch_axes()
    if placement is not None and xg.shape[0] % _num_shards(placement):
      placement = None  # groups do not split evenly: let XLA place them
    xd = self._rounded(xg.astype(dtype))
    eom_key = layers.dropout_key(self.expert_output_mask_rate, train, rngs)
    if placement is None:
      r = self.router.decide(logits, capacity=capacity)
      if forcing is not None:
        r = rt.drop_forced_off(r, forcing)

      def expert_fn(buffers):
        ys = self.experts(buffers, train=train, rngs=rngs)
        return self._rounded(self._masked(self._eom(ys, eom_key)))

      def ragged_fn(xs, sizes, expert_id):
        ys = self.experts.ragged(xs, sizes, expert_id, train=train, rngs=rngs,
                                 kernels=self.kernels)
        return self._rounded(self._masked(self._eom(ys, eom_key), expert_id))

      y = dp.moe_apply(r, xd, expert_fn, method=self.dispatch,
                       ragged_fn=ragged_fn, kernels=self.kernels)
    else:
      if forcing is not None:
        raise ValueError('expert forcing runs without an expert-parallel '
                         'mesh (evaluate the model unsharded)')
      # The decision and the token movement run per device.
      y, r = self._apply_sharded(logits, xd, placement, capacity=capacity,
                                 train=train, rngs=rngs, eom_key=eom_key)
    metrics = self.router.metrics(r, logits, train=train)
    if self.capture:
      self.sow(nnx.Intermediate, 'routing', Captured(r, logits, s, xg))
    y = y.reshape(b, n, d)
    if self.shared_experts is not None:
      y = y + self.shared_experts.as_one_mlp(
          x.reshape(b * n, d), train=train, rngs=rngs).reshape(b, n, d)
    y = output_mask(y, self.final_output_mask_rate,
                    layers.dropout_key(self.final_output_mask_rate, train,
                                       rngs), (b, n, 1))
    return y.astype(x.dtype), metrics

  def _forcing(self, b: int, n: int, s: int) -> jax.Array | None:
    """`forcing` as [g, s, e] for the groups of a [b, n] batch, or None."""
    if self.forcing is None:
      return None
    if not self.router.SUPPORTS_FORCING:
      raise ValueError(f'model.moe.router={self.router_type!r} does not '
                       'support expert forcing')
    f = jnp.asarray(self.forcing)
    e = self.num_experts
    if f.shape == (b, e):
      f = jnp.broadcast_to(f[:, None, :], (b, n, e))
    if f.shape != (b, n, e):
      raise ValueError(f'expert forcing of shape {f.shape} is not [b, e] or '
                       f'[b, n, e] for a batch of {b} x {n} tokens and {e} '
                       'experts')
    return f.reshape(b * n // s, s, e)

  def _eom(self, y: jax.Array, key: jax.Array | None) -> jax.Array:
    """Expert Output Masking of expert outputs y [e, g, c, d] (slots) or
    [m, d] (rows): one mask entry per slot / row."""
    return output_mask(y, self.expert_output_mask_rate, key,
                       y.shape[:-1] + (1,))

  def _rounded(self, a: jax.Array) -> jax.Array:
    """`a` rounded to bfloat16 and back if `bf16_dispatch` (else `a`)."""
    if not self.bf16_dispatch:
      return a
    return a.astype(jnp.bfloat16).astype(a.dtype)

  def _masked(self, y: jax.Array, expert_id: jax.Array | None = None
              ) -> jax.Array:
    """Zeroes the outputs of `disabled_experts`: y [e, ...] (all experts), or
    rows [m, d] of experts expert_id [m]."""
    if not self.disabled_experts:
      return y
    on = jnp.ones((self.num_experts,), y.dtype).at[
        jnp.asarray(self.disabled_experts)].set(0)
    if expert_id is None:
      return y * on.reshape((-1,) + (1,) * (y.ndim - 1))
    eid = jnp.clip(expert_id, 0, self.num_experts - 1)
    return y * on[eid][:, None]

  def _apply_sharded(self, logits: Any, xg: jax.Array, placement, *,
                     capacity: int, train: bool, rngs: nnx.Rngs | None,
                     eom_key: jax.Array | None = None
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
      logits: the router's logits pytree ([g, ...] leaves).
      xg: [g, s, d] tokens in the compute dtype (rounded for dispatch).
      placement: (batch mesh axes, mesh axis sizes) of the context mesh.
      capacity: slots per expert and group.
      train, rngs: dropout in the experts.
      eom_key: key of the Expert Output Masking (None: no mask in training).

    Returns:
      (y [g, s, d], the routing decision with [g, ...] arrays).
    """
    axes, sizes = placement
    num_shards = sizes['expert']
    if self.num_experts % num_shards:
      raise ValueError(f'model.moe.num_experts={self.num_experts} is not a '
                       f'multiple of the expert mesh axis size {num_shards}')
    if (self.dispatch == 'dropless' and num_shards > 1
        and self.router.DECISION is not rt.SoftRouting):
      raise ValueError("model.moe.dispatch='dropless' does not support an "
                       "expert mesh axis > 1; use 'indices' or 'einsum'")
    batch = jax.sharding.PartitionSpec(axes)
    expert = jax.sharding.PartitionSpec('expert')
    weights = self.experts.weights(xg.dtype)
    rate = self.experts.dropout_rate
    approximate = self.experts.approximate_gelu
    key = layers.dropout_key(rate, train, rngs)
    use_dropout, use_eom = key is not None, eom_key is not None
    # shard_map takes arrays only; unused inside when off.
    keys = tuple(k if k is not None else jnp.zeros((), jnp.uint32)
                 for k in (key, eom_key))
    method = self.dispatch
    decide = lambda z: self.router.decide(z, capacity=capacity)

    def per_device(key, on):
      if not on:
        return None
      for axis in axes:  # distinct masks on every device
        key = jax.random.fold_in(key, jax.lax.axis_index(axis))
      return key

    def local(logits, x, weights, keys):
      r = decide(logits)
      key = per_device(keys[0], use_dropout)
      eom = per_device(keys[1], use_eom)

      def expert_fn(buffers):  # [e, g_l, c, d]
        if num_shards > 1:  # -> [e / X, X * g_l, c, d]
          buffers = jax.lax.all_to_all(buffers, 'expert', split_axis=0,
                                       concat_axis=1, tiled=True)
        y = apply_experts(weights, buffers, dropout_rate=rate,
                          dropout_key=key, approximate_gelu=approximate)
        if num_shards > 1:
          y = jax.lax.all_to_all(y, 'expert', split_axis=1, concat_axis=0,
                                 tiled=True)
        return self._rounded(self._masked(self._eom(y, eom)))

      def ragged_fn(xs, group_sizes, expert_id):  # only with num_shards == 1
        ys = apply_experts_ragged(weights, xs, group_sizes, expert_id,
                                  dropout_rate=rate, dropout_key=key,
                                  approximate_gelu=approximate,
                                  kernels=self.kernels)
        return self._rounded(self._masked(self._eom(ys, eom), expert_id))

      y = dp.moe_apply(r, x, expert_fn, method=method, ragged_fn=ragged_fn,
                       kernels=self.kernels)
      return y, r

    r_shape = jax.eval_shape(decide, logits)
    return jax.shard_map(
        local,
        in_specs=(rt.group_partition_specs(logits, batch), batch,
                  (expert,) * len(weights), (jax.sharding.PartitionSpec(),) * 2),
        out_specs=(batch, rt.group_partition_specs(r_shape, batch)),
    )(logits, xg, weights, keys)


# ----------------------------------------------------------------------------
# Model-wide helpers.
# ----------------------------------------------------------------------------


def moe_layers(model: nnx.Module) -> dict[Any, MoeLayer]:
  """{module path: MoeLayer} of every MoE layer in `model`, in order."""
  return {path: m for path, m in nnx.iter_modules(model)
          if isinstance(m, MoeLayer)}


def routed_layer(module: nnx.Module) -> MoeLayer | None:
  """The MoeLayer that routes in an MLP slot: the slot itself, or the one a
  layer kind wraps (its `moe` attribute, e.g. Multi-Head MoE); None for a
  dense MLP."""
  if isinstance(module, MoeLayer):
    return module
  inner = getattr(module, 'moe', None)
  return inner if isinstance(inner, MoeLayer) else None


def block_moe_layers(model: nnx.Module) -> dict[int, MoeLayer]:
  """{block index: the MoeLayer routing in that block} of a
  `vmoe.nn.vit.VisionTransformer`."""
  out = {}
  for i, blk in enumerate(model.blocks):
    layer = routed_layer(getattr(blk, 'mlp', None))
    if layer is not None:
      out[i] = layer
  return out


def set_forcing(model: nnx.Module, forcing: dict[int, Any]) -> None:
  """Forces experts on or off: {MoE block index: int [b, e] (per image) or
  [b, n, e] (per token, n the tokens the layer sees) of
  `vmoe.nn.routing.FORCE_OFF` (-1) / `FORCE_FREE` (0) / `FORCE_ON` (+1), or
  None (no forcing)}.

  Off: the router may not pick the expert (its gate is 0 and the token is
  routed among the others); on: the expert is the token's first choice with
  gate 1 (`vmoe.nn.routing.force_logits`). For inference: call it on the
  model merged inside the jitted function, with the masks as (traced)
  arrays, e.g. `analysis.forced_accuracy`.
  """
  layers_ = block_moe_layers(model)
  for i, mask in forcing.items():
    if i not in layers_:
      raise ValueError(f'expert forcing: block {i} is not an MoE block (MoE '
                       f'blocks: {list(layers_)})')
    layers_[i].forcing = mask


# pylint: disable-next=redefined-builtin
def set_capacity_factor(model: nnx.Module, train: float | None = None,
                        eval: float | None = None) -> int:
  """Sets the train and/or eval capacity factor of every MoeLayer in `model`.

  Capacity factors are static attributes: re-split the model (`nnx.split`) and
  re-jit after calling this. Returns the number of layers updated.
  """
  for name, value in (('train', train), ('eval', eval)):
    if value is not None and not (is_number(value) and value > 0):
      raise ValueError(f'{name} capacity factor={value!r} must be a number > 0')
  count = 0
  for module in moe_layers(model).values():
    if train is not None:
      module.capacity_factor = float(train)
    if eval is not None:
      module.eval_capacity_factor = float(eval)
    count += 1
  return count


def capture_routing(model: nnx.Module, images: jax.Array, *,
                    train: bool = False, rngs: nnx.Rngs | None = None
                    ) -> tuple[jax.Array, dict, dict[int, Captured]]:
  """Runs `model` (a `vmoe.nn.vit.VisionTransformer`) on images and returns
  what every MoE layer routed.

  Returns (logits [b, classes], metrics, {block index: Captured}). The model
  is left as it was (capture switched off, nothing stored). Runs jitted; pass
  `rngs` (with 'gating' and 'dropout' streams) when train=True.
  """
  blocks = block_moe_layers(model)
  for layer in blocks.values():
    layer.capture = True
  try:
    graphdef, state = nnx.split(model)
    key = rngs.gating() if rngs is not None else None

    @jax.jit
    def run(state, images, key):
      m = nnx.merge(graphdef, state)
      run_rngs = (nnx.Rngs(gating=key, dropout=jax.random.fold_in(key, 1))
                  if key is not None else None)
      logits, metrics = m(images, train=train, rngs=run_rngs)
      inner = block_moe_layers(m)
      captured = {i: inner[i].routing.get_value()[0] for i in blocks}
      return logits, metrics, captured

    return run(state, images, key)
  finally:
    for layer in blocks.values():
      layer.capture = False
