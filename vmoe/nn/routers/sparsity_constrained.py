"""Sparsity-constrained expert choice: experts take the support of a k-sparse
transport plan.

"Sparsity-Constrained Optimal Transport" (Liu, Puigcerver, Blondel; ICLR
2023, https://arxiv.org/abs/2209.15466) and "Routers in Vision Mixture of
Experts" (Liu et al., TMLR 2024); google-research/vmoe's
`KSparseProjectionTransportTopItemsPerExpertRouter`. The softmax gates of
each group are projected onto transport plans (rows 1, columns s / e) whose
expert columns have at most c non-zeros, c = the expert capacity, by a fixed
budget of Adam steps on the semi-dual (`vmoe.nn.optimal_transport.
sparse_plan`: 20 steps, learning rate 1e-2, far from converged). Each expert
then takes its top-c tokens by the plan (`vmoe.nn.routing.
expert_choice_from_gates`): the tokens where its column is non-zero, then,
if the column has fewer than c non-zeros, the lowest-index tokens of zero
mass (as vmoe's top-c does).

Combine weights (`ot_combine_weights`): the softmax gates (default, as in
vmoe; 'clean_softmax' is the same here unless noise is asked for) or the plan
entries; no gradient flows through the plan (vmoe's plan is
built from stop-gradient projections, so its derivative is zero too), so with
'plan' the gate receives gradients from the auxiliary losses only.

Noise: vmoe's router adds none, so `noise_std=None` means no noise here; a
number adds Gaussian noise of that std to the logits in training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vmoe.kernels import registry as kernel_registry

from vmoe.config import is_int, is_number
from vmoe.nn import optimal_transport as ot
from vmoe.nn import routing as rt
from vmoe.nn.routers import base
from vmoe.nn.routers import registry
from vmoe.nn.routers import expert_choice
from vmoe.nn.routers import sinkhorn_token_choice as stc


@registry.register('sparsity_constrained_expert_choice')
class SparsityConstrainedExpertChoiceRouter(expert_choice.ExpertChoiceRouter):
  """Expert choice on the c-sparse OT plan of the softmax gates.

  Options: sparse_ot_steps (20), sparse_ot_learning_rate (1e-2),
  ot_combine_weights ('softmax' | 'clean_softmax' | 'plan'), noise_std (None
  = no noise). Only the z-loss (weight 0 by default) enters its auxiliary
  loss: vmoe's router returns an auxiliary loss of 0
  (tests/data/ot_aux_losses.npz).
  """
  OPTIONS = dict(expert_choice.ExpertChoiceRouter.OPTIONS,
                 ot_combine_weights='softmax', sparse_ot_steps=20,
                 sparse_ot_learning_rate=1e-2)
  DECISION = rt.ExpertChoiceRouting
  # Forced logits would break the transport plan (a column of zeros).
  SUPPORTS_FORCING = False

  @classmethod
  def validate(cls, c, need):
    super().validate(c, need)
    stc.validate_combine_weights(c, need)
    need(is_int(c.sparse_ot_steps) and c.sparse_ot_steps >= 1,
         'sparse_ot_steps', 'must be an integer >= 1')
    need(is_number(c.sparse_ot_learning_rate)
         and c.sparse_ot_learning_rate > 0, 'sparse_ot_learning_rate',
         'must be a number > 0')

  def __init__(self, dim, c, **kw):
    super().__init__(dim, c, **kw)
    if c.noise_std is None:
      self.noise_std = 0.0
    self.steps = c.sparse_ot_steps
    self.learning_rate = float(c.sparse_ot_learning_rate)
    self.combine_weights = c.ot_combine_weights

  def plan(self, logits: dict[str, jax.Array], capacity: int) -> jax.Array:
    """[g, s, e] plan with at most `capacity` non-zeros per expert column."""
    gates = jax.nn.softmax(logits['noisy'].astype(jnp.float32), axis=-1)
    return ot.sparse_plan(gates, max_nonzeros=capacity, num_steps=self.steps,
                          learning_rate=self.learning_rate)

  def decide(self, logits, *, capacity):
    scores, combine = stc.scores_and_combine(self.plan(logits, capacity),
                                             logits, self.combine_weights)
    expert_choice = kernel_registry.lookup(
        self.kernels, 'routing', 'expert_choice_from_gates',
        rt.expert_choice_from_gates)
    return expert_choice(scores, capacity=capacity, combine_gates=combine)
