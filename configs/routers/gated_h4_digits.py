"""Per-head sigmoid-gated attention, on digits (the baseline of MoH).

Gated attention (Qiu et al. 2025) in every block of `dense_h4_digits.py`:
each of the 4 heads' outputs is scaled by a sigmoid gate of the block's
normalised input (one gate per head and token, 'headwise'). Dense MLPs
(budget 1).
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/gated_h4_digits.py \\
      --workdir=/tmp/routers/gated_h4

Cost (`--config.dry_run=True`): 137k parameters,
5.0 MFLOPs per image.
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits_kinds(
      num_heads=4, attention='gated',
      attention_options=dict(gated_granularity='headwise'))
