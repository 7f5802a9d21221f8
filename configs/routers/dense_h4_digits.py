"""Dense ViT-mu/2 with 4 attention heads, on digits (budget 1).

`dense_digits.py` with 4 heads of 16 dimensions instead of 2 of 32: the
baseline of the attention kinds (`moh_h4_k2_digits.py`,
`gated_h4_digits.py`).
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/dense_h4_digits.py \\
      --workdir=/tmp/routers/dense_h4

Cost (`--config.dry_run=True`): 136k parameters,
5.0 MFLOPs per image.
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits_kinds(num_heads=4)
