"""Soft MoE-S/16: 128 experts with one slot each in the second half of blocks.

Reproduces: Soft MoE S/16 128E (Puigcerver et al. 2023): ViT-S/16 whose
blocks 6-11 are Soft MoE layers with 128 experts x 1 slot, GAP head, one image
per routing group (196 tokens); ImageNet-1k, 300 epochs at batch 4096.
Training recipe: big_vision's ImageNet-1k ViT recipe
(big_vision/configs/vit_i1k.py) with the AugReg preset medium2
(RandAugment(2, 15), mixup 0.5), sigmoid cross-entropy, eval at resize 256
+ central crop 224 (`common.imagenet_recipe`).

Cost (`--config.dry_run=True`): 923M parameters (the paper: 933M with its MAP
head), 9.7 GFLOPs per image.

  python main.py --config=configs/soft_moe_s16.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config(), aug='medium2')
  config.model.variant = 'S/16'
  config.model.pool = 'gap'
  config.model.moe = common.moe_config(
      layers='second_half', router='soft', num_experts=128, num_slots=1,
      group_size=196, importance_loss_weight=0.0, load_loss_weight=0.0)
  return config
