"""Top-1 token choice with LIMoE's entropy losses, on digits (budget 1).

LIMoE (Mustafa et al. 2022, Sec. 3.1): the local entropy loss (mean
per-token router entropy, weight 0.01) and the thresholded global entropy
loss (max(0, tau - H(mean router distribution)), weight 0.01, tau = log 6:
at least about 6 of the 8 experts' worth of spread) replace the V-MoE
importance and load losses; k=1, capacity factor 1.0 (c = 9). Compared
with `tc_k1_noaux_digits.py` (no auxiliary loss) in the claims table.
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/tc_k1_entropy_digits.py \\
      --workdir=/tmp/routers/tc_k1_entropy

Cost (`--config.dry_run=True`): 369k parameters
(137k active per token), 5.1 MFLOPs per image.
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

import math

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='token_choice', k=1, capacity_factor=1.0,
                       importance_loss_weight=0.0, load_loss_weight=0.0,
                       local_entropy_loss_weight=0.01,
                       global_entropy_loss_weight=0.01,
                       global_entropy_threshold=math.log(6))
