"""Basic layers shared by the ViT and MoE modules.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per
array axis: 'embed', 'mlp', 'heads', 'kv', 'expert', 'vocab', ...). The sharding
code maps these logical names to mesh axes; nothing else reads them.

The MLP slot of a transformer block is any module with the call signature of
`MlpBlock`:

    y, metrics = mlp(x, train=..., rngs=...)   # x, y: [b, n, d]

`metrics` is a flat dict of scalars/arrays; the key `'auxiliary_loss'` (if
present) is a scalar already weighted and added to the training loss.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vmoe.nn import batched_mlp

Initializer = Callable[..., jax.Array]
DType = Any

AUX_LOSS_KEY = 'auxiliary_loss'


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int],
          axes: Sequence[str | None], dtype: DType = jnp.float32) -> nnx.Param:
  """Creates an `nnx.Param` with `logical_axes` metadata (one name per axis)."""
  if len(axes) != len(shape):
    raise ValueError(f'logical axes {axes} do not match shape {shape}')
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x @ kernel + bias on the last axis; kernel [d_in, d_out]."""

  def __init__(self, in_features: int, out_features: int, *,
               axes: tuple[str | None, str | None] = ('embed', 'mlp'),
               use_bias: bool = True,
               kernel_init: Initializer = nnx.initializers.xavier_uniform(),
               bias_init: Initializer = nnx.initializers.zeros_init(),
               dtype: DType | None = None, param_dtype: DType = jnp.float32,
               rngs: nnx.Rngs):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes,
                        param_dtype)
    self.bias = (param(rngs, bias_init, (out_features,), axes[1:], param_dtype)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = jnp.dot(x.astype(dtype), self.kernel[...].astype(dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


@jax.custom_vjp
def materialize_cotangent(x: jax.Array) -> jax.Array:
  """Identity whose gradient is computed once and stored (a fusion barrier).

  On the residual stream of a transformer, the gradient is a long chain of
  elementwise ops (every block's LayerNorm backward adds to it). Left alone,
  XLA:CPU fuses the whole chain so far into each consumer and recomputes it
  there, which makes the backward pass quadratic in depth (measured: 30% of a
  ViT-S/16 train step). Marking the block boundaries with this identity
  materialises the gradient once per block.
  """
  return x


def _materialize_fwd(x):
  return x, None


def _materialize_bwd(_, g):
  # XLA:CPU drops optimization barriers before fusion, but never fuses a
  # reduction into its consumers: g is summed with zeros over a new axis.
  return (jnp.sum(jnp.stack([g, jnp.zeros_like(g)]), axis=0),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype: DType | None = None,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    self.scale = param(rngs, nnx.initializers.ones_init(), (dim,), ('embed',),
                       param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), (dim,), ('embed',),
                      param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...] + self.bias[...]
    return y.astype(dtype)


class Streams:
  """The random streams of one block call, drawn like `nnx.Rngs`.

  `streams.dropout()` returns the next key of the 'dropout' stream (the
  stream's key folded with a call counter), as `nnx.Rngs.dropout()` does.
  A stream's key is a single key or a [b] array of keys, one per example
  (the ViT's 'gating' stream): each draw of the latter is [b] keys too, so
  that what an example draws does not depend on the other examples of the
  batch (`vmoe.nn.routing.add_gating_noise`).

  Unlike `nnx.Rngs` it is a plain Python object built from arrays inside
  the traced function, so it can be created per block inside `jax.lax.scan`
  and `jax.checkpoint` (`vmoe.nn.vit`) without any state crossing them.
  """

  def __init__(self, keys: dict[str, jax.Array]):
    self._keys = dict(keys)
    self._counts = {name: 0 for name in keys}

  def __contains__(self, name: str) -> bool:
    return name in self._keys

  def __getattr__(self, name: str):
    if name.startswith('_') or name not in self._keys:
      raise AttributeError(f'no random stream {name!r} (streams: '
                           f'{sorted(self._keys)})')

    def draw() -> jax.Array:
      count = self._counts[name]
      self._counts[name] = count + 1
      return fold_in(self._keys[name], count)
    return draw


def fold_in(key: jax.Array, data) -> jax.Array:
  """`jax.random.fold_in` of a single key or of each key of a [b] array."""
  if jnp.ndim(key) == 0:
    return jax.random.fold_in(key, data)
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(key, data)


def dropout(x: jax.Array, rate: float, *, train: bool,
            rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout using the 'dropout' rng stream; identity at eval."""
  keep = dropout_multiplier(rate, dropout_key(rate, train, rngs), x.shape,
                            x.dtype)
  return x if keep is None else x * keep


def dropout_key(rate: float, train: bool,
                rngs: nnx.Rngs | None) -> jax.Array | None:
  """A key of the 'dropout' stream if dropout is active, else None."""
  if not train or rate == 0.0:
    return None
  if rngs is None:
    raise ValueError('dropout with train=True needs rngs with a dropout stream')
  return rngs.dropout()


def dropout_multiplier(rate: float, key: jax.Array | None,
                       shape: Sequence[int], dtype: DType) -> jax.Array | None:
  """Inverted-dropout multiplier: 0 (dropped) or 1 / (1 - rate) (kept).

  None when there is no dropout (key None or rate 0), so callers skip the
  multiplication altogether.
  """
  if key is None or rate == 0.0:
    return None
  keep = jax.random.bernoulli(key, 1.0 - rate, tuple(shape))
  return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(dtype)


def drop_path(x: jax.Array, rate: float | jax.Array, *, train: bool,
              rngs: Any) -> jax.Array:
  """Stochastic depth: drops the whole residual branch per example.

  rate: a Python float, or a traced float32 scalar (the rate of a block
  inside a scanned stack). The key comes from the 'drop_path' stream the
  ViT gives each block (`Streams`), else from 'dropout'.
  """
  if not train or (isinstance(rate, (int, float)) and rate == 0.0):
    return x
  # float32 whether the rate is static or traced: the same values either way.
  rate = jnp.asarray(rate, jnp.float32)
  key = rngs.drop_path() if 'drop_path' in rngs else rngs.dropout()
  keep = jax.random.bernoulli(key, 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))


def join_metrics(metrics: dict[str, Any], **parts: dict[str, Any]
                 ) -> dict[str, Any]:
  """`metrics` with the metrics of other parts of a block under
  '<part>/<name>'; their `AUX_LOSS_KEY` entries are summed into the
  returned one (one auxiliary loss per block)."""
  out = dict(metrics)
  for part, values in parts.items():
    for name, value in values.items():
      if name == AUX_LOSS_KEY:
        out[AUX_LOSS_KEY] = out.get(AUX_LOSS_KEY, 0.0) + value
      else:
        out[f'{part}/{name}'] = value
  return out


class MlpBlock(nnx.Module):
  """Transformer MLP: Dense(d->h) -> GELU -> dropout -> Dense(h->d).

  x: [b, n, d] -> y: [b, n, d]. Returns (y, {}) to match the MoE slot signature.
  gelu: 'exact' (erf) or 'tanh' (the approximation of the reference ViT code;
  `model.gelu` selects it for a whole model, see `vmoe.nn.vit`).
  """

  def __init__(self, dim: int, hidden_dim: int, *, dropout_rate: float = 0.0,
               gelu: str = batched_mlp.DEFAULT_GELU, dtype: DType | None = None,
               param_dtype: DType = jnp.float32, rngs: nnx.Rngs):
    bias_init = nnx.initializers.normal(stddev=1e-6)
    self.fc1 = Dense(dim, hidden_dim, axes=('embed', 'mlp'), bias_init=bias_init,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = Dense(hidden_dim, dim, axes=('mlp', 'embed'), bias_init=bias_init,
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dropout_rate = dropout_rate
    self.approximate_gelu = batched_mlp.gelu_approximate(gelu)

  def __call__(self, x: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    # `batched_mlp.mlp` with one MLP over the b*n rows: the same code the
    # experts of an MoE layer run, with its faster hand-written VJP.
    dtype = self.fc1.dtype or x.dtype
    *lead, d = x.shape
    rows = x.reshape(1, -1, d).astype(dtype)
    w1, b1, w2, b2 = (p[...].astype(dtype)[None] for p in (
        self.fc1.kernel, self.fc1.bias, self.fc2.kernel, self.fc2.bias))
    keep = dropout_multiplier(
        self.dropout_rate, dropout_key(self.dropout_rate, train, rngs),
        (1, rows.shape[1], w1.shape[-1]), dtype)
    y = batched_mlp.mlp(rows, w1, b1, w2, b2, keep, self.approximate_gelu)
    return y.reshape(*lead, -1), {}
