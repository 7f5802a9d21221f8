"""V-MoE-B/16 "Every-2": 8 experts in every odd block, k=2.

Reproduces: V-MoE-B/16, E=8, K=2 (Riquelme et al. 2021) with the MoE
settings of google-research/vmoe's `configs/vmoe_paper/
pretrain_imagenet21k.py` ('ViT-B/16, E=8, K=2, Every 2, 300 Epochs'):
blocks 1, 3, ..., 11 are MoE layers, top-2 token choice, capacity factor
1.05, router noise 1/E, importance + load losses (0.005 each), routing
groups of 8 images (8 x 197 tokens). Batch Priority Routing is OFF in
training and evaluation, as in every V-MoE paper config of vmoe
(`batch_priority = False`, "By default we don't use batch priority for
training the model"); the paper evaluates BPR at reduced capacity, which
`--config.model.moe.batch_priority=True` (or the capacity-sweep command)
reproduces. Trained here on ImageNet-1k with the same recipe as the dense
`vit_b16.py` (big_vision's ImageNet-1k ViT recipe, AugReg medium2,
`common.imagenet_recipe`) so that the two compare; vmoe pre-trains this
model on ImageNet-21k (RandAugment(2, 20), mixup 0.5).

  python main.py --config=configs/vmoe_b16.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds

Cost (`--config.dry_run=True`): 285M parameters (115M active per token),
48 GFLOPs per image (1.35x ViT-B/16: k=2 at capacity 1.05 in 6 of 12 MLPs).
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config(), aug='medium2')
  config.model.variant = 'B/16'
  config.model.moe = common.moe_config(
      layers='every:2', router='token_choice', num_experts=8, k=2,
      group_size=8 * 197, capacity_factor=1.05, batch_priority=False,
      noise_std=1 / 8, importance_loss_weight=0.005, load_loss_weight=0.005)
  return config
