"""CPU counterpart of `soft_moe_b16.py` on the embedded digits data.

ViT-mu/2 (4 blocks) with GAP head; the second half of the blocks (2 and 3)
are Soft MoE layers (Puigcerver et al. 2023) with 16 experts x 1 slot, one
image (16 tokens) per routing group, so slots = tokens as in the paper's
B/16 128E setting (196 tokens, 128 slots).

  python main.py --config=configs/soft_moe_b16_digits.py --workdir=/tmp/soft_digits

Expected: test accuracy ~0.97 in 2-4 minutes on 2 CPU cores.
"""

from vmoe.recipes import common


def get_config():
  config = common.digits_recipe(common.get_base_config())
  config.model.pool = 'gap'
  config.model.moe = common.moe_config(
      layers='second_half', router='soft', num_experts=16, num_slots=1,
      group_size=16, importance_loss_weight=0.0, load_loss_weight=0.0)
  return config
