"""Token choice: every token picks its top-k experts (V-MoE, GShard, Switch).

V-MoE (Riquelme et al. 2021, https://arxiv.org/abs/2106.05974): softmax gates
over experts, top-k per token, a per-expert capacity with the tokens over it
dropped, optional Batch Priority Routing (tokens served by descending top
gate, so the least confident are dropped) and noisy gating in training. The
decision math is `vmoe.nn.routing.token_choice_from_logits`.
"""

from __future__ import annotations

from vmoe.kernels import registry as kernel_registry
from vmoe.config import is_int
from vmoe.nn import routing as rt
from vmoe.nn.routers import base
from vmoe.nn.routers import registry


@registry.register('token_choice')
class TokenChoiceRouter(base.GateRouter):
  """Top-k token choice with capacity and optional Batch Priority Routing.

  Options: k (experts per token), batch_priority, renormalize_gates (combine
  with the top-k gates divided by their sum), noise_std. All four auxiliary
  losses enter its auxiliary loss (importance and load as in V-MoE, GShard
  balance, z-loss).
  """
  OPTIONS = dict(base.GateRouter.OPTIONS, k=2, batch_priority=False,
                 renormalize_gates=False)
  LOSSES = base.LOSS_KEYS
  DECISION = rt.TokenChoiceRouting
  SUPPORTS_FORCING = True  # softmax gates: see rt.force_logits

  @classmethod
  def validate(cls, c, need):
    super().validate(c, need)
    need(is_int(c.k) and c.k >= 1, 'k', 'must be an integer >= 1')
    need(c.k <= c.num_experts, 'k',
         f'exceeds model.moe.num_experts={c.num_experts}')
    need(isinstance(c.batch_priority, bool), 'batch_priority',
         'must be a bool')
    need(isinstance(c.renormalize_gates, bool), 'renormalize_gates',
         'must be a bool')

  @classmethod
  def fine_grained(cls, c, m):
    return dict(k=c.k * m)  # m times more experts per token, each h / m

  def __init__(self, dim, c, **kw):
    super().__init__(dim, c, **kw)
    self.k = c.k
    self.batch_priority = c.batch_priority
    self.renormalize_gates = c.renormalize_gates
    self.kernels = c.kernels  # model.moe.kernels: XLA or the routing kernel

  def capacity(self, s, capacity_factor):
    return self._capacity(s, capacity_factor, num_selected=self.k)

  def applications_per_token(self, s, capacity):
    return float(self.k)  # at most; dropped pairs are not applied

  def decide(self, logits, *, capacity):
    token_choice = kernel_registry.lookup(
        self.kernels, 'routing', 'token_choice_from_logits',
        rt.token_choice_from_logits)
    return token_choice(logits['noisy'], num_selected=self.k,
                        capacity=capacity,
                        batch_priority=self.batch_priority,
                        renormalize=self.renormalize_gates)

  def metrics(self, r, logits, *, train):
    # The decision already ranked the experts of every token: reuse that.
    return self.gate_metrics(r, logits, train=train, num_selected=self.k,
                             ranked=r.expert_index)
