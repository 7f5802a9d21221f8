"""Per-layer routing statistics of a `Trace` as tidy pandas frames.

Expert load (tokens and router probability mass per expert), dropped
fraction per layer and per image, router entropy, unused experts, and a
one-row-per-layer summary. Every function is a plain numpy computation on
`vmoe.analysis.trace.Trace`; see that module for what "assigned" means per
router (for Soft MoE a token counts for the expert of the slot it
contributes to most, so "unused" there means "never a token's top expert").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from vmoe.analysis.trace import LayerTrace, Trace


def _shares(x: np.ndarray) -> np.ndarray:
  total = np.sum(x)
  return x / total if total > 0 else np.zeros_like(x, dtype=np.float64)


def expert_load(trace: Trace) -> pd.DataFrame:
  """One row per (block, expert): tokens (assignments), token_share (of the
  layer's assignments), gate_mass (sum of router probabilities over all
  tokens), gate_share."""
  rows = []
  for i, layer in trace.layers.items():
    tokens = layer.assigned.sum(axis=(0, 1))
    mass = layer.gate_mass.astype(np.float64).sum(axis=0)
    for e, (t, ts, g, gs) in enumerate(zip(tokens, _shares(tokens), mass,
                                           _shares(mass))):
      rows.append(dict(block=i, expert=e, tokens=int(t), token_share=ts,
                       gate_mass=g, gate_share=gs))
  return pd.DataFrame(rows, columns=['block', 'expert', 'tokens',
                                     'token_share', 'gate_mass', 'gate_share'])


def dropped_per_image(trace: Trace) -> pd.DataFrame:
  """One row per (image, block): label and the image's dropped fraction."""
  frames = []
  for i, layer in trace.layers.items():
    frames.append(pd.DataFrame(dict(
        image=np.arange(len(trace.labels)), label=trace.labels, block=i,
        dropped_fraction=layer.dropped.mean(axis=1))))
  if not frames:
    return pd.DataFrame(columns=['image', 'label', 'block',
                                 'dropped_fraction'])
  return pd.concat(frames, ignore_index=True)


def unused(layer: LayerTrace, max_share: float = 0.0) -> np.ndarray:
  """Ids of the experts whose token share is <= max_share (0: no token)."""
  tokens = layer.assigned.sum(axis=(0, 1))
  return np.flatnonzero(_shares(tokens) <= max_share)


def unused_experts(trace: Trace, max_share: float = 0.0) -> pd.DataFrame:
  """One row per block: num_unused and the tuple of unused expert ids."""
  rows = []
  for i, layer in trace.layers.items():
    ids = unused(layer, max_share)
    rows.append(dict(block=i, num_experts=layer.num_experts,
                     num_unused=len(ids), unused=tuple(int(e) for e in ids)))
  return pd.DataFrame(rows, columns=['block', 'num_experts', 'num_unused',
                                     'unused'])


def layer_summary(trace: Trace) -> pd.DataFrame:
  """One row per MoE block: router, experts, capacity, dropped_fraction
  (mean over tokens), entropy (mean nats), max_entropy (log of the number of
  outcomes), num_unused, min/max token share and load_cv (coefficient of
  variation of the token shares; 0 = perfectly balanced)."""
  rows = []
  for i, layer in trace.layers.items():
    shares = _shares(layer.assigned.sum(axis=(0, 1)))
    outcomes = (layer.num_experts * layer.capacity if layer.router == 'soft'
                else layer.num_experts)
    rows.append(dict(
        block=i, router=layer.router, num_experts=layer.num_experts,
        capacity=layer.capacity, group_size=layer.group_size,
        dropped_fraction=float(layer.dropped.mean()),
        entropy=float(layer.entropy.mean()), max_entropy=float(np.log(outcomes)),
        num_unused=int(np.sum(shares == 0)),
        min_share=float(shares.min()), max_share=float(shares.max()),
        load_cv=float(shares.std() / shares.mean()) if shares.mean() else 0.0))
  return pd.DataFrame(rows)
