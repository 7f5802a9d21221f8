"""Expert choice: every expert picks its top-c tokens (Zhou et al. 2022).

https://arxiv.org/abs/2202.09368. Softmax gates over experts as in token
choice; each expert then takes the c tokens of the group with the largest
gate for it, so every expert is full and a token is processed by 0..e
experts. The decision math is `vmoe.nn.routing.expert_choice_from_logits`.
"""

from __future__ import annotations

from vmoe.kernels import registry as kernel_registry
from vmoe.nn import routing as rt
from vmoe.nn.routers import base
from vmoe.nn.routers import registry


@registry.register('expert_choice')
class ExpertChoiceRouter(base.GateRouter):
  """Each expert takes its top-c tokens, c = ceil(s * capacity_factor / e).

  Only the z-loss enters its auxiliary loss (the load is balanced by
  construction); the other losses are reported.
  """
  DECISION = rt.ExpertChoiceRouting
  SUPPORTS_FORCING = True  # softmax gates: see rt.force_logits

  @classmethod
  def fine_grained(cls, c, m):
    # m times more experts of h / m hidden units, each still taking
    # s * capacity_factor / e tokens: the capacity factor counts per expert.
    return dict(capacity_factor=c.capacity_factor * m,
                eval_capacity_factor=(None if c.eval_capacity_factor is None
                                      else c.eval_capacity_factor * m))

  def __init__(self, dim, c, **kw):
    super().__init__(dim, c, **kw)
    self.kernels = c.kernels  # model.moe.kernels: XLA or the routing kernel

  def decide(self, logits, *, capacity):
    expert_choice = kernel_registry.lookup(
        self.kernels, 'routing', 'expert_choice_from_logits',
        rt.expert_choice_from_logits)
    return expert_choice(logits['noisy'], capacity=capacity)

  def metrics(self, r, logits, *, train):
    return self.gate_metrics(r, logits, train=train)
