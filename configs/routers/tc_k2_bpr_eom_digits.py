"""Top-2 token choice with BPR and Expert Output Masking, on digits
(budget 2).

`tc_k2_bpr_digits.py` with EOM (Elbayad et al. 2023; fairseq `moe_eom`, the
NLLB rate 0.2): in training each (token, expert) output is zeroed with
probability 0.2, no rescaling; at evaluation expert outputs are scaled by
0.8.
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/tc_k2_bpr_eom_digits.py \\
      --workdir=/tmp/routers/tc_k2_bpr_eom

Cost (`--config.dry_run=True`): 369k parameters
(170k active per token), 6.3 MFLOPs per image.
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='token_choice', k=2, capacity_factor=1.0,
                       batch_priority=True, expert_output_mask_rate=0.2)
