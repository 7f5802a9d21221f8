"""Fine-grained top-2 token choice with BPR (granularity 2), digits.

Fine-grained experts (DeepSeekMoE; Krajewski et al. 2024): each of the 8
experts split into 2 of half the hidden size, 16 experts, k = 4, capacity
factor 1.0 (c = 17): the expert parameters and active FLOPs of
`tc_k2_bpr_digits.py`.
Shared settings and naming: `configs/routers/recipe.py`.

  python main.py --config=configs/routers/tc_k2_bpr_fine2_digits.py \
      --workdir=/tmp/routers/tc_k2_bpr_fine2

Cost (`--config.dry_run=True`): 371k parameters
(172k active per token), 6.9 MFLOPs per image.
Result (800 steps, one run): test accuracy 0.973, 157 s on 2
shared CPU cores.
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='token_choice', k=2, capacity_factor=1.0,
                       batch_priority=True, granularity=2)
