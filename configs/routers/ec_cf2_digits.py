"""Softmax expert choice, capacity factor 2, on digits (budget 2).

Expert choice (Zhou et al. 2022): every expert takes its top c = 17 tokens
of the group by softmax gate.
Shared settings and naming: `configs/routers/recipe.py`.

  python main.py --config=configs/routers/ec_cf2_digits.py \
      --workdir=/tmp/routers/ec_cf2

Cost (`--config.dry_run=True`): 369k parameters
(170k active per token), 6.2 MFLOPs per image.
Result (800 steps, one run): test accuracy 0.970, 205 s on 2
shared CPU cores.
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='expert_choice', capacity_factor=2.0)
