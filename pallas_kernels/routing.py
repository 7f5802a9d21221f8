"""Routing kernel: gates, top-k, Batch Priority order and buffer positions.

One Pallas kernel per routing decision of `vmoe.nn.routing`, producing the
same decision pytree (the plain references are `vmoe.nn.routing`'s
`token_choice[_from_gates]` and `expert_choice[_from_gates]`):

  * token choice: per group, the softmax gates over experts, the top-k
    experts of every token (ties to the lower expert index), the Batch
    Priority order (tokens by descending top gate, ties in sequence order: a
    stable sort on -max gate) and the buffer position of every (token,
    choice) pair, choice-major, with the pairs beyond the capacity dropped.
    The BPR order is not sorted: the kernel counts, for every token, the
    tokens served before it that chose the same expert (pairwise compares,
    vectorised, O(s^2 k) per group), which gives the positions directly and
    keeps the whole decision in one kernel without an XLA sort in between.
  * expert choice: per group, the softmax gates and each expert's top-c
    tokens (ties to the lower token index), c passes of a max and a
    lowest-index reduction over the tokens of all experts at once.

Layout: the wrapper transposes the scores to [g, e, s], tokens on the lane
(last) axis, so that the per-token vectors of the kernel ([1, s] rows) are
lane-dense; the outputs come back as [g, k, s] / [g, e, c] and are
transposed to the decision layout. Everything runs in float32; counts are
exact integers in float32 (s < 2^24).

Tiles (one grid step = `bg` whole groups; the grid is over group tiles):
  'tpu'     e padded to a multiple of 8 (sublanes), s to a multiple of 128
            (lanes), k and c kept (full block dims); bg groups per step,
            vectorised ([bg, e, s] arrays), with the double-buffered blocks
            under 2 MB and bg * s <= 8192; pairwise compares in chunks of
            8-128 tokens ([bg, chunk, s] intermediates <= 256 KB of VMEM).
            The group axis is 'parallel' (megacore).
  'triton'  e, s, k, c padded to powers of two (Triton tensors); one group
            per program; chunks with chunk * s <= 2048 elements.
Padded experts get score -inf (never selected), padded tokens are never
served before a real one and never chosen.

Floats: the integer fields (experts, positions, drops, chosen tokens) equal
the reference's whenever the gates do, ties included. The gates themselves
may differ from XLA's softmax in the last bits (XLA:CPU's own softmax differs
by up to a few ulp between two shapes of the same input), so a near-tie of a
few ulp can resolve differently, as it can between two XLA programs.

Gradients: the combine weights are differentiable in the scores (and the
combine gates); the backward is plain XLA (`jax.custom_vjp`), the VJP of the
gather of the selected gates with the decision fixed, as autodiff of the
reference computes it.

Axis letters: g groups, s tokens per group, e experts, c capacity, k choices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from vmoe.kernels import compat
from vmoe.nn import routing as rt

Array = jax.Array
_F32 = jnp.float32
_NEG_INF = float('-inf')


# ----------------------------------------------------------------------------
# Tiles.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Tiles:
  """Padded sizes and tiles of one routing call (all static)."""
  g: int        # groups, padded to a multiple of bg
  e: int        # experts, padded
  s: int        # tokens, padded
  k: int        # choices (token choice) or capacity (expert choice), padded
  bg: int       # groups per grid step
  chunk: int    # tokens per pairwise-compare chunk


def _tiles(backend: str, g: int, s: int, e: int, k: int) -> _Tiles:
  """Tiles for [g, s, e] scores with k outputs per token (or c per expert)."""
  if backend == 'tpu':
    ep, sp, kp = compat.round_up(e, 8), compat.round_up(s, 128), k
    per_group = 2 * 4 * (2 * ep + 3 * max(kp, 8)) * sp  # double-buffered
    bg = max(1, min(_floor_pow2(g), _floor_pow2((2 << 20) // per_group),
                    _floor_pow2(8192 // sp)))
    # [bg, chunk, s] compare intermediates <= 256 KB.
    chunk = max(8, min(128, _floor_pow2(65536 // (sp * bg)), sp))
  else:
    ep, sp, kp = (compat.next_power_of_2(e), compat.next_power_of_2(s),
                  compat.next_power_of_2(k))
    chunk = max(1, min(sp, _floor_pow2(2048 // sp) if sp <= 2048 else 1))
    bg = 1
  return _Tiles(g=compat.round_up(g, bg), e=ep, s=sp, k=kp, bg=bg,
                chunk=chunk)


def _floor_pow2(x: int) -> int:
  return 1 if x < 2 else 1 << (int(x).bit_length() - 1)


def _to_kernel_layout(a: Array, t: _Tiles, fill: float) -> Array:
  """[g, s, e] -> float32 [g', e', s'] (tokens last), padded experts = fill."""
  g, s, e = a.shape
  a = jnp.swapaxes(a.astype(_F32), 1, 2)
  a = jnp.pad(a, ((0, 0), (0, t.e - e), (0, 0)), constant_values=fill)
  return jnp.pad(a, ((0, t.g - g), (0, 0), (0, t.s - s)))


def _compiler_params(backend: str) -> Any:
  if backend == 'tpu':
    return compat.tpu_params(dimension_semantics=('parallel',))
  return compat.triton_params(num_warps=4, num_stages=1)


# ----------------------------------------------------------------------------
# Kernel helpers: [bg, e, s] arrays, tokens on the lane (last) axis, experts
# on sublanes; every reduction is over one axis of one group.
# ----------------------------------------------------------------------------


def _softmax_over_experts(x: Array) -> Array:
  """softmax over axis 1 of [bg, e, s], as `jax.nn.softmax` computes it."""
  u = jnp.exp(x - jnp.max(x, axis=1, keepdims=True))
  return u / jnp.sum(u, axis=1, keepdims=True)


def _select_experts(mask: Array, value: Array) -> Array:
  """sum over axis 1 of where(mask, value, 0): -> [bg, 1, s] (exact when at
  most one entry per token is selected)."""
  return jnp.sum(jnp.where(mask, value, 0.0), axis=1, keepdims=True)


def _zeros_like(x: Array, shape, dtype=_F32) -> Array:
  """Zeros of `shape` computed from x. Loop carries start from these: in
  interpret mode inside a shard_map the kernel is evaluated on values that
  vary along mesh axes, and a carry initialised by a constant would not
  (the interpreter inserts no pvary), which fails the loop's type check."""
  zero = jnp.where(jnp.isnan(x), 0.0, 0.0)
  for axis, (n, m) in enumerate(zip(x.shape, shape)):
    if n != m:  # reductions, not slices (Triton has no slice)
      zero = jnp.max(zero, axis=axis, keepdims=True)
  return jnp.broadcast_to(zero, shape).astype(dtype)


# ----------------------------------------------------------------------------
# Token choice.
# ----------------------------------------------------------------------------


def _token_choice_kernel(*refs, k: int, e: int, s: int, capacity: int,
                         batch_priority: bool, renormalize: bool,
                         softmax: bool, has_combine: bool, chunk: int):
  """Scores [bg, E, S] (+ combine gates) -> experts, positions, weights
  [bg, K, S] for a tile of bg groups (E, S, K the padded sizes)."""
  if has_combine:
    score_ref, combine_ref, index_ref, position_ref, weight_ref = refs
  else:
    score_ref, index_ref, position_ref, weight_ref = refs
    combine_ref = None
  bg, ep, sp = score_ref.shape
  kp = index_ref.shape[1]
  x = score_ref[...]                                             # [bg, E, S]
  gates = _softmax_over_experts(x) if softmax else x
  combine = combine_ref[...] if has_combine else gates
  expert = lax.broadcasted_iota(jnp.int32, (bg, ep, sp), 1).astype(_F32)
  lane = lax.broadcasted_iota(jnp.int32, (bg, 1, sp), 2)
  real = lane < s                                                # [bg, 1, S]

  # Top-k: k passes of a max and the lowest index holding it (padded experts
  # count as taken from the start).
  taken = expert >= e
  index, value, hits = [], [], []
  priority = None
  for _ in range(k):
    masked = jnp.where(taken, _NEG_INF, gates)
    best = jnp.max(masked, axis=1, keepdims=True)                # [bg, 1, S]
    i = jnp.min(jnp.where((masked == best) & ~taken, expert, float(ep)),
                axis=1, keepdims=True)
    i = jnp.minimum(i, float(e - 1))  # NaN rows: a valid index anyway
    hit = expert == i
    if priority is None:
      priority = best  # the top score, before any renormalisation
    index.append(i)
    value.append(_select_experts(hit, combine))
    hits.append(hit)
    taken = taken | hit
  if renormalize:
    total = value[0]
    for v in value[1:]:
      total = total + v
    value = [v / total for v in value]

  # Choice-major queue: the pairs of earlier choices come first, so the base
  # of choice c at expert x counts the real pairs (c' < c, x).
  base, bases = None, []
  for hit in hits:
    bases.append(jnp.zeros((bg, 1, sp), _F32) if base is None
                 else _select_experts(hit, base))                # [bg, 1, S]
    count = jnp.sum(jnp.where(hit & real, 1.0, 0.0), axis=2, keepdims=True)
    base = count if base is None else base + count               # [bg, E, 1]

  # Within one choice: the tokens t' served before t (BPR: higher priority,
  # or equal and earlier; otherwise earlier) that chose the same expert. t'
  # runs over sublane chunks; its values come from the lane vectors by an
  # exact masked reduction (no transpose, no re-computation).
  def count_chunk(j, within):
    row = j * chunk + lax.broadcasted_iota(jnp.int32, (bg, chunk, 1), 1)
    pick = row == lane                                       # [bg, chunk, S]
    if batch_priority:
      p_row = jnp.max(jnp.where(pick, priority, _NEG_INF), axis=2,
                      keepdims=True)
      before = (p_row > priority) | ((p_row == priority) & (row < lane))
    else:
      before = row < lane
    before = before & (row < s)
    out = []
    for c in range(k):
      i_row = jnp.max(jnp.where(pick, index[c], -1.0), axis=2, keepdims=True)
      same = before & (i_row == index[c])
      out.append(within[c] + jnp.sum(jnp.where(same, 1.0, 0.0), axis=1,
                                     keepdims=True))
    return tuple(out)

  zeros = _zeros_like(x, (bg, 1, sp))
  within = lax.fori_loop(0, sp // chunk, count_chunk, (zeros,) * k)

  choice = lax.broadcasted_iota(jnp.int32, (bg, kp, sp), 1)
  index_out = jnp.zeros((bg, kp, sp), jnp.int32)
  position_out = jnp.zeros((bg, kp, sp), jnp.int32)
  weight_out = jnp.zeros((bg, kp, sp), _F32)
  for c in range(k):
    pos = bases[c] + within[c]
    w = jnp.where(pos < capacity, value[c], 0.0)
    row = choice == c
    index_out = jnp.where(row, index[c].astype(jnp.int32), index_out)
    position_out = jnp.where(row, pos.astype(jnp.int32), position_out)
    weight_out = jnp.where(row, w, weight_out)
  index_ref[...] = index_out
  position_ref[...] = position_out
  weight_ref[...] = weight_out


@dataclasses.dataclass(frozen=True)
class _TokenChoiceConfig:
  num_selected: int
  capacity: int
  batch_priority: bool
  renormalize: bool
  softmax: bool
  backend: str
  interpret: Any


def _token_choice_call(scores: Array, combine: Array | None,
                       cfg: _TokenChoiceConfig) -> tuple[Array, ...]:
  """The pallas_call: -> (expert_index, position, combine_weight) [g, s, k]."""
  g, s, e = scores.shape
  k = cfg.num_selected
  t = _tiles(cfg.backend, g, s, e, k)
  inputs = [_to_kernel_layout(scores, t, _NEG_INF)]
  if combine is not None:
    inputs.append(_to_kernel_layout(combine, t, 0.0))
  kernel = functools.partial(
      _token_choice_kernel, k=k, e=e, s=s, capacity=cfg.capacity,
      batch_priority=cfg.batch_priority, renormalize=cfg.renormalize,
      softmax=cfg.softmax, has_combine=combine is not None, chunk=t.chunk)
  in_spec = compat.block_spec((t.bg, t.e, t.s), lambda i: (i, 0, 0))
  out_spec = compat.block_spec((t.bg, t.k, t.s), lambda i: (i, 0, 0))
  out_shape = [compat.out_struct((t.g, t.k, t.s), dt, *inputs)
               for dt in (jnp.int32, jnp.int32, _F32)]
  call = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(t.g // t.bg,),
      in_specs=[in_spec] * len(inputs), out_specs=[out_spec] * 3,
      compiler_params=_compiler_params(cfg.backend),
      interpret=cfg.interpret, name='token_choice_routing')
  outs = call(*inputs)
  return tuple(jnp.swapaxes(o[:g, :k, :s], 1, 2) for o in outs)


def _token_choice_weight(scores: Array, combine: Array | None,
                         expert_index: Array, valid: Array,
                         cfg: _TokenChoiceConfig) -> Array:
  """The combine weights as a differentiable jnp function of the inputs, with
  the decision (expert_index, valid) fixed: the ops of the reference."""
  gates = scores.astype(_F32)
  if cfg.softmax:
    gates = jax.nn.softmax(gates, axis=-1)
  if combine is None:
    iota = jnp.arange(gates.shape[-1], dtype=jnp.int32)
    value = jnp.stack([jnp.sum(jnp.where(iota == expert_index[..., c, None],
                                         gates, 0.0), axis=-1)
                       for c in range(cfg.num_selected)], axis=-1)
  else:
    value = jnp.take_along_axis(combine.astype(_F32), expert_index, axis=-1)
  if cfg.renormalize:
    value = value / jnp.sum(value, axis=-1, keepdims=True)
  return jnp.where(valid, value, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_choice(scores, combine, cfg):
  return _token_choice_call(scores, combine, cfg)


def _token_choice_fwd(scores, combine, cfg):
  expert_index, position, weight = _token_choice_call(scores, combine, cfg)
  valid = position < cfg.capacity
  return (expert_index, position, weight), (scores, combine, expert_index,
                                            valid)


def _token_choice_bwd(cfg, res, cotangents):
  scores, combine, expert_index, valid = res
  _, _, dweight = cotangents
  _, vjp = jax.vjp(lambda a, b: _token_choice_weight(a, b, expert_index,
                                                     valid, cfg),
                   scores, combine)
  return vjp(dweight)


_token_choice.defvjp(_token_choice_fwd, _token_choice_bwd)


def _token_choice_routing(scores, combine, *, softmax, num_selected, capacity,
                          batch_priority, renormalize, backend, interpret):
  if scores.ndim != 3:
    raise ValueError(f'routing scores must be [g, s, e], got {scores.shape}')
  backend, interpret = compat.resolve_for((scores,), backend, interpret)
  cfg = _TokenChoiceConfig(int(num_selected), int(capacity),
                           bool(batch_priority), bool(renormalize), softmax,
                           backend, interpret)
  expert_index, position, weight = _token_choice(
      scores.astype(_F32),
      None if combine is None else combine.astype(_F32), cfg)
  return rt.TokenChoiceRouting(
      expert_index=expert_index, position=position, combine_weight=weight,
      valid=position < cfg.capacity, capacity=cfg.capacity,
      num_experts=int(scores.shape[-1]))


def token_choice_from_logits(
    logits: Array, *, num_selected: int, capacity: int,
    batch_priority: bool = False, renormalize: bool = False,
    backend: str | None = None,
    interpret: Any = None) -> rt.TokenChoiceRouting:
  """`vmoe.nn.routing.token_choice_from_logits` as one kernel: logits
  [g, s, e] -> the [g, s, k] decision (softmax gates, top-k, BPR, positions, drops).

  backend: 'tpu' | 'triton' | None (the default device's); interpret: None =
  interpreted exactly on a CPU host.
  """
  return _token_choice_routing(
      logits, None, softmax=True, num_selected=num_selected,
      capacity=capacity, batch_priority=batch_priority,
      renormalize=renormalize, backend=backend, interpret=interpret)


def token_choice_from_gates(gates: Array, *, num_selected: int, capacity: int,
                            batch_priority: bool = False,
                            renormalize: bool = False,
                            combine_gates: Array | None = None,
                            backend: str | None = None,
                            interpret: Any = None) -> rt.TokenChoiceRouting:
  """`vmoe.nn.routing.token_choice_from_gates` as one kernel: the experts are
  ranked (and BPR prioritised) by `gates` [g, s, e], combined with
  `combine_gates` (None: the gates)."""
  return _token_choice_routing(
      gates, combine_gates, softmax=False, num_selected=num_selected,
      capacity=capacity, batch_priority=batch_priority,
      renormalize=renormalize, backend=backend, interpret=interpret)


# ----------------------------------------------------------------------------
# Expert choice.
# ----------------------------------------------------------------------------


def _expert_choice_kernel(*refs, e: int, s: int, capacity: int, softmax: bool,
                          has_combine: bool):
  """Scores [bg, E, S] (+ combine gates) -> token ids and weights [bg, E, C]:
  c passes, each taking every expert's best remaining token."""
  if has_combine:
    score_ref, combine_ref, token_ref, weight_ref = refs
  else:
    score_ref, token_ref, weight_ref = refs
    combine_ref = None
  bg, ep, sp = score_ref.shape
  cp = token_ref.shape[2]
  x = score_ref[...]                                             # [bg, E, S]
  gates = _softmax_over_experts(x) if softmax else x
  combine = combine_ref[...] if has_combine else gates
  lane = lax.broadcasted_iota(jnp.int32, (bg, ep, sp), 2).astype(_F32)
  slot = lax.broadcasted_iota(jnp.int32, (bg, ep, cp), 2)

  def pick(r, state):
    taken, tokens, weights = state  # taken: 1.0 where already chosen
    free = taken == 0.0
    masked = jnp.where(free, gates, _NEG_INF)
    best = jnp.max(masked, axis=2, keepdims=True)                # [bg, E, 1]
    t = jnp.min(jnp.where((masked == best) & free, lane, float(sp)),
                axis=2, keepdims=True)
    t = jnp.minimum(t, float(s - 1))
    hit = lane == t
    w = jnp.sum(jnp.where(hit, combine, 0.0), axis=2, keepdims=True)
    tokens = jnp.where(slot == r, t.astype(jnp.int32), tokens)
    weights = jnp.where(slot == r, w, weights)
    return jnp.where(hit, 1.0, taken), tokens, weights

  taken = jnp.where(lane >= s, 1.0, _zeros_like(x, (bg, ep, sp)))
  _, tokens, weights = lax.fori_loop(
      0, capacity, pick,
      (taken, _zeros_like(x, (bg, ep, cp), jnp.int32),
       _zeros_like(x, (bg, ep, cp))))
  token_ref[...] = tokens
  weight_ref[...] = weights


@dataclasses.dataclass(frozen=True)
class _ExpertChoiceConfig:
  capacity: int
  softmax: bool
  backend: str
  interpret: Any


def _expert_choice_call(scores: Array, combine: Array | None,
                        cfg: _ExpertChoiceConfig) -> tuple[Array, Array]:
  """The pallas_call: -> (token_index, combine_weight) [g, e, c]."""
  g, s, e = scores.shape
  c = cfg.capacity
  t = _tiles(cfg.backend, g, s, e, c)
  inputs = [_to_kernel_layout(scores, t, _NEG_INF)]
  if combine is not None:
    inputs.append(_to_kernel_layout(combine, t, 0.0))
  kernel = functools.partial(_expert_choice_kernel, e=e, s=s, capacity=c,
                             softmax=cfg.softmax,
                             has_combine=combine is not None)
  in_spec = compat.block_spec((t.bg, t.e, t.s), lambda i: (i, 0, 0))
  out_spec = compat.block_spec((t.bg, t.e, t.k), lambda i: (i, 0, 0))
  call = pl.pallas_call(
      kernel,
      out_shape=[compat.out_struct((t.g, t.e, t.k), jnp.int32, *inputs),
                 compat.out_struct((t.g, t.e, t.k), _F32, *inputs)],
      grid=(t.g // t.bg,), in_specs=[in_spec] * len(inputs),
      out_specs=[out_spec] * 2,
      compiler_params=_compiler_params(cfg.backend),
      interpret=cfg.interpret, name='expert_choice_routing')
  tokens, weights = call(*inputs)
  return tokens[:g, :e, :c], weights[:g, :e, :c]


def _expert_choice_weight(scores, combine, token_index, cfg):
  """Differentiable combine weights with the chosen tokens fixed."""
  source = combine if combine is not None else scores
  source = source.astype(_F32)
  if combine is None and cfg.softmax:
    source = jax.nn.softmax(source, axis=-1)
  return jnp.take_along_axis(jnp.swapaxes(source, 1, 2), token_index,
                             axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _expert_choice(scores, combine, cfg):
  return _expert_choice_call(scores, combine, cfg)


def _expert_choice_fwd(scores, combine, cfg):
  tokens, weights = _expert_choice_call(scores, combine, cfg)
  return (tokens, weights), (scores, combine, tokens)


def _expert_choice_bwd(cfg, res, cotangents):
  scores, combine, tokens = res
  _, dweight = cotangents
  _, vjp = jax.vjp(lambda a, b: _expert_choice_weight(a, b, tokens, cfg),
                   scores, combine)
  return vjp(dweight)


_expert_choice.defvjp(_expert_choice_fwd, _expert_choice_bwd)


def _expert_choice_routing(scores, combine, *, softmax, capacity, backend,
                           interpret):
  if scores.ndim != 3:
    raise ValueError(f'routing scores must be [g, s, e], got {scores.shape}')
  s = scores.shape[1]
  if not 1 <= capacity <= s:
    raise ValueError(f'expert choice capacity={capacity} must be in [1, {s}]')
  backend, interpret = compat.resolve_for((scores,), backend, interpret)
  cfg = _ExpertChoiceConfig(int(capacity), softmax, backend, interpret)
  tokens, weights = _expert_choice(
      scores.astype(_F32),
      None if combine is None else combine.astype(_F32), cfg)
  return rt.ExpertChoiceRouting(token_index=tokens, combine_weight=weights,
                                num_tokens=s)


def expert_choice_from_logits(
    logits: Array, *, capacity: int, backend: str | None = None,
    interpret: Any = None) -> rt.ExpertChoiceRouting:
  """`vmoe.nn.routing.expert_choice_from_logits` as one kernel: logits
  [g, s, e] -> the [g, e, c] decision (softmax gates, each expert's top-c
  tokens)."""
  return _expert_choice_routing(logits, None, softmax=True, capacity=capacity,
                                backend=backend, interpret=interpret)


def expert_choice_from_gates(gates: Array, *, capacity: int,
                             combine_gates: Array | None = None,
                             backend: str | None = None,
                             interpret: Any = None) -> rt.ExpertChoiceRouting:
  """`vmoe.nn.routing.expert_choice_from_gates` as one kernel."""
  return _expert_choice_routing(gates, combine_gates, softmax=False,
                                capacity=capacity, backend=backend,
                                interpret=interpret)
