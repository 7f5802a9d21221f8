"""Per-patch routing maps of images, and the Soft MoE weights behind them.

`expert_maps(trace, image)`: the expert of every patch in every MoE block
(token / expert choice: the patch's top expert, -1 if dropped; Soft MoE: the
expert owning the slot the patch contributes to most). `soft_maps(model,
images, block)`: Soft MoE dispatch and combine weights of each slot as images
over the patch grid. `slot_similarity(model, block)`: cosine similarities of
the Soft MoE slot parameters phi (Puigcerver et al. 2023, App. I).

Shapes: m images, (r, q) patch grid rows x columns, e experts, p slots per
expert, n = e * p slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from vmoe.analysis.trace import Trace
from vmoe.nn import moe as moe_lib
from vmoe.nn import routing as rt


def expert_maps(trace: Trace, image: int) -> np.ndarray:
  """int [blocks, r, q]: expert of each patch of `image`, MoE blocks in
  order (`list(trace.layers)`); -1 marks a dropped patch."""
  r, q = trace.grid
  p0 = trace.num_prefix_tokens
  return np.stack([layer.top_expert[image, p0:p0 + r * q].reshape(r, q)
                   for layer in trace.layers.values()])


@dataclasses.dataclass
class SoftMaps:
  """Soft MoE weights of m images in one block, over the patch grid.

  dispatch: [m, n, r, q], weight of each patch in each slot's input
    (softmax over the group's tokens: a slot's weights over the patches of
    one image sum to <= 1, to 1 when the group is one image without a class
    token).
  combine: [m, n, r, q], weight of each slot's output in each patch's output
    (softmax over slots: sums to 1 over n for every patch).
  top_slot: int [m, r, q], slot each patch contributes to most.
  slot_expert: int [n], expert owning each slot (slot // p).
  """
  dispatch: np.ndarray
  combine: np.ndarray
  top_slot: np.ndarray
  slot_expert: np.ndarray


def soft_maps(model: nnx.Module, images: jax.Array, block: int) -> SoftMaps:
  """Dispatch / combine weights of a Soft MoE `block` for images [m, H, W, C]
  (run as one batch, in inference mode)."""
  layer = model.blocks[block].mlp
  if not isinstance(layer, moe_lib.MoeLayer) or layer.router_type != 'soft':
    raise ValueError(f'block {block} is not a Soft MoE layer')
  _, _, captured = moe_lib.capture_routing(model, jnp.asarray(images))
  decision: rt.SoftRouting = captured[block].decision
  m, hgt, wid = np.shape(images)[:3]
  r, q = hgt // model.patch, wid // model.patch
  p0 = 1 if model.cls_token is not None else 0
  n_slots = decision.logits.shape[-1]

  def per_image(w):  # [g, s, n] -> [m, n, r, q] (patch tokens only)
    w = np.asarray(w).reshape(m, -1, n_slots)[:, p0:p0 + r * q]
    return np.transpose(w, (0, 2, 1)).reshape(m, n_slots, r, q)

  dispatch = per_image(decision.dispatch_weights())
  return SoftMaps(dispatch=dispatch,
                  combine=per_image(decision.combine_weights()),
                  top_slot=np.argmax(dispatch, axis=1),
                  slot_expert=np.arange(n_slots) // decision.capacity)


def slot_similarity(model: nnx.Module, block: int
                    ) -> tuple[np.ndarray, pd.DataFrame]:
  """Cosine similarities of the slot parameters phi [e, p, d] of a Soft MoE
  block: ([n, n] matrix, slots expert-major; one-row frame with the mean
  similarity between distinct slots of the same expert (`within_expert`, NaN
  with one slot per expert) and between slots of different experts
  (`across_experts`))."""
  layer = model.blocks[block].mlp
  if not isinstance(layer, moe_lib.MoeLayer) or layer.router_type != 'soft':
    raise ValueError(f'block {block} is not a Soft MoE layer')
  phi = np.asarray(layer.router.phi[...], np.float64)
  e, p, d = phi.shape
  unit = phi.reshape(e * p, d)
  unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
  sim = unit @ unit.T
  expert = np.arange(e * p) // p
  same = expert[:, None] == expert[None, :]
  off_diag = ~np.eye(e * p, dtype=bool)
  within = sim[same & off_diag]
  across = sim[~same]
  frame = pd.DataFrame([dict(
      block=block, num_experts=e, slots_per_expert=p,
      within_expert=float(within.mean()) if within.size else float('nan'),
      across_experts=float(across.mean()) if across.size else float('nan'))])
  return sim, frame
