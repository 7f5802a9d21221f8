"""Grouped matrix multiplication (the experts of `dispatch='dropless'`).

    out = gmm(lhs [m, k], rhs [e, k, n], group_sizes [e])            # [m, n]

Rows of `lhs` are sorted by group: rows [o_i, o_i + group_sizes[i]) with
o_i = sum(group_sizes[:i]) are multiplied by rhs[i]. Rows past
sum(group_sizes) are padding: their output (and their gradient) is zero.
Empty groups are allowed; sum(group_sizes) <= m is the caller's contract.

Custom VJP (both directions are grouped matmuls again):
  d lhs = gmm(d out, rhs^T)            (rhs transposed inside the kernel)
  d rhs = tgmm(lhs, d out)             d rhs[i] = lhs[rows of i]^T d out[rows of i]

Backends:
  'tpu'     megablox (`jax.experimental.pallas.ops.tpu.megablox.gmm.gmm` and
            `.tgmm`), wrapped, not forked. m is padded to the row tile;
            tiles: rows 128 (or m rounded up to 16 when smaller; a multiple of
            8 f32 / 16 bf16 sublanes), k and n tiles of 512/256/128 lanes when
            the dim is a multiple of 128, else the full dim.
  'triton'  our kernels below. Forward / d lhs: one program per (row tile,
            column tile); the wrapper computes each row tile's first and last
            group (a tile straddles the group boundaries that fall inside it),
            the kernel loops over those groups, masks the rows of each and
            accumulates in f32, skipping empty groups. tgmm: one program per
            (group, k tile, n tile) looping over that group's row tiles.
            Blocks are powers of two >= 16 (Triton's `dot`), loads and stores
            are masked, so no operand is padded in HBM.
  None      the default device's backend; interpreted on a CPU host.

The plain reference is `gmm_reference` (`jax.lax.ragged_dot`).

Axis letters: m rows (token, choice) pairs, k contraction, n output columns,
e groups (experts).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vmoe.kernels import compat

# The kernel module (the package re-exports `gmm`, the op, under this name).
megablox = importlib.import_module(
    'jax.experimental.pallas.ops.tpu.megablox.gmm')

Array = jax.Array


# ----------------------------------------------------------------------------
# Reference.
# ----------------------------------------------------------------------------


def _row_mask(m: int, group_sizes: Array) -> Array:
  """[m, 1] True for rows inside some group (row < sum(group_sizes))."""
  total = jnp.sum(group_sizes)
  return (jnp.arange(m, dtype=jnp.int32) < total)[:, None]


def gmm_reference(lhs: Array, rhs: Array, group_sizes: Array,
                  preferred_element_type: Any = None) -> Array:
  """`jax.lax.ragged_dot` with padding rows set to zero: [m, k] -> [m, n]."""
  out = lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                       preferred_element_type=preferred_element_type)
  return jnp.where(_row_mask(lhs.shape[0], group_sizes), out, 0)


# ----------------------------------------------------------------------------
# Tiles.
# ----------------------------------------------------------------------------


def _tpu_lane_tile(dim: int) -> int:
  """TPU tile of a lane (last) block dim: 512/256/128 dividing dim, else dim."""
  if dim % 128:
    return dim
  for t in (512, 256, 128):
    if dim % t == 0:
      return t
  return dim


def _tpu_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  tm = 128 if m >= 128 else compat.round_up(m, 16)
  return tm, _tpu_lane_tile(k), _tpu_lane_tile(n)


def _triton_tile(dim: int, preferred: int) -> int:
  """Power of two in [16, preferred], no larger than dim needs."""
  return max(16, min(preferred, compat.next_power_of_2(dim)))


def _triton_tiling(m: int, k: int, n: int, e: int, dtype) -> tuple[int, ...]:
  # Fewer rows per tile when groups are short: a tile straddling g groups
  # costs g tile matmuls.
  tm = 128 if m >= 512 * e else 64
  tk = 64 if jnp.dtype(dtype).itemsize <= 2 else 32
  return _triton_tile(m, tm), _triton_tile(k, tk), _triton_tile(n, 128)


# ----------------------------------------------------------------------------
# Triton kernels.
# ----------------------------------------------------------------------------


def _iota(size: int, start) -> Array:
  return start + lax.iota(jnp.int32, size)


def _triton_gmm_kernel(first_ref, last_ref, offsets_ref, lhs_ref, rhs_ref,
                       out_ref, *, m, c, o, tm, tc, to, transpose_rhs):
  """out[row tile i, col tile j] = sum over the tile's groups g of
  lhs[rows of g in the tile] @ rhs[g] (c contracted; rhs [e, c, o] or, with
  transpose_rhs, [e, o, c])."""
  i, j = pl.program_id(0), pl.program_id(1)
  rows = _iota(tm, i * tm)
  cols = _iota(to, j * to)
  col_ok = cols < o

  def group(g, acc):
    start, end = offsets_ref[g], offsets_ref[g + 1]
    row_ok = (rows >= start) & (rows < end)

    def step(kk, acc):
      ks = _iota(tc, kk * tc)
      k_ok = ks < c
      a = compat.triton_load(
          lhs_ref.at[pl.ds(i * tm, tm), pl.ds(kk * tc, tc)],
          mask=row_ok[:, None] & k_ok[None, :], other=0)
      if transpose_rhs:
        b = compat.triton_load(
            rhs_ref.at[g, pl.ds(j * to, to), pl.ds(kk * tc, tc)],
            mask=col_ok[:, None] & k_ok[None, :], other=0)
        dims = (((1,), (1,)), ((), ()))
      else:
        b = compat.triton_load(
            rhs_ref.at[g, pl.ds(kk * tc, tc), pl.ds(j * to, to)],
            mask=k_ok[:, None] & col_ok[None, :], other=0)
        dims = (((1,), (0,)), ((), ()))
      return acc + lax.dot_general(a, b, dims,
                                   preferred_element_type=jnp.float32)

    return lax.cond(end > start,
                    lambda acc: lax.fori_loop(0, pl.cdiv(c, tc), step, acc),
                    lambda acc: acc, acc)

  acc = lax.fori_loop(first_ref[i], last_ref[i] + 1, group,
                      jnp.zeros((tm, to), jnp.float32))
  compat.triton_store(out_ref.at[pl.ds(i * tm, tm), pl.ds(j * to, to)],
                      acc.astype(out_ref.dtype),
                      mask=(rows < m)[:, None] & col_ok[None, :])


def _tile_groups(group_sizes: Array, m: int, tm: int) -> tuple[Array, Array]:
  """([m_tiles] first, [m_tiles] last) group of each row tile.

  last < first for tiles that hold padding rows only (nothing to compute).
  """
  ends = jnp.cumsum(group_sizes)
  total = ends[-1]
  start = jnp.arange(0, m, tm, dtype=jnp.int32)
  last_row = jnp.minimum(start + tm, total) - 1
  first = jnp.searchsorted(ends, start, side='right').astype(jnp.int32)
  last = jnp.searchsorted(ends, last_row, side='right').astype(jnp.int32)
  last = jnp.where(start < total, last, first - 1)
  return first, last


def _offsets(group_sizes: Array) -> Array:
  """[e + 1] first row of each group, then sum(group_sizes)."""
  return jnp.concatenate([jnp.zeros((1,), jnp.int32),
                          jnp.cumsum(group_sizes).astype(jnp.int32)])


def _full_spec(shape):
  return compat.block_spec(tuple(shape), lambda *_: (0,) * len(shape))


def _triton_gmm(lhs, rhs, group_sizes, out_dtype, tiling, interpret,
                transpose_rhs):
  m, c = lhs.shape
  e = rhs.shape[0]
  o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tc, to = tiling or _triton_tiling(m, c, o, e, lhs.dtype)
  first, last = _tile_groups(group_sizes, m, tm)
  kernel = functools.partial(_triton_gmm_kernel, m=m, c=c, o=o, tm=tm, tc=tc,
                             to=to, transpose_rhs=transpose_rhs)
  args = (first, last, _offsets(group_sizes), lhs, rhs)
  return pl.pallas_call(
      kernel,
      out_shape=compat.out_struct((m, o), out_dtype, *args),
      grid=(pl.cdiv(m, tm), pl.cdiv(o, to)),
      in_specs=[_full_spec(a.shape) for a in args],
      out_specs=_full_spec((m, o)),
      compiler_params=compat.triton_params(num_warps=4, num_stages=3),
      interpret=interpret,
      name='gmm_triton',
  )(*args)


def _triton_tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, k, n, tm,
                        tk, tn):
  """out[g, k tile a, n tile b] = lhs[rows of g]^T @ dout[rows of g]."""
  g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[g], offsets_ref[g + 1]
  ks = _iota(tk, a * tk)
  ns = _iota(tn, b * tn)

  def step(t, acc):
    rows = _iota(tm, t * tm)
    ok = ((rows >= start) & (rows < end))[:, None]
    x = compat.triton_load(lhs_ref.at[pl.ds(t * tm, tm), pl.ds(a * tk, tk)],
                           mask=ok & (ks < k)[None, :], other=0)
    dy = compat.triton_load(dout_ref.at[pl.ds(t * tm, tm), pl.ds(b * tn, tn)],
                            mask=ok & (ns < n)[None, :], other=0)
    return acc + lax.dot_general(x, dy, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

  acc = lax.fori_loop(start // tm, pl.cdiv(end, tm), step,
                      jnp.zeros((tk, tn), jnp.float32))
  compat.triton_store(out_ref.at[g, pl.ds(a * tk, tk), pl.ds(b * tn, tn)],
                      acc.astype(out_ref.dtype),
                      mask=(ks < k)[:, None] & (ns < n)[None, :])


def _triton_tgmm(lhs, dout, group_sizes, out_dtype, tiling, interpret):
  m, k = lhs.shape
  n = dout.shape[1]
  e = group_sizes.shape[0]
  if tiling:
    tm, tk, tn = tiling
  else:
    tm = _triton_tile(m, 64 if lhs.dtype.itemsize <= 2 else 32)
    tk, tn = _triton_tile(k, 64), _triton_tile(n, 128)
  kernel = functools.partial(_triton_tgmm_kernel, k=k, n=n, tm=tm, tk=tk,
                             tn=tn)
  args = (_offsets(group_sizes), lhs, dout)
  return pl.pallas_call(
      kernel,
      out_shape=compat.out_struct((e, k, n), out_dtype, *args),
      grid=(e, pl.cdiv(k, tk), pl.cdiv(n, tn)),
      in_specs=[_full_spec(a.shape) for a in args],
      out_specs=_full_spec((e, k, n)),
      compiler_params=compat.triton_params(num_warps=4, num_stages=3),
      interpret=interpret,
      name='tgmm_triton',
  )(*args)


# ----------------------------------------------------------------------------
# TPU (megablox).
# ----------------------------------------------------------------------------


def _pad_rows(x: Array, rows: int) -> Array:
  return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]),
                                                  (0, 0)))


def _tpu_gmm(lhs, rhs, group_sizes, out_dtype, tiling, interpret,
             transpose_rhs):
  m, c = lhs.shape
  o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tiling = tiling or _tpu_tiling(m, c, o)
  mp = compat.round_up(m, tiling[0])
  call = functools.partial(megablox.gmm, preferred_element_type=out_dtype,
                           tiling=tiling, transpose_rhs=transpose_rhs,
                           interpret=interpret)
  out = compat.without_vma(call, _pad_rows(lhs, mp), rhs, group_sizes)
  # megablox leaves rows outside every group unwritten.
  return jnp.where(_row_mask(m, group_sizes), out[:m], 0).astype(out_dtype)


def _tpu_tgmm(lhs, dout, group_sizes, out_dtype, tiling, interpret):
  m, k = lhs.shape
  tiling = tiling or _tpu_tiling(m, k, dout.shape[1])
  mp = compat.round_up(m, tiling[0])
  call = functools.partial(megablox.tgmm, preferred_element_type=out_dtype,
                           tiling=tiling,
                           num_actual_groups=group_sizes.shape[0],
                           interpret=interpret)
  return compat.without_vma(call, _pad_rows(lhs, mp).swapaxes(0, 1),
                            _pad_rows(dout, mp), group_sizes)


# ----------------------------------------------------------------------------
# The differentiable op.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  backend: str
  interpret: Any
  tiling: tuple[int, int, int] | None
  tgmm_tiling: tuple[int, int, int] | None


def _forward(cfg: _Config, lhs, rhs, group_sizes, out_dtype, transpose_rhs):
  fn = _tpu_gmm if cfg.backend == 'tpu' else _triton_gmm
  return fn(lhs, rhs, group_sizes, out_dtype, cfg.tiling, cfg.interpret,
            transpose_rhs)


def _tgmm(cfg: _Config, lhs, dout, group_sizes, out_dtype):
  fn = _tpu_tgmm if cfg.backend == 'tpu' else _triton_tgmm
  return fn(lhs, dout, group_sizes, out_dtype, cfg.tgmm_tiling, cfg.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(cfg: _Config, lhs, rhs, group_sizes):
  return _forward(cfg, lhs, rhs, group_sizes, lhs.dtype, False)


def _gmm_fwd(cfg, lhs, rhs, group_sizes):
  return _gmm(cfg, lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, res, dout):
  lhs, rhs, group_sizes = res
  dout = dout.astype(lhs.dtype)
  dlhs = _forward(cfg, dout, rhs, group_sizes, lhs.dtype, True)
  drhs = _tgmm(cfg, lhs, dout, group_sizes, rhs.dtype)
  # Inside a shard_map: the weights' gradient summed over the devices.
  return compat.sum_to_vma(dlhs, lhs), compat.sum_to_vma(drhs, rhs), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(lhs: Array, rhs: Array, group_sizes: Array, *,
        backend: str | None = None, interpret: Any = None,
        tiling: tuple[int, int, int] | None = None,
        tgmm_tiling: tuple[int, int, int] | None = None) -> Array:
  """Grouped matmul lhs [m, k] x rhs [e, k, n] -> [m, n] (see module doc).

  Args:
    lhs: [m, k] rows sorted by group (float32 or bfloat16).
    rhs: [e, k, n] one matrix per group (cast to lhs's dtype).
    group_sizes: [e] integer rows per group, sum <= m.
    backend: 'tpu' | 'triton' | None (the default device's).
    interpret: run the Pallas interpreter (None: on a CPU host only); for
      'tpu' also a `pltpu.InterpretParams`.
    tiling: (rows, contraction, columns) tiles of the forward and d lhs
      kernels (None: the rules in the module doc).
    tgmm_tiling: (rows, k, n) tiles of the d rhs kernel.

  Returns:
    [m, n] in lhs's dtype (f32 accumulation); rows past sum(group_sizes) are
    zero.
  """
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f'gmm expects lhs [m, k] and rhs [e, k, n], got '
                     f'{lhs.shape} and {rhs.shape}')
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f'gmm group_sizes has shape {group_sizes.shape}, '
                     f'expected ({rhs.shape[0]},)')
  if lhs.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f'gmm supports float32 and bfloat16, got {lhs.dtype}')
  # resolve_for: inside a shard_map on a CPU host the interpreted kernels
  # must be the TPU ones (see compat.resolve_for).
  backend, interpret = compat.resolve_for((lhs, rhs), backend, interpret)
  cfg = _Config(backend, interpret, tiling, tgmm_tiling)
  return _gmm(cfg, lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32))
