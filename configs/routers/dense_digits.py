"""Dense ViT-mu/2 baseline of the router comparison on digits.

The `common.digits_recipe` model without MoE layers: 1 MLP application per
token (the budget-1 rows match it, the budget-2 rows double its MLP FLOPs in
blocks 1 and 3).
Shared settings and naming: `configs/routers/recipe.py`.

  python main.py --config=configs/routers/dense_digits.py \
      --workdir=/tmp/routers/dense

Cost (`--config.dry_run=True`): 136k parameters, 5.0 MFLOPs per image.
Result (800 steps, one run): test accuracy 0.983, 306 s on 2
shared CPU cores.
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits()
