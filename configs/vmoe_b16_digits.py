"""CPU counterpart of `vmoe_b16.py` on the embedded digits data.

ViT-mu/2 (4 blocks) with the V-MoE "Every-2" recipe: every odd block is a
token-choice MoE layer with 8 experts, k=2, no Batch Priority Routing in
training (as vmoe's V-MoE configs), capacity factor 1.05, router noise 1/E,
importance + load losses; routing groups of 4 images (68 tokens), as V-MoE
groups tokens of several images.

  python main.py --config=configs/vmoe_b16_digits.py --workdir=/tmp/vmoe_b16_digits

Expected: test accuracy ~0.97 in 2-4 minutes on 2 CPU cores.
"""

from vmoe.recipes import common


def get_config():
  config = common.digits_recipe(common.get_base_config())
  config.model.moe = common.moe_config(
      layers='every:2', router='token_choice', num_experts=8, k=2,
      group_size=4 * 17, capacity_factor=1.05, batch_priority=False,
      noise_std=1 / 8, importance_loss_weight=0.005, load_loss_weight=0.005)
  return config
