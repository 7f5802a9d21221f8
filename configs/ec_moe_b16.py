"""Expert-choice MoE ViT-B/16: 8 experts in every odd block, capacity factor 2.

Reproduces: expert-choice routing (Zhou et al. 2022, "EC-CF2") applied to
V-MoE-B/16: each expert takes its top-C tokens of a routing group with
C = group_size * 2 / E, so on average every token is processed by two experts
(same compute as top-2 token choice); no auxiliary balancing loss is needed.
Groups of 4 images (788 tokens); dropout 0.1. Training recipe: big_vision's ImageNet-1k ViT recipe
(big_vision/configs/vit_i1k.py) with the AugReg preset medium2
(RandAugment(2, 15), mixup 0.5), sigmoid cross-entropy, eval at resize 256
+ central crop 224 (`common.imagenet_recipe`); 300 epochs at
batch 4096.

Cost (`--config.dry_run=True`): 285M parameters, 47 GFLOPs per image.

  python main.py --config=configs/ec_moe_b16.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config(), aug='medium2')
  config.model.variant = 'B/16'
  config.model.dropout = 0.1
  config.model.moe = common.moe_config(
      layers='every:2', router='expert_choice', num_experts=8,
      group_size=4 * 197, capacity_factor=2.0, noise_std=0.0,
      importance_loss_weight=0.0, load_loss_weight=0.0)
  return config
