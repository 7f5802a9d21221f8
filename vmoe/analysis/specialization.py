"""Expert specialisation: expert-by-class usage, its normalised mutual
information per layer, and routing change between two checkpoints.

V-MoE (Riquelme et al. 2021, Sec. 5 / App. E) reports that routing in deeper
MoE layers correlates more with the image class; the NMI of the expert-by-class
usage matrix measures that with one number per layer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vmoe.analysis.trace import LayerTrace, Trace


def class_usage(trace: Trace, block: int, num_classes: int | None = None, *,
                patches_only: bool = False) -> np.ndarray:
  """[e, classes] counts: assignments of tokens of class-c images to expert
  e in `block` (token choice counts each kept choice; Soft MoE each token's
  top expert). patches_only: leave out the class token."""
  layer = trace.layers[block]
  num_classes = num_classes or int(trace.labels.max()) + 1
  assigned = layer.assigned
  if patches_only:
    assigned = assigned[:, trace.num_prefix_tokens:]
  per_image = assigned.sum(axis=1)                                 # [m, e]
  onehot = np.eye(num_classes, dtype=np.int64)[trace.labels]        # [m, c]
  return per_image.T.astype(np.int64) @ onehot


def normalized_mutual_information(counts: np.ndarray) -> float:
  """NMI of a contingency table [a, b] of counts: I(A; B) divided by the
  arithmetic mean of H(A) and H(B) (scikit-learn's default normalisation);
  0 when either variable is constant."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if total <= 0:
    return 0.0
  p = counts / total
  pa, pb = p.sum(axis=1), p.sum(axis=0)

  def entropy(q):
    q = q[q > 0]
    return float(-np.sum(q * np.log(q)))

  ha, hb = entropy(pa), entropy(pb)
  if ha == 0 or hb == 0:
    return 0.0
  nz = p > 0
  mi = float(np.sum(p[nz] * np.log(p[nz] / np.outer(pa, pb)[nz])))
  return max(mi, 0.0) / ((ha + hb) / 2)


def specialization(trace: Trace, num_classes: int | None = None, *,
                   patches_only: bool = False) -> pd.DataFrame:
  """One row per MoE block: nmi (expert vs class) and the share of the
  layer's assignments going to each class's most used expert
  (top_expert_share, averaged over classes; 1/e for class-blind routing)."""
  rows = []
  for i, layer in trace.layers.items():
    counts = class_usage(trace, i, num_classes, patches_only=patches_only)
    per_class = counts.sum(axis=0)
    used = per_class > 0
    top = counts.max(axis=0)[used] / per_class[used]
    rows.append(dict(block=i, router=layer.router,
                     num_experts=layer.num_experts,
                     nmi=normalized_mutual_information(counts),
                     top_expert_share=float(top.mean()) if used.any() else 0.0))
  return pd.DataFrame(rows)


def routing_change(before: Trace, after: Trace) -> pd.DataFrame:
  """One row per MoE block: changed_fraction, the fraction of tokens whose top
  expert differs between two traces of the same images (e.g. two
  checkpoints; a dropped token has top expert -1), and
  changed_fraction_kept, the same over tokens kept in both."""
  if (before.labels.shape != after.labels.shape
      or not np.array_equal(before.labels, after.labels)):
    raise ValueError('routing_change: the traces are not of the same images')
  rows = []
  for i, a in before.layers.items():
    if i not in after.layers:
      raise ValueError(f'routing_change: block {i} is not an MoE block of '
                       'both models')
    b: LayerTrace = after.layers[i]
    changed = a.top_expert != b.top_expert
    kept = ~a.dropped & ~b.dropped
    rows.append(dict(block=i, changed_fraction=float(changed.mean()),
                     changed_fraction_kept=(float(changed[kept].mean())
                                            if kept.any() else 0.0)))
  return pd.DataFrame(rows)
