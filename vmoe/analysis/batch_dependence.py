"""Does an image's output depend on the other images of its batch?

Capacity-limited routers whose routing groups span several images (V-MoE's
groups of several images, expert choice over a group) let images compete for
expert slots, so an image's logits change with its batch-mates. Soft MoE with
groups of one image (and any router whose groups are single images) is
per-example deterministic (Puigcerver et al. 2023, Sec. 2.2 and 6). The test
here: run a batch, run the same images in another order (so that every image
gets other group-mates), and compare each image's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def batch_dependence(model: nnx.Module, images: np.ndarray, *, seed: int = 0,
                     atol: float = 1e-5) -> dict[str, float]:
  """Compares logits of images [b, H, W, C] in their order and permuted.

  Returns {'max_abs_logit_diff', 'changed_fraction' (images whose logits
  differ by more than atol), 'prediction_changed_fraction'}.
  """
  images = np.asarray(images)
  perm = np.random.default_rng(seed).permutation(len(images))
  if len(images) > 1 and np.all(perm == np.arange(len(images))):
    perm = np.roll(perm, 1)
  graphdef, state = nnx.split(model)

  @jax.jit
  def logits_of(state, x):
    return nnx.merge(graphdef, state)(x, train=False)[0]

  base = np.asarray(logits_of(state, jnp.asarray(images)))
  permuted = np.empty_like(base)
  permuted[perm] = np.asarray(logits_of(state, jnp.asarray(images[perm])))
  diff = np.abs(base - permuted).max(axis=-1)
  return {'max_abs_logit_diff': float(diff.max()),
          'changed_fraction': float(np.mean(diff > atol)),
          'prediction_changed_fraction': float(np.mean(
              base.argmax(-1) != permuted.argmax(-1)))}


def per_image_groups(model: nnx.Module) -> nnx.Module:
  """`model` with every MoE layer routing groups of one image (group_size =
  None), e.g. to see that the batch dependence comes from groups spanning
  images. Changes the layers in place and returns the model; Soft MoE keeps
  its slot parameters (p slots per expert for fewer tokens)."""
  from vmoe.nn import moe as moe_lib  # pylint: disable=g-import-not-at-top
  for layer in moe_lib.moe_layers(model).values():
    layer.group_size = None
  return model
