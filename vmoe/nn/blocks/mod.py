"""Mixture-of-Depths blocks for ViTs (`model.block='mod'`).

"Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models" (Raposo et al. 2024, https://arxiv.org/abs/2404.02258),
applied to ViTs as in gamma-MoD (Luo et al. 2024,
https://arxiv.org/abs/2410.13859; code github.com/Yaxin9Luo/Gamma-MOD,
`gamma_mod/model/language_model/llava_llama_mod.py`). In every block
`mod_layers` selects, a router scores each token, r_i = w . x_i (x_i the
block input), and only the top-c tokens of each image, c =
ceil(mod_capacity * n), go through the block: they attend among themselves
and through the MLP, and their update is weighted by the router,
x_i <- x_i + w(r_i) * (f(X~)_i - x_i), with f the standard block on the
selected set X~; every other token skips the block on the residual path.
The class token is never skipped: it always takes part and gets the
standard update (weight 1), and counts in c.

`mod_router_activation`: w(r) = r as in Raposo et al. Eq. 2 ('none', the
default) or sigmoid(r) ('sigmoid', bounded like gamma-MoD's softmax
probability). `mod_loss_weight`: weight of the routing loss, a binary
cross-entropy of the router logits against the top-c selection (Raposo et
al.'s auxiliary loss, gamma-MoD's routing loss at 0.01), 0 by default.
gamma-MoD weights only the MLP output and routes from the normalised input;
here the whole block update is weighted, as in Raposo et al.

Metrics (under 'depth/'): 'dropped_fraction' (share of tokens skipping the
block), 'capacity' (c), 'compute_fraction' (the block's forward FLOPs on c
tokens over those on n: projections and MLP linear in tokens, attention
quadratic), 'router_loss' and 'auxiliary_loss'. The MLP's own metrics (an
MoE MLP's routing, over the c tokens) stay at the block's top level.

Axis letters: b images, n tokens per image, c tokens through the block, d
model dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vmoe.config import is_number
from vmoe.nn import kinds
from vmoe.nn import layers
from vmoe.nn.blocks.registry import BLOCKS
from vmoe.nn.layers import AUX_LOSS_KEY, param

ACTIVATIONS = ('none', 'sigmoid')


def capacity_tokens(n: int, capacity: float) -> int:
  """c = ceil(capacity * n), in [1, n]."""
  return int(min(n, max(1, math.ceil(capacity * n - 1e-9))))


def block_flops(tokens: int, dim: int, mlp_dim: int) -> float:
  """Forward matmul FLOPs of a standard block on `tokens` tokens: qkv and
  output projections (8 t d^2), attention logits and mixing (4 t^2 d), MLP
  (4 t d h)."""
  return 8.0 * tokens * dim * dim + 4.0 * tokens * tokens * dim + (
      4.0 * tokens * dim * mlp_dim)


def mlp_hidden(mlp: nnx.Module) -> int:
  """The hidden size of a block's MLP: a dense MLP's, or an MoE layer's
  experts' (one expert application per token: an approximation of its
  active FLOPs)."""
  fc1 = getattr(mlp, 'fc1', None)
  if fc1 is not None:
    return int(fc1.kernel.shape[-1])
  experts = getattr(getattr(mlp, 'moe', mlp), 'experts', None)
  return int(experts.kernel1.shape[-1]) if experts is not None else 0


@BLOCKS.register('mod')
class MixtureOfDepths(kinds.Mixin, nnx.Module):
  """The standard block on the router's top-c tokens of each image.

  Params beyond the standard block's: router/kernel [d].
  """
  OPTIONS = dict(mod_layers='every:2', mod_capacity=0.5,
                 mod_router_activation='none', mod_loss_weight=0.0)
  LAYERS_OPTION = 'mod_layers'

  @classmethod
  def validate(cls, c, need, moe=None, **context):
    need(is_number(c.mod_capacity) and 0 < c.mod_capacity <= 1,
         'mod_capacity', 'must be a number in (0, 1]')
    need(c.mod_router_activation in ACTIVATIONS, 'mod_router_activation',
         f'is not one of {ACTIVATIONS}')
    need(is_number(c.mod_loss_weight) and c.mod_loss_weight >= 0,
         'mod_loss_weight', 'must be a number >= 0')
    if moe is not None and moe.get('group_size') is not None:
      need(not set(context.get('moe_blocks', ())) & set(
          context.get('kind_blocks', ())), 'mod_layers',
           'selects MoE blocks whose model.moe.group_size is set; the MoE '
           'layer of a mixture-of-depths block routes the c tokens of each '
           'image (set model.moe.group_size=None)')

  def __init__(self, dim: int, num_heads: int, mlp: nnx.Module, *, options,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **kw):
    super().__init__(dim, num_heads, mlp, param_dtype=param_dtype, rngs=rngs,
                     **kw)
    self.router = param(rngs, nnx.initializers.normal(stddev=dim ** -0.5),
                        (dim,), ('embed',), param_dtype)
    self.capacity = float(options.mod_capacity)
    self.activation = options.mod_router_activation
    self.loss_weight = float(options.mod_loss_weight)
    self.num_prefix_tokens = int(options.num_prefix_tokens)

  def scores(self, x: jax.Array) -> jax.Array:
    """Router logits r [b, n] (float32) of the block input x [b, n, d]."""
    return jnp.einsum('bnd,d->bn', x.astype(jnp.float32),
                      self.router[...].astype(jnp.float32))

  def weights(self, r: jax.Array) -> jax.Array:
    """w(r): the update weights of routed tokens."""
    return jax.nn.sigmoid(r) if self.activation == 'sigmoid' else r

  def select(self, r: jax.Array, c: int) -> jax.Array:
    """Indices [b, c] (ascending) of the top-c tokens of every image; the
    prefix (class) tokens first."""
    p = self.num_prefix_tokens
    priority = jax.lax.stop_gradient(r)
    if p:
      priority = priority.at[:, :p].set(jnp.inf)
    _, index = jax.lax.top_k(priority, c)
    return jnp.sort(index, axis=-1)

  def __call__(self, x, *, drop_path_rate=0.0, train: bool,
               rngs: nnx.Rngs | None):
    b, n, d = x.shape
    c = capacity_tokens(n, self.capacity)
    r = self.scores(x)
    index = self.select(r, c)                                     # [b, c]
    selected = jnp.take_along_axis(x, index[..., None], axis=1)   # [b, c, d]
    out, inner = super().__call__(selected, drop_path_rate=drop_path_rate,
                                  train=train, rngs=rngs)
    w = self.weights(jnp.take_along_axis(r, index, axis=1))       # [b, c]
    if self.num_prefix_tokens:  # the class token gets the standard update
      w = jnp.where(index < self.num_prefix_tokens, 1.0, w)
    update = selected + w[..., None].astype(x.dtype) * (out - selected)
    y = x.at[jnp.arange(b)[:, None], index].set(update)
    return y, layers.join_metrics(inner, depth=self.metrics(r, index, n, d))

  def metrics(self, r: jax.Array, index: jax.Array, n: int,
              d: int) -> dict[str, jax.Array]:
    c = index.shape[-1]
    chosen = jnp.zeros(r.shape, jnp.float32).at[
        jnp.arange(r.shape[0])[:, None], index].set(1.0)
    p = self.num_prefix_tokens
    # The routing loss: BCE of the router logits against the selection.
    bce = jnp.mean(jnp.maximum(r[:, p:], 0) - r[:, p:] * chosen[:, p:]
                   + jnp.log1p(jnp.exp(-jnp.abs(r[:, p:]))))
    h = mlp_hidden(self.mlp)
    return {AUX_LOSS_KEY: self.loss_weight * bce, 'router_loss': bce,
            'dropped_fraction': jnp.asarray(1.0 - c / n, jnp.float32),
            'capacity': jnp.asarray(float(c), jnp.float32),
            'compute_fraction': jnp.asarray(
                block_flops(c, d, h) / block_flops(n, d, h), jnp.float32)}


def reference(block: MixtureOfDepths, x: jax.Array, *, train: bool = False,
              rngs: nnx.Rngs | None = None) -> jax.Array:
  """The block's output with Python loops over images and tokens: rank the
  tokens by router logit (class token first), run the standard block of
  `block` on the top c of each image, write the weighted updates back."""
  b, n, d = x.shape
  c = capacity_tokens(n, block.capacity)
  p = block.num_prefix_tokens
  w = block.router[...]
  standard = super(MixtureOfDepths, block)  # the standard block
  outs = []
  for img in range(b):
    logits = [jnp.dot(x[img, t], w) for t in range(n)]
    order = sorted(range(n), key=lambda t: (
        t >= p, -float(jax.lax.stop_gradient(logits[t])), t))
    chosen = sorted(order[:c])
    selected = jnp.stack([x[img, t] for t in chosen])[None]
    out = standard.__call__(selected, train=train, rngs=rngs)[0][0]
    rows = []
    for t in range(n):
      if t in chosen:
        j = chosen.index(t)
        weight = 1.0 if t < p else (jax.nn.sigmoid(logits[t])
                                    if block.activation == 'sigmoid'
                                    else logits[t])
        rows.append(x[img, t] + weight * (out[j] - x[img, t]))
      else:
        rows.append(x[img, t])
    outs.append(jnp.stack(rows))
  return jnp.stack(outs)
