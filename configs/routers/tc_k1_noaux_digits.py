"""Top-1 token choice without auxiliary losses, on digits (budget 1).

`tc_k1_digits.py` with the importance and load losses switched off: the
baseline of LIMoE's entropy losses (`tc_k1_entropy_digits.py`).
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/tc_k1_noaux_digits.py \\
      --workdir=/tmp/routers/tc_k1_noaux

Cost (`--config.dry_run=True`): 369k parameters
(137k active per token), 5.1 MFLOPs per image.
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='token_choice', k=1, capacity_factor=1.0,
                       importance_loss_weight=0.0, load_loss_weight=0.0)
