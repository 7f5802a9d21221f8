"""Active compute of study configs, for comparisons at matched cost.

`applications_per_token` counts the expert MLPs a token goes through, the
always-on shared experts included (weighted by their hidden size relative
to a routed expert's), so a top-1 router with one shared expert counts 2,
like top-2. `flop_ratio` labels a comparison with the ratio of the configs'
training FLOPs (XLA's cost analysis of the compiled train step,
`analysis.train_flops_per_step`): 'matched' within `tolerance`, else the
ratio, so no comparison claims "equal compute" that it does not have.
"""

from __future__ import annotations

import math

from vmoe.nn import moe as moe_lib
from vmoe.train import model_summary

MATCHED_TOLERANCE = 0.05


def applications_per_token(layer: moe_lib.MoeLayer,
                           tokens_per_image: int) -> float:
  """Routed expert applications per token (`model_summary`) plus the shared
  experts, each weighted by its hidden size over a routed expert's."""
  routed = model_summary.expert_applications_per_token(layer,
                                                       tokens_per_image)
  if layer.shared_experts is None:
    return routed
  e_shared, _, h_shared = layer.shared_experts.kernel1.shape  # [e, d, h]
  h_routed = layer.experts.kernel1.shape[-1]
  return routed + e_shared * h_shared / h_routed


def flop_ratio(a_flops: float, b_flops: float, *,
               tolerance: float = MATCHED_TOLERANCE) -> tuple[float, str]:
  """(a / b, label): 'matched FLOPs (a/b = 1.02)' when within `tolerance`
  of 1, else 'a uses 1.28x the FLOPs of b'-style text."""
  if not (math.isfinite(a_flops) and math.isfinite(b_flops)) or b_flops <= 0:
    return float('nan'), 'FLOPs not measured'
  ratio = a_flops / b_flops
  if abs(ratio - 1) <= tolerance:
    return ratio, f'matched FLOPs ({ratio:.2f}x)'
  return ratio, f'unmatched FLOPs: {ratio:.2f}x'
