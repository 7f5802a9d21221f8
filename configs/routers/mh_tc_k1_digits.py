"""Multi-Head MoE over top-1 token choice, on digits (budget 1, FLOP- and
parameter-matched to `tc_k1_digits.py`).

MH-MoE (Wu et al. 2024; matched sizing of Huang et al. 2024): each token is
projected (64 -> 64) and split into 2 sub-tokens of 32; the 136 sub-tokens
of a group of 4 images are routed top-1 (capacity factor 1.0, c = 5) over
30 experts of 32 -> 64 -> 32, then merged (64 -> 64). Against the 8
experts of 64 -> 128 -> 64: the same expert-MLP FLOPs plus the two
projections paid by the smaller hidden size (64 = 128 - 64 / k), and the
same parameters (30 = 2 * (8 * 128 - 64) / 64 experts).
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/mh_tc_k1_digits.py \\
      --workdir=/tmp/routers/mh_tc_k1

Cost (`--config.dry_run=True`): 373k parameters
(130k active per token), 5.5 MFLOPs per image
(tc_k1: 369k, 137k, 5.1: the excess is routing and dispatch over 30 experts).
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(kind='multi_head', mh_heads=2, mh_sizing='matched',
                       router='token_choice', k=1, capacity_factor=1.0)
