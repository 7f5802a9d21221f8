"""Per-token routing of every MoE layer over a data set (`collect`).

`collect(model, batches)` runs the model in inference mode with the MoE
layers' capture hook on (`MoeLayer.capture`, see `vmoe.nn.moe`) and keeps, per
MoE block and per token of every real image, a router-independent view of
the decision (`LayerTrace`). The statistics of `vmoe.analysis.statistics`,
`specialization` and `patch_maps` are plain numpy functions of that view.

What "assigned" and "top expert" mean per decision type:
  * token choice: the token's kept (token, expert) pairs; its top expert is
    the kept expert with the largest combine weight (-1 if all its pairs were
    dropped);
  * expert choice: the experts whose top-c picked the token; top expert: the
    one of those with the largest combine weight (-1 if none picked it);
  * Soft MoE: every token reaches every slot, so "assigned" marks the expert
    owning the slot the token contributes to most (largest dispatch
    weight), which is also its top expert; nothing is dropped.

Router probabilities ("gate mass"): softmax of the clean router logits over
experts for gate routers; for Soft MoE the combine weights summed over each
expert's slots. Router entropy: the entropy of the distribution the layer's
`router_entropy` metric uses (softmax gates over experts; Soft MoE: combine
weights over all slots).

Axis letters: m images, n tokens per image (class token first with
pool='tok'), e experts, g groups, s tokens per group, k choices, c capacity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vmoe.nn import moe as moe_lib
from vmoe.nn import routing as rt


@dataclasses.dataclass
class LayerTrace:
  """Routing of one MoE block over m images of n tokens (numpy arrays).

  Attributes:
    block: block index in the encoder.
    router: `model.moe.router` name.
    num_experts: e.
    capacity: slots per expert and group at evaluation (Soft MoE: p).
    group_size: tokens per routing group s.
    top_expert: int32 [m, n], -1 where the token reached no expert.
    assigned: bool [m, n, e], see the module docstring.
    dropped: bool [m, n], the token reached no expert slot.
    entropy: float32 [m, n], entropy (nats) of the routing distribution.
    gate_mass: float32 [m, e], router probability mass per image and expert
      (summed over the image's tokens).
  """
  block: int
  router: str
  num_experts: int
  capacity: int
  group_size: int
  top_expert: np.ndarray
  assigned: np.ndarray
  dropped: np.ndarray
  entropy: np.ndarray
  gate_mass: np.ndarray


@dataclasses.dataclass
class Trace:
  """Routing of every MoE block of a model over a data set.

  Attributes:
    layers: {block index: LayerTrace}, in block order.
    labels: int [m] labels of the images.
    logits: float32 [m, classes] model outputs.
    num_prefix_tokens: tokens before the patches (1 with a class token).
    grid: (rows, cols) of patches.
  """
  layers: dict[int, LayerTrace]
  labels: np.ndarray
  logits: np.ndarray
  num_prefix_tokens: int
  grid: tuple[int, int]

  @property
  def predictions(self) -> np.ndarray:
    return np.argmax(self.logits, axis=-1)

  @property
  def accuracy(self) -> float:
    return float(np.mean(self.predictions == self.labels))


def gate_probabilities(logits: Any) -> jax.Array:
  """[g, s, e] softmax of the clean logits of a gate router's logits pytree
  ({'logits': [g, s, e], ...})."""
  if isinstance(logits, dict) and 'logits' in logits:
    return jax.nn.softmax(logits['logits'].astype(jnp.float32), axis=-1)
  raise TypeError(f'router logits {type(logits).__name__} have no '
                  "'logits' entry of gate logits [g, s, e]")


def _entropy(p: jax.Array) -> jax.Array:
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1)


def token_view(decision: rt.Routing, logits: Any) -> dict[str, jax.Array]:
  """Router-independent per-token view of one layer's decision.

  Returns {'top_expert' [g, s] int32, 'assigned' [g, s, e] bool,
  'dropped' [g, s] bool, 'entropy' [g, s], 'probs' [g, s, e]} (see the module
  docstring for the meaning per decision type).
  """
  if isinstance(decision, rt.SoftRouting):
    g, s, n = decision.logits.shape
    e = decision.num_experts
    combine = decision.combine_weights()                          # [g, s, n]
    top_slot = jnp.argmax(decision.dispatch_weights(), axis=-1)   # [g, s]
    top_expert = (top_slot // (n // e)).astype(jnp.int32)
    return {'top_expert': top_expert,
            'assigned': jax.nn.one_hot(top_expert, e, dtype=jnp.bool_),
            'dropped': jnp.zeros((g, s), jnp.bool_),
            'entropy': _entropy(combine),
            'probs': jnp.sum(combine.reshape(g, s, e, n // e), axis=-1)}
  probs = gate_probabilities(logits)
  g, s, e = probs.shape
  if isinstance(decision, rt.TokenChoiceRouting):
    pairs = (jax.nn.one_hot(decision.expert_index, e)
             * decision.valid[..., None])                       # [g, s, k, e]
    assigned = jnp.sum(pairs, axis=2) > 0
    weight = jnp.sum(pairs * decision.combine_weight[..., None], axis=2)
  elif isinstance(decision, rt.ExpertChoiceRouting):
    picks = jax.nn.one_hot(decision.token_index, s)             # [g, e, c, s]
    assigned = jnp.swapaxes(jnp.sum(picks, axis=2), 1, 2) > 0
    weight = jnp.einsum('gecs,gec->gse', picks, decision.combine_weight)
  else:
    raise TypeError(f'unknown routing decision {type(decision).__name__}')
  reached = jnp.any(assigned, axis=-1)
  best = jnp.argmax(jnp.where(assigned, weight, -jnp.inf), axis=-1)
  return {'top_expert': jnp.where(reached, best, -1).astype(jnp.int32),
          'assigned': assigned,
          'dropped': ~reached,
          'entropy': _entropy(probs),
          'probs': probs}


def moe_blocks(model: nnx.Module) -> dict[int, moe_lib.MoeLayer]:
  """{block index: the MoeLayer routing in that block} of a
  `VisionTransformer` (for a Multi-Head MoE block, its inner layer, which
  routes h sub-tokens per token: its traces have n * h "tokens" per
  image)."""
  return moe_lib.block_moe_layers(model)


def capturing_split(model: nnx.Module):
  """(graphdef, state) of `model` with every MoE layer's capture hook on in
  the graphdef (the model itself is left as it was)."""
  layers = moe_blocks(model)
  for layer in layers.values():
    layer.capture = True
  try:
    return nnx.split(model)
  finally:
    for layer in layers.values():
      layer.capture = False


def make_trace_fn(model: nnx.Module):
  """Jitted images [b, H, W, C] -> (logits [b, classes], {block: view}) with
  every view array reshaped from groups [g, s, ...] to images [b, n, ...]
  ('probs' summed over the tokens of each image: [b, e])."""
  layers = moe_blocks(model)
  graphdef, state = capturing_split(model)

  @jax.jit
  def run(state, images):
    m = nnx.merge(graphdef, state)
    logits, _ = m(images, train=False)
    b = images.shape[0]
    views = {}
    for i in layers:
      captured = moe_lib.block_moe_layers(m)[i].routing.get_value()[0]
      view = token_view(captured.decision, captured.logits)
      # Token t of group j is token j * s + t of the flat [b * n] batch.
      view = {k: v.reshape(b, -1, *v.shape[2:]) for k, v in view.items()}
      view['probs'] = jnp.sum(view['probs'], axis=1)
      views[i] = view
    return logits, views

  return lambda images: run(state, images)


def collect(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]]
            ) -> Trace:
  """Routing of every MoE block of `model` (a `VisionTransformer`) on the
  real (mask 1) images of eval `batches`, in batch order.

  Routing depends on the batch composition when groups span several images
  (capacity is shared within a group): the trace is that of these batches.
  """
  layers = moe_blocks(model)
  fn = make_trace_fn(model)
  parts: dict[int, dict[str, list]] = {i: {} for i in layers}
  labels, logits = [], []
  grid = n = None
  for batch in batches:
    if grid is None:
      h, w = np.shape(batch['image'])[1:3]
      grid = (h // model.patch, w // model.patch)
      n = grid[0] * grid[1] + (1 if model.cls_token is not None else 0)
    keep = np.asarray(batch['mask']) > 0
    out_logits, views = jax.device_get(fn(batch['image']))
    labels.append(np.asarray(batch['label'])[keep])
    logits.append(np.asarray(out_logits)[keep])
    for i, view in views.items():
      for key, value in view.items():
        parts[i].setdefault(key, []).append(np.asarray(value)[keep])
  if not labels:
    raise ValueError('collect: no batches')
  traces = {}
  for i, layer in layers.items():
    p = {k: np.concatenate(v) for k, v in parts[i].items()}
    # Tokens the layer saw per image (n * h for a Multi-Head MoE's layer).
    s = layer.group_size or p['top_expert'].shape[1]
    traces[i] = LayerTrace(
        block=i, router=layer.router_type, num_experts=layer.num_experts,
        capacity=int(layer.capacity_for(s, False)), group_size=int(s),
        top_expert=p['top_expert'], assigned=p['assigned'],
        dropped=p['dropped'], entropy=p['entropy'].astype(np.float32),
        gate_mass=p['probs'].astype(np.float32))
  return Trace(layers=traces, labels=np.concatenate(labels).astype(np.int64),
               logits=np.concatenate(logits).astype(np.float32),
               num_prefix_tokens=1 if model.cls_token is not None else 0,
               grid=grid)
