"""Routing decisions as pure functions of router logits: the shared math.

A router (`vmoe.nn.routers`, one registered unit per algorithm) owns
parameters and produces logits; the functions here turn logits (or scores)
into a routing *decision*: a small pytree saying which token goes to which
slot of which expert buffer and with which combine weight. Dispatchers
(`vmoe.nn.dispatch`) consume decisions; nothing here moves tokens, and
nothing here knows which router called it.

Axis letters: g groups, s tokens per group, e experts, c capacity (slots per
expert), d model dim, k choices per token, n = e * c slots in a group.

Decisions:
  * `token_choice_from_logits` / `token_choice_from_gates`: top-k experts per
    token with a per-expert capacity, tokens over capacity dropped; optional
    Batch Priority Routing (V-MoE, Riquelme et al. 2021,
    https://arxiv.org/abs/2106.05974; GShard, Lepikhin et al. 2020; Switch,
    Fedus et al. 2021).
  * `expert_choice_from_logits` / `expert_choice_from_gates`: each expert
    picks its top-c tokens (Zhou et al. 2022,
    https://arxiv.org/abs/2202.09368).
  * `soft_routing`: Soft MoE slot logits (Puigcerver et al. 2023,
    https://arxiv.org/abs/2308.00951); dispatch = softmax over tokens,
    combine = softmax over slots.

Index maps of token choice decisions (`TokenChoiceSlotMaps`), dense one-hot
tensors (tests and analysis), and the auxiliary losses: `importance_loss`,
`load_loss` (V-MoE appendix A), `balance_loss` (GShard / Switch), `z_loss`
(ST-MoE, Zoph et al. 2022).

All router math runs in float32 whatever the activation dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

Array = jax.Array


# ----------------------------------------------------------------------------
# Decisions.
# ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenChoiceRouting:
  """Top-k token-choice assignment.

  Attributes:
    expert_index: [g, s, k] int32, expert chosen by each (token, choice).
    position: [g, s, k] int32, slot inside that expert's buffer. Meaningful only
      where `valid`; dropped pairs hold their would-be position (>= capacity).
    combine_weight: [g, s, k] float32, gate value used to combine the expert
      output; exactly zero where the pair was dropped.
    valid: [g, s, k] bool, the pair fits in the expert's capacity.
    capacity: static int c, buffer size per expert and group.
    num_experts: static int e.
  """
  expert_index: Array
  position: Array
  combine_weight: Array
  valid: Array
  capacity: int = dataclasses.field(metadata=dict(static=True))
  num_experts: int = dataclasses.field(metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertChoiceRouting:
  """Expert-choice assignment: every slot of every expert holds one token.

  Attributes:
    token_index: [g, e, c] int32, token (within its group) placed in each slot.
    combine_weight: [g, e, c] float32, gate of that token for that expert.
    num_tokens: static int s (tokens per group).
  """
  token_index: Array
  combine_weight: Array
  num_tokens: int = dataclasses.field(metadata=dict(static=True))

  @property
  def capacity(self) -> int:
    return self.token_index.shape[-1]

  @property
  def num_experts(self) -> int:
    return self.token_index.shape[-2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SoftRouting:
  """Soft MoE routing: only the slot logits are stored.

  Both weight tensors derive from the same logits (dispatch = softmax over s,
  combine = softmax over slots), so keeping the logits alone lets the
  dispatcher hold a single [g, s, n] tensor.

  With the fused Soft MoE kernels (`model.moe.kernels` selecting 'soft', see
  `pallas_kernels/soft_moe.py`) the decision also carries what the kernels
  form the logits from, and `logits` is then never read (jit drops it):

  Attributes:
    logits: [g, s, n] float32 with n = e * p slots, expert-major.
    num_experts: static int e; slots per expert p = n / e.
    tokens: None, or [g, s, d] the router's input x.
    slot_params: None, or [n, d] float32 l2-normalised phi times the scale
      (no group axis: replicated across devices, see REPLICATED_FIELDS).
    stats: None, or the kernels' combine-weight statistics per group
      (token_lse [g, s], token_entropy [g, s], slot_mass [g, n]): the router
      metrics without the logits.
  """
  logits: Array
  num_experts: int = dataclasses.field(metadata=dict(static=True))
  tokens: Array | None = None
  slot_params: Array | None = None
  stats: tuple[Array, Array, Array] | None = None

  # Fields without a leading group axis (`group_partition_specs`).
  REPLICATED_FIELDS = ('slot_params',)

  @property
  def capacity(self) -> int:
    return self.logits.shape[-1] // self.num_experts

  def dispatch_weights(self) -> Array:
    """[g, s, n]: softmax over the tokens of the group, per slot."""
    return jax.nn.softmax(self.logits, axis=1)

  def combine_weights(self) -> Array:
    """[g, s, n]: softmax over all slots, per token."""
    return jax.nn.softmax(self.logits, axis=2)


Routing = Union[TokenChoiceRouting, ExpertChoiceRouting, SoftRouting]


def group_partition_specs(tree, batch_spec):
  """PartitionSpecs of a pytree of per-group arrays (and decisions) for a
  shard_map: `batch_spec` for every leaf but those of the fields a decision
  lists in REPLICATED_FIELDS (no group axis), which are replicated (P())."""
  replicated = jax.sharding.PartitionSpec()

  def is_decision(node):
    return hasattr(type(node), 'REPLICATED_FIELDS')

  def specs(node):
    if not is_decision(node):
      return jax.tree.map(lambda _: batch_spec, node)
    return dataclasses.replace(node, **{
        f.name: jax.tree.map(
            lambda _, name=f.name: (replicated
                                    if name in node.REPLICATED_FIELDS
                                    else batch_spec), getattr(node, f.name))
        for f in dataclasses.fields(node) if not f.metadata.get('static')})

  return jax.tree.map(specs, tree, is_leaf=is_decision)


# ----------------------------------------------------------------------------
# Capacity.
# ----------------------------------------------------------------------------


CAPACITY_ROUNDINGS = ('ceil', 'round')


def compute_capacity(num_tokens: int, num_experts: int, *,
                     capacity_factor: float | None = None,
                     num_selected: int = 1,
                     capacity: int | None = None,
                     multiple: int | None = None,
                     rounding: str = 'ceil') -> int:
  """Per-expert buffer size c for one group.

  c = ceil(k * s * capacity_factor / e) ('ceil') or Python's round of it
  ('round': half to even, the float product evaluated left to right), then
  rounded up to a multiple of `multiple` (if given); an explicit `capacity`
  overrides the formula. This is google-research/vmoe's `compute_capacity`
  with num_tokens = s * k: like it, 'round' raises a ValueError when the
  rounded capacity is below 1 (before rounding up to the multiple). The
  result is at most s: an expert receives each token at most once (top-k
  picks distinct experts; expert choice picks distinct tokens), so a larger
  buffer could never be filled.
  """
  if capacity is None:
    if capacity_factor is None:
      raise ValueError('either capacity or capacity_factor must be given')
    target = num_tokens * num_selected * capacity_factor / num_experts
    if rounding == 'ceil':
      capacity = math.ceil(target)
    elif rounding == 'round':
      capacity = int(round(target))
    else:
      raise ValueError(f'model.moe.capacity_rounding={rounding!r} is not one '
                       f'of {CAPACITY_ROUNDINGS}')
    if capacity < 1 and rounding == 'round':
      raise ValueError(
          f'model.moe.capacity_factor={capacity_factor} with '
          f"model.moe.capacity_rounding='round', {num_tokens} tokens, "
          f'{num_experts} experts and k={num_selected} rounds to capacity '
          f'{capacity}; it must be >= 1')
    if multiple and multiple > 1:
      capacity = -(-capacity // multiple) * multiple
  return int(max(1, min(capacity, num_tokens)))


# ----------------------------------------------------------------------------
# Token choice.
# ----------------------------------------------------------------------------


def add_gating_noise(logits: Array, noise_std: float, rng: Array) -> Array:
  """logits [g, s, e] + noise_std * N(0, 1), in float32 (V-MoE noisy gating).

  rng: one key for the whole array, or [b] keys, one per example of the
  batch whose b * n tokens the g * s rows are (tokens in batch order, as
  `vmoe.nn.moe.MoeLayer` groups them). Per-example keys make the noise of
  an example independent of the rest of the batch, so a step over
  micro-batches (`config.grad_accum_steps`) draws the very noise of the
  step over the whole batch.
  """
  logits = logits.astype(jnp.float32)
  if jnp.ndim(rng) == 0:
    noise = jax.random.normal(rng, logits.shape, jnp.float32)
  else:
    g, s, e = logits.shape
    b = rng.shape[0]
    if (g * s) % b:
      raise ValueError(f'{b} per-example keys for {g * s} tokens')
    noise = jax.vmap(lambda key: jax.random.normal(
        key, (g * s // b, e), jnp.float32))(rng).reshape(g, s, e)
  return logits + noise_std * noise


def top_k(x: Array, k: int) -> tuple[Array, Array]:
  """(values, indices) of the k largest entries of the last axis, [..., k].

  Same result as `jax.lax.top_k` (ties go to the lower index; the gradient
  reaches the selected entries only). For k <= 4 it runs k passes of two
  plain reductions each (the max, then the lowest index holding it), O(k * e):
  XLA:CPU sometimes lowers `lax.top_k` on a [g, s, e] array to a full sort of
  the expert axis (30x slower at e=256), and `argmax`, a reduction over
  (value, index) pairs, does not vectorise (3x slower than the two passes).
  """
  if k > 4:
    return jax.lax.top_k(x, k)
  e = x.shape[-1]
  iota = jnp.arange(e, dtype=jnp.int32)
  values, indices = [], []
  masked, taken = x, jnp.zeros(x.shape, jnp.bool_)
  for i in range(k):
    best = jnp.max(jax.lax.stop_gradient(masked), axis=-1, keepdims=True)
    # Earlier winners are excluded explicitly: masking them to -inf alone
    # would let them win again in rows with fewer than k finite entries.
    index = jnp.min(jnp.where((masked == best) & ~taken, iota, e), axis=-1)
    index = jnp.minimum(index, e - 1)  # NaN rows: a valid index all the same
    hit = iota == index[..., None]
    values.append(jnp.sum(jnp.where(hit, x, 0.0), axis=-1))
    indices.append(index)
    if i + 1 < k:  # mask the winner out for the next pass
      masked = jnp.where(hit, -jnp.inf, masked)
      taken = taken | hit
  return jnp.stack(values, axis=-1), jnp.stack(indices, axis=-1)


# Above this many experts `queue_positions` sorts instead of counting with a
# one-hot running sum: the one-hot costs O(m * e), the sort O(m log m), and
# with a one-hot the routing time would grow with the number of experts.
SORT_POSITIONS_MIN_EXPERTS = 64


def queue_positions(queue: Array, num_experts: int,
                    method: str | None = None) -> Array:
  """[g, m] expert ids in serving order -> [g, m] buffer positions.

  position[g, i] = number of j < i with queue[g, j] == queue[g, i].

  Args:
    queue: [g, m] int expert ids (m = k * s pairs, choice-major).
    num_experts: e.
    method: 'one_hot' (running count of a [g, m, e] one-hot, O(m * e)) or
      'sort' (stable sort by expert, rank inside each run, O(m log m));
      None picks 'sort' from SORT_POSITIONS_MIN_EXPERTS experts on.
  """
  g, m = queue.shape
  if method is None:
    method = ('sort' if num_experts >= SORT_POSITIONS_MIN_EXPERTS
              else 'one_hot')
  if method == 'one_hot':
    one_hot = jax.nn.one_hot(queue, num_experts, dtype=jnp.int32)  # [g, m, e]
    return jnp.sum(jnp.cumsum(one_hot, axis=1) * one_hot, axis=-1) - 1
  if method != 'sort':
    raise ValueError(f'queue_positions method={method!r} is not one of '
                     "'one_hot', 'sort'")
  # A stable sort keeps serving order inside each expert's run; the rank of
  # an entry in its run is its index minus the index where the run starts.
  order = jnp.argsort(queue, axis=-1, stable=True)
  sorted_queue = jnp.take_along_axis(queue, order, axis=-1)
  index = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (g, m))
  starts = jnp.concatenate(
      [jnp.ones((g, 1), jnp.bool_),
       sorted_queue[:, 1:] != sorted_queue[:, :-1]], axis=1)
  run_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  gi = jnp.arange(g)[:, None]
  return jnp.zeros((g, m), jnp.int32).at[gi, order].set(index - run_start)


def token_choice_from_logits(logits: Array, *, num_selected: int,
                             capacity: int, batch_priority: bool = False,
                             renormalize: bool = False) -> TokenChoiceRouting:
  """Top-k token choice with capacity (V-MoE / GShard / Switch).

  Gates are softmax(logits) over experts; see `token_choice_from_gates`.

  Args:
    logits: [g, s, e] router logits (already noisy in training).
    num_selected: k.
    capacity: c, slots per expert and group.
    batch_priority: serve tokens by descending max gate instead of position.
    renormalize: divide the k selected gates by their sum (before dropping).

  Returns:
    A `TokenChoiceRouting` with [g, s, k] fields.
  """
  gates = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return token_choice_from_gates(gates, num_selected=num_selected,
                                 capacity=capacity,
                                 batch_priority=batch_priority,
                                 renormalize=renormalize)


def token_choice_from_gates(gates: Array, *, num_selected: int, capacity: int,
                            batch_priority: bool = False,
                            renormalize: bool = False,
                            combine_gates: Array | None = None
                            ) -> TokenChoiceRouting:
  """Top-k token choice on given routing scores (softmax gates, a plan, ...).

  Each token picks the k experts with the largest `gates`. Buffer positions
  are assigned choice-major: every token's 1st choice is placed before any
  2nd choice, and so on. Within one choice rank tokens are served in sequence
  order, or, with Batch Priority Routing (V-MoE, Sec. 4), in descending order
  of their top score, so the least confident tokens are the ones dropped when
  an expert is full. Pairs beyond `capacity` are dropped.

  Args:
    gates: [g, s, e] float32 scores that rank the experts of each token and
      give the BPR priority (the token's largest score).
    num_selected: k.
    capacity: c, slots per expert and group.
    batch_priority: serve tokens by descending max score instead of position.
    renormalize: divide the k selected combine weights by their sum (before
      dropping).
    combine_gates: [g, s, e] combine weights of the selected pairs (None: the
      `gates` themselves). Sinkhorn routing ranks by the transport plan and
      combines with the softmax gates, as google-research/vmoe does.

  Returns:
    A `TokenChoiceRouting` with [g, s, k] fields.
  """
  g, s, e = gates.shape
  k = num_selected
  top_gate, expert_index = top_k(gates, k)  # [g, s, k]
  priority = top_gate[..., 0]  # max score, before any renormalisation
  if combine_gates is not None:
    top_gate = jnp.take_along_axis(combine_gates.astype(jnp.float32),
                                   expert_index, axis=-1)
  if renormalize:
    top_gate = top_gate / jnp.sum(top_gate, axis=-1, keepdims=True)

  # Serving order of tokens within each group.
  if batch_priority:
    # Stable sort on -max_gate keeps sequence order among exact ties.
    order = jnp.argsort(-priority, axis=-1, stable=True)
    served = jnp.take_along_axis(expert_index, order[..., None], axis=1)
  else:
    order = None
    served = expert_index

  # [g, k, s] -> [g, k*s]: choice-major queue; a running count per expert
  # gives each pair its buffer position.
  queue = jnp.swapaxes(served, 1, 2).reshape(g, k * s)
  position = queue_positions(queue, e)                          # [g, k*s]
  position = jnp.swapaxes(position.reshape(g, k, s), 1, 2)      # [g, s, k]

  if batch_priority:
    # Back from serving order to sequence order: the i-th served token is
    # token order[i] (a scatter; inverting the permutation would sort again).
    gi = jnp.arange(g)[:, None]
    position = jnp.zeros_like(position).at[gi, order].set(
        position, unique_indices=True)

  valid = position < capacity
  return TokenChoiceRouting(
      expert_index=expert_index.astype(jnp.int32),
      position=position.astype(jnp.int32),
      combine_weight=jnp.where(valid, top_gate, 0.0),
      valid=valid,
      capacity=int(capacity),
      num_experts=int(e))


# ----------------------------------------------------------------------------
# Expert choice.
# ----------------------------------------------------------------------------


def expert_choice_from_logits(logits: Array, *,
                              capacity: int) -> ExpertChoiceRouting:
  """Expert choice routing (Zhou et al. 2022, https://arxiv.org/abs/2202.09368).

  Gates are softmax(logits) over experts; see `expert_choice_from_gates`.

  Args:
    logits: [g, s, e] router logits.
    capacity: c <= s, tokens per expert (see `compute_capacity`, which uses
      c = ceil(s * capacity_factor / e)).

  Returns:
    An `ExpertChoiceRouting` with [g, e, c] fields.
  """
  gates = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return expert_choice_from_gates(gates, capacity=capacity)


def expert_choice_from_gates(gates: Array, *, capacity: int,
                             combine_gates: Array | None = None
                             ) -> ExpertChoiceRouting:
  """Each expert takes its top-`capacity` tokens by `gates`.

  Ties are broken by the lower token index. A token can be chosen by 0..e
  experts.

  Args:
    gates: [g, s, e] float32 scores (softmax gates, a transport plan, ...).
    capacity: c in [1, s], tokens per expert.
    combine_gates: [g, s, e] combine weights of the chosen pairs (None: the
      `gates` themselves).

  Returns:
    An `ExpertChoiceRouting` with [g, e, c] fields.
  """
  g, s, e = gates.shape
  if not 1 <= capacity <= s:
    raise ValueError(f'expert choice capacity={capacity} must be in [1, {s}]')
  weight, token_index = jax.lax.top_k(jnp.swapaxes(gates, 1, 2), capacity)
  if combine_gates is not None:
    weight = jnp.take_along_axis(
        jnp.swapaxes(combine_gates.astype(jnp.float32), 1, 2), token_index,
        axis=-1)
  return ExpertChoiceRouting(token_index=token_index.astype(jnp.int32),
                             combine_weight=weight, num_tokens=s)


# ----------------------------------------------------------------------------
# Soft MoE.
# ----------------------------------------------------------------------------


def l2_normalize(x: Array, axis: int, eps: float = 1e-6) -> Array:
  """x / ||x|| along `axis` (float32)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def soft_routing(x: Array, phi: Array, scale: Array) -> SoftRouting:
  """Soft MoE slot logits (Puigcerver et al. 2023, Sec. 2 and 2.3).

  logits[g, s, n] = scale * <x[g, s] / |x[g, s]|, phi[n] / |phi[n]|>.
  Normalising both sides and learning a scalar scale keeps the logits in a
  sane range when the model dimension grows.

  Args:
    x: [g, s, d] tokens.
    phi: [e, p, d] slot parameters (p slots per expert), expert-major like
      every expert parameter (also the faster layout of this skinny matmul
      on CPU).
    scale: [] learnable scalar.

  Returns:
    A `SoftRouting` holding [g, s, e*p] float32 logits.
  """
  e, p, d = phi.shape
  xn = l2_normalize(x, axis=-1)
  pn = l2_normalize(phi.reshape(e * p, d), axis=-1)
  logits = jnp.einsum('gsd,nd->gsn', xn, pn * scale.astype(jnp.float32))
  return SoftRouting(logits=logits, num_experts=e)


# ----------------------------------------------------------------------------
# Index maps of token choice decisions (the 'indices' dispatch and its
# kernels move rows by them).
# ----------------------------------------------------------------------------


def group_offsets(g: int, stride: int) -> Array:
  """[g, 1, 1] offsets g_i * stride, to turn per-group into global indices."""
  return (jnp.arange(g, dtype=jnp.int32) * stride)[:, None, None]


def expert_major(index: Array) -> Array:
  """[g, e, c] per-slot values -> [e, g, c] (the buffer order)."""
  return jnp.swapaxes(index, 0, 1)


def token_choice_slot_of_pair(r: TokenChoiceRouting) -> Array:
  """[g, s, k] flat slot e_i * c + position of each pair; e * c if dropped."""
  e, c = r.num_experts, r.capacity
  return jnp.where(r.valid, r.expert_index * c + r.position, e * c)


def token_choice_pair_of_slot(r: TokenChoiceRouting) -> Array:
  """[g, e, c] pair (token * k + choice, within the group) filling each slot.

  s * k marks an empty slot. The inverse of `token_choice_slot_of_pair`, built
  with one small scatter of int32 ids (kept pairs have distinct slots).
  """
  g, s, k = r.expert_index.shape
  e, c = r.num_experts, r.capacity
  slot = token_choice_slot_of_pair(r).reshape(g, s * k)
  pair = jnp.broadcast_to(jnp.arange(s * k, dtype=jnp.int32), (g, s * k))
  gi = jnp.arange(g)[:, None]
  out = jnp.full((g, e * c), s * k, jnp.int32)
  out = out.at[gi, slot].set(pair, mode='drop')
  return out.reshape(g, e, c)


class TokenChoiceSlotMaps(NamedTuple):
  """Global row indices between tokens [g*s], pairs [g*s*k], slots [e*g*c].

  Slot rows are numbered in buffer order, (e_i * g + g_i) * c + position.
  Out-of-range values (the table size) mark empty slots / dropped pairs; the
  gathers return zero rows for them.
  """
  pair_slot: Array   # [g, s, k] slot row of each pair
  slot_token: Array  # [e, g, c] token row in each slot
  slot_pair: Array   # [e, g, c] pair row in each slot

  @classmethod
  def build(cls, r: TokenChoiceRouting) -> 'TokenChoiceSlotMaps':
    g, s, k = r.expert_index.shape
    e, c = r.num_experts, r.capacity
    row = (r.expert_index * g + group_offsets(g, 1)) * c + r.position
    pair_slot = jnp.where(r.valid, row, e * g * c)
    pair = token_choice_pair_of_slot(r)  # [g, e, c]
    full = pair < s * k
    slot_pair = jnp.where(full, pair + group_offsets(g, s * k), g * s * k)
    slot_token = jnp.where(full, pair // k + group_offsets(g, s), g * s)
    return cls(pair_slot, expert_major(slot_token), expert_major(slot_pair))


# ----------------------------------------------------------------------------
# Dense tensors (tests and analysis only; never on the fast path).
# ----------------------------------------------------------------------------


def _one_hot_slots(expert_index: Array, position: Array, valid: Array,
                   e: int, c: int) -> Array:
  """[g, s, k] pairs -> [g, s, k, e, c] one-hot (zero for dropped pairs)."""
  slot = jnp.where(valid, expert_index * c + position, -1)
  return jax.nn.one_hot(slot, e * c).reshape(*slot.shape, e, c)


def dense_dispatch(routing: Routing) -> Array:
  """[g, s, e, c] dispatch tensor: buffers = einsum('gsec,gsd->egcd', ., x).

  0/1 for hard routers, softmax-over-tokens weights for Soft MoE.
  """
  if isinstance(routing, TokenChoiceRouting):
    oh = _one_hot_slots(routing.expert_index, routing.position, routing.valid,
                        routing.num_experts, routing.capacity)
    return jnp.sum(oh, axis=2)
  if isinstance(routing, ExpertChoiceRouting):
    oh = jax.nn.one_hot(routing.token_index, routing.num_tokens)  # [g,e,c,s]
    return jnp.transpose(oh, (0, 3, 1, 2))
  if isinstance(routing, SoftRouting):
    g, s, n = routing.logits.shape
    return routing.dispatch_weights().reshape(g, s, routing.num_experts, -1)
  raise TypeError(f'unknown routing {type(routing)}')


def dense_combine(routing: Routing) -> Array:
  """[g, s, e, c] combine tensor: y = einsum('gsec,egcd->gsd', ., outputs)."""
  if isinstance(routing, TokenChoiceRouting):
    oh = _one_hot_slots(routing.expert_index, routing.position, routing.valid,
                        routing.num_experts, routing.capacity)
    return jnp.einsum('gskec,gsk->gsec', oh, routing.combine_weight)
  if isinstance(routing, ExpertChoiceRouting):
    return dense_dispatch(routing) * routing.combine_weight[:, None]
  if isinstance(routing, SoftRouting):
    g, s, n = routing.logits.shape
    return routing.combine_weights().reshape(g, s, routing.num_experts, -1)
  raise TypeError(f'unknown routing {type(routing)}')


# ----------------------------------------------------------------------------
# Auxiliary losses. Each is computed per group and averaged over groups.
# ----------------------------------------------------------------------------


def _cv_squared(v: Array) -> Array:
  """Squared coefficient of variation over the last axis (var / mean^2)."""
  return jnp.var(v, axis=-1) / jnp.square(jnp.mean(v, axis=-1))


def importance_loss(gates: Array) -> Array:
  """V-MoE importance loss (Riquelme et al. 2021, App. A; Shazeer et al. 2017).

  importance_e = sum_s gates[s, e]; loss = CV(importance)^2, per group, mean
  over groups.

  Args:
    gates: [g, s, e] softmax gates (V-MoE uses the noise-free gates).
  Returns:
    scalar.
  """
  return jnp.mean(_cv_squared(jnp.sum(gates, axis=1)))


def load_loss(logits: Array, noisy_logits: Array, noise_std: float,
              num_selected: int, selected: Array | None = None) -> Array:
  """V-MoE load loss from the noisy-gating estimate (Shazeer et al. 2017).

  For each token the threshold is its k-th largest noisy logit. The
  probability that expert e would be selected if its noise were re-drawn is
  p[s, e] = 1 - Phi((threshold[s] - logits[s, e]) / noise_std), with Phi the
  standard normal CDF and `logits` the clean logits. load_e = mean_s p[s, e];
  loss = CV(load)^2, per group, mean over groups. Defined only for
  noise_std > 0.

  Args:
    logits: [g, s, e] clean logits.
    noisy_logits: [g, s, e] logits + noise (those used for routing).
    noise_std: standard deviation of the noise.
    num_selected: k.
    selected: optional [g, s, >=k] indices of the k largest noisy logits in
      descending order, to reuse instead of searching them again: a
      token-choice decision's `expert_index` (the top-k of softmax(noisy
      logits), the same ranking up to float ties).
  Returns:
    scalar.
  """
  logits = logits.astype(jnp.float32)
  noisy_logits = noisy_logits.astype(jnp.float32)
  # The threshold is a top-k value, so its gradient flows into the noisy
  # logits at the k-th expert (as in the V-MoE reference).
  if selected is None:
    threshold = top_k(noisy_logits, num_selected)[0][..., -1]
  else:
    kth = selected[..., num_selected - 1:num_selected]
    threshold = jnp.take_along_axis(noisy_logits, kth, axis=-1)[..., 0]
  z = (threshold[..., None] - logits) / noise_std
  p = 1.0 - jax.scipy.stats.norm.cdf(z)
  return jnp.mean(_cv_squared(jnp.mean(p, axis=1)))


def balance_loss(gates: Array, top1: Array | None = None) -> Array:
  """GShard / Switch load-balancing loss: e * sum_e f_e * P_e.

  f_e is the fraction of tokens whose top-1 expert is e, P_e the mean gate of
  expert e. Equals 1 for a perfectly uniform router. Per group, mean over
  groups.

  Args:
    gates: [g, s, e] gates used for routing.
    top1: optional [g, s] index of each token's largest gate (a token-choice
      decision's first choice), to reuse instead of searching it again.
  Returns:
    scalar.
  """
  e = gates.shape[-1]
  if top1 is None:
    top1 = top_k(gates, 1)[1][..., 0]
  frac = jnp.mean(jax.nn.one_hot(top1, e), axis=1)
  prob = jnp.mean(gates, axis=1)
  return jnp.mean(e * jnp.sum(frac * prob, axis=-1))


def z_loss(logits: Array) -> Array:
  """Router z-loss (ST-MoE, Zoph et al. 2022): mean_s logsumexp(logits)^2.

  Args:
    logits: [..., e] logits (the softmax axis last).
  Returns:
    scalar.
  """
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(jnp.square(lse))


def _xlogx(p: Array) -> Array:
  """p * log(p) with 0 at p = 0, and a finite gradient there too."""
  safe = jnp.where(p > 0, p, 1.0)
  return jnp.where(p > 0, p * jnp.log(safe), 0.0)


def local_entropy_loss(logits: Array) -> Array:
  """LIMoE local entropy loss (Mustafa et al. 2022, Sec. 3.1): the mean over
  tokens of the entropy of each token's router distribution,
  (1 / s) sum_s H(softmax(logits[s])). Minimising it makes every token's
  routing confident.

  Args:
    logits: [g, s, e] router logits (the softmax axis last).
  Returns:
    scalar (nats), mean over the tokens of every group.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def global_entropy_loss(logits: Array,
                        threshold: float | None = None) -> Array:
  """LIMoE global entropy loss: minus the entropy of the group's marginal
  router distribution p = (1 / s) sum_s softmax(logits[s]), so minimising
  it spreads the tokens over the experts. With LIMoE's threshold tau the
  loss is max(0, tau - H(p)): zero once the marginal entropy reaches tau.

  LIMoE takes the marginal over all tokens of a modality in the batch; here
  it is taken per routing group (like every auxiliary loss of this module)
  and averaged over groups.

  Args:
    logits: [g, s, e] router logits.
    threshold: tau in nats, or None (no threshold: -H(p)).
  Returns:
    scalar.
  """
  p = jnp.mean(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=1)
  h = -jnp.sum(_xlogx(p), axis=-1)                                  # [g]
  loss = -h if threshold is None else jax.nn.relu(threshold - h)
  return jnp.mean(loss)


# ----------------------------------------------------------------------------
# Expert forcing.
# ----------------------------------------------------------------------------

FORCE_OFF, FORCE_FREE, FORCE_ON = -1, 0, 1
# A logit that no softmax of float32 logits of magnitude < 1e4 can tell from
# -inf (exp underflows to exactly 0) yet keeps softmax and top-k finite.
FORCED_LOGIT = 1e4


def force_logits(logits: Array, forcing: Array) -> Array:
  """Router logits [g, s, e] with experts forced on or off per token.

  forcing [g, s, e] holds FORCE_OFF (-1: the router may not pick the
  expert; its softmax gate becomes 0 and the token's other gates are
  renormalised over the experts left), FORCE_FREE (0) or FORCE_ON (+1: the
  expert is the token's first choice; with one forced expert its softmax
  gate is 1, with m of them 1 / m each). Implemented as logits of
  -FORCED_LOGIT / +FORCED_LOGIT, so every decision made from softmax gates
  (top-k, capacity, BPR, expert choice) sees the forcing.
  """
  logits = logits.astype(jnp.float32)
  return jnp.where(forcing < 0, -FORCED_LOGIT,
                   jnp.where(forcing > 0, FORCED_LOGIT, logits))


def drop_forced_off(routing: Routing, forcing: Array) -> Routing:
  """Zeroes the combine weight of every (token, expert) pair forced off.

  `force_logits` already keeps such pairs out of the decision unless a
  token has fewer than k experts left (e.g. all forced off); this makes
  "off" exact in that case too. forcing: [g, s, e].
  """
  off = forcing < 0
  if isinstance(routing, TokenChoiceRouting):
    pair_off = jnp.take_along_axis(off, routing.expert_index, axis=-1)
    return dataclasses.replace(
        routing, combine_weight=jnp.where(pair_off, 0.0,
                                          routing.combine_weight))
  if isinstance(routing, ExpertChoiceRouting):
    slot_off = jnp.take_along_axis(jnp.swapaxes(off, 1, 2),
                                   routing.token_index, axis=-1)
    return dataclasses.replace(
        routing, combine_weight=jnp.where(slot_off, 0.0,
                                          routing.combine_weight))
  raise TypeError(f'expert forcing is not defined for {type(routing)}')


# ----------------------------------------------------------------------------
# Routing statistics.
# ----------------------------------------------------------------------------


def entropy(probs: Array) -> Array:
  """Mean entropy (nats) of the distributions along the last axis."""
  return jnp.mean(-jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0),
                           axis=-1))


def dropped_fraction(routing: Routing) -> Array:
  """Fraction of tokens that reach no expert slot (0 for Soft MoE)."""
  if isinstance(routing, TokenChoiceRouting):
    return jnp.mean((~jnp.any(routing.valid, axis=-1)).astype(jnp.float32))
  if isinstance(routing, ExpertChoiceRouting):
    g, s = routing.token_index.shape[0], routing.num_tokens
    gi = jnp.arange(g)[:, None, None]
    hit = jnp.zeros((g, s), jnp.bool_).at[gi, routing.token_index].set(True)
    return jnp.mean((~hit).astype(jnp.float32))
  if isinstance(routing, SoftRouting):
    return jnp.zeros((), jnp.float32)
  raise TypeError(f'unknown routing {type(routing)}')


def expert_load(routing: Routing) -> Array:
  """[e] share of the work of each expert (sums to 1).

  Hard routers: fraction of kept (token, expert) assignments per expert.
  Soft MoE: fraction of the combine mass per expert.
  """
  if isinstance(routing, TokenChoiceRouting):
    e = routing.num_experts
    counts = jnp.sum(jax.nn.one_hot(routing.expert_index, e)
                     * routing.valid[..., None], axis=(0, 1, 2))
    return counts / jnp.maximum(jnp.sum(counts), 1.0)
  if isinstance(routing, ExpertChoiceRouting):
    e = routing.num_experts
    return jnp.full((e,), 1.0 / e, jnp.float32)
  if isinstance(routing, SoftRouting):
    g, s, n = routing.logits.shape
    mass = routing.combine_weights().reshape(g, s, routing.num_experts, -1)
    return jnp.mean(jnp.sum(mass, axis=-1), axis=(0, 1))
  raise TypeError(f'unknown routing {type(routing)}')
