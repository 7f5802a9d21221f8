"""Sparsity-constrained expert choice, capacity factor 2, on digits (budget 2).

Sparsity-constrained expert choice (Liu et al. 2023, 2024): the softmax
gates projected onto transport plans with at most c = 17 non-zeros per
expert by 20 Adam steps on the semi-dual; each expert takes its top 17
tokens by the plan, softmax combine weights, no router noise.
Shared settings and naming: `configs/routers/recipe.py`.

  python main.py --config=configs/routers/sparse_ec_cf2_digits.py \
      --workdir=/tmp/routers/sparse_ec_cf2

Cost (`--config.dry_run=True`): 369k parameters
(170k active per token), 6.2 MFLOPs per image.
Result (800 steps, one run): test accuracy 0.980, 281 s on 2
shared CPU cores.
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='sparsity_constrained_expert_choice',
                       capacity_factor=2.0)
