"""CPU counterpart of `vmoe_s32_last2.py` on the embedded digits data.

ViT-mu/2 (4 blocks) with the V-MoE "Last-2" placement and routing of vmoe's
S/32 config: the last two odd blocks (1 and 3) are token-choice MoE layers,
8 experts, k=2, no Batch Priority Routing, router noise 1/E, importance +
load losses (0.005 each), routing groups of 8 images (136 tokens),
capacity factor 1.05 in training (a multiple of 4 slots) and 4.0 at
evaluation; trained with the digits recipe.

  python main.py --config=configs/vmoe_s32_last2_digits.py --workdir=/tmp/vmoe_digits

Expected: test accuracy ~0.97 in 2-4 minutes on 2 CPU cores; routing metrics
(dropped fraction, expert load, losses) in metrics.jsonl under `moe/block_*`.
"""

from vmoe.recipes import common


def get_config():
  config = common.digits_recipe(common.get_base_config())
  config.model.moe = common.moe_config(
      layers=(1, 3), router='token_choice', num_experts=8, k=2,
      group_size=8 * 17, capacity_factor=1.05, eval_capacity_factor=4.0,
      capacity_multiple=4, batch_priority=False, noise_std=1 / 8,
      importance_loss_weight=0.005, load_loss_weight=0.005)
  return config
