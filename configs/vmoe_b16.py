"""V-MoE-B/16 "Every-2": 8 experts in every odd block, k=2, BPR.

Reproduces: V-MoE-B/16, E=8, K=2 (Riquelme et al. 2021, Table 8 family)
on ImageNet-1k: blocks 1, 3, ..., 11 are MoE layers, top-2 token choice with
Batch Priority Routing, capacity factor 1.05, router noise 1/E, importance +
load losses (0.005 each), routing groups of 4 images (788 tokens); 300 epochs
at batch 4096 (`common.imagenet_recipe`).

  python main.py --config=configs/vmoe_b16.py --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds

Cost (`--config.dry_run=True`): 285M parameters (115M active per token),
48 GFLOPs per image (1.35x ViT-B/16: k=2 at capacity 1.05 in 6 of 12 MLPs).
"""

from vmoe.recipes import common


def get_config():
  config = common.imagenet_recipe(common.get_base_config())
  config.model.variant = 'B/16'
  config.model.dropout = 0.1
  config.model.moe = common.moe_config(
      layers='every:2', router='token_choice', num_experts=8, k=2,
      group_size=4 * 197, capacity_factor=1.05, batch_priority=True,
      noise_std=1 / 8, importance_loss_weight=0.005, load_loss_weight=0.005)
  return config
