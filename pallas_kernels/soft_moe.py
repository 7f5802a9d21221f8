"""Soft MoE dispatch and combine fused with their routing weights.

Soft MoE (Puigcerver et al. 2023, https://arxiv.org/abs/2308.00951), per group
of s tokens x [g, s, d] and n = e * p slots with parameters phi [n, d]:

    logits[g, s, n] = scale * <x[g, s] / |x[g, s]|, phi[n] / |phi[n]|>
    slots[g, n]     = sum_s softmax_s(logits)[g, s, n] * x[g, s]        dispatch
    y[g, s]         = sum_n softmax_n(logits)[g, s, n] * outputs[g, n]  combine

The XLA path (`vmoe.nn.routing.soft_routing` + `vmoe.nn.dispatch.soft_dispatch
/ soft_combine`) writes the [g, s, n] logits to memory and reads them back
in the dispatch, the combine, the metrics and both backward passes. These
kernels never materialise them: every kernel recomputes its
[tile, tile] block of logits from a tile of tokens (normalised in the kernel)
and a tile of the normalised, scaled slot parameters, like flash attention:

  dispatch  grid (g, slot tiles), loop over token tiles with an online
            softmax over tokens: slots and the per-slot log-sum-exp.
  combine   grid (g, token tiles), loop over slot tiles with an online
            softmax over slots: y, the per-token log-sum-exp and the entropy
            of the combine weights (router metrics, see below).
  backward  custom VJPs recompute the weights from the saved log-sum-exps:
            per op one kernel over token tiles (d x) and one over slot tiles
            (d phi, and d outputs for combine); the per-row corrections
            <d out, out> are one cheap XLA reduction (as flash attention).
            Gradients reach x, phi, scale (phi and scale through the tiny
            [n, d] normalisation, left to XLA autodiff) and the expert
            outputs.

Router metrics. The model reports z_loss = mean(lse_s^2), the mean entropy of
the combine weights and each expert's share of the combine mass; all three
come from small per-token / per-slot statistics (`SoftStats`), never from
[s, n] tensors: `soft_stats(x, phi, scale)` computes them with two light
kernels (logits only: per-token log-sum-exp, differentiable so that the
z-loss trains through it, and entropy; then the per-slot mass against the
final log-sum-exp) and `metric_values` turns them into the model's numbers;
`soft_combine(..., with_stats=True)` returns the same statistics with the
combine (its kernel yields log-sum-exp and entropy for free, the mass kernel
runs after it). Metrics computed by XLA from the logits would bring the
[g, s, n] logits back into memory.

Tile rules (documented choices, tunable by `block_s` / `block_n`):
  'tpu'     128 tokens x 128 slots (multiples of 128: both are the lane dim
            of some logits tile; d is a full block dim). The wrapper pads s
            and n to the tiles (padded tokens / slots get logits -0.7 * f32
            max, finite so an all-padding tile never yields NaN) and d is not
            tiled. Per-token / per-slot statistics travel lane-dense as
            [g, 1, L] rows and are turned into columns in the kernel (a
            diagonal select), never as lane-padded [g, L, 1] arrays.
  'triton'  powers of two >= 16 (`tl.dot`); d is rounded up to a power of
            two d' inside the kernel with masked loads (nothing is padded in
            HBM) and the accumulators hold [tile, d'] f32 values, kept to 32k
            elements, so tiles shrink as d grows: 64 for d' <= 512, 32 for
            d' = 1024, 16 for d' = 2048 (halved again in the kernels with two
            accumulators, down to 16). A starting point to be tuned on the
            GPU (bench/kernels.py), not a measured optimum.
Reductions over d, the softmax statistics and all accumulators are float32;
matmul operands are the activation dtype (bfloat16 activations: bfloat16
operands with float32 accumulation, which for the logits means bf16-rounded
normalised operands where the XLA path forms them in float32).

References: `soft_logits_reference`, `soft_dispatch_reference`,
`soft_combine_reference`, `soft_stats_reference` (plain jnp).

Axis letters: g groups, s tokens per group, n = e * p slots, d model dim.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vmoe.kernels import compat

Array = jax.Array
EPS = 1e-6  # as vmoe.nn.routing.l2_normalize
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


class SoftStats(NamedTuple):
  """Per-token / per-slot statistics of the combine weights.

  token_lse: [g, s] log-sum-exp of each token's slot logits (z-loss).
  token_entropy: [g, s] entropy (nats) of each token's combine weights.
  slot_mass: [g, n] sum over the group's tokens of each slot's combine
    weight.
  """
  token_lse: Array
  token_entropy: Array
  slot_mass: Array


# ----------------------------------------------------------------------------
# References (plain jnp).
# ----------------------------------------------------------------------------


def _l2_normalize(x: Array) -> Array:
  x = x.astype(jnp.float32)
  return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + EPS)


def slot_params(phi: Array, scale: Array) -> Array:
  """[n, d] float32 normalised slot parameters times the scale.

  phi: [n, d] or expert-major [e, p, d] (flattened to n = e * p slots).
  """
  phi = phi.reshape(-1, phi.shape[-1])
  return _l2_normalize(phi) * jnp.asarray(scale, jnp.float32)


def soft_logits_reference(x: Array, phi: Array, scale: Array) -> Array:
  """[g, s, n] float32 slot logits of tokens x [g, s, d]."""
  return jnp.einsum('gsd,nd->gsn', _l2_normalize(x), slot_params(phi, scale))


def soft_dispatch_reference(x: Array, phi: Array, scale: Array) -> Array:
  """slots [g, n, d] = softmax over tokens of the logits, applied to x."""
  w = jax.nn.softmax(soft_logits_reference(x, phi, scale), axis=1)
  return jnp.einsum('gsn,gsd->gnd', w.astype(x.dtype), x)


def soft_stats_reference(logits: Array) -> SoftStats:
  """Combine-weight statistics of [g, s, n] logits."""
  lse = jax.nn.logsumexp(logits, axis=2)
  w = jax.nn.softmax(logits, axis=2)
  entropy = -jnp.sum(jnp.where(w > 0, w * jnp.log(w), 0.0), axis=2)
  return SoftStats(lse, entropy, jnp.sum(w, axis=1))


def soft_combine_reference(x: Array, phi: Array, scale: Array, outputs: Array,
                           with_stats: bool = False):
  """y [g, s, d] = softmax over slots of the logits, applied to outputs."""
  logits = soft_logits_reference(x, phi, scale)
  w = jax.nn.softmax(logits, axis=2)
  y = jnp.einsum('gsn,gnd->gsd', w.astype(outputs.dtype), outputs)
  if not with_stats:
    return y
  stats = soft_stats_reference(logits)
  return y, stats._replace(token_entropy=lax.stop_gradient(stats.token_entropy),
                           slot_mass=lax.stop_gradient(stats.slot_mass))


# ----------------------------------------------------------------------------
# Tile math shared by both backends. Every kernel works on a [to, ti] block of
# logits: `o` the tile of the grid axis (rows), `i` the tile of the reduction
# loop (lanes). Per-row statistics are [to, 1] columns, per-lane ones
# [1, ti] rows.
# ----------------------------------------------------------------------------


def _normalize(x: Array) -> tuple[Array, Array]:
  """Token tile [t, d] -> (x / |x| float32, 1 / |x| [t, 1])."""
  x = x.astype(jnp.float32)
  r = lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + EPS)
  return x * r, r


def _dot(a: Array, b: Array) -> Array:
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _dot_nt(a: Array, b: Array) -> Array:
  """a [r, d] . b [c, d]^T -> [r, c] float32."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _logits(rows: Array, cols: Array, valid: Array, dtype) -> Array:
  """Masked [to, ti] logits of normalised rows [to, d] and cols [ti, d]."""
  l = _dot_nt(rows.astype(dtype), cols.astype(dtype))
  return jnp.where(valid, l, MASK)


def _norm_backward(xn: Array, r: Array, dxn: Array) -> Array:
  """d x of xn = x * r given d xn (all [t, d] float32, r [t, 1])."""
  return r * (dxn - xn * jnp.sum(xn * dxn, axis=-1, keepdims=True))


def _online(m, l, logits):
  """Online-softmax update: (m', l', alpha, p) of a new logits tile."""
  m_new = jnp.maximum(m, jnp.max(logits, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  p = jnp.exp(logits - m_new)
  return m_new, alpha * l + jnp.sum(p, axis=1, keepdims=True), alpha, p


# Each kernel: (outer axis, operands, carries, step, finish, outputs).
# Operands are named; `_Arg.axis` says along which axis ('tok' | 'slot') the
# operand is tiled, `vec` marks [g, L] float32 statistics and `shared` the
# group-independent slot parameters [n, d].


@dataclasses.dataclass(frozen=True)
class _Arg:
  axis: str
  vec: bool = False
  shared: bool = False


@dataclasses.dataclass(frozen=True)
class _Kernel:
  name: str
  outer: str                       # 'tok' | 'slot'
  args: tuple[tuple[str, _Arg], ...]
  carries: tuple[tuple[str, float], ...]  # ('col' | 'mat', initial value)
  outs: tuple[str, ...]            # 'col' | 'mat' per output
  step: Callable
  finish: Callable


def _dispatch_step(o, i, valid, carry, dtype):
  m, l, acc = carry
  logits = _logits(o.pns, _normalize(i.x)[0], valid, dtype)
  m, l, alpha, p = _online(m, l, logits)
  return m, l, alpha * acc + _dot(p.astype(dtype), i.x)


def _dispatch_finish(o, carry, dtype):
  m, l, acc = carry
  return acc / l, m + jnp.log(l)


DISPATCH = _Kernel(
    'soft_dispatch', 'slot',
    (('pns', _Arg('slot', shared=True)), ('x', _Arg('tok'))),
    (('col', -jnp.inf), ('col', 0.0), ('mat', 0.0)),
    ('mat', 'col'), _dispatch_step, _dispatch_finish)


def _combine_step(o, i, valid, carry, dtype):
  m, l, t, acc = carry
  logits = _logits(_normalize(o.x)[0], i.pns, valid, dtype)
  m, l, alpha, p = _online(m, l, logits)
  t = alpha * t + jnp.sum(p * logits, axis=1, keepdims=True)
  return m, l, t, alpha * acc + _dot(p.astype(i.out.dtype), i.out)


def _combine_finish(o, carry, dtype):
  m, l, t, acc = carry
  lse = m + jnp.log(l)
  return acc / l, lse, lse - t / l


COMBINE = _Kernel(
    'soft_combine', 'tok',
    (('x', _Arg('tok')), ('pns', _Arg('slot', shared=True)),
     ('out', _Arg('slot'))),
    (('col', -jnp.inf), ('col', 0.0), ('col', 0.0), ('mat', 0.0)),
    ('mat', 'col', 'col'), _combine_step, _combine_finish)


def _mass_step(o, i, valid, carry, dtype):
  (mass,) = carry
  logits = _logits(o.pns, _normalize(i.x)[0], valid, dtype)
  return (mass + jnp.sum(jnp.exp(logits - i.lse), axis=1, keepdims=True),)


SLOT_MASS = _Kernel(
    'soft_slot_mass', 'slot',
    (('pns', _Arg('slot', shared=True)), ('x', _Arg('tok')),
     ('lse', _Arg('tok', vec=True))),
    (('col', 0.0),), ('col',), _mass_step, lambda o, carry, dtype: carry)


def _stats_step(o, i, valid, carry, dtype):
  m, l, t = carry
  logits = _logits(_normalize(o.x)[0], i.pns, valid, dtype)
  m, l, alpha, p = _online(m, l, logits)
  return m, l, alpha * t + jnp.sum(p * logits, axis=1, keepdims=True)


def _stats_finish(o, carry, dtype):
  m, l, t = carry
  lse = m + jnp.log(l)
  return lse, lse - t / l


TOKEN_STATS = _Kernel(
    'soft_token_stats', 'tok',
    (('x', _Arg('tok')), ('pns', _Arg('slot', shared=True))),
    (('col', -jnp.inf), ('col', 0.0), ('col', 0.0)),
    ('col', 'col'), _stats_step, _stats_finish)


def _stats_dx_step(o, i, valid, carry, dtype):
  # d logits of the log-sum-exp: w * d lse (w = combine weights).
  (dxn,) = carry
  xn, _ = _normalize(o.x)
  dl = jnp.exp(_logits(xn, i.pns, valid, dtype) - o.lse) * o.dlse
  return (dxn + _dot(dl.astype(dtype), i.pns.astype(dtype)),)


STATS_DX = _Kernel(
    'soft_token_stats_dx', 'tok',
    (('x', _Arg('tok')), ('lse', _Arg('tok', vec=True)),
     ('dlse', _Arg('tok', vec=True)), ('pns', _Arg('slot', shared=True))),
    (('mat', 0.0),), ('mat',), _stats_dx_step,
    lambda o, carry, dtype: (_norm_backward(*_normalize(o.x), carry[0]),))


def _stats_dphi_step(o, i, valid, carry, dtype):
  (dpns,) = carry
  xn, _ = _normalize(i.x)
  dl = jnp.exp(_logits(o.pns, xn, valid, dtype) - i.lse) * i.dlse
  return (dpns + _dot(dl.astype(dtype), xn.astype(dtype)),)


STATS_DPHI = _Kernel(
    'soft_token_stats_dphi', 'slot',
    (('pns', _Arg('slot', shared=True)), ('x', _Arg('tok')),
     ('lse', _Arg('tok', vec=True)), ('dlse', _Arg('tok', vec=True))),
    (('mat', 0.0),), ('mat',), _stats_dphi_step,
    lambda o, carry, dtype: carry)


def _dispatch_dx_step(o, i, valid, carry, dtype):
  # Rows: tokens; lanes: slots. w = softmax over tokens (per-slot lse).
  dx, dxn = carry
  xn, _ = _normalize(o.x)
  w = jnp.exp(_logits(xn, i.pns, valid, dtype) - i.lse)
  dl = w * (_dot_nt(o.x, i.dslots) - i.delta)
  return (dx + _dot(w.astype(dtype), i.dslots),
          dxn + _dot(dl.astype(dtype), i.pns.astype(dtype)))


def _dx_finish(o, carry, dtype):
  xn, r = _normalize(o.x)
  return (carry[0] + _norm_backward(xn, r, carry[1]),)


DISPATCH_DX = _Kernel(
    'soft_dispatch_dx', 'tok',
    (('x', _Arg('tok')), ('pns', _Arg('slot', shared=True)),
     ('dslots', _Arg('slot')), ('lse', _Arg('slot', vec=True)),
     ('delta', _Arg('slot', vec=True))),
    (('mat', 0.0), ('mat', 0.0)), ('mat',), _dispatch_dx_step, _dx_finish)


def _dispatch_dphi_step(o, i, valid, carry, dtype):
  # Rows: slots; lanes: tokens.
  (dpns,) = carry
  xn, _ = _normalize(i.x)
  w = jnp.exp(_logits(o.pns, xn, valid, dtype) - o.lse)
  dl = w * (_dot_nt(o.dslots, i.x) - o.delta)
  return (dpns + _dot(dl.astype(dtype), xn.astype(dtype)),)


DISPATCH_DPHI = _Kernel(
    'soft_dispatch_dphi', 'slot',
    (('pns', _Arg('slot', shared=True)), ('dslots', _Arg('slot')),
     ('lse', _Arg('slot', vec=True)), ('delta', _Arg('slot', vec=True)),
     ('x', _Arg('tok'))),
    (('mat', 0.0),), ('mat',), _dispatch_dphi_step,
    lambda o, carry, dtype: carry)


def _combine_dx_step(o, i, valid, carry, dtype):
  # Rows: tokens; lanes: slots. w = softmax over slots (per-token lse).
  (dxn,) = carry
  xn, _ = _normalize(o.x)
  w = jnp.exp(_logits(xn, i.pns, valid, dtype) - o.lse)
  dl = w * (_dot_nt(o.dy, i.out) - o.delta)
  return (dxn + _dot(dl.astype(dtype), i.pns.astype(dtype)),)


def _combine_dx_finish(o, carry, dtype):
  xn, r = _normalize(o.x)
  return (_norm_backward(xn, r, carry[0]),)


COMBINE_DX = _Kernel(
    'soft_combine_dx', 'tok',
    (('x', _Arg('tok')), ('dy', _Arg('tok')), ('lse', _Arg('tok', vec=True)),
     ('delta', _Arg('tok', vec=True)), ('pns', _Arg('slot', shared=True)),
     ('out', _Arg('slot'))),
    (('mat', 0.0),), ('mat',), _combine_dx_step, _combine_dx_finish)


def _combine_dslot_step(o, i, valid, carry, dtype):
  # Rows: slots; lanes: tokens.
  dout, dpns = carry
  xn, _ = _normalize(i.x)
  w = jnp.exp(_logits(o.pns, xn, valid, dtype) - i.lse)
  dl = w * (_dot_nt(o.out, i.dy) - i.delta)
  return (dout + _dot(w.astype(i.dy.dtype), i.dy),
          dpns + _dot(dl.astype(dtype), xn.astype(dtype)))


COMBINE_DSLOT = _Kernel(
    'soft_combine_dslot', 'slot',
    (('pns', _Arg('slot', shared=True)), ('out', _Arg('slot')),
     ('x', _Arg('tok')), ('dy', _Arg('tok')), ('lse', _Arg('tok', vec=True)),
     ('delta', _Arg('tok', vec=True))),
    (('mat', 0.0), ('mat', 0.0)), ('mat', 'mat'), _combine_dslot_step,
    lambda o, carry, dtype: carry)


# ----------------------------------------------------------------------------
# Drivers: the same kernel on TPU (reduction as the last grid axis, carries in
# VMEM scratch) and with Triton (reduction as a loop, carries in registers).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Cfg:
  backend: str
  interpret: Any
  block_s: int | None
  block_n: int | None


def _tiles(cfg: _Cfg, s: int, n: int, d: int, accumulators: int = 1
           ) -> dict[str, int]:
  """{'tok': token tile, 'slot': slot tile} of a kernel with `accumulators`
  [tile, d] float32 carries."""
  if cfg.backend == 'tpu':
    ts, tn = cfg.block_s or 128, cfg.block_n or 128
    for name, t in (('block_s', ts), ('block_n', tn)):
      if t % 128:
        raise ValueError(f'soft_moe {name}={t} must be a multiple of 128 on '
                         'TPU')
    return {'tok': ts, 'slot': tn}
  # Triton: the [tile, d'] float32 accumulators live in registers; keep them
  # to 32k elements (128 per thread at 8 warps).
  t = 32768 // (compat.next_power_of_2(d) * max(1, accumulators))
  t = max(16, min(64, compat.next_power_of_2(t + 1) // 2))
  ts = cfg.block_s or max(16, min(t, compat.next_power_of_2(s)))
  tn = cfg.block_n or max(16, min(t, compat.next_power_of_2(n)))
  for name, v in (('block_s', ts), ('block_n', tn)):
    if v < 16 or v & (v - 1):
      raise ValueError(f'soft_moe {name}={v} must be a power of two >= 16 '
                       'with Triton')
  return {'tok': ts, 'slot': tn}


def _eye(t: int) -> Array:
  return (lax.broadcasted_iota(jnp.int32, (t, t), 0)
          == lax.broadcasted_iota(jnp.int32, (t, t), 1))


def _row_to_col(v: Array) -> Array:
  """[1, t] -> [t, 1] (exact: a diagonal select and a lane sum)."""
  t = v.shape[1]
  return jnp.sum(jnp.where(_eye(t), jnp.broadcast_to(v, (t, t)), 0.0),
                 axis=1, keepdims=True)


def _col_to_row(v: Array) -> Array:
  """[t, 1] -> [1, t]."""
  t = v.shape[0]
  return jnp.sum(jnp.where(_eye(t), jnp.broadcast_to(v, (t, t)), 0.0),
                 axis=0, keepdims=True)


def _call_tpu(k: _Kernel, arrays: dict, lengths: dict, g: int, d: int,
              dtype, out_dtypes, cfg: _Cfg, tiles: dict):
  inner = 'tok' if k.outer == 'slot' else 'slot'
  padded = {a: compat.round_up(lengths[a], tiles[a]) for a in lengths}
  to, ti = tiles[k.outer], tiles[inner]
  n_inner = padded[inner] // ti

  operands, in_specs = [], []
  for name, arg in k.args:
    v = arrays[name]
    axis = 0 if arg.shared else 1
    pad = [(0, 0)] * v.ndim
    pad[axis] = (0, padded[arg.axis] - v.shape[axis])
    v = jnp.pad(v, pad)
    t = tiles[arg.axis]
    on_outer = arg.axis == k.outer

    def tile(o, i, on_outer=on_outer):
      return o if on_outer else i

    if arg.vec:
      v = v[:, None, :]
      spec = pl.BlockSpec((None, 1, t), lambda gi, o, i, f=tile: (gi, 0, f(o, i)))
    elif arg.shared:
      spec = pl.BlockSpec((t, d), lambda gi, o, i, f=tile: (f(o, i), 0))
    else:
      spec = pl.BlockSpec((None, t, d),
                          lambda gi, o, i, f=tile: (gi, f(o, i), 0))
    operands.append(v)
    in_specs.append(spec)

  out_shapes, out_specs = [], []
  for kind, dt in zip(k.outs, out_dtypes):
    if kind == 'mat':
      out_shapes.append(compat.out_struct((g, padded[k.outer], d), dt,
                                          *operands))
      out_specs.append(pl.BlockSpec((None, to, d), lambda gi, o, i: (gi, o, 0)))
    else:
      out_shapes.append(compat.out_struct((g, 1, padded[k.outer]), dt,
                                          *operands))
      out_specs.append(pl.BlockSpec((None, 1, to), lambda gi, o, i: (gi, 0, o)))
  # Column carries live lane-replicated ([to, 128]) in VMEM.
  scratch = [pltpu.VMEM((to, 128) if kind == 'col' else (to, d), jnp.float32)
             for kind, _ in k.carries]
  n_args, n_outs = len(k.args), len(k.outs)
  length_inner = lengths[inner]

  def kernel(*refs):
    in_refs = refs[:n_args]
    out_refs = refs[n_args:n_args + n_outs]
    carry_refs = refs[n_args + n_outs:]
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _init():
      for ref, (_, init) in zip(carry_refs, k.carries):
        ref[...] = jnp.full(ref.shape, init, jnp.float32)

    outer_vals, inner_vals = {}, {}
    for ref, (name, arg) in zip(in_refs, k.args):
      v = ref[...]
      if arg.axis == k.outer:
        outer_vals[name] = _row_to_col(v) if arg.vec else v
      else:
        inner_vals[name] = v
    o_ns = types.SimpleNamespace(**outer_vals)
    i_ns = types.SimpleNamespace(**inner_vals)
    valid = (i * ti + lax.broadcasted_iota(jnp.int32, (1, ti), 1)
             ) < length_inner
    carry = tuple(ref[...][:, :1] if kind == 'col' else ref[...]
                  for ref, (kind, _) in zip(carry_refs, k.carries))
    carry = k.step(o_ns, i_ns, valid, carry, dtype)
    for ref, (kind, _), v in zip(carry_refs, k.carries, carry):
      ref[...] = jnp.broadcast_to(v, ref.shape) if kind == 'col' else v

    @pl.when(i == n_inner - 1)
    def _finish():
      outs = k.finish(o_ns, carry, dtype)
      for ref, kind, v in zip(out_refs, k.outs, outs):
        v = _col_to_row(v) if kind == 'col' else v
        ref[...] = v.astype(ref.dtype)

  outs = pl.pallas_call(
      kernel,
      out_shape=out_shapes,
      grid=(g, padded[k.outer] // to, n_inner), in_specs=in_specs,
      out_specs=out_specs, scratch_shapes=scratch,
      compiler_params=compat.tpu_params(
          dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=cfg.interpret,
      name=k.name,
  )(*operands)
  length = lengths[k.outer]
  return [o[:, :length] if kind == 'mat' else o[:, 0, :length]
          for o, kind in zip(outs, k.outs)]


def _call_triton(k: _Kernel, arrays: dict, lengths: dict, g: int, d: int,
                 dtype, out_dtypes, cfg: _Cfg, tiles: dict):
  inner = 'tok' if k.outer == 'slot' else 'slot'
  to, ti = tiles[k.outer], tiles[inner]
  dp = max(16, compat.next_power_of_2(d))
  operands = []
  for name, arg in k.args:
    v = arrays[name]
    if arg.vec:  # columns on the grid axis, rows on the loop axis
      v = v[:, :, None] if arg.axis == k.outer else v[:, None, :]
    operands.append(v)
  n_args = len(k.args)

  def cols():
    return lax.broadcasted_iota(jnp.int32, (1, dp), 1) < d

  def load(ref, arg, start, t, length, gi):
    if arg.vec and arg.axis == k.outer:
      ok = (start + lax.broadcasted_iota(jnp.int32, (t, 1), 0)) < length
      return compat.triton_load(ref.at[gi, pl.ds(start, t), pl.ds(0, 1)], mask=ok, other=0.0)
    if arg.vec:
      ok = (start + lax.broadcasted_iota(jnp.int32, (1, t), 1)) < length
      return compat.triton_load(ref.at[gi, pl.ds(0, 1), pl.ds(start, t)], mask=ok, other=0.0)
    ok = ((start + lax.broadcasted_iota(jnp.int32, (t, 1), 0)) < length) & cols()
    view = (ref.at[pl.ds(start, t), pl.ds(0, dp)] if arg.shared else
            ref.at[gi, pl.ds(start, t), pl.ds(0, dp)])
    return compat.triton_load(view, mask=ok, other=0)

  def kernel(*refs):
    in_refs, out_refs = refs[:n_args], refs[n_args:]
    # Program ids are read here, outside the loop (the interpreter only
    # substitutes them at the kernel's top level).
    gi, o = pl.program_id(0), pl.program_id(1)
    outer_vals = {name: load(ref, arg, o * to, to, lengths[k.outer], gi)
                  for ref, (name, arg) in zip(in_refs, k.args)
                  if arg.axis == k.outer}
    o_ns = types.SimpleNamespace(**outer_vals)

    def body(i, carry):
      inner_vals = {name: load(ref, arg, i * ti, ti, lengths[inner], gi)
                    for ref, (name, arg) in zip(in_refs, k.args)
                    if arg.axis == inner}
      valid = (i * ti + lax.broadcasted_iota(jnp.int32, (1, ti), 1)
               ) < lengths[inner]
      return k.step(o_ns, types.SimpleNamespace(**inner_vals), valid, carry,
                    dtype)

    init = tuple(jnp.full((to, 1) if kind == 'col' else (to, dp), v,
                          jnp.float32) for kind, v in k.carries)
    carry = lax.fori_loop(0, pl.cdiv(lengths[inner], ti), body, init)
    outs = k.finish(o_ns, carry, dtype)
    rows = (o * to + lax.broadcasted_iota(jnp.int32, (to, 1), 0)
            ) < lengths[k.outer]
    for ref, kind, v in zip(out_refs, k.outs, outs):
      if kind == 'col':
        compat.triton_store(ref.at[gi, pl.ds(o * to, to), pl.ds(0, 1)], v.astype(ref.dtype),
                            mask=rows)
      else:
        compat.triton_store(ref.at[gi, pl.ds(o * to, to), pl.ds(0, dp)], v.astype(ref.dtype),
                            mask=rows & cols())

  length = lengths[k.outer]
  out_shapes = [compat.out_struct((g, length, d if kind == 'mat' else 1), dt,
                                  *operands)
                for kind, dt in zip(k.outs, out_dtypes)]
  full = lambda shape: compat.block_spec(shape, lambda *_: (0,) * len(shape))
  # Matrices in blocks of dp columns, so that the kernel's pl.ds(0, dp) stays
  # inside its block (jax >= 0.12 rejects static slices past a ref's end);
  # the Triton lowering masks the columns past d, the interpreter pads them.
  padded = lambda shape: full((*shape[:-1], dp))
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shapes,
      grid=(g, pl.cdiv(length, to)),
      in_specs=[full(v.shape) if arg.vec else padded(v.shape)
                for v, (_, arg) in zip(operands, k.args)],
      out_specs=[padded(s.shape) if kind == 'mat' else full(s.shape)
                 for s, kind in zip(out_shapes, k.outs)],
      compiler_params=compat.triton_params(num_warps=4 if dp <= 256 else 8,
                                           num_stages=2),
      interpret=cfg.interpret,
      name=k.name,
  )(*operands)
  return [o if kind == 'mat' else o[..., 0] for o, kind in zip(outs, k.outs)]


def _run(k: _Kernel, cfg: _Cfg, arrays: dict, out_dtypes, *, s: int, n: int):
  x = arrays['x']
  g, _, d = x.shape
  tiles = _tiles(cfg, s, n, d,
                 sum(kind == 'mat' for kind, _ in k.carries))
  call = _call_tpu if cfg.backend == 'tpu' else _call_triton
  return call(k, arrays, {'tok': s, 'slot': n}, g, d, x.dtype, out_dtypes,
              cfg, tiles)


# ----------------------------------------------------------------------------
# Differentiable ops on (x, normalised slot parameters pns [n, d] float32).
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(cfg: _Cfg, x: Array, pns: Array) -> Array:
  return _dispatch_fwd(cfg, x, pns)[0]


def _dispatch_fwd(cfg, x, pns):
  s, n = x.shape[1], pns.shape[0]
  slots, lse = _run(DISPATCH, cfg, dict(x=x, pns=pns), (x.dtype, jnp.float32),
                    s=s, n=n)
  return slots, (x, pns, slots, lse)


def _dispatch_bwd(cfg, res, dslots):
  x, pns, slots, lse = res
  s, n = x.shape[1], pns.shape[0]
  dslots = dslots.astype(x.dtype)
  delta = jnp.sum(dslots.astype(jnp.float32) * slots.astype(jnp.float32),
                  axis=-1)
  arrays = dict(x=x, pns=pns, dslots=dslots, lse=lse, delta=delta)
  (dx,) = _run(DISPATCH_DX, cfg, arrays, (x.dtype,), s=s, n=n)
  (dpns,) = _run(DISPATCH_DPHI, cfg, arrays, (jnp.float32,), s=s, n=n)
  # Inside a shard_map the slot parameters are replicated: their gradient is
  # summed over the devices too.
  return (compat.sum_to_vma(dx, x),
          compat.sum_to_vma(jnp.sum(dpns, axis=0), pns))


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _combine(cfg: _Cfg, x: Array, pns: Array, out: Array):
  return _combine_fwd(cfg, x, pns, out)[0]


def _combine_fwd(cfg, x, pns, out):
  s, n = x.shape[1], pns.shape[0]
  y, lse, entropy = _run(COMBINE, cfg, dict(x=x, pns=pns, out=out),
                         (out.dtype, jnp.float32, jnp.float32), s=s, n=n)
  return (y, lse, entropy), (x, pns, out, y, lse)


def _combine_bwd(cfg, res, cotangents):
  x, pns, out, y, lse = res
  dy, dlse, _ = cotangents  # the entropy is a metric (no gradient)
  s, n = x.shape[1], pns.shape[0]
  dy = dy.astype(out.dtype)
  # dl = w * (<dy, out_n> - <dy, y> + dlse): the per-token correction.
  delta = (jnp.sum(dy.astype(jnp.float32) * y.astype(jnp.float32), axis=-1)
           - dlse)
  arrays = dict(x=x, pns=pns, out=out, dy=dy, lse=lse, delta=delta)
  (dx,) = _run(COMBINE_DX, cfg, arrays, (x.dtype,), s=s, n=n)
  dout, dpns = _run(COMBINE_DSLOT, cfg, arrays, (out.dtype, jnp.float32),
                    s=s, n=n)
  return (compat.sum_to_vma(dx, x),
          compat.sum_to_vma(jnp.sum(dpns, axis=0), pns),
          compat.sum_to_vma(dout, out))


_combine.defvjp(_combine_fwd, _combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _token_stats(cfg: _Cfg, x: Array, pns: Array):
  return _token_stats_fwd(cfg, x, pns)[0]


def _token_stats_fwd(cfg, x, pns):
  lse, entropy = _run(TOKEN_STATS, cfg, dict(x=x, pns=pns),
                      (jnp.float32, jnp.float32), s=x.shape[1], n=pns.shape[0])
  return (lse, entropy), (x, pns, lse)


def _token_stats_bwd(cfg, res, cotangents):
  x, pns, lse = res
  dlse, _ = cotangents  # the entropy is a metric (no gradient)
  arrays = dict(x=x, pns=pns, lse=lse, dlse=dlse.astype(jnp.float32))
  s, n = x.shape[1], pns.shape[0]
  (dx,) = _run(STATS_DX, cfg, arrays, (x.dtype,), s=s, n=n)
  (dpns,) = _run(STATS_DPHI, cfg, arrays, (jnp.float32,), s=s, n=n)
  return (compat.sum_to_vma(dx, x),
          compat.sum_to_vma(jnp.sum(dpns, axis=0), pns))


_token_stats.defvjp(_token_stats_fwd, _token_stats_bwd)


def _slot_mass(cfg: _Cfg, x: Array, pns: Array, lse: Array) -> Array:
  """[g, n] combine mass per slot (no gradient)."""
  x, pns, lse = (lax.stop_gradient(v) for v in (x, pns, lse))
  (mass,) = _run(SLOT_MASS, cfg, dict(x=x, pns=pns, lse=lse), (jnp.float32,),
                 s=x.shape[1], n=pns.shape[0])
  return mass


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def _config(backend, interpret, block_s, block_n, operands=()) -> _Cfg:
  # resolve_for: inside a shard_map on a CPU host the interpreted kernels
  # must be the TPU ones (see compat.resolve_for).
  backend, interpret = compat.resolve_for(operands, backend, interpret)
  return _Cfg(backend, interpret, block_s, block_n)


def _check(x: Array, phi: Array, outputs: Array | None = None):
  if x.ndim != 3:
    raise ValueError(f'soft_moe x must be [g, s, d], got shape {x.shape}')
  if phi.shape[-1] != x.shape[-1] or phi.ndim not in (2, 3):
    raise ValueError(f'soft_moe phi must be [n, d] or [e, p, d] with '
                     f'd={x.shape[-1]}, got shape {phi.shape}')
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f'soft_moe supports float32 and bfloat16, got {x.dtype}')
  if outputs is not None:
    n = phi.size // phi.shape[-1]
    if outputs.shape != (x.shape[0], n, x.shape[-1]):
      raise ValueError(f'soft_moe outputs must be [g, n, d] = '
                       f'{(x.shape[0], n, x.shape[-1])}, got {outputs.shape}')


def soft_dispatch(x: Array, phi: Array, scale: Array, *,
                  backend: str | None = None, interpret: Any = None,
                  block_s: int | None = None,
                  block_n: int | None = None) -> Array:
  """slots [g, n, d] = sum_s softmax_s(logits) x, logits never stored.

  Args:
    x: [g, s, d] tokens (float32 or bfloat16).
    phi: [n, d] or [e, p, d] slot parameters.
    scale: [] logit scale.
    backend: 'tpu' | 'triton' | None (the default device's).
    interpret: run the Pallas interpreter (None: on a CPU host only).
    block_s, block_n: token / slot tiles (None: the module's tile rules).
  """
  _check(x, phi)
  cfg = _config(backend, interpret, block_s, block_n, (x,))
  return _dispatch(cfg, x, slot_params(phi, scale))


def soft_combine(x: Array, phi: Array, scale: Array, outputs: Array, *,
                 with_stats: bool = False, backend: str | None = None,
                 interpret: Any = None, block_s: int | None = None,
                 block_n: int | None = None):
  """y [g, s, d] = sum_n softmax_n(logits) outputs, logits never stored.

  Args:
    x: [g, s, d] tokens (the logits are recomputed from them).
    phi, scale: slot parameters and scale, as in `soft_dispatch`.
    outputs: [g, n, d] expert outputs per slot.
    with_stats: also return `SoftStats` (token_lse carries gradients; the
      entropy and slot mass are metrics without gradient).
    backend, interpret, block_s, block_n: as in `soft_dispatch`.

  Returns:
    y [g, s, d] in outputs' dtype, or (y, SoftStats) with with_stats.
  """
  _check(x, phi, outputs)
  cfg = _config(backend, interpret, block_s, block_n, (x, outputs))
  pns = slot_params(phi, scale)
  y, lse, entropy = _combine(cfg, x, pns, outputs)
  if not with_stats:
    return y
  return y, SoftStats(lse, lax.stop_gradient(entropy),
                      _slot_mass(cfg, x, pns, lse))


def soft_stats(x: Array, phi: Array, scale: Array, *,
               backend: str | None = None, interpret: Any = None,
               block_s: int | None = None,
               block_n: int | None = None) -> SoftStats:
  """`SoftStats` of the combine weights without combining anything.

  Two light kernels (logits only): per-token log-sum-exp (differentiable)
  and entropy, then per-slot mass. For router metrics computed before (or
  without) the combine.
  """
  _check(x, phi)
  cfg = _config(backend, interpret, block_s, block_n, (x,))
  pns = slot_params(phi, scale)
  lse, entropy = _token_stats(cfg, x, pns)
  return SoftStats(lse, lax.stop_gradient(entropy),
                   _slot_mass(cfg, x, pns, lse))


def metric_values(stats: SoftStats, num_experts: int
                  ) -> tuple[Array, Array, Array]:
  """(z_loss, router entropy, expert_load [e]) of the model's Soft MoE metrics.

  Equal to `rt.z_loss(logits)`, `rt.entropy(combine weights)` and
  `rt.expert_load(SoftRouting)` of the same logits (slots expert-major).
  """
  g, s = stats.token_lse.shape
  mass = stats.slot_mass.reshape(g, num_experts, -1)
  return (jnp.mean(jnp.square(stats.token_lse)),
          jnp.mean(stats.token_entropy),
          jnp.sum(mass, axis=(0, 2)) / (g * s))


# ----------------------------------------------------------------------------
# The MoE layer's entry points (registry part 'soft', operation
# 'SoftRouting'): decisions carrying the router input and slot parameters.
# ----------------------------------------------------------------------------


def _decision_inputs(r) -> tuple[Array, Array]:
  tokens, pns = getattr(r, 'tokens', None), getattr(r, 'slot_params', None)
  if tokens is None or pns is None:
    raise ValueError('the Soft MoE kernels need a SoftRouting with tokens and '
                     'slot_params (the soft router sets them when '
                     "model.moe.kernels selects 'soft')")
  return tokens, pns


def dispatch(r, x: Array, *, backend: str | None = None,
             interpret: Any = None) -> Array:
  """x [g, s, d] -> expert buffers [e, g, p, d] for a `rt.SoftRouting`.

  The logits are formed from x itself (the tokens entering dispatch, in the
  compute dtype), so the weights and the contraction see the same tokens.
  """
  _, pns = _decision_inputs(r)
  g, _, d = x.shape
  slots = _dispatch(_config(backend, interpret, None, None, (x,)), x, pns)
  return jnp.swapaxes(slots.reshape(g, r.num_experts, -1, d), 0, 1)


def combine(r, outputs: Array, *, backend: str | None = None,
            interpret: Any = None) -> Array:
  """Expert outputs [e, g, p, d] -> tokens [g, s, d] for a `rt.SoftRouting`."""
  tokens, pns = _decision_inputs(r)
  e, g, p, d = outputs.shape
  slots = jnp.swapaxes(outputs, 0, 1).reshape(g, e * p, d)
  y, _, _ = _combine(_config(backend, interpret, None, None, (tokens, slots)),
                     tokens.astype(outputs.dtype), pns, slots)
  return y


def decision_stats(r, *, backend: str | None = None, interpret: Any = None
                   ) -> tuple[Array, Array, Array]:
  """(token_lse [g, s], token_entropy [g, s], slot_mass [g, n]) of a
  `rt.SoftRouting` from the statistics kernels (the `SoftStats` fields; the
  log-sum-exp is differentiable). Per group: computed where the groups are
  (inside the expert-parallel shard_map when the router decides there)."""
  tokens, pns = _decision_inputs(r)
  cfg = _config(backend, interpret, None, None, (tokens,))
  lse, entropy = _token_stats(cfg, tokens, pns)
  return lse, lax.stop_gradient(entropy), _slot_mass(cfg, tokens, pns, lse)


def decision_metrics(r, *, backend: str | None = None, interpret: Any = None
                     ) -> tuple[Array, Array, Array]:
  """(z_loss, router entropy, expert_load [e]) of a `rt.SoftRouting`, from
  its `stats` (or `decision_stats` when it has none; see `metric_values`)."""
  stats = getattr(r, 'stats', None)
  if stats is None:
    stats = decision_stats(r, backend=backend, interpret=interpret)
  return metric_values(SoftStats(*stats), r.num_experts)
