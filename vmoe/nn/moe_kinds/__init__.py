"""Kinds of MoE layer (`model.moe.kind`), registered by name.

A kind decides what fills the MLP slot of an MoE block around the routed
experts of `vmoe.nn.moe.MoeLayer`:

  'moe'         the MoeLayer itself (every router, dispatch, shared and
                fine-grained experts);
  'multi_head'  Multi-Head MoE (Wu et al. 2024; the FLOP- and
                parameter-matched version of Huang et al. 2024): tokens
                split into sub-tokens routed by an inner MoeLayer.

  moe_kinds.get('multi_head')  -> the kind's class
  moe_kinds.names()            -> registered names
  moe_kinds.default_options()  -> {option: default} of every kind

A new kind is a module of this package whose class has `OPTIONS`,
`validate(c, need, dim=None, mlp_dim=None)` and `build(moe_cls, dim,
hidden_dim, *, config, options, **kw)` (moe_cls: `MoeLayer`, passed in so
that kinds never import the layer; options: `config` merged with the
defaults), registered with `@registry.KINDS.register(name)`, plus one
import line below; `vmoe.nn.moe.build_layer` asks the registry.
"""

from __future__ import annotations

# pylint: disable-next=unused-import
from vmoe.nn.moe_kinds.registry import KINDS

get = KINDS.get
names = KINDS.names
default_options = KINDS.default_options

# Registrations: one line per kind module.
# pylint: disable=g-import-not-at-top,wrong-import-position
from vmoe.nn.moe_kinds import standard
from vmoe.nn.moe_kinds import multi_head
