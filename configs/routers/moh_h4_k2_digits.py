"""Mixture-of-head attention with 75% of the heads per token, on digits.

MoH (Jin et al. 2024) in every block of `dense_h4_digits.py`: of the 4
heads, 1 is shared and each token takes the top 2 of the other 3 (75% of
the heads), the heads' outputs weighted by MoH's two-stage gates; the
reference code's head load-balance loss at weight 0.01. Dense MLPs
(budget 1); attention computed for all heads (as the reference code).
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/moh_h4_k2_digits.py \\
      --workdir=/tmp/routers/moh_h4_k2

Cost (`--config.dry_run=True`): 137k parameters,
5.0 MFLOPs per image.
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits_kinds(
      num_heads=4, attention='moh',
      attention_options=dict(moh_shared_heads=1, moh_k=2,
                             moh_balance_loss_weight=0.01))
