"""Sinkhorn token choice: top-k experts per token by an entropic transport plan.

"Routers in Vision Mixture of Experts" (Liu, Blondel, Riquelme, Puigcerver;
TMLR 2024, https://arxiv.org/abs/2401.15969), google-research/vmoe's
`KLProjectionNoisyTopExpertsPerItemRouter`. The router logits of each group
define an entropic OT problem (cost -logits, epsilon 1, one unit of mass per
token, s / e per expert) solved by a fixed number of Sinkhorn iterations
(`vmoe.nn.optimal_transport.sinkhorn`); every discrete choice of token choice
(the top-k experts and their order, the Batch Priority Routing priority =
the token's largest plan entry, the capacity drops) is then made on the plan
instead of the softmax gates, with `vmoe.nn.routing.token_choice_from_gates`.

Auxiliary loss, as vmoe's router: the importance loss and, in training with
noise, the load loss of softmax token choice, weighted by `model.moe.
importance_loss_weight` / `load_loss_weight`, from the softmax gates and
not from the plan (importance: softmax of the clean logits; load: the clean
logits against each token's k-th largest noisy logit, the logits the plan
was computed from, at noise std `noise_std`). vmoe adds no balance loss
(`balance_loss_weight` is ignored here; it is reported) and no z-loss; the
z-loss (clean logits) is ours, with weight `z_loss_weight` (0 by default).
So at z_loss_weight=0 the auxiliary loss is vmoe's
`KLProjectionNoisyTopExpertsPerItemRouter` with the same weights and its
noise_std = ours * e (tests/data/ot_aux_losses.npz). vmoe's router defaults
both weights to 0, ours to the library's 0.005 (the V-MoE configs' values).

Combine weights (`ot_combine_weights`):
  'softmax' (default): the raw softmax gates, over all experts and not
    renormalised, of the logits the plan was computed from (noisy in
    training, as in vmoe's Sinkhorn expert choice and in softmax token
    choice). The plan only makes discrete choices and gets no gradient.
  'clean_softmax': the softmax of the noise-free logits. In training vmoe's
    Sinkhorn token choice routes on the noisy plan but combines with these;
    equal to 'softmax' in evaluation and without noise.
  'plan': the plan entries; the gradient flows through the unrolled
    Sinkhorn iterations (vmoe differentiates the plan implicitly, which
    agrees once the iterations have converged).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vmoe.kernels import registry as kernel_registry

from vmoe.config import Need, is_int
from vmoe.nn import optimal_transport as ot
from vmoe.nn import routing as rt
from vmoe.nn.routers import base
from vmoe.nn.routers import registry
from vmoe.nn.routers import token_choice

COMBINE_WEIGHTS = ('softmax', 'clean_softmax', 'plan')
SINKHORN_OPTIONS = dict(sinkhorn_iterations=20, sinkhorn_mode='kernel',
                        ot_combine_weights='softmax')


def validate_sinkhorn_options(c, need: Need) -> None:
  need(is_int(c.sinkhorn_iterations) and c.sinkhorn_iterations >= 1,
       'sinkhorn_iterations', 'must be an integer >= 1')
  need(c.sinkhorn_mode in ot.SINKHORN_MODES, 'sinkhorn_mode',
       f'is not one of {ot.SINKHORN_MODES}')
  validate_combine_weights(c, need)


def validate_combine_weights(c, need: Need) -> None:
  need(c.ot_combine_weights in COMBINE_WEIGHTS, 'ot_combine_weights',
       f'is not one of {COMBINE_WEIGHTS}')


def scores_and_combine(plan: jax.Array, logits: dict[str, jax.Array],
                       combine: str) -> tuple[jax.Array, Any]:
  """(routing scores, combine gates or None = the scores) of a plan [g, s, e].

  With softmax combine weights the plan is a discrete choice only: its
  gradient is stopped (no work is spent differentiating the solver).
  """
  if combine == 'plan':
    return plan, None
  source = logits['logits'] if combine == 'clean_softmax' else logits['noisy']
  return (jax.lax.stop_gradient(plan),
          jax.nn.softmax(source.astype(jnp.float32), axis=-1))


@registry.register('sinkhorn_token_choice')
class SinkhornTokenChoiceRouter(token_choice.TokenChoiceRouter):
  """Token choice on the Sinkhorn plan of the (noisy) router logits.

  Parameters and options of token choice (gate kernel [e, d], k,
  batch_priority, renormalize_gates, noise_std) plus sinkhorn_iterations
  (20), sinkhorn_mode ('kernel', vmoe's arithmetic | 'log') and
  ot_combine_weights (see the module docstring). The importance, load (in
  training with noise) and z-losses enter its auxiliary loss, not the
  balance loss, as in vmoe (see the module docstring).
  """
  OPTIONS = dict(token_choice.TokenChoiceRouter.OPTIONS, **SINKHORN_OPTIONS)
  LOSSES = ('importance_loss', 'load_loss', 'z_loss')
  DECISION = rt.TokenChoiceRouting
  # Forced logits would break the transport plan (a column of zeros).
  SUPPORTS_FORCING = False

  @classmethod
  def validate(cls, c, need):
    super().validate(c, need)
    validate_sinkhorn_options(c, need)

  def __init__(self, dim, c, **kw):
    super().__init__(dim, c, **kw)
    self.sinkhorn_iterations = c.sinkhorn_iterations
    self.sinkhorn_mode = c.sinkhorn_mode
    self.combine_weights = c.ot_combine_weights

  def plan(self, logits: dict[str, jax.Array]) -> jax.Array:
    """[g, s, e] Sinkhorn plan of the routing (noisy) logits."""
    return ot.sinkhorn(logits['noisy'], num_iters=self.sinkhorn_iterations,
                       mode=self.sinkhorn_mode)

  def decide(self, logits, *, capacity):
    scores, combine = scores_and_combine(self.plan(logits), logits,
                                         self.combine_weights)
    token_choice = kernel_registry.lookup(
        self.kernels, 'routing', 'token_choice_from_gates',
        rt.token_choice_from_gates)
    return token_choice(
        scores, num_selected=self.k, capacity=capacity,
        batch_priority=self.batch_priority,
        renormalize=self.renormalize_gates, combine_gates=combine)

  def metrics(self, r, logits, *, train):
    # The common gate metrics (softmax gates, not the plan, as vmoe's losses):
    # the decision ranked experts by the plan, not by the gates, so it is not
    # reused as their ranking (the load loss thresholds the noisy logits).
    return self.gate_metrics(r, logits, train=train, num_selected=self.k)
