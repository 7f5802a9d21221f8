"""CPU counterpart of `ec_moe_b16.py` on the embedded digits data.

ViT-mu/2 (4 blocks), every odd block an expert-choice MoE layer (Zhou et al.
2022): 8 experts each take their top C = ceil(68 * 2 / 8) = 17 tokens of a
group of 4 images (capacity factor 2), no router noise, no balancing loss.

  python main.py --config=configs/ec_moe_b16_digits.py --workdir=/tmp/ec_digits

Expected: test accuracy ~0.97 in 2-4 minutes on 2 CPU cores.
"""

from vmoe.recipes import common


def get_config():
  config = common.digits_recipe(common.get_base_config())
  config.model.moe = common.moe_config(
      layers='every:2', router='expert_choice', num_experts=8,
      group_size=4 * 17, capacity_factor=2.0, noise_std=0.0,
      importance_loss_weight=0.0, load_loss_weight=0.0)
  return config
