"""Mixture of Nested Experts blocks (`model.block='mone'`).

"Mixture of Nested Experts: Adaptive Processing of Visual Tokens" (Jain et
al. 2024, https://arxiv.org/abs/2407.19985). The authors' code is not
public; the conventions below follow the paper (checked against the
unofficial github.com/usryokousha/mone-pytorch where the paper is silent).

Nested experts: expert j of E (j = 0 the smallest) is the block restricted
to the first D_j = d / 2^(E-1-j) model dimensions of its weights: the
in-projections (qkv, MLP fc1) read the first D_j dimensions of the
normalised token with the first D_j rows of their kernels (queries, keys and
values stay full size, so tokens of every expert attend to each other at
the full dimension, and the MLP keeps its full hidden size), and the
out-projections (attention output, MLP fc2) write only the first D_j
dimensions (the rest of the update is zero). The parameters are those of
the standard block: a standard checkpoint loads, and expert E-1 is the
standard block.

Routing (Expert Preferred Routing): a router (kernel [E, d], on the block
input) gives each token probabilities over the experts; the experts, from
the largest down, each take their top-c_j tokens among those not yet
taken, c_j = floor(capacity_j * n); the smallest takes the rest. The class
token always takes the largest expert (counted in its capacity). The MLP
update of a token is scaled by (alpha * r + 1), r its router probability
of its expert and alpha a learned scalar starting at 0, so that the router
learns.

Budget: capacities come from the paper's program for an effective capacity
e_c = sum_j capacity_j * D_j / d: maximise sum_j capacity_j delta^j +
beta * H(capacity) subject to sum_j capacity_j = 1 and the e_c constraint
(`mone_delta` 2, `mone_beta` 10), solved exactly (the optimum is a softmax
of (delta^j - mu * D_j / d) / beta; mu by bisection). `mone_budget` is the
training e_c and `mone_eval_budget` (None: the same) the evaluation one:
one trained model evaluates at any budget (`set_budget`,
`vmoe.analysis.budget_sweep`). `mone_capacities` (smallest expert first)
replaces the program in training.

Metrics (under 'nested/'): 'compute_fraction' (the block's forward FLOPs
over the standard block's), 'effective_capacity' (the e_c the token counts
realise), 'expert_load' [E] (share of tokens per expert), 'router_entropy',
'auxiliary_loss' 0.

Axis letters: b images, n tokens per image, d model dim, h heads, k head
dim, E nested experts (here `e`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vmoe.config import is_int, is_number
from vmoe.nn import kinds
from vmoe.nn import layers
from vmoe.nn import routing as rt
from vmoe.nn.blocks.mod import block_flops
from vmoe.nn.blocks.registry import BLOCKS
from vmoe.nn.layers import AUX_LOSS_KEY, param


def expert_dims(dim: int, num_experts: int) -> tuple[int, ...]:
  """D_j = dim / 2^(E-1-j), smallest first."""
  return tuple(dim >> (num_experts - 1 - j) for j in range(num_experts))


def min_budget(num_experts: int) -> float:
  """The smallest effective capacity: every token to the smallest expert."""
  return 2.0 ** -(num_experts - 1)


def capacity_distribution(budget: float, num_experts: int, *,
                          delta: float = 2.0,
                          beta: float = 10.0) -> tuple[float, ...]:
  """Capacities (smallest expert first, sum 1) for effective capacity
  `budget`: the maximiser of sum_j c_j delta^j + beta * H(c) subject to
  sum_j c_j = 1 and sum_j c_j 2^-(E-1-j) = budget (MoNE, Sec. 3.3)."""
  e = num_experts
  w = np.array([2.0 ** -(e - 1 - j) for j in range(e)])
  if budget >= 1.0 - 1e-12:
    return tuple(float(v) for v in (w == 1.0))
  if budget <= w[0] + 1e-12:
    return tuple(float(v) for v in (np.arange(e) == 0))
  a = np.array([delta ** j for j in range(e)])

  def dist(mu):
    z = (a - mu * w) / beta
    p = np.exp(z - z.max())
    return p / p.sum()

  lo, hi = -1e7, 1e7       # sum(dist(mu) * w) falls from 1 to w[0] in mu
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    if float(dist(mid) @ w) > budget:
      lo = mid
    else:
      hi = mid
  return tuple(float(v) for v in dist(0.5 * (lo + hi)))


def token_counts(n: int, capacities: Sequence[float],
                 num_prefix_tokens: int = 0) -> tuple[int, ...]:
  """Tokens per expert (smallest first): floor(capacity_j * n) for every
  expert but the smallest, which takes the rest; the largest at least the
  prefix (class) tokens."""
  counts = [int(math.floor(c * n + 1e-9)) for c in capacities]
  counts[-1] = max(counts[-1], num_prefix_tokens)
  for j in range(len(counts) - 2, 0, -1):  # never more than n in all
    counts[j] = min(counts[j], n - sum(counts[j + 1:]))
  counts[0] = n - sum(counts[1:])
  return tuple(counts)


@BLOCKS.register('mone')
class NestedExperts(kinds.Mixin, nnx.Module):
  """The standard block as E nested experts, tokens routed under a budget.

  Params beyond the standard block's: router/kernel [E, d], alpha [].
  Needs the standard attention and a dense MLP in its blocks.
  """
  OPTIONS = dict(mone_layers='every:1', mone_experts=4, mone_budget=0.5,
                 mone_eval_budget=None, mone_capacities=None, mone_delta=2.0,
                 mone_beta=10.0)
  LAYERS_OPTION = 'mone_layers'

  @classmethod
  def validate(cls, c, need, dim=None, attention=None, moe_blocks=(),
               kind_blocks=(), **context):
    need(is_int(c.mone_experts) and c.mone_experts >= 2, 'mone_experts',
         'must be an integer >= 2')
    e = c.mone_experts
    low = min_budget(e)
    for name in ('mone_budget', 'mone_eval_budget'):
      value = getattr(c, name)
      need((value is None and name == 'mone_eval_budget')
           or (is_number(value) and low <= value <= 1), name,
           f'must be a number in [{low:g}, 1] (the smallest expert alone .. '
           'the full block)' + (' or None' if name == 'mone_eval_budget'
                                 else ''))
    caps = c.mone_capacities
    need(caps is None or (
        isinstance(caps, (tuple, list)) and len(caps) == e
        and all(is_number(v) and v >= 0 for v in caps)
        and abs(sum(caps) - 1) < 1e-6), 'mone_capacities',
         f'must be None or {e} numbers >= 0 summing to 1 (smallest expert '
         'first)')
    need(is_number(c.mone_delta) and c.mone_delta > 1, 'mone_delta',
         'must be a number > 1')
    need(is_number(c.mone_beta) and c.mone_beta > 0, 'mone_beta',
         'must be a number > 0')
    if dim is not None:
      need(dim % 2 ** (e - 1) == 0, 'mone_experts',
           f'needs the width {dim} divisible by 2^(experts-1)={2 ** (e - 1)}')
    if attention is not None:
      need(attention == 'mha', 'mone_layers',
           f"needs the standard attention (model.attention='mha', not "
           f'{attention!r})')
    need(not set(moe_blocks) & set(kind_blocks), 'mone_layers',
         f'selects MoE blocks {sorted(set(moe_blocks) & set(kind_blocks))}: '
         'nested experts slice a dense MLP')

  def __init__(self, dim: int, num_heads: int, mlp: nnx.Module, *, options,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **kw):
    super().__init__(dim, num_heads, mlp, param_dtype=param_dtype, rngs=rngs,
                     **kw)
    e = int(options.mone_experts)
    init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)
    self.router = param(rngs, init, (e, dim), (None, 'embed'), param_dtype)
    self.alpha = param(rngs, nnx.initializers.zeros_init(), (), (),
                       param_dtype)
    self.num_experts = e
    self.dims = expert_dims(dim, e)
    self.num_prefix_tokens = int(options.num_prefix_tokens)
    self.delta, self.beta = float(options.mone_delta), float(options.mone_beta)
    self.budget = float(options.mone_budget)
    self.eval_budget = (None if options.mone_eval_budget is None
                        else float(options.mone_eval_budget))
    self.train_capacities = (None if options.mone_capacities is None
                             else tuple(float(v)
                                        for v in options.mone_capacities))

  def capacities(self, train: bool) -> tuple[float, ...]:
    """Capacities (smallest expert first) in training / evaluation."""
    budget = None if train else self.eval_budget
    if budget is None:
      if self.train_capacities is not None:
        return self.train_capacities
      budget = self.budget
    return capacity_distribution(budget, self.num_experts, delta=self.delta,
                                 beta=self.beta)

  def probabilities(self, x: jax.Array) -> jax.Array:
    """Router probabilities [b, n, E] (float32) of the block input."""
    logits = jnp.einsum('bnd,ed->bne', x.astype(jnp.float32),
                        self.router[...].astype(jnp.float32))
    return jax.nn.softmax(logits, axis=-1)

  def assign(self, probs: jax.Array, counts: Sequence[int]) -> jax.Array:
    """Expert Preferred Routing: token order [b, n], the tokens of expert 0
    first (counts[0] of them), then expert 1's, ...; within an expert by
    descending probability."""
    b, n, _ = probs.shape
    priority = jax.lax.stop_gradient(probs)
    p = self.num_prefix_tokens
    if p:  # the class token goes to the largest expert
      priority = priority.at[:, :p, -1].set(jnp.inf)
    taken = jnp.zeros((b, n), jnp.bool_)
    parts = [None] * self.num_experts
    for j in range(self.num_experts - 1, -1, -1):
      if counts[j] == 0:
        parts[j] = jnp.zeros((b, 0), jnp.int32)
        continue
      score = jnp.where(taken, -jnp.inf, priority[..., j])
      _, index = jax.lax.top_k(score, counts[j])
      parts[j] = index.astype(jnp.int32)
      taken = taken.at[jnp.arange(b)[:, None], index].set(True)
    return jnp.concatenate(parts, axis=1)

  def _nested(self, x_sorted: jax.Array, counts: Sequence[int], fn):
    """Applies fn(segment [b, c_j, ...], D_j) to the token segments of
    every expert and concatenates the results along the token axis."""
    outs, start = [], 0
    for j, c in enumerate(counts):
      outs.append(fn(x_sorted[:, start:start + c], self.dims[j]))
      start += c
    return jnp.concatenate(outs, axis=1)

  def __call__(self, x, *, drop_path_rate=0.0, train: bool,
               rngs: nnx.Rngs | None):
    b, n, d = x.shape
    counts = token_counts(n, self.capacities(train), self.num_prefix_tokens)
    probs = self.probabilities(x)
    order = self.assign(probs, counts)                             # [b, n]
    inverse = jnp.argsort(order, axis=-1)
    expert_of = jnp.concatenate([jnp.full((c,), j, jnp.int32)
                                 for j, c in enumerate(counts)])
    expert = jnp.take_along_axis(jnp.broadcast_to(expert_of, (b, n)),
                                 inverse, axis=1)                  # [b, n]
    sort = lambda a: jnp.take_along_axis(  # noqa: E731
        a, order.reshape(b, n, *(1,) * (a.ndim - 2)), axis=1)
    unsort = lambda a: jnp.take_along_axis(  # noqa: E731
        a, inverse.reshape(b, n, *(1,) * (a.ndim - 2)), axis=1)
    attn, mlp = self.attn, self.mlp
    dtype = attn.dtype or x.dtype

    x = layers.materialize_cotangent(x)
    kq, bq = (attn.qkv_kernel[...].astype(dtype),
              attn.qkv_bias[...].astype(dtype))
    qkv = unsort(self._nested(
        sort(self.ln1(x).astype(dtype)), counts,
        lambda s, dj: jnp.einsum('bcd,dthk->bcthk', s[..., :dj], kq[:dj]) + bq))
    heads = attn.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    ko, bo = (attn.out_kernel[...].astype(dtype),
              attn.out_bias[...].astype(dtype))
    y = unsort(self._nested(
        sort(heads), counts, lambda s, dj: _pad(
            jnp.einsum('bchk,hkd->bcd', s, ko[..., :dj]) + bo[:dj], d)))
    y = layers.dropout(y, self.dropout_rate, train=train, rngs=rngs)
    x = x + layers.drop_path(y, drop_path_rate, train=train, rngs=rngs)

    x = layers.materialize_cotangent(x)
    w1, b1, w2, b2 = (p[...].astype(dtype) for p in (
        mlp.fc1.kernel, mlp.fc1.bias, mlp.fc2.kernel, mlp.fc2.bias))
    key = layers.dropout_key(mlp.dropout_rate, train, rngs)

    def nested_mlp(s, dj):
      hidden = jax.nn.gelu(s[..., :dj] @ w1[:dj] + b1,
                           approximate=mlp.approximate_gelu)
      keep = layers.dropout_multiplier(
          mlp.dropout_rate, None if key is None else jax.random.fold_in(
              key, dj), hidden.shape, hidden.dtype)
      if keep is not None:
        hidden = hidden * keep
      return _pad(hidden @ w2[:, :dj] + b2[:dj], d)

    y = unsort(self._nested(sort(self.ln2(x).astype(dtype)), counts,
                            nested_mlp))
    r = jnp.take_along_axis(probs, expert[..., None], axis=-1)     # [b, n, 1]
    y = y * (self.alpha[...].astype(jnp.float32) * r + 1).astype(y.dtype)
    y = layers.dropout(y, self.dropout_rate, train=train, rngs=rngs)
    x = x + layers.drop_path(y, drop_path_rate, train=train, rngs=rngs)
    return x, {AUX_LOSS_KEY: jnp.zeros((), jnp.float32),
               **{f'nested/{k}': v for k, v in self.metrics(
                   probs, counts, n, d).items()}}

  def metrics(self, probs, counts, n, d) -> dict[str, jax.Array]:
    h = int(self.mlp.fc1.kernel.shape[-1])
    nested = sum(c * (8.0 * d * dj + 4.0 * dj * h)
                 for c, dj in zip(counts, self.dims)) + 4.0 * n * n * d
    return {
        'compute_fraction': jnp.asarray(nested / block_flops(n, d, h),
                                        jnp.float32),
        'effective_capacity': jnp.asarray(
            sum(c * dj for c, dj in zip(counts, self.dims)) / (n * d),
            jnp.float32),
        'expert_load': jnp.asarray(counts, jnp.float32) / n,
        'router_entropy': rt.entropy(probs)}


def _pad(y: jax.Array, d: int) -> jax.Array:
  """[..., D_j] -> [..., d] with zeros beyond D_j."""
  return jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, d - y.shape[-1])])


def set_budget(model: nnx.Module, budget: float | None) -> int:
  """Sets the evaluation budget (effective capacity) of every nested-experts
  block of `model` (None: the training budget). A static attribute:
  re-split and re-jit afterwards. Returns the number of blocks."""
  count = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, NestedExperts):
      if budget is not None and not (
          min_budget(module.num_experts) <= budget <= 1):
        raise ValueError(f'budget={budget!r} must be in '
                         f'[{min_budget(module.num_experts):g}, 1]')
      module.eval_budget = None if budget is None else float(budget)
      count += 1
  return count


def reference(block: NestedExperts, x: jax.Array, *,
              train: bool = False) -> jax.Array:
  """The block's output (no dropout) with Python loops over images, tokens,
  experts, heads and keys; differentiable."""
  b, n, d = x.shape
  counts = token_counts(n, block.capacities(train), block.num_prefix_tokens)
  attn, mlp = block.attn, block.mlp
  kq, bq = attn.qkv_kernel[...], attn.qkv_bias[...]
  ko, bo = attn.out_kernel[...], attn.out_bias[...]
  h = kq.shape[2]
  w1, b1 = mlp.fc1.kernel[...], mlp.fc1.bias[...]
  w2, b2 = mlp.fc2.kernel[...], mlp.fc2.bias[...]
  gelu = lambda z: jax.nn.gelu(z, approximate=mlp.approximate_gelu)  # noqa: E731
  p = block.num_prefix_tokens
  outs = []
  for img in range(b):
    xi = x[img]
    probs = [jax.nn.softmax(block.router[...] @ xi[t]) for t in range(n)]
    expert = [None] * n
    for j in range(block.num_experts - 1, -1, -1):
      free = [t for t in range(n) if expert[t] is None]
      free.sort(key=lambda t, j=j: (
          not (t < p and j == block.num_experts - 1),
          -float(jax.lax.stop_gradient(probs[t][j])), t))
      for t in free[:counts[j]]:
        expert[t] = j
    dims = [block.dims[expert[t]] for t in range(n)]
    ln = block.ln1(xi[None])[0]
    qkv = [[[ln[t, :dims[t]] @ kq[:dims[t], s, i] + bq[s, i]
             for i in range(h)] for s in range(3)] for t in range(n)]
    rows = []
    for t in range(n):
      out = jnp.zeros((d,))
      for i in range(h):
        weights = jax.nn.softmax(jnp.stack(
            [jnp.dot(qkv[t][0][i], qkv[m][1][i]) for m in range(n)])
                                 * kq.shape[-1] ** -0.5)
        head = sum(weights[m] * qkv[m][2][i] for m in range(n))
        out = out + _pad(head @ ko[i, :, :dims[t]], d)
      rows.append(xi[t] + out + _pad(bo[:dims[t]], d))
    z = jnp.stack(rows)
    ln2 = block.ln2(z[None])[0]
    final = []
    for t in range(n):
      dj = dims[t]
      y = _pad(gelu(ln2[t, :dj] @ w1[:dj] + b1) @ w2[:, :dj] + b2[:dj], d)
      scale = block.alpha[...] * probs[t][expert[t]] + 1
      final.append(z[t] + scale * y)
    outs.append(jnp.stack(final))
  return jnp.stack(outs)
