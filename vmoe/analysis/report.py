"""Layer-placement report: which MoE layers of a trained model route in a
way worth keeping as MoE.

  python -m vmoe.analysis.report --workdir=/tmp/vmoe_b16_digits

prints one row per MoE layer and writes report.csv and report.png into
--out (default <workdir>/report):

  * routing specialisation: the NMI of the expert-by-class assignment
    counts (`vmoe.analysis.specialization`) against its null, the same NMI
    with the image labels permuted (`permutations` times): null mean, 95th
    percentile and p-value;
  * load statistics (`vmoe.analysis.statistics.layer_summary`): unused
    experts, load coefficient of variation, dropped fraction, entropy;
  * expert-output norms against routing ("A Closer Look into Mixture-of-
    Experts in Large Language Models", Lo et al. 2024,
    https://arxiv.org/abs/2406.18219: routers tend to pick the experts with
    the largest output norms): every expert applied to every token, then
    per token the Spearman correlation between the router probabilities and
    the experts' output norms (`norm_gate_spearman`, mean over tokens), the
    share of tokens whose most probable expert is also the one with the
    largest output (`norm_top1_agreement`, chance 1 / e) and the ratio of
    the top expert's output norm to the mean of the others';
  * the criterion of ViMoE (Han et al. 2024, https://arxiv.org/abs/2410.15732,
    Sec. 4): keep MoE in the layers whose routing specialises (experts
    preferred by specific classes), replace by dense MLPs those whose
    routing is class-agnostic. Rule here, fixed in advance: `keep_moe` when
    the NMI exceeds its label-permutation null at p < 0.05.

Router probabilities: the softmax of the clean gate logits (Soft MoE: each
expert's share of the token's combine weights).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from vmoe.analysis import loading
from vmoe.analysis import trace as trace_lib
from vmoe.analysis.specialization import normalized_mutual_information
from vmoe.analysis.statistics import layer_summary
from vmoe.nn import moe as moe_lib

ALPHA = 0.05  # the criterion's level, fixed before any report is run


def nmi_null(trace: trace_lib.Trace, block: int, *, permutations: int = 200,
             seed: int = 0, num_classes: int | None = None
             ) -> tuple[float, np.ndarray]:
  """(NMI of the expert-by-class counts, [permutations] NMIs with the image
  labels permuted)."""
  num_classes = num_classes or int(trace.labels.max()) + 1
  layer = trace.layers[block]
  per_image = layer.assigned.sum(axis=1).astype(np.int64)          # [m, e]
  onehot = np.eye(num_classes, dtype=np.int64)
  observed = normalized_mutual_information(
      per_image.T @ onehot[trace.labels])
  rng = np.random.default_rng(seed)
  null = np.array([normalized_mutual_information(
      per_image.T @ onehot[rng.permutation(trace.labels)])
                   for _ in range(permutations)])
  return observed, null


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Spearman correlation of every row pair of a, b [t, e] (ties by
  order)."""
  ra = np.argsort(np.argsort(a, axis=1), axis=1).astype(np.float64)
  rb = np.argsort(np.argsort(b, axis=1), axis=1).astype(np.float64)
  ra -= ra.mean(axis=1, keepdims=True)
  rb -= rb.mean(axis=1, keepdims=True)
  den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
  return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1), 0.0)


def expert_norms(model: nnx.Module, batches: Iterable[dict[str, np.ndarray]],
                 blocks: Sequence[int] | None = None
                 ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """{block: (output norms [t, e], router probabilities [t, e])} over the
  tokens of the real images of `batches`: every expert of the block applied
  to every token it routed."""
  layers = moe_lib.block_moe_layers(model)
  blocks = list(layers) if blocks is None else list(blocks)
  graphdef, state = trace_lib.capturing_split(model)

  @jax.jit
  def run(state, images):
    m = nnx.merge(graphdef, state)
    m(images, train=False)
    inner = moe_lib.block_moe_layers(m)
    out = {}
    for i in blocks:
      layer = inner[i]
      captured = layer.routing.get_value()[0]
      tokens = captured.tokens.reshape(-1, captured.tokens.shape[-1])
      weights = layer.experts.weights(jnp.float32)
      buffers = jnp.broadcast_to(tokens.astype(jnp.float32),
                                 (layer.num_experts, 1) + tokens.shape)
      y = moe_lib.apply_experts(weights, buffers,
                                approximate_gelu=layer.experts.approximate_gelu)
      norms = jnp.linalg.norm(y[:, 0], axis=-1).T                 # [t, e]
      probs = trace_lib.token_view(captured.decision, captured.logits)['probs']
      out[i] = (norms, probs.reshape(-1, probs.shape[-1]))
    return out

  parts = {i: ([], []) for i in blocks}
  for batch in batches:
    real = np.asarray(batch['mask']) > 0
    out = jax.device_get(run(state, jnp.asarray(batch['image'])))
    for i, (norms, probs) in out.items():
      per_image = norms.shape[0] // len(real)
      keep = np.repeat(real, per_image)
      parts[i][0].append(norms[keep])
      parts[i][1].append(probs[keep])
  return {i: (np.concatenate(n), np.concatenate(p))
          for i, (n, p) in parts.items()}


def norm_statistics(norms: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """Norms against router probabilities [t, e]: mean Spearman correlation,
  top-1 agreement and the top expert's norm over the others' mean."""
  top = np.argmax(probs, axis=1)
  rows = np.arange(len(top))
  others = (norms.sum(1) - norms[rows, top]) / max(norms.shape[1] - 1, 1)
  return dict(
      norm_gate_spearman=float(np.mean(_spearman_rows(norms, probs))),
      norm_top1_agreement=float(np.mean(top == np.argmax(norms, axis=1))),
      norm_top1_ratio=float(np.mean(norms[rows, top] / np.maximum(others,
                                                                 1e-12))))


def layer_report(trained: loading.Trained,
                 batches: Sequence[dict[str, np.ndarray]] | None = None, *,
                 permutations: int = 200, max_examples: int | None = None,
                 seed: int = 0) -> tuple[pd.DataFrame, dict]:
  """(one row per MoE layer, {block: (norms, probs)} for plots)."""
  batches = list(batches if batches is not None else loading.eval_batches(
      trained.config, max_examples=max_examples))
  model = trained.model
  if not moe_lib.block_moe_layers(model):
    raise ValueError('the model has no MoE layer')
  trace = trace_lib.collect(model, batches)
  summary = layer_summary(trace).set_index('block')
  norms = expert_norms(model, batches)
  rows = []
  for i, layer in trace.layers.items():
    observed, null = nmi_null(trace, i, permutations=permutations, seed=seed,
                              num_classes=trained.num_classes)
    p_value = (1 + np.sum(null >= observed)) / (1 + len(null))
    s = summary.loc[i]
    rows.append(dict(
        block=i, router=layer.router, num_experts=layer.num_experts,
        nmi=observed, nmi_null_mean=float(null.mean()),
        nmi_null_q95=float(np.quantile(null, 0.95)), nmi_p_value=p_value,
        num_unused=int(s.num_unused), load_cv=float(s.load_cv),
        dropped_fraction=float(s.dropped_fraction),
        entropy=float(s.entropy),
        **norm_statistics(*norms[i]),
        keep_moe=bool(p_value < ALPHA)))
  return pd.DataFrame(rows), norms


def plot(frame: pd.DataFrame, norms: dict, path: str,
         max_points: int = 3000, seed: int = 0) -> str:
  """NMI against its null per layer, and output norm against router
  probability per layer (PNG)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  x = np.arange(len(frame))
  axes[0].bar(x, frame.nmi, color=['C2' if k else 'C7'
                                   for k in frame.keep_moe], label='NMI')
  axes[0].errorbar(x, frame.nmi_null_mean,
                   yerr=[np.zeros(len(frame)),
                         frame.nmi_null_q95 - frame.nmi_null_mean],
                   fmt='k_', capsize=4, label='permutation null (mean, q95)')
  axes[0].set_xticks(x, [f'block {b}' for b in frame.block])
  axes[0].set_ylabel('expert-class NMI')
  axes[0].set_title('green: keep as MoE (p < 0.05)', fontsize=9)
  axes[0].legend(fontsize=7)
  rng = np.random.default_rng(seed)
  for i, (n, p) in norms.items():
    flat_n, flat_p = n.ravel(), p.ravel()
    pick = rng.choice(len(flat_n), size=min(max_points, len(flat_n)),
                      replace=False)
    axes[1].scatter(flat_p[pick], flat_n[pick], s=3, alpha=0.4,
                    label=f'block {i}')
  axes[1].set_xlabel('router probability')
  axes[1].set_ylabel('expert output norm')
  axes[1].legend(fontsize=7, markerscale=3)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def main(argv: Sequence[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--max_examples', type=int, default=None)
  parser.add_argument('--permutations', type=int, default=200)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  try:
    if args.permutations < 1:
      raise ValueError(f'--permutations={args.permutations} must be >= 1')
    trained = loading.load(args.workdir, args.step)
    frame, norms = layer_report(trained, permutations=args.permutations,
                                max_examples=args.max_examples)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  out = args.out or os.path.join(args.workdir, 'report')
  os.makedirs(out, exist_ok=True)
  frame.to_csv(os.path.join(out, 'report.csv'), index=False)
  plot(frame, norms, os.path.join(out, 'report.png'))
  with pd.option_context('display.width', 200, 'display.max_columns', None):
    print(frame.to_string(index=False, float_format=lambda v: f'{v:.4f}'))
  print(f'wrote {out}/report.csv and report.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
