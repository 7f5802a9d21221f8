"""Mixture-of-depths blocks, on digits (below budget 1).

MoD (Raposo et al. 2024) in every other block (1 and 3) of
`dense_digits.py`: a router picks 9 of the 17 tokens of each image (the
class token always among them, capacity 0.5), those go through the block
with their update weighted by the router logit; the other 8 (47%) skip it.
Dense MLPs.
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/mod_c50_digits.py \\
      --workdir=/tmp/routers/mod_c50

Cost (`--config.dry_run=True`): 136k parameters,
3.8 MFLOPs per image (dense: 5.0).
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits_kinds(
      block='mod', block_options=dict(mod_layers='every:2', mod_capacity=0.5))
