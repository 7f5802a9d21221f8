"""Routers of the MoE layer, registered by name (`model.moe.router`).

Each module of this package defines one `base.Router` subclass: its
parameters, its pure decision function of the router logits and its metrics.
Adding a router = one new module with a class decorated
`@registry.register('name')` (`vmoe.nn.routers.registry`) + one import line
at the end of this file.

  routers.get('token_choice')  -> the Router class
  routers.names()              -> registered names, in registration order
  routers.default_options()    -> {option: default} of every router
"""

from __future__ import annotations

# pylint: disable-next=unused-import
from vmoe.nn.routers.registry import default_options, get, names, register

# Registrations: one line per router module.
# pylint: disable=g-import-not-at-top,wrong-import-position
from vmoe.nn.routers import token_choice
from vmoe.nn.routers import expert_choice
from vmoe.nn.routers import soft
from vmoe.nn.routers import sinkhorn_token_choice
from vmoe.nn.routers import sinkhorn_expert_choice
from vmoe.nn.routers import sparsity_constrained
