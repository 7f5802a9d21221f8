"""Top-2 token choice with BPR and Final Output Masking, on digits
(budget 2).

`tc_k2_bpr_digits.py` with FOM (Elbayad et al. 2023; fairseq `moe_fom`):
in training each token's whole MoE output is zeroed with probability 0.2
(the token keeps only its residual), no rescaling; at evaluation the MoE
output is scaled by 0.8.
Shared settings and naming: `vmoe/recipes/routers.py`.

  python main.py --config=configs/routers/tc_k2_bpr_fom_digits.py \\
      --workdir=/tmp/routers/tc_k2_bpr_fom

Cost (`--config.dry_run=True`): 369k parameters
(170k active per token), 6.3 MFLOPs per image.
Result: not measured yet (run the router study,
`notebooks/router_study.ipynb`, or the command above).
"""

from vmoe.recipes import routers as recipe


def get_config():
  return recipe.digits(router='token_choice', k=2, capacity_factor=1.0,
                       batch_priority=True, final_output_mask_rate=0.2)
