"""CPU counterpart of `soft_moe_s16.py` on the embedded digits data.

ViT-mu/2 (4 blocks), GAP head; blocks 2 and 3 are Soft MoE layers with 32
experts x 1 slot over groups of 2 images (32 tokens, 32 slots): the many-
small-experts regime of the paper at CPU size.

  python main.py --config=configs/soft_moe_s16_digits.py --workdir=/tmp/soft_s_digits

Expected: test accuracy ~0.97 in 2-4 minutes on 2 CPU cores.
"""

from vmoe.recipes import common


def get_config():
  config = common.digits_recipe(common.get_base_config())
  config.model.pool = 'gap'
  config.model.moe = common.moe_config(
      layers='second_half', router='soft', num_experts=32, num_slots=1,
      group_size=32, importance_loss_weight=0.0, load_loss_weight=0.0)
  return config
