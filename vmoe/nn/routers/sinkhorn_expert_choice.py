"""Sinkhorn expert choice: every expert takes its top-c tokens by the plan.

"Routers in Vision Mixture of Experts" (Liu et al., TMLR 2024),
google-research/vmoe's `KLProjectionNoisyTopItemsPerExpertRouter`: the
entropic transport plan of `sinkhorn_token_choice` (20 Sinkhorn iterations
on the noisy logits in training), then each expert takes the c tokens with
the largest plan entries for it (`vmoe.nn.routing.expert_choice_from_gates`).
Combine weights as in `sinkhorn_token_choice` (`ot_combine_weights`; the
default softmax of the logits the plan was computed from is vmoe's).
"""

from __future__ import annotations

from vmoe.kernels import registry as kernel_registry

from vmoe.nn import optimal_transport as ot
from vmoe.nn import routing as rt
from vmoe.nn.routers import expert_choice
from vmoe.nn.routers import sinkhorn_token_choice as stc
from vmoe.nn.routers import registry


@registry.register('sinkhorn_expert_choice')
class SinkhornExpertChoiceRouter(expert_choice.ExpertChoiceRouter):
  """Expert choice on the Sinkhorn plan, c = ceil(s * capacity_factor / e).

  Options: noise_std, sinkhorn_iterations, sinkhorn_mode, ot_combine_weights.
  Only the z-loss (weight 0 by default) enters its auxiliary loss: vmoe's
  router returns an auxiliary loss of 0 (tests/data/ot_aux_losses.npz).
  """
  OPTIONS = dict(expert_choice.ExpertChoiceRouter.OPTIONS,
                 **stc.SINKHORN_OPTIONS)
  DECISION = rt.ExpertChoiceRouting
  # Forced logits would break the transport plan (a column of zeros).
  SUPPORTS_FORCING = False

  @classmethod
  def validate(cls, c, need):
    super().validate(c, need)
    stc.validate_sinkhorn_options(c, need)

  def __init__(self, dim, c, **kw):
    super().__init__(dim, c, **kw)
    self.sinkhorn_iterations = c.sinkhorn_iterations
    self.sinkhorn_mode = c.sinkhorn_mode
    self.combine_weights = c.ot_combine_weights

  def plan(self, logits):
    """[g, s, e] Sinkhorn plan of the routing (noisy) logits."""
    return ot.sinkhorn(logits['noisy'], num_iters=self.sinkhorn_iterations,
                       mode=self.sinkhorn_mode)

  def decide(self, logits, *, capacity):
    scores, combine = stc.scores_and_combine(self.plan(logits), logits,
                                             self.combine_weights)
    expert_choice = kernel_registry.lookup(
        self.kernels, 'routing', 'expert_choice_from_gates',
        rt.expert_choice_from_gates)
    return expert_choice(scores, capacity=capacity, combine_gates=combine)
