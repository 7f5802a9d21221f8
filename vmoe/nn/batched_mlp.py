"""The MLP of a transformer block as one batched computation with its own VJP.

    y = gelu(x @ w1 + b1) @ w2 + b2        for each of e MLPs (experts) at once

Shapes: x [e, t, d], w1 [e, d, h], b1 [e, h], w2 [e, h, d], b2 [e, d] -> y
[e, t, d] (t rows per MLP). The dense `MlpBlock` is the case e = 1 and the
experts of an MoE layer run their capacity buffers through it, so a dense MLP
and an MoE layer of equal active FLOPs execute the very same code, and the
benchmarks' ratio between them measures routing and dispatch only.

The GELU is the tanh approximation (`approximate=True`, the default here
and `jax.nn.gelu`'s, which vit_jax, big_vision and google-research/vmoe use,
so published weights compute the published function with it) or the exact
erf form (`approximate=False`).

`mlp` has a hand-written VJP; `mlp_reference` is the same function left to
autodiff, kept beside it as the ground truth for tests. The VJP
  * stores the GELU output and its derivative, both from one pass over the
    pre-activations (autodiff of exact GELU recomputes the erf polynomial and
    differentiates it in the backward pass: about 5% of the MLP time on CPU);
  * inside `jax.shard_map`, sums the weight gradients over the mesh axes along
    which the rows vary but the weights do not (autodiff does the same).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array
_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_FORMS = ('tanh', 'exact')
# Every layer's default (MlpBlock, MoeLayer, the ViT, the configs): the
# reference code's form, so benchmarks time the function models train.
DEFAULT_GELU = 'tanh'


def gelu_approximate(form: str) -> bool:
  """'tanh' -> True, 'exact' -> False (the `approximate` flag of jax.nn.gelu);
  raises a one-line ValueError naming `model.gelu` otherwise."""
  if form not in GELU_FORMS:
    raise ValueError(f'model.gelu={form!r} is not one of {GELU_FORMS}')
  return form == 'tanh'


def gelu_and_derivative(x: Array, approximate: bool = True
                        ) -> tuple[Array, Array]:
  """GELU and its derivative from one pass over x, computed in f32.

  Exact: x * Phi(x) and Phi(x) + x * phi(x). Tanh approximation (the same
  operations as `jax.nn.gelu(approximate=True)`, so the values are equal):
  x * t with t = (1 + tanh(u)) / 2, u = sqrt(2/pi) (x + 0.044715 x^3), and
  derivative t + x (1 - tanh(u)^2) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 x^2).
  """
  x32 = x.astype(jnp.float32)
  if approximate:
    th = jnp.tanh(_SQRT_2_OVER_PI * (x32 + 0.044715 * (x32 ** 3)))
    cdf = 0.5 * (1.0 + th)
    dcdf = (0.5 * _SQRT_2_OVER_PI) * (1.0 - th * th) * (
        1.0 + (3 * 0.044715) * x32 * x32)
    return (x32 * cdf).astype(x.dtype), (cdf + x32 * dcdf).astype(x.dtype)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return (x32 * cdf).astype(x.dtype), (cdf + x32 * pdf).astype(x.dtype)


def _rows_times(x: Array, w: Array) -> Array:
  """[e, t, i] x [e, i, o] -> [e, t, o]."""
  return jnp.einsum('eti,eio->eto', x, w)


def mlp_reference(x: Array, w1: Array, b1: Array, w2: Array, b2: Array,
                  keep: Array | None = None, approximate: bool = True
                  ) -> Array:
  """The batched MLP differentiated by autodiff (the reference of `mlp`).

  keep: None, or the [e, t, h] dropout multiplier of the hidden activations
  (0 for dropped units, 1 / (1 - rate) for kept ones).
  approximate: the tanh GELU (True) or the exact one.
  """
  a = jax.nn.gelu(_rows_times(x, w1) + b1[:, None], approximate=approximate)
  if keep is not None:
    a = a * keep
  return _rows_times(a, w2) + b2[:, None]


def mlp(x: Array, w1: Array, b1: Array, w2: Array, b2: Array,
        keep: Array | None = None, approximate: bool = True) -> Array:
  """Batched MLP, [e, t, d] -> [e, t, d]; see the module docstring.

  Same arguments and result as `mlp_reference`, with the faster VJP.
  """
  return _mlp(bool(approximate), x, w1, b1, w2, b2, keep)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mlp(approximate, x, w1, b1, w2, b2, keep):
  return _mlp_fwd(approximate, x, w1, b1, w2, b2, keep)[0]


def _mlp_fwd(approximate, x, w1, b1, w2, b2, keep):
  a, da = gelu_and_derivative(_rows_times(x, w1) + b1[:, None], approximate)
  if keep is not None:
    a, da = a * keep, da * keep
  y = _rows_times(a, w2) + b2[:, None]
  return y, (x, a, da, w1, b1, w2, b2, keep)


def _mlp_bwd(approximate, res, dy):
  del approximate  # da already holds the derivative of the chosen form
  x, a, da, w1, b1, w2, b2, keep = res
  dw2 = jnp.einsum('eth,etd->ehd', a, dy)
  db2 = jnp.sum(dy, axis=1)
  dh = jnp.einsum('etd,ehd->eth', dy, w2) * da     # d pre-activation
  dw1 = jnp.einsum('etd,eth->edh', x, dh)
  db1 = jnp.sum(dh, axis=1)
  dx = jnp.einsum('eth,edh->etd', dh, w1)
  grads = [_sum_over_extra_axes(g, w)
           for g, w in ((dw1, w1), (db1, b1), (dw2, w2), (db2, b2))]
  dkeep = None if keep is None else jnp.zeros_like(keep)
  return (dx, grads[0], grads[1], grads[2], grads[3], dkeep)


_mlp.defvjp(_mlp_fwd, _mlp_bwd)


def _varying_axes(x: Array) -> frozenset:
  """Mesh axes along which x varies inside shard_map (empty outside)."""
  axis_type = getattr(jax.typeof(x), 'manual_axis_type', None)
  return frozenset(getattr(axis_type, 'varying', ()) or ())


def _sum_over_extra_axes(grad: Array, weight: Array) -> Array:
  """psum of a weight gradient over the axes the rows vary along, not w."""
  extra = tuple(sorted(_varying_axes(grad) - _varying_axes(weight)))
  return jax.lax.psum(grad, extra) if extra else grad
