"""Mixture of Nested Experts, on digits (budget 0.5).

MoNE (Jain et al. 2024) in every block of `dense_digits.py`: 4 nested
experts of 8, 16, 32 and 64 dimensions (prefixes of the block's weights),
tokens routed by Expert Preferred Routing under the effective capacity 0.5
(capacities from the paper's program, delta 2, beta 10); the class token
always takes the full block. Evaluate the trained model at other budgets
with `python -m vmoe.analysis.budget --workdir=...`.
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/mone_e4_b50_digits.py \\
      --workdir=/tmp/routers/mone_e4_b50

Cost (`--config.dry_run=True`): 137k parameters,
2.5 MFLOPs per image at budget 0.5 (dense: 5.0).
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits_kinds(
      block='mone', block_options=dict(mone_layers='every:1', mone_experts=4,
                                       mone_budget=0.5))
