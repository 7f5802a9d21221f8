"""Encoder blocks as scanned stacks, rematerialisation, and the two layouts.

`model.scan_layers=True` runs runs of identical blocks as one `jax.lax.scan`
over parameters stacked on a leading axis, so XLA compiles one block (or one
unit of a few blocks) instead of every block: compile time stops growing
with depth. The encoder is then a *layout*, a tuple of segments in block
order:

  Single(i)    block i as its own module; parameters 'blocks/{i}/...'
               (the unscanned layout is all singles: 'blocks/0/...', ...).
  Stack(n, start, period, reps)
               blocks start .. start + period * reps - 1 as reps repetitions
               of a unit of `period` consecutive blocks. Unit position j is
               one module whose parameters are stacked, [reps, ...]:
               'stacks/{n}/unit/{j}/...'; block start + t * period + j is its
               repetition t. V-MoE's "every other block" pattern (dense,
               MoE, dense, MoE, ...) is one stack of period 2.

`plan` finds the layout from one signature per block (two blocks may share
a stack position when their module structure and parameter shapes are
equal), so any block kind built by the model's per-index block factory
scans as soon as its repetitions are identical. `to_canonical` /
`from_canonical` convert flat parameter (or optimizer-state) dicts between a
layout and the unscanned one, which is what checkpoints of one layout need
to load into the other.

`model.remat` wraps every block (unscanned) or every unit (scanned) in
`jax.checkpoint` with a policy (`REMAT_POLICIES`): what the backward pass may
keep of the forward instead of recomputing it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Names the blocks tag with `jax.ad_checkpoint.checkpoint_name`, for
# model.remat='save:<names>' (`vmoe.nn.vit.EncoderBlock`).
CHECKPOINT_NAMES = ('qkv', 'attn', 'mlp')
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_no_batch', 'save:<names>')
STACK_AXIS = 'layers'  # logical name of the stacked axis (never sharded)


@dataclasses.dataclass(frozen=True)
class Single:
  index: int

  @property
  def blocks(self) -> tuple[int, ...]:
    return (self.index,)


@dataclasses.dataclass(frozen=True)
class Stack:
  number: int
  start: int
  period: int
  reps: int

  def block(self, t: int, j: int) -> int:
    """The block index of repetition t of unit position j."""
    return self.start + t * self.period + j

  @property
  def blocks(self) -> tuple[int, ...]:
    return tuple(range(self.start, self.start + self.period * self.reps))


Segment = Single | Stack


def plan(signatures: Sequence[Hashable], max_period: int = 4
         ) -> tuple[Segment, ...]:
  """The scanned layout of blocks with these signatures.

  Greedy from the first block: at each block the unit of up to `max_period`
  blocks that repeats over the most blocks (the shortest unit on ties) is a
  stack if it repeats at least twice; otherwise the block is a single.
  E.g. 12 identical blocks: one stack of period 1; V-MoE every-2: one stack
  of period 2; the 6 dense then 6 MoE blocks of Soft MoE B/16: two stacks;
  V-MoE-S/32 last-2 (MoE at 5 and 7 of 8): a stack of blocks 0-4, then 5, 6,
  7 as singles.
  """
  n = len(signatures)
  out: list[Segment] = []
  i = 0
  while i < n:
    best = (1, 1)  # (period, reps)
    for period in range(1, max_period + 1):
      unit = tuple(signatures[i:i + period])
      if len(unit) < period:
        break
      reps = 1
      while tuple(signatures[i + reps * period:i + (reps + 1) * period]) == unit:
        reps += 1
      if reps >= 2 and period * reps > best[0] * best[1]:
        best = (period, reps)
    period, reps = best
    if reps >= 2:
      number = sum(isinstance(s, Stack) for s in out)
      out.append(Stack(number, i, period, reps))
    else:
      out.append(Single(i))
    i += period * reps
  return tuple(out)


def signature(module: nnx.Module) -> Hashable:
  """What two blocks must share to be scanned together: the module graph
  (types, static attributes) and the shapes and dtypes of its variables."""
  graphdef, state = nnx.split(module)
  shapes = tuple((path, tuple(v.shape), str(v.dtype))
                 for path, v in nnx.to_flat_state(state))
  return graphdef, shapes


# ----------------------------------------------------------------------------
# Stacked modules.
# ----------------------------------------------------------------------------


class BlockStack(nnx.Module):
  """`reps` repetitions of a unit of `period` blocks with stacked parameters.

  units[t][j] is block j of repetition t (all with equal `signature`s).
  `unit[j]` holds their variables stacked on a new leading axis (logical
  name 'layers', never sharded); it is a template, called only through
  `scan`.
  """

  def __init__(self, units: Sequence[Sequence[nnx.Module]]):
    templates = []
    for j in range(len(units[0])):
      graphdef, _ = nnx.split(units[0][j])
      states = [nnx.state(unit[j]) for unit in units]
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
      template = nnx.merge(graphdef, stacked)
      for _, var in nnx.to_flat_state(nnx.state(template)):
        axes = var.get_metadata().get('logical_axes')
        if axes is not None:
          var.set_metadata('logical_axes', (STACK_AXIS,) + tuple(axes))
      templates.append(template)
    self.unit = nnx.List(templates)
    self.reps = len(units)

  def scan(self, x: Any, body: Callable, xs: Any = None, *,
           remat: str = 'none') -> tuple[Any, Any]:
    """jax.lax.scan of body(unit, x, t, xs[t]) -> (x, out) over t < reps.

    unit: the list of `period` blocks of repetition t (merged from the
    stacked variables). Returns (x after the last repetition, outs stacked
    [reps, ...]). Variables the blocks change while running are dropped:
    blocks must be pure functions of their parameters.
    """
    graphdef, state = nnx.split(self.unit)

    def step(x, slices):
      state_t, t, xs_t = slices
      return body(nnx.merge(graphdef, state_t), x, t, xs_t)

    step = checkpointed(step, remat, prevent_cse=False)
    return jax.lax.scan(step, x, (state, jnp.arange(self.reps), xs))


def call_block(block: nnx.Module, x: Any, body: Callable, *args,
               remat: str = 'none') -> Any:
  """body(block, x, *args) under the remat policy (unscanned blocks)."""
  if remat == 'none':
    return body(block, x, *args)
  graphdef, state = nnx.split(block)
  fn = lambda state, x, *args: body(nnx.merge(graphdef, state), x, *args)
  return checkpointed(fn, remat)(state, x, *args)


# ----------------------------------------------------------------------------
# Rematerialisation.
# ----------------------------------------------------------------------------


def remat_policy(name: str) -> Callable | None:
  """The `jax.checkpoint` policy of `model.remat` (ValueError if unknown).

  'full': nothing saved but the block's inputs (the whole block forward
    runs again in the backward pass); 'dots': the outputs of every matmul
    are saved (`dots_saveable`), 'dots_no_batch': those without batch
    dimensions, i.e. the projections but not the attention scores
    (`dots_with_no_batch_dims_saveable`); 'save:qkv,attn,mlp': only the
    named values (`save_only_these_names`; `CHECKPOINT_NAMES`: the q/k/v
    projections, the attention branch output, the MLP / MoE branch output).
  """
  policies = jax.checkpoint_policies
  if name == 'full':
    return policies.nothing_saveable
  if name == 'dots':
    return policies.dots_saveable
  if name == 'dots_no_batch':
    return policies.dots_with_no_batch_dims_saveable
  if isinstance(name, str) and name.startswith('save:'):
    names = tuple(n.strip() for n in name[len('save:'):].split(','))
    bad = [n for n in names if n not in CHECKPOINT_NAMES]
    if bad or not names:
      raise ValueError(f'model.remat={name!r}: {bad or "no names"} not among '
                       f'the checkpoint names {CHECKPOINT_NAMES}')
    return policies.save_only_these_names(*names)
  raise ValueError(f'model.remat={name!r} is not one of {REMAT_POLICIES} '
                   f'(names from {CHECKPOINT_NAMES})')


def validate_remat(name: Any) -> None:
  """ValueError naming model.remat unless it is a known policy."""
  if name != 'none':
    remat_policy(name)


def checkpointed(fn: Callable, remat: str, prevent_cse: bool = True
                 ) -> Callable:
  """`fn` under jax.checkpoint with the policy of `remat` ('none': fn)."""
  if remat == 'none':
    return fn
  return jax.checkpoint(fn, policy=remat_policy(remat),
                        prevent_cse=prevent_cse)


# ----------------------------------------------------------------------------
# Layout conversion of flat dicts ('stacks/0/unit/1/attn/qkv_kernel' <->
# 'blocks/3/attn/qkv_kernel'); any prefix (optimizer state) is kept.
# ----------------------------------------------------------------------------

_STACKED = re.compile(r'(^|/)stacks/(\d+)/unit/(\d+)/')
_BLOCK = re.compile(r'(^|/)blocks/(\d+)/')


def is_scanned(names) -> bool:
  """Whether flat names (or a pytree's '/'-joined paths) have stacks."""
  return any(_STACKED.search(n) for n in names)


def to_canonical(flat: dict[str, Any], layout: Sequence[Segment],
                 unstack: Callable[[Any, int], Any]) -> dict[str, Any]:
  """Flat dict of `layout` -> the unscanned layout ('blocks/{i}/...').

  unstack(leaf, t): repetition t of a stacked leaf (e.g. `lambda a, t:
  a[t]` for arrays).
  """
  stacks = {s.number: s for s in layout if isinstance(s, Stack)}
  out = {}
  for name, leaf in flat.items():
    m = _STACKED.search(name)
    if m is None:
      out[name] = leaf
      continue
    stack = stacks.get(int(m[2]))
    if stack is None or int(m[3]) >= stack.period:
      raise ValueError(f'{name}: no such stack position in layout {layout}')
    for t in range(stack.reps):
      block = stack.block(t, int(m[3]))
      out[name[:m.start()] + f'{m[1]}blocks/{block}/' + name[m.end():]] = (
          unstack(leaf, t))
  return out


def from_canonical(flat: dict[str, Any], layout: Sequence[Segment],
                   stack: Callable[[list[Any]], Any]) -> dict[str, Any]:
  """Flat dict of the unscanned layout -> `layout`.

  stack(leaves): the leaves of the repetitions stacked (e.g. np.stack).
  """
  where = {}  # block index -> (stack, position j, repetition t)
  for s in layout:
    if isinstance(s, Stack):
      for t in range(s.reps):
        for j in range(s.period):
          where[s.block(t, j)] = (s, j, t)
  groups: dict[str, list] = {}
  out = {}
  for name, leaf in flat.items():
    m = _BLOCK.search(name)
    if m is None or int(m[2]) not in where:
      out[name] = leaf
      continue
    s, j, t = where[int(m[2])]
    key = (name[:m.start()] + f'{m[1]}stacks/{s.number}/unit/{j}/'
           + name[m.end():])
    groups.setdefault(key, [None] * s.reps)[t] = leaf
  for key, leaves in groups.items():
    if any(leaf is None for leaf in leaves):
      raise ValueError(f'{key}: a repetition is missing from the unscanned '
                       'parameters')
    out[key] = stack(leaves)
  return out


def infer_layout(flat: dict[str, Any]) -> tuple[Segment, ...]:
  """The layout of a flat dict of parameters (or of a whole train state),
  from its names and the leading dimension of its stacked leaves: segments
  are contiguous and in block order, so singles 'blocks/{i}' and stacks
  'stacks/{n}/unit/{j}' [reps, ...] determine where each stack starts."""
  singles = set()
  stacks: dict[int, list[int]] = {}  # number -> [period, reps]
  for name, leaf in flat.items():
    if (m := _BLOCK.search(name)) is not None:
      singles.add(int(m[2]))
    elif (m := _STACKED.search(name)) is not None:
      entry = stacks.setdefault(int(m[2]), [0, 0])
      entry[0] = max(entry[0], int(m[3]) + 1)
      entry[1] = int(leaf.shape[0])
  if sorted(stacks) != list(range(len(stacks))):
    raise ValueError(f'stacks {sorted(stacks)} are not numbered 0..')
  out: list[Segment] = []
  i, number = 0, 0
  while singles or number < len(stacks):
    if i in singles:
      out.append(Single(i))
      singles.discard(i)
      i += 1
    elif number < len(stacks):
      period, reps = stacks[number]
      out.append(Stack(number, i, period, reps))
      i += period * reps
      number += 1
    else:
      raise ValueError(f'blocks {sorted(singles)} leave a gap at block {i}')
  return tuple(out)
