"""Sinkhorn token choice ViT-S/16 with 32 experts.

Reproduces: the sinkhorn token choice router of "Routers in Vision Mixture of
Experts: An Empirical Study" (Liu, Blondel, Riquelme, Puigcerver; TMLR 2024;
google-research/vmoe `projects/sparsity_constrained_ot`) at 32 experts, as the
study compares routers, on ImageNet-1k with this repository's recipe (300
epochs at batch 4096, `common.imagenet_recipe`): ViT-S/16 whose blocks 6-11
are MoE layers (the placement of the Soft MoE configs here), one image (197
tokens) per routing group; each token takes its top expert by the 20-iteration
Sinkhorn plan of the noisy router logits (cost -logits, epsilon 1, columns s /
e), capacity factor 1.0 (c = 7), combine weights = softmax gates.
Shared settings: `configs/routers/recipe.py`.

  python main.py --config=configs/routers/sinkhorn_tc_s16.py \
      --workdir=$WORKDIR \
      --config.dataset.data_dir=/path/to/tfds

Cost (`--config.dry_run=True`): 242M parameters (22.1M active per
token), 9.9 GFLOPs per image.
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.imagenet('S/16', router='sinkhorn_token_choice', k=1,
                         capacity_factor=1.0)
