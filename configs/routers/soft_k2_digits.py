"""Soft MoE with 17 slots per expert, on digits (budget 2).

Soft MoE (Puigcerver et al. 2023): 8 experts x 17 slots = 136 slots per
group of 68 tokens, the slot count of the budget-2 sparse routers.
Shared settings and naming: `configs/routers/recipe.py`.

  python main.py --config=configs/routers/soft_k2_digits.py \
      --workdir=/tmp/routers/soft_k2

Cost (`--config.dry_run=True`): 386k parameters
(187k active per token), 8.0 MFLOPs per image.
Result (800 steps, one run): test accuracy 0.973, 180 s on 2
shared CPU cores.
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='soft', num_slots=17)
