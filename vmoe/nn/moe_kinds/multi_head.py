"""Multi-Head Mixture-of-Experts (`model.moe.kind='multi_head'`).

MH-MoE (Wu et al. 2024, https://arxiv.org/abs/2404.15045; code:
github.com/yushuiwx/MH-MoE, torchscale `xmoe/tutel_moe_layer.py`): every
token x [d] is projected by a head layer (d -> d, with bias), split into h
sub-tokens of d / h, token-major (sub-token j of token t is row t * h + j),
and the sub-tokens are routed separately by an ordinary MoE layer over
experts of input size d / h (any router of `vmoe.nn.routers`); the h outputs
of a token are concatenated back to [d] and mixed by a merge layer (d -> d,
with bias). The paper's claim is denser expert activation: a token's h
sub-tokens reach up to h * k experts.

Sizing (`mh_sizing`):
  'matched' (default): the FLOP- and parameter-matched version of the
    follow-up (Huang et al. 2024, https://arxiv.org/abs/2411.16205), which
    adjusts the experts' hidden size and count. Against the sparse MoE of the
    same config (e experts of d -> h_mlp -> d, a expert applications per
    token: k for token choice, the capacity factor for expert choice), the
    head and merge layers cost 2 d^2 parameters and 4 d^2 FLOPs per token,
    which the experts give back: hidden size H' = h_mlp - d / a (equal
    FLOPs) and e' = h * (e * h_mlp - d) / H' experts of d / h -> H' -> d / h
    (equal parameters), both rounded to integers.
  'original': Wu et al.'s layer: e experts of d / h -> h_mlp -> d / h (the
    experts' FLOPs of the sparse MoE plus the two projections; 1 / h of its
    expert parameters).

Groups: a routing group of s tokens becomes one of s * h sub-tokens
(group_size None: the n * h sub-tokens of an image). Metrics: the inner
layer's routing metrics (over sub-tokens) plus 'expert_activation', the
fraction of experts that received any sub-token of the batch.

Axis letters: b images, n tokens per image, d model dim, e experts.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vmoe.config import is_int
from vmoe.nn import routers
from vmoe.nn.layers import Dense
from vmoe.nn.moe_kinds.registry import KINDS

SIZINGS = ('matched', 'original')


def applications_per_token(c: types.SimpleNamespace) -> float:
  """Nominal expert applications per (sub-)token of the router of c: k for
  routers with a `k` option, else the capacity factor (expert choice)."""
  if 'k' in routers.get(c.router).OPTIONS:
    return float(c.k)
  return float(c.capacity_factor)


def expert_sizes(c: types.SimpleNamespace, dim: int,
                 hidden_dim: int) -> tuple[int, int]:
  """(number of experts, expert hidden size) of the inner layer."""
  if c.mh_sizing == 'original':
    return c.num_experts, hidden_dim
  hidden = round(hidden_dim - dim / applications_per_token(c))
  if hidden < 1:
    return c.num_experts, hidden
  experts = round(c.mh_heads * (c.num_experts * hidden_dim - dim) / hidden)
  return experts, hidden


@KINDS.register('multi_head')
class MultiHeadMoe(nnx.Module):
  """head (Dense d -> d) -> h sub-tokens -> MoeLayer -> merge (Dense d -> d).

  Params: head/{kernel [d, d], bias [d]}, moe/... (the inner MoeLayer over
  d / h), merge/{kernel [d, d], bias [d]}. Initialisation as the reference
  code: head kernel Xavier-uniform with gain 1 / sqrt(2), merge kernel
  Xavier-uniform, zero biases.
  """
  OPTIONS = dict(mh_heads=2, mh_sizing='matched')

  @classmethod
  def validate(cls, c, need, dim=None, mlp_dim=None):
    need(is_int(c.mh_heads) and c.mh_heads >= 2, 'mh_heads',
         'must be an integer >= 2')
    need(c.mh_sizing in SIZINGS, 'mh_sizing', f'is not one of {SIZINGS}')
    if dim is not None:
      need(dim % c.mh_heads == 0, 'mh_heads',
           f'does not divide the model width {dim}')
    if dim is not None and mlp_dim is not None:
      experts, hidden = expert_sizes(c, dim, mlp_dim)
      need(hidden >= 1 and experts >= 1, 'mh_sizing',
           f'leaves experts of hidden size {hidden} ({experts} experts) for '
           f'width {dim}, MLP size {mlp_dim}; use more experts per token or '
           "mh_sizing='original'")

  @classmethod
  def build(cls, moe_cls, dim, hidden_dim, *, config, options, **kw):
    return cls(dim, hidden_dim, config=config, options=options,
               moe_cls=moe_cls, **kw)

  def __init__(self, dim: int, hidden_dim: int, *,
               config: ml_collections.ConfigDict,
               options: types.SimpleNamespace, moe_cls: type,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **kw):
    """config: `model.moe`; options: it merged with the defaults."""
    c = options
    h = c.mh_heads
    experts, hidden = expert_sizes(c, dim, hidden_dim)
    inner = ml_collections.ConfigDict(dict(config.items()))
    inner.update(dict(
        kind='moe', num_experts=experts,
        group_size=None if c.group_size is None else c.group_size * h))
    half = nnx.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')
    self.heads = h
    self.hidden_dim = hidden_dim  # of the dense MLP the layer replaces
    self.head = Dense(dim, dim, axes=('embed', 'mlp'), kernel_init=half,
                      dtype=kw.get('dtype'), param_dtype=param_dtype,
                      rngs=rngs)
    self.moe = moe_cls(dim // h, hidden, config=inner,
                       param_dtype=param_dtype, rngs=rngs, **kw)
    self.merge = Dense(dim, dim, axes=('mlp', 'embed'),
                       dtype=kw.get('dtype'), param_dtype=param_dtype,
                       rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """x [b, n, d] -> (y [b, n, d], metrics)."""
    b, n, d = x.shape
    sub = self.head(x).reshape(b, n * self.heads, d // self.heads)
    y, metrics = self.moe(sub, train=train, rngs=rngs)
    y = self.merge(y.reshape(b, n, d))
    metrics = dict(metrics)
    metrics['expert_activation'] = jnp.mean(
        (metrics['expert_load'] > 0).astype(jnp.float32))
    return y.astype(x.dtype), metrics


# -----------------------------------------------------------------------------
# Reference: loops over tokens, sub-tokens and experts (token choice).
# -----------------------------------------------------------------------------


def reference(layer: MultiHeadMoe, x: jax.Array) -> jax.Array:
  """The layer's output for token choice routing, with Python loops.

  Token choice without noise, Batch Priority Routing or dropless dispatch:
  within each group, sub-tokens are served in order (first choices of all
  sub-tokens, then second choices) and a (sub-token, expert) pair is
  dropped once its expert holds `capacity` sub-tokens; the combine weight
  is the softmax gate. x: [b, n, d] -> [b, n, d]; differentiable.
  """
  inner = layer.moe
  router = inner.router
  b, n, d = x.shape
  h = layer.heads
  kernel = layer.head.kernel[...]
  bias = layer.head.bias[...]
  subs = []                                     # (b * n * h) rows of d / h
  for t in range(b * n):
    token = x.reshape(b * n, d)[t] @ kernel + bias
    for j in range(h):
      subs.append(token[j * d // h:(j + 1) * d // h])
  s = inner.group_size or n * h
  capacity = inner.capacity_for(s, False)
  w1, b1, w2, b2 = inner.experts.weights(jnp.float32)
  gelu = lambda z: jax.nn.gelu(z, approximate=inner.experts.approximate_gelu)
  outs = []
  for start in range(0, len(subs), s):
    group = subs[start:start + s]
    gates = [jax.nn.softmax(router.kernel[...] @ row) for row in group]
    order = [list(jnp.argsort(-jax.lax.stop_gradient(gt), stable=True))
             for gt in gates]
    filled = [0] * inner.num_experts
    kept = [[] for _ in group]
    for choice in range(router.k):
      for i in range(len(group)):
        e = int(order[i][choice])
        if filled[e] < capacity:
          filled[e] += 1
          kept[i].append(e)
    for i, row in enumerate(group):
      y = jnp.zeros_like(row)
      for e in kept[i]:
        y = y + gates[i][e] * (gelu(row @ w1[e] + b1[e]) @ w2[e] + b2[e])
      outs.append(y)
  merged = jnp.stack([jnp.concatenate(outs[t * h:(t + 1) * h])
                      for t in range(b * n)])
  y = merged @ layer.merge.kernel[...] + layer.merge.bias[...]
  return y.reshape(b, n, d)
