"""Softmax token choice, top-2 with BPR, on digits (budget 2).

V-MoE token choice with k=2, capacity factor 1.0 (c = 17) and BPR (the
V-MoE recipe at capacity factor 1.0).
Shared settings and naming: `configs/routers/recipe.py`.

  python main.py --config=configs/routers/tc_k2_bpr_digits.py \
      --workdir=/tmp/routers/tc_k2_bpr

Cost (`--config.dry_run=True`): 369k parameters
(170k active per token), 6.3 MFLOPs per image.
Result (800 steps, one run): test accuracy 0.987, 181 s on 2
shared CPU cores.
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='token_choice', k=2, capacity_factor=1.0,
                       batch_priority=True)
