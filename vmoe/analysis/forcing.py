"""Expert forcing at inference: switch experts on or off per class or per
image, and the targeted-against-random ablation check.

"Mixture of Tunable Experts" (Dahlke et al. 2025,
https://arxiv.org/abs/2502.11096) shifts a MoE model's behaviour by
overriding its routers: experts most distinctive for a behaviour are
switched off (the router may not pick them) or forced on, and switching off
the distinctive ones changes the behaviour more than switching off random
ones. Here the behaviour is the accuracy of one class. Forcing goes through
`vmoe.nn.moe.set_forcing` (re-routing, not zeroing outputs as
`vmoe.analysis.ablation` does): an expert switched off is replaced by the
token's next choice.

  frame = forced_accuracy(model, batches, off={3: [5]}, classes=[7])
  check = targeted_ablation(model, batches, num_off=1, random_draws=5)

Axis letters: b images, e experts.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from vmoe.analysis import trace as trace_lib
from vmoe.analysis.specialization import class_usage
from vmoe.nn import moe as moe_lib
from vmoe.nn import routing as rt


class ForcedPredictor:
  """Predictions of a model under expert forcing, one compiled program for
  every forcing of the same MoE blocks (the masks are arguments)."""

  def __init__(self, model: nnx.Module, blocks: Sequence[int]):
    layers = moe_lib.block_moe_layers(model)
    missing = [i for i in blocks if i not in layers]
    if missing:
      raise ValueError(f'expert forcing: blocks {missing} are not MoE blocks '
                       f'(MoE blocks: {list(layers)})')
    self.blocks = tuple(blocks)
    self.num_experts = {i: layers[i].num_experts for i in blocks}
    graphdef, state = nnx.split(model)

    @jax.jit
    def predict(state, images, masks):
      m = nnx.merge(graphdef, state)
      moe_lib.set_forcing(m, masks)
      logits, _ = m(images, train=False)
      return jnp.argmax(logits, axis=-1)

    self._predict = lambda images, masks: predict(state, images, masks)

  def masks(self, labels: np.ndarray, off: Mapping[int, Sequence[int]],
            on: Mapping[int, Sequence[int]],
            classes: Sequence[int] | None) -> dict[int, np.ndarray]:
    """{block: int32 [b, e]} forcing `off` / `on` experts for the images
    whose label is in `classes` (None: every image)."""
    selected = (np.ones(len(labels), bool) if classes is None
                else np.isin(labels, list(classes)))
    out = {}
    for i in self.blocks:
      row = np.zeros(self.num_experts[i], np.int32)
      row[list(off.get(i, ()))] = rt.FORCE_OFF
      row[list(on.get(i, ()))] = rt.FORCE_ON
      out[i] = np.where(selected[:, None], row[None], rt.FORCE_FREE).astype(
          np.int32)
    return out

  def predictions(self, batch: dict[str, np.ndarray],
                  off: Mapping[int, Sequence[int]] | None = None,
                  on: Mapping[int, Sequence[int]] | None = None,
                  classes: Sequence[int] | None = None) -> np.ndarray:
    """Predicted classes [b] of a batch under the forcing."""
    labels = np.asarray(batch['label'])
    masks = self.masks(labels, off or {}, on or {}, classes)
    return np.asarray(self._predict(jnp.asarray(batch['image']), masks))


def per_class_accuracy(predictor: ForcedPredictor,
                       batches: Sequence[dict[str, np.ndarray]],
                       num_classes: int, **forcing) -> np.ndarray:
  """[classes] accuracy of the real (mask 1) images of every class under
  `forcing` (off, on, classes of `ForcedPredictor.predictions`); NaN for a
  class without images."""
  correct = np.zeros(num_classes)
  count = np.zeros(num_classes)
  for batch in batches:
    real = np.asarray(batch['mask']) > 0
    labels = np.asarray(batch['label'])[real]
    hits = predictor.predictions(batch, **forcing)[real] == labels
    np.add.at(correct, labels, hits)
    np.add.at(count, labels, 1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return correct / count


def forced_accuracy(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]],
                    *, off: Mapping[int, Sequence[int]] | None = None,
                    on: Mapping[int, Sequence[int]] | None = None,
                    classes: Sequence[int] | None = None) -> pd.DataFrame:
  """One row per class: accuracy with experts forced `off` / `on` ({block:
  expert ids}) for the images of `classes` (None: all), base_accuracy
  (nothing forced) and delta."""
  batches = list(batches)
  blocks = sorted(set(off or {}) | set(on or {}))
  predictor = ForcedPredictor(model, blocks)
  num_classes = int(model.head.kernel.shape[-1])
  base = per_class_accuracy(predictor, batches, num_classes)
  forced = per_class_accuracy(predictor, batches, num_classes, off=off,
                              on=on, classes=classes)
  return pd.DataFrame(dict(label=np.arange(num_classes), accuracy=forced,
                           base_accuracy=base, delta=forced - base))


def distinctive_experts(trace: trace_lib.Trace, block: int, label: int,
                        num: int, num_classes: int | None = None
                        ) -> list[int]:
  """The `num` experts of `block` most distinctive for class `label`: the
  largest share of that class's assignments minus the share of the other
  classes' (MoTE's activation difference between the behaviour and the
  rest)."""
  usage = class_usage(trace, block, num_classes).astype(float)
  own = usage[:, label]
  rest = usage.sum(axis=1) - own
  score = own / max(own.sum(), 1.0) - rest / max(rest.sum(), 1.0)
  return [int(e) for e in np.argsort(-score, kind='stable')[:num]]


def targeted_ablation(model: nnx.Module,
                      batches: Iterable[dict[str, np.ndarray]], *,
                      blocks: Sequence[int] | None = None, num_off: int = 1,
                      random_draws: int = 5, seed: int = 0) -> pd.DataFrame:
  """Does switching off a class's distinctive experts lower that class's
  accuracy more than switching off random experts?

  For every MoE block (default: all) and class: the `num_off` experts most
  distinctive for the class (`distinctive_experts`, from the routing of
  these batches) are switched off for every image; so are, separately,
  `random_draws` random sets of `num_off` other experts of the block. One
  row per (block, label): targeted (the expert ids), base_accuracy,
  targeted_accuracy, random_accuracy (mean over the draws), targeted_drop
  and random_drop (base minus each), and their difference.
  """
  batches = list(batches)
  layers = moe_lib.block_moe_layers(model)
  blocks = list(layers) if blocks is None else list(blocks)
  num_classes = int(model.head.kernel.shape[-1])
  trace = trace_lib.collect(model, batches)
  predictor = ForcedPredictor(model, blocks)
  base = per_class_accuracy(predictor, batches, num_classes)
  rng = np.random.default_rng(seed)
  rows = []
  for i in blocks:
    e = layers[i].num_experts
    if not 1 <= num_off < e:
      raise ValueError(f'num_off={num_off} must be in [1, {e - 1}] for the '
                       f'{e} experts of block {i}')
    for label in range(num_classes):
      if np.isnan(base[label]):
        continue
      targeted = distinctive_experts(trace, i, label, num_off, num_classes)
      acc = per_class_accuracy(predictor, batches, num_classes,
                               off={i: targeted})[label]
      others = [x for x in range(e) if x not in targeted]
      random_acc = np.mean([
          per_class_accuracy(predictor, batches, num_classes, off={
              i: list(rng.choice(others, size=num_off, replace=False))
          })[label] for _ in range(random_draws)])
      rows.append(dict(
          block=i, label=label, targeted=tuple(targeted),
          base_accuracy=base[label], targeted_accuracy=acc,
          random_accuracy=random_acc, targeted_drop=base[label] - acc,
          random_drop=base[label] - random_acc,
          targeted_minus_random=random_acc - acc))
  return pd.DataFrame(rows)
