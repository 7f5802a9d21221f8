"""Dispatch and combine kernels: tokens to expert buffers and back.

Token choice and expert choice decisions move rows with two kernels,

    gather_rows(table [N, d], index [R, k], weight [R, k] | None) -> [R, d]
        out[r] = sum_j weight[r, j] * table[index[r, j]]
    gather_dot(table [N, d], index [R, k], other [R, d]) -> [R, k] float32
        out[r, j] = <table[index[r, j]], other[r]>

where an index outside [0, N) (an empty slot, a dropped pair) contributes
zero. Every direction is an output-stationary gather through an index map
built from the decision (no scatter, no atomics):

  token choice   dispatch  buffers[slot] = x[token of slot]       k = 1
                 combine   y[t] = sum_k w[t, k] outputs[slot of (t, k)]
                           (the gate multiply fused into the gather)
  expert choice  dispatch  buffers[slot] = x[token of slot]       k = 1
                 combine   y[t] = sum_x w[x, t] outputs[slot of t in x]
                           (k = e: a token sits in 0..e buffers)

and each one's VJP is the other kernel (`jax.custom_vjp`): d x of dispatch
is the combine gather with unit weights, d outputs of combine is the
dispatch gather weighted by the slot's gate, and the combine-weight
gradient is `gather_dot` (d w[t, k] = <dy[t], outputs[slot of (t, k)]>).
The plain references are `vmoe.nn.dispatch.dispatch` / `combine` with
method 'indices' (gathers) and 'einsum' (one-hot contractions); the index
maps are the ones 'indices' uses.

Backends and tiles:
  'tpu'     rows are gathered by DMA: the index block of a grid step sits in
            SMEM (a blocked SMEM input rather than one scalar prefetch of
            the whole map, which would not fit SMEM for large groups), the
            table stays in HBM (`pl.ANY`) and every valid row is one
            `make_async_copy` into a VMEM buffer [k, rows, d]; the step then
            masks the rows that were not copied (a VMEM copy of the index),
            applies the weights in float32 and writes its [rows, d] block.
            Rows per step: a multiple of 8 (32-bit sublanes), at most 256,
            with the buffer under 1 MB; d is the full row. bfloat16 rows are
            moved as int32 words (two bfloat16 each: single-row DMAs of
            packed 16-bit rows would split words) and unpacked in the kernel;
            other 16-bit types go through float32. The row axis is
            'parallel'.
  'triton'  one program per (32 rows, column tile) (gather_dot: per 32
            rows, looping over the column tiles): the row indices are a
            block, the table a raw ref read with masked gathers (rows of
            empty slots are never read); column tile = the largest power of
            two <= 128 dividing d; accumulation in float32.
  None      the default device's backend; interpreted on a CPU host (inside
            a shard_map: the 'tpu' kernels in the TPU interpreter).

Axis letters: g groups, s tokens per group, e experts, c capacity, d model
dim, k choices per token, n = e * g * c buffer rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vmoe.kernels import compat
from vmoe.nn import routing as rt

Array = jax.Array
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Target:
  backend: str
  interpret: Any


# ----------------------------------------------------------------------------
# bfloat16 rows as int32 words (TPU).
# ----------------------------------------------------------------------------


def _pack_bf16(a: Array) -> Array:
  """[N, d] bfloat16 (d even) -> [N, d / 2] int32 (element 2i: low half)."""
  n, d = a.shape
  return lax.bitcast_convert_type(a.reshape(n, d // 2, 2), jnp.int32)


def _unpack_bf16(a: Array) -> Array:
  """[N, d / 2] int32 -> [N, d] bfloat16 (inverse of `_pack_bf16`)."""
  n, w = a.shape
  return lax.bitcast_convert_type(a, jnp.bfloat16).reshape(n, 2 * w)


def _words_to_f32(w: Array) -> tuple[Array, Array]:
  """int32 words -> (even, odd) bfloat16 elements as float32 (exact)."""
  even = lax.bitcast_convert_type(lax.shift_left(w, 16), _F32)
  odd = lax.bitcast_convert_type(w & jnp.int32(-65536), _F32)
  return even, odd


def _f32_to_words(even: Array, odd: Array) -> Array:
  """(even, odd) float32 -> int32 words of two bfloat16, rounded to nearest
  even like a float32 -> bfloat16 conversion."""
  def bits(x):
    u = lax.bitcast_convert_type(x, jnp.int32)
    lsb = lax.shift_right_logical(u, 16) & 1
    r = lax.shift_right_logical(u + 0x7FFF + lsb, 16)
    return jnp.where(x != x, jnp.int32(0x7FC0), r)  # NaN stays a quiet NaN
  return bits(even) | lax.shift_left(bits(odd), 16)


# ----------------------------------------------------------------------------
# TPU kernels: SMEM indices drive one DMA per valid row.
# ----------------------------------------------------------------------------


def _tpu_rows(r: int, k: int, words: int) -> int:
  """Rows per grid step: a multiple of 8, <= 256, with the buffer
  [k, rows, words] under 1 MB."""
  rows = max(8, min(256, _floor_pow2((1 << 20) // (4 * k * words))))
  return min(rows, compat.round_up(r, 8))


def _floor_pow2(x: int) -> int:
  return 1 if x < 2 else 1 << (int(x).bit_length() - 1)


def _tpu_gather_into(index_smem, table_hbm, buf, sem, *, n: int):
  """Starts one row DMA per valid index of this step's block, then waits."""
  rows, k = index_smem.shape

  def start(r, started):
    for j in range(k):
      i = index_smem[r, j]
      ok = (i >= 0) & (i < n)

      @pl.when(ok)
      def _():
        pltpu.make_async_copy(table_hbm.at[pl.ds(i, 1)],
                              buf.at[j, pl.ds(r, 1)], sem.at[0]).start()

      started = started + ok.astype(jnp.int32)
    return started

  started = lax.fori_loop(0, rows, start, jnp.int32(0))

  def wait(_, carry):  # every copy has the same size: any descriptor waits
    pltpu.make_async_copy(table_hbm.at[pl.ds(0, 1)], buf.at[0, pl.ds(0, 1)],
                          sem.at[0]).wait()
    return carry

  lax.fori_loop(0, started, wait, 0)


def _tpu_gather_rows_kernel(*refs, n: int, weighted: bool, packed: bool):
  if weighted:
    index_smem, index_vmem, weight_ref, table_hbm, out_ref, buf, sem = refs
  else:
    index_smem, index_vmem, table_hbm, out_ref, buf, sem = refs
    weight_ref = None
  k = index_smem.shape[1]
  _tpu_gather_into(index_smem, table_hbm, buf, sem, n=n)
  index = index_vmem[...]
  ok = (index >= 0) & (index < n)                                # [rows, k]
  if not weighted and k == 1:  # a pure copy: move the bits
    out_ref[...] = jnp.where(ok[:, 0:1], buf[0], 0).astype(out_ref.dtype)
    return
  weight = weight_ref[...] if weighted else None
  acc = None
  for j in range(k):
    w = jnp.where(ok[:, j:j + 1], 1.0 if weight is None
                  else weight[:, j:j + 1], 0.0)                  # [rows, 1]
    row = buf[j]
    parts = _words_to_f32(row) if packed else (row.astype(_F32),)
    # where(), not a product alone: rows that were not copied hold garbage.
    terms = [jnp.where(w != 0.0, p * w, 0.0) for p in parts]
    acc = terms if acc is None else [a + t for a, t in zip(acc, terms)]
  out_ref[...] = (_f32_to_words(*acc) if packed
                  else acc[0].astype(out_ref.dtype))


def _tpu_gather_dot_kernel(index_smem, index_vmem, other_ref, table_hbm,
                           out_ref, buf, sem, *, n: int, packed: bool):
  rows, k = index_smem.shape
  _tpu_gather_into(index_smem, table_hbm, buf, sem, n=n)
  index = index_vmem[...]
  ok = (index >= 0) & (index < n)
  other = other_ref[...]
  other_parts = _words_to_f32(other) if packed else (other.astype(_F32),)
  col = lax.broadcasted_iota(jnp.int32, (rows, k), 1)
  out = jnp.zeros((rows, k), _F32)
  for j in range(k):
    row = buf[j]
    parts = _words_to_f32(row) if packed else (row.astype(_F32),)
    dot = sum(jnp.sum(p * q, axis=1, keepdims=True)
              for p, q in zip(parts, other_parts))               # [rows, 1]
    out = jnp.where((col == j) & ok[:, j:j + 1], dot, out)
  out_ref[...] = out


def _tpu_table(table: Array) -> tuple[Array, bool, Any]:
  """(rows as 32-bit words, packed?, dtype of the words) for DMA."""
  if table.dtype == jnp.bfloat16 and table.shape[1] % 2 == 0:
    return _pack_bf16(table), True, jnp.int32
  if table.dtype.itemsize == 4:
    return table, False, table.dtype
  return table.astype(_F32), False, _F32


def _pad_rows(a: Array, rows: int, value) -> Array:
  return jnp.pad(a, ((0, rows - a.shape[0]),) + ((0, 0),) * (a.ndim - 1),
                 constant_values=value)


def _tpu_gather_rows(table, index, weight, target: _Target):
  n, d = table.shape
  r, k = index.shape
  words, packed, wdtype = _tpu_table(table)
  dw = words.shape[1]
  rows = _tpu_rows(r, k, dw)
  rp = compat.round_up(r, rows)
  index = _pad_rows(index, rp, -1)
  operands = [index, index]
  in_specs = [pl.BlockSpec((rows, k), lambda i: (i, 0),
                           memory_space=pltpu.SMEM),
              compat.block_spec((rows, k), lambda i: (i, 0))]
  if weight is not None:
    operands.append(_pad_rows(weight.astype(_F32), rp, 0.0))
    in_specs.append(compat.block_spec((rows, k), lambda i: (i, 0)))
  operands.append(words)
  in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
  out_dtype = wdtype if (packed or weight is None and k == 1) else _F32
  call = pl.pallas_call(
      functools.partial(_tpu_gather_rows_kernel, n=n,
                        weighted=weight is not None, packed=packed),
      out_shape=compat.out_struct((rp, dw), out_dtype, *operands),
      grid=(rp // rows,), in_specs=in_specs,
      out_specs=compat.block_spec((rows, dw), lambda i: (i, 0)),
      scratch_shapes=[pltpu.VMEM((k, rows, dw), wdtype),
                      pltpu.SemaphoreType.DMA((1,))],
      compiler_params=compat.tpu_params(dimension_semantics=('parallel',)),
      interpret=target.interpret, name='gather_rows')
  out = call(*operands)[:r]
  if packed:
    return _unpack_bf16(out)
  return out.astype(table.dtype)


def _tpu_gather_dot(table, index, other, target: _Target):
  n, d = table.shape
  r, k = index.shape
  words, packed, wdtype = _tpu_table(table)
  if packed:
    other_words = _pack_bf16(other.astype(jnp.bfloat16))
  else:
    other_words = other.astype(wdtype)
  dw = words.shape[1]
  rows = _tpu_rows(r, k, dw)
  rp = compat.round_up(r, rows)
  index = _pad_rows(index, rp, -1)
  other_words = _pad_rows(other_words, rp, 0)
  call = pl.pallas_call(
      functools.partial(_tpu_gather_dot_kernel, n=n, packed=packed),
      out_shape=compat.out_struct((rp, k), _F32, index, other_words, words),
      grid=(rp // rows,),
      in_specs=[pl.BlockSpec((rows, k), lambda i: (i, 0),
                             memory_space=pltpu.SMEM),
                compat.block_spec((rows, k), lambda i: (i, 0)),
                compat.block_spec((rows, dw), lambda i: (i, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=compat.block_spec((rows, k), lambda i: (i, 0)),
      scratch_shapes=[pltpu.VMEM((k, rows, dw), wdtype),
                      pltpu.SemaphoreType.DMA((1,))],
      compiler_params=compat.tpu_params(dimension_semantics=('parallel',)),
      interpret=target.interpret, name='gather_dot')
  out = call(index, index, other_words, words)
  return out[:r]


# ----------------------------------------------------------------------------
# Triton kernels: masked gathers of row tiles.
# ----------------------------------------------------------------------------


_TRITON_ROWS = 32


def _column_tile(d: int) -> int:
  """Largest power of two <= 128 dividing d."""
  return min(128, d & -d)


def _triton_gather(table_ref, index, ok, d0, cols: int):
  """Rows table[index] of columns [d0, d0 + cols) as float32 [rows, cols];
  rows where not ok are zero and never read."""
  col = d0 + lax.broadcasted_iota(jnp.int32, (1, cols), 1)
  safe = jnp.where(ok, index, 0)[:, None]
  mask = jnp.broadcast_to(ok[:, None], (index.shape[0], cols))
  rows = compat.triton_load(table_ref.at[safe, col], mask=mask, other=0)
  return rows.astype(_F32)


def _triton_gather_rows_kernel(*refs, n: int, k: int, weighted: bool):
  if weighted:
    index_ref, weight_ref, table_ref, out_ref = refs
  else:
    index_ref, table_ref, out_ref = refs
    weight_ref = None
  rows, cols = out_ref.shape
  d0 = pl.program_id(1) * cols
  acc = jnp.zeros((rows, cols), _F32)
  for j in range(k):
    index = index_ref[:, j]
    ok = (index >= 0) & (index < n)
    got = _triton_gather(table_ref, index, ok, d0, cols)
    if weighted:
      got = got * weight_ref[:, j][:, None]
    acc = acc + got
  out_ref[...] = acc.astype(out_ref.dtype)


def _triton_gather_dot_kernel(index_ref, other_ref, table_ref, out_ref, *,
                              n: int, k: int, d: int, cols: int):
  rows, kp = out_ref.shape
  r0 = pl.program_id(0) * rows
  slot = lax.broadcasted_iota(jnp.int32, (rows, kp), 1)
  out = jnp.zeros((rows, kp), _F32)
  for j in range(k):
    index = index_ref[:, j]
    ok = (index >= 0) & (index < n)
    dot = None
    for t in range(d // cols):  # static: d / cols <= 10 for ViT widths
      got = _triton_gather(table_ref, index, ok, t * cols, cols)
      other = other_ref[pl.ds(r0, rows), pl.ds(t * cols, cols)].astype(_F32)
      part = jnp.sum(got * other, axis=1)
      dot = part if dot is None else dot + part
    out = jnp.where(slot == j, dot[:, None], out)
  out_ref[...] = out


def _triton_index(index: Array, rp: int) -> Array:
  """[R, k] -> [rp, k'] with k' a power of two; padding = -1 (no row)."""
  r, k = index.shape
  kp = compat.next_power_of_2(k)
  return jnp.pad(index, ((0, rp - r), (0, kp - k)), constant_values=-1)


def _triton_gather_rows(table, index, weight, target: _Target):
  n, d = table.shape
  r, k = index.shape
  rows, cols = _TRITON_ROWS, _column_tile(d)
  rp = compat.round_up(r, rows)
  index_p = _triton_index(index, rp)
  kp = index_p.shape[1]
  operands = [index_p]
  in_specs = [compat.block_spec((rows, kp), lambda i, j: (i, 0))]
  if weight is not None:
    operands.append(jnp.pad(weight.astype(_F32), ((0, rp - r), (0, kp - k))))
    in_specs.append(compat.block_spec((rows, kp), lambda i, j: (i, 0)))
  operands.append(table)
  in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
  call = pl.pallas_call(
      functools.partial(_triton_gather_rows_kernel, n=n, k=k,
                        weighted=weight is not None),
      out_shape=compat.out_struct((rp, d), table.dtype, *operands),
      grid=(rp // rows, d // cols), in_specs=in_specs,
      out_specs=compat.block_spec((rows, cols), lambda i, j: (i, j)),
      compiler_params=compat.triton_params(num_warps=4, num_stages=1),
      interpret=target.interpret, name='gather_rows')
  out = call(*operands)
  return out[:r]


def _triton_gather_dot(table, index, other, target: _Target):
  n, d = table.shape
  r, k = index.shape
  rows, cols = _TRITON_ROWS, _column_tile(d)
  rp = compat.round_up(r, rows)
  index_p = _triton_index(index, rp)
  kp = index_p.shape[1]
  other_p = _pad_rows(other.astype(table.dtype), rp, 0)
  call = pl.pallas_call(
      functools.partial(_triton_gather_dot_kernel, n=n, k=k, d=d, cols=cols),
      out_shape=compat.out_struct((rp, kp), _F32, index_p, other_p, table),
      grid=(rp // rows,),
      in_specs=[compat.block_spec((rows, kp), lambda i: (i, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=compat.block_spec((rows, kp), lambda i: (i, 0)),
      compiler_params=compat.triton_params(num_warps=4, num_stages=1),
      interpret=target.interpret, name='gather_dot')
  out = call(index_p, other_p, table)
  return out[:r, :k]


# ----------------------------------------------------------------------------
# The two primitives.
# ----------------------------------------------------------------------------


def gather_rows(table: Array, index: Array, weight: Array | None = None, *,
                backend: str | None = None, interpret: Any = None) -> Array:
  """out[r] = sum_j weight[r, j] * table[index[r, j]]: [N, d] -> [R, d].

  index [R, k] int32; entries outside [0, N) contribute zero (exactly). No
  weight: a plain sum (for k = 1 a bit-exact copy). Accumulates in float32;
  the output has the table's dtype. Not differentiable by itself (the
  dispatch / combine functions below define the VJPs).
  """
  backend, interpret = compat.resolve_for((table, index), backend, interpret)
  target = _Target(backend, interpret)
  index = index.astype(jnp.int32)
  if backend == 'tpu':
    return _tpu_gather_rows(table, index, weight, target)
  return _triton_gather_rows(table, index, weight, target)


def gather_dot(table: Array, index: Array, other: Array, *,
               backend: str | None = None, interpret: Any = None) -> Array:
  """out[r, j] = <table[index[r, j]], other[r]>: -> [R, k] float32.

  table [N, d], index [R, k] int32 (outside [0, N): zero), other [R, d].
  """
  backend, interpret = compat.resolve_for((table, index, other), backend,
                                          interpret)
  target = _Target(backend, interpret)
  index = index.astype(jnp.int32)
  if backend == 'tpu':
    return _tpu_gather_dot(table, index, other, target)
  return _triton_gather_dot(table, index, other, target)


def _rows(target: _Target, table, index, weight=None):
  return gather_rows(table, index, weight, backend=target.backend,
                     interpret=target.interpret)


def _dots(target: _Target, table, index, other):
  return gather_dot(table, index, other, backend=target.backend,
                    interpret=target.interpret)


# ----------------------------------------------------------------------------
# Dispatch (both decisions): its VJP is the combine gather with weight 1.
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dispatch(target, x, slot_token, token_slots):
  """x [g*s, d] -> buffer rows [n, d]; token_slots [g*s, k or e]: the slots
  holding each token (n marks none), for the backward."""
  return _rows(target, x, slot_token)


def _dispatch_fwd(target, x, slot_token, token_slots):
  return _dispatch(target, x, slot_token, token_slots), (slot_token,
                                                         token_slots)


def _dispatch_bwd(target, res, dbuffers):
  slot_token, token_slots = res
  # d x[t] = sum over the buffers holding t: the combine gather, weight 1.
  return _rows(target, dbuffers, token_slots), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


# ----------------------------------------------------------------------------
# Token choice combine: its VJP is the weighted dispatch gather.
# ----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tc_combine(target, outputs, weight, pair_slot, slot_token, slot_pair):
  """outputs [n, d], weight [g*s, k] -> y [g*s, d]."""
  return _rows(target, outputs, pair_slot, weight)


def _tc_combine_fwd(target, outputs, weight, pair_slot, slot_token,
                    slot_pair):
  y = _tc_combine(target, outputs, weight, pair_slot, slot_token, slot_pair)
  return y, (outputs, weight, pair_slot, slot_token, slot_pair)


def _tc_combine_bwd(target, res, dy):
  outputs, weight, pair_slot, slot_token, slot_pair = res
  # d outputs[slot] = weight of the pair in slot * dy[token in slot]: the
  # dispatch gather weighted by the slot's gate.
  slot_weight = weight.reshape(-1).at[slot_pair].get(mode='fill',
                                                       fill_value=0)
  doutputs = _rows(target, dy, slot_token, slot_weight)
  # d weight[t, k] = <outputs[slot of (t, k)], dy[t]>.
  dweight = _dots(target, outputs, pair_slot, dy)
  return doutputs, dweight.astype(weight.dtype), None, None, None


_tc_combine.defvjp(_tc_combine_fwd, _tc_combine_bwd)


def _tc_maps(r: rt.TokenChoiceRouting):
  """Index maps of the 'indices' dispatch (`rt.TokenChoiceSlotMaps`), as
  [rows, k]."""
  g, s, k = r.expert_index.shape
  maps = rt.TokenChoiceSlotMaps.build(r)
  return (maps.pair_slot.reshape(g * s, k), maps.slot_token.reshape(-1, 1),
          maps.slot_pair.reshape(-1, 1))


# ----------------------------------------------------------------------------
# Expert choice.
# ----------------------------------------------------------------------------


def _ec_maps(r: rt.ExpertChoiceRouting):
  """(slot_token [n, 1], token_slot [g*s, e]) for expert-major buffer rows
  (x * g + g_i) * c + slot; g*s / n mark 'none'."""
  g, e, c = r.token_index.shape
  s = r.num_tokens
  gi = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  xi = jnp.arange(e, dtype=jnp.int32)[None, :, None]
  slot_token = jnp.swapaxes(r.token_index + gi * s, 0, 1).reshape(-1, 1)
  row = (xi * g + gi) * c + jnp.arange(c, dtype=jnp.int32)       # [g, e, c]
  n = e * g * c
  token_slot = jnp.full((g, s, e), n, jnp.int32).at[
      jnp.broadcast_to(gi, (g, e, c)), r.token_index,
      jnp.broadcast_to(xi, (g, e, c))].set(row, unique_indices=True)
  return slot_token, token_slot.reshape(g * s, e)


def _ec_token_weight(token_slot: Array, slot_weight: Array) -> Array:
  """[g*s, e] weight of each (token, expert) from the slot weights [n]."""
  return slot_weight.at[token_slot].get(mode='fill', fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ec_combine(target, outputs, slot_weight, slot_token, token_slot):
  """outputs [n, d], slot_weight [n] -> y [g*s, d]."""
  return _rows(target, outputs, token_slot,
               _ec_token_weight(token_slot, slot_weight))


def _ec_combine_fwd(target, outputs, slot_weight, slot_token, token_slot):
  y = _ec_combine(target, outputs, slot_weight, slot_token, token_slot)
  return y, (outputs, slot_weight, slot_token, token_slot)


def _ec_combine_bwd(target, res, dy):
  outputs, slot_weight, slot_token, token_slot = res
  doutputs = _rows(target, dy, slot_token, slot_weight[:, None])
  dweight = _dots(target, dy, slot_token, outputs)[:, 0]
  return doutputs, dweight.astype(slot_weight.dtype), None, None


_ec_combine.defvjp(_ec_combine_fwd, _ec_combine_bwd)


# ----------------------------------------------------------------------------
# Public entry points (the `vmoe.nn.dispatch` signatures).
# ----------------------------------------------------------------------------


def _target(backend, interpret, *operands) -> _Target:
  return _Target(*compat.resolve_for(operands, backend, interpret))


def dispatch(r: rt.Routing, x: Array, *, backend: str | None = None,
             interpret: Any = None) -> Array:
  """Tokens [g, s, d] -> expert buffers [e, g, c, d] (empty slots zero), for
  token-choice and expert-choice decisions."""
  target = _target(backend, interpret, x)
  g, s, d = x.shape
  e, c = r.num_experts, r.capacity
  x2 = x.reshape(g * s, d)
  if isinstance(r, rt.TokenChoiceRouting):
    pair_slot, slot_token, _ = _tc_maps(r)
    rows = _dispatch(target, x2, slot_token, pair_slot)
  elif isinstance(r, rt.ExpertChoiceRouting):
    slot_token, token_slot = _ec_maps(r)
    rows = _dispatch(target, x2, slot_token, token_slot)
  else:
    raise TypeError(f'no dispatch kernel for {type(r).__name__}')
  return rows.reshape(e, g, c, d)


def combine(r: rt.Routing, outputs: Array, *, backend: str | None = None,
            interpret: Any = None) -> Array:
  """Expert outputs [e, g, c, d] -> tokens [g, s, d], weighted by the gates
  (dropped tokens get exactly zero)."""
  target = _target(backend, interpret, outputs)
  e, g, c, d = outputs.shape
  rows = outputs.reshape(e * g * c, d)
  if isinstance(r, rt.TokenChoiceRouting):
    s = r.expert_index.shape[1]
    pair_slot, slot_token, slot_pair = _tc_maps(r)
    w = r.combine_weight.reshape(g * s, -1)
    y = _tc_combine(target, rows, w, pair_slot, slot_token, slot_pair)
  elif isinstance(r, rt.ExpertChoiceRouting):
    s = r.num_tokens
    slot_token, token_slot = _ec_maps(r)
    w = jnp.swapaxes(r.combine_weight, 0, 1).reshape(-1)
    y = _ec_combine(target, rows, w, slot_token, token_slot)
  else:
    raise TypeError(f'no combine kernel for {type(r).__name__}')
  return y.reshape(g, s, d)
