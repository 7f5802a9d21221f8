"""V-MoE-S/32 "Last-2": 8 experts on the last two odd blocks, k=2, BPR.

Reproduces: the V-MoE S/32 ILSVRC2012 setting (Riquelme et al. 2021; the
public `vmoe_s32_last2_ilsvrc2012` models): ViT-S/32 whose blocks 9 and 11
(0-based) are MoE layers with 8 experts, top-2 token choice with Batch Priority
Routing, capacity factor 1.05, router noise 1/E, importance + load losses
(0.005 each), routing groups of 4 images; 300 epochs at batch 4096
(`common.imagenet_recipe`). RandAugment is not included.

  python main.py --config=configs/vmoe_s32_last2.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds

Cost (`--config.dry_run=True`): 39M parameters (25M active per token), 2.6
GFLOPs per image. Evaluate at other capacities with
--config.model.moe.eval_capacity_factor=...
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config())
  config.model.variant = 'S/32'
  tokens = (224 // 32) ** 2 + 1  # 50 per image
  config.model.moe = common.moe_config(
      layers=(9, 11), router='token_choice', num_experts=8, k=2,
      group_size=4 * tokens, capacity_factor=1.05, batch_priority=True,
      noise_std=1 / 8, importance_loss_weight=0.005, load_loss_weight=0.005)
  return config
