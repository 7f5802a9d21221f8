"""Soft MoE-B/16: 128 experts with one slot each in the second half of blocks.

Reproduces: Soft MoE B/16 128E (Puigcerver et al. 2023, "From Sparse to Soft
Mixtures of Experts"): blocks 6-11 are Soft MoE layers with 128 experts and 1
slot per expert, L2-normalised tokens and slot parameters with a learned
scale, global-average-pool head; every image is its own routing group (196
tokens, 128 slots). Trained here on ImageNet-1k for 300 epochs at batch 4096
(the paper pre-trains on JFT-4B with sigmoid cross-entropy). Training recipe: big_vision's ImageNet-1k ViT recipe
(big_vision/configs/vit_i1k.py) with the AugReg preset medium2
(RandAugment(2, 15), mixup 0.5), sigmoid cross-entropy, eval at resize 256
+ central crop 224 (`common.imagenet_recipe`).

  python main.py --config=configs/soft_moe_b16.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds

Cost (`--config.dry_run=True`): 3.7B parameters, 36 GFLOPs per image (1.005x
ViT-B/16: 128 slots for 196 tokens cost less than the dense MLP they replace,
plus the dispatch/combine contractions).
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config(), aug='medium2')
  config.model.variant = 'B/16'
  config.model.pool = 'gap'
  config.model.moe = common.moe_config(
      layers='second_half', router='soft', num_experts=128, num_slots=1,
      group_size=196, importance_loss_weight=0.0, load_loss_weight=0.0)
  return config
