"""Moving tokens to expert buffers and back, for any routing decision.

Expert buffers are expert-major, [e, g, c, d]: every expert's rows are
contiguous, so the experts run as one batched matmul on [e, g*c, d] without a
transpose, and expert parallelism splits the leading axis.

Strategies (identical results for the same decision, up to float rounding):

  * 'einsum': the GShard / V-MoE one-hot contractions with the dense
    [g, s, e, c] dispatch and combine tensors. O(g*s*e*c*d) time and
    O(g*s*e*c) memory; the reference for tests.
  * 'indices' (CPU default): moves rows by index, never building a
    [g, s, e, c] tensor; time and memory are O((g*s*k + g*e*c) * d).
    Token choice uses an inverse map (the pair filling each slot) so that
    dispatch, combine and both their gradients are row gathers (scatter-adds,
    what autodiff of a gather gives, are slower on CPU). Expert choice gathers
    into the buffers and scatter-adds back (a token may sit in several
    buffers). Soft MoE uses two softmax-weighted contractions whose backward
    recomputes the weights from the logits, so the only [g, s, n] tensor kept
    for the backward pass is the logits.
  * 'dropless': (token, choice) pairs sorted by expert and fed to grouped
    matmuls (`jax.lax.ragged_dot`), no [e, g, c, d] buffers. Slow on CPU, where
    ragged_dot costs time proportional to the number of experts.

Every method but 'einsum' can move the tokens with Pallas kernels instead
of the XLA gathers below (`kernels=` = `model.moe.kernels`; the kernels and
their selection live in `pallas_kernels/`).

Axis letters: g groups, s tokens per group, e experts, c capacity, d model
dim, k choices per token, n = e * c slots, m = number of (token, choice) pairs.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vmoe.kernels import registry
from vmoe.nn import routing as rt

Array = jax.Array
METHODS = ('indices', 'einsum', 'dropless')

# expert_fn: [e, g, c, d] -> [e, g, c, d].
ExpertFn = Callable[[Array], Array]
# ragged_fn: (x_sorted [m, d], group_sizes [e], expert_id [m]) -> [m, d].
RaggedFn = Callable[[Array, Array, Array], Array]


def _check_method(method: str):
  if method not in METHODS:
    raise ValueError(f'dispatch method {method!r} is not one of {METHODS}')


def _gather_rows(table: Array, index: Array) -> Array:
  """table[index] for a 2-D table; out-of-range indices give zero rows."""
  return table.at[index].get(mode='fill', fill_value=0)


# Token choice dispatch and combine are gathers in both directions: each
# backward is the gather through the inverse map (instead of the scatter-add
# that autodiff of a gather would produce, which is slow on CPU).


@jax.custom_vjp
def _tc_dispatch(x: Array, slot_token: Array, pair_slot: Array) -> Array:
  """x [g*s, d] -> buffers [e, g, c, d]."""
  return _gather_rows(x, slot_token)


def _tc_dispatch_fwd(x, slot_token, pair_slot):
  return _tc_dispatch(x, slot_token, pair_slot), (pair_slot, slot_token)


def _tc_dispatch_bwd(res, dbuffers):
  pair_slot, slot_token = res
  g, s, k = pair_slot.shape
  d = dbuffers.shape[-1]
  dx = _gather_rows(dbuffers.reshape(-1, d), pair_slot)  # [g, s, k, d]
  dx = dx[:, :, 0] if k == 1 else jnp.sum(dx, axis=2)
  return dx.reshape(g * s, d), None, None


_tc_dispatch.defvjp(_tc_dispatch_fwd, _tc_dispatch_bwd)


@jax.custom_vjp
def _tc_combine(outputs: Array, weight: Array, pair_slot: Array,
                slot_token: Array, slot_pair: Array) -> Array:
  """outputs [e*g*c, d], weight [g, s, k] -> y [g, s, d]."""
  picked = _gather_rows(outputs, pair_slot)  # [g, s, k, d]
  # A weighted sum over k (not a dot): XLA fuses it with the gather.
  return jnp.sum(picked * weight[..., None], axis=2)


def _tc_combine_fwd(outputs, weight, pair_slot, slot_token, slot_pair):
  y = _tc_combine(outputs, weight, pair_slot, slot_token, slot_pair)
  return y, (outputs, weight, pair_slot, slot_token, slot_pair)


def _tc_combine_bwd(res, dy):
  outputs, weight, pair_slot, slot_token, slot_pair = res
  d = dy.shape[-1]
  # d outputs[slot] = weight[pair in slot] * dy[token in slot].
  slot_weight = weight.reshape(-1).at[slot_pair].get(mode='fill',
                                                       fill_value=0)
  doutputs = (_gather_rows(dy.reshape(-1, d), slot_token)
              * slot_weight[..., None])
  # d weight[pair] = <dy[token], outputs[slot of pair]>.
  picked = _gather_rows(outputs, pair_slot)
  dweight = jnp.einsum('gskd,gsd->gsk', picked, dy)
  return (doutputs.reshape(outputs.shape), dweight.astype(weight.dtype),
          None, None, None)


_tc_combine.defvjp(_tc_combine_fwd, _tc_combine_bwd)


# ----------------------------------------------------------------------------
# Soft MoE contractions with a single stored logits tensor.
# ----------------------------------------------------------------------------


def _softmax_vjp(w: Array, dw: Array, axis: int) -> Array:
  """Gradient w.r.t. the logits of w = softmax(logits, axis), given dL/dw."""
  return w * (dw - jnp.sum(w * dw, axis=axis, keepdims=True))


@jax.custom_vjp
def soft_dispatch(logits: Array, x: Array) -> Array:
  """slots[g, n, d] = sum_s softmax_s(logits)[g, s, n] * x[g, s, d].

  Custom VJP: the backward recomputes the softmax from `logits` instead of
  storing it, so the only [g, s, n] residual is the logits array itself
  (shared with `soft_combine`).
  """
  w = jax.nn.softmax(logits, axis=1).astype(x.dtype)
  return jnp.einsum('gsn,gsd->gnd', w, x)


def _soft_dispatch_fwd(logits, x):
  return soft_dispatch(logits, x), (logits, x)


def _soft_dispatch_bwd(res, dslots):
  logits, x = res
  w = jax.nn.softmax(logits, axis=1)
  dx = jnp.einsum('gsn,gnd->gsd', w.astype(dslots.dtype), dslots)
  dw = jnp.einsum('gnd,gsd->gsn', dslots, x,
                  preferred_element_type=jnp.float32)
  dlogits = _softmax_vjp(w, dw, axis=1)
  return dlogits.astype(logits.dtype), dx.astype(x.dtype)


soft_dispatch.defvjp(_soft_dispatch_fwd, _soft_dispatch_bwd)


@jax.custom_vjp
def soft_combine(logits: Array, outputs: Array) -> Array:
  """y[g, s, d] = sum_n softmax_n(logits)[g, s, n] * outputs[g, n, d].

  Custom VJP like `soft_dispatch`: the softmax is recomputed in the backward.
  """
  w = jax.nn.softmax(logits, axis=2).astype(outputs.dtype)
  return jnp.einsum('gsn,gnd->gsd', w, outputs)


def _soft_combine_fwd(logits, outputs):
  return soft_combine(logits, outputs), (logits, outputs)


def _soft_combine_bwd(res, dy):
  logits, outputs = res
  w = jax.nn.softmax(logits, axis=2)
  doutputs = jnp.einsum('gsn,gsd->gnd', w.astype(dy.dtype), dy)
  dw = jnp.einsum('gsd,gnd->gsn', dy, outputs,
                  preferred_element_type=jnp.float32)
  dlogits = _softmax_vjp(w, dw, axis=2)
  return dlogits.astype(logits.dtype), doutputs.astype(outputs.dtype)


soft_combine.defvjp(_soft_combine_fwd, _soft_combine_bwd)


# ----------------------------------------------------------------------------
# Dispatch / combine with capacity buffers.
# ----------------------------------------------------------------------------


def _kernel(kernels: str, method: str, r: rt.Routing):
  """The dispatch / combine kernel module that `kernels` selects for this
  decision (`vmoe.kernels.registry`), or None: the XLA code below. The
  one-hot 'einsum' reference never runs a kernel."""
  if method == 'einsum':
    return None
  part = 'soft' if isinstance(r, rt.SoftRouting) else 'dispatch'
  return registry.lookup(kernels, part, type(r).__name__)


def dispatch(r: rt.Routing, x: Array, method: str = 'indices',
             kernels: str = 'xla') -> Array:
  """Tokens [g, s, d] -> expert buffers [e, g, c, d] (empty slots are zero).

  For 'dropless' this is the 'indices' layout (dropless only differs in
  `moe_apply`, where it skips the buffers). `kernels`: `model.moe.kernels`;
  where it selects a Pallas kernel for this decision, the kernel replaces
  the 'indices' gathers (`vmoe.kernels.registry`).
  """
  _check_method(method)
  kernel = _kernel(kernels, method, r)
  if kernel is not None:
    return kernel.dispatch(r, x)
  g, s, d = x.shape
  if method == 'einsum':
    mask = rt.dense_dispatch(r).astype(x.dtype)
    return jnp.einsum('gsec,gsd->egcd', mask, x)
  if isinstance(r, rt.SoftRouting):
    slots = soft_dispatch(r.logits, x).reshape(g, r.num_experts, -1, d)
    return jnp.swapaxes(slots, 0, 1)
  if isinstance(r, rt.TokenChoiceRouting):
    maps = rt.TokenChoiceSlotMaps.build(r)
    return _tc_dispatch(x.reshape(g * s, d), maps.slot_token, maps.pair_slot)
  if isinstance(r, rt.ExpertChoiceRouting):
    index = rt.expert_major(r.token_index + rt.group_offsets(g, s))
    return _gather_rows(x.reshape(g * s, d), index)
  raise TypeError(f'unknown routing {type(r)}')


def combine(r: rt.Routing, outputs: Array, method: str = 'indices',
            kernels: str = 'xla') -> Array:
  """Expert outputs [e, g, c, d] -> tokens [g, s, d], weighted by the gates.

  Dropped tokens get exactly zero. `kernels`: as in `dispatch`.
  """
  _check_method(method)
  kernel = _kernel(kernels, method, r)
  if kernel is not None:
    return kernel.combine(r, outputs)
  e, g, c, d = outputs.shape
  if method == 'einsum':
    weights = rt.dense_combine(r).astype(outputs.dtype)
    return jnp.einsum('gsec,egcd->gsd', weights, outputs)
  if isinstance(r, rt.SoftRouting):
    slots = jnp.swapaxes(outputs, 0, 1).reshape(g, e * c, d)
    return soft_combine(r.logits, slots)
  if isinstance(r, rt.TokenChoiceRouting):
    maps = rt.TokenChoiceSlotMaps.build(r)
    w = r.combine_weight.astype(outputs.dtype)
    return _tc_combine(outputs.reshape(e * g * c, d), w, maps.pair_slot,
                       maps.slot_token, maps.slot_pair)
  if isinstance(r, rt.ExpertChoiceRouting):
    # A token may sit in several experts' buffers: accumulate (scatter-add).
    s = r.num_tokens
    index = rt.expert_major(r.token_index + rt.group_offsets(g, s))
    w = rt.expert_major(r.combine_weight).astype(outputs.dtype)[..., None]
    y = jnp.zeros((g * s, d), outputs.dtype)
    y = y.at[index.reshape(-1)].add((outputs * w).reshape(-1, d))
    return y.reshape(g, s, d)
  raise TypeError(f'unknown routing {type(r)}')


# ----------------------------------------------------------------------------
# Dropless (sorted pairs + grouped matmul).
# ----------------------------------------------------------------------------


def _dropless_token_choice(r: rt.TokenChoiceRouting, x: Array,
                           ragged_fn: RaggedFn) -> Array:
  g, s, d = x.shape
  k, e = r.expert_index.shape[-1], r.num_experts
  # Dropped pairs get key e and sort to the end, outside every group.
  key = jnp.where(r.valid, r.expert_index, e).reshape(-1)          # [m]
  order = jnp.argsort(key, stable=True)
  token = jnp.broadcast_to(
      (jnp.arange(s, dtype=jnp.int32)[None, :, None]
       + rt.group_offsets(g, s)), (g, s, k)).reshape(-1)
  xs = x.reshape(g * s, d)[token[order]]
  sizes = jnp.sum(jax.nn.one_hot(key, e, dtype=jnp.int32), axis=0)
  ys = ragged_fn(xs, sizes, key[order])
  pair_out = ys[jnp.argsort(order)].reshape(g, s, k, d)
  # Rows of dropped pairs lie outside every group: their content is undefined.
  pair_out = jnp.where(r.valid[..., None], pair_out, 0)
  w = r.combine_weight.astype(ys.dtype)
  return jnp.einsum('gskd,gsk->gsd', pair_out, w)


def _dropless_expert_choice(r: rt.ExpertChoiceRouting, x: Array,
                            ragged_fn: RaggedFn, kernels: str) -> Array:
  g, s, d = x.shape
  e, c = r.num_experts, r.capacity
  # Expert-major rows: [e, g, c] are already sorted by expert.
  index = rt.expert_major(r.token_index + rt.group_offsets(g, s))
  xs = x.reshape(g * s, d)[index.reshape(-1)]
  sizes = jnp.full((e,), g * c, jnp.int32)
  expert_id = jnp.repeat(jnp.arange(e, dtype=jnp.int32), g * c)
  ys = ragged_fn(xs, sizes, expert_id).reshape(e, g, c, d)
  return combine(r, ys, 'indices', kernels)


# ----------------------------------------------------------------------------
# Everything together.
# ----------------------------------------------------------------------------


def moe_apply(r: rt.Routing, x: Array, expert_fn: ExpertFn, *,
              method: str = 'indices',
              ragged_fn: RaggedFn | None = None,
              kernels: str = 'xla') -> Array:
  """Routes x [g, s, d] through the experts and back to [g, s, d].

  Args:
    r: routing decision for x.
    x: [g, s, d] tokens.
    expert_fn: batched experts on buffers, [e, g, c, d] -> [e, g, c, d].
    method: 'indices' | 'einsum' | 'dropless'.
    ragged_fn: experts on expert-sorted rows, needed for 'dropless' with hard
      routers (Soft MoE has no sparse layout; it uses 'indices').
    kernels: `model.moe.kernels` (see `dispatch`).
  """
  _check_method(method)
  if method == 'dropless' and not isinstance(r, rt.SoftRouting):
    if ragged_fn is None:
      raise ValueError("dispatch 'dropless' needs ragged_fn")
    if isinstance(r, rt.TokenChoiceRouting):
      return _dropless_token_choice(r, x, ragged_fn)
    return _dropless_expert_choice(r, x, ragged_fn, kernels)
  buffers = dispatch(r, x, method, kernels)
  return combine(r, expert_fn(buffers), method, kernels)
