"""The plain MoE layer (`model.moe.kind='moe'`): `vmoe.nn.moe.MoeLayer`."""

from __future__ import annotations

from vmoe.nn.moe_kinds.registry import KINDS


@KINDS.register('moe')
class Standard:
  """Builds `moe_cls` (the MoeLayer) as configured; no options of its own."""
  OPTIONS = {}

  @classmethod
  def validate(cls, c, need, dim=None, mlp_dim=None):
    del c, need, dim, mlp_dim

  @classmethod
  def build(cls, moe_cls, dim, hidden_dim, *, config, options, **kw):
    del options
    return moe_cls(dim, hidden_dim, config=config, **kw)
