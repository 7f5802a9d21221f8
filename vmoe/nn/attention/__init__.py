"""Attention kinds of the encoder blocks (`model.attention`), registered by
name; their options live in `model.attention_options`.

  'mha'    the standard multi-head attention (`vmoe.nn.vit.MultiHeadAttention`);
  'moh'    mixture-of-head attention (Jin et al. 2024): heads are experts,
           shared heads plus top-k routed heads per token;
  'gated'  per-head sigmoid gates on the attention output (Qiu et al. 2025).

Every kind answers `attend(x, train=..., rngs=...) -> (y, metrics)`
(x, y: [b, n, d]; metrics as an MoE layer's, with an 'auxiliary_loss' if it
has one). The non-standard kinds are mixins over the standard class
(`vmoe.nn.kinds.compose`), which the block passes in:

  attention.build('moh', MultiHeadAttention, options, dim, num_heads, ...)

so they keep its parameters and methods (`heads`, `project`). A new kind is
a module of this package with a class registered by
`@registry.ATTENTION.register(name)` plus one import line below.
"""

from __future__ import annotations

from typing import Any

from vmoe.nn.attention.registry import ATTENTION

get = ATTENTION.get
names = ATTENTION.names
default_options = ATTENTION.default_options


def build(kind: str, base: type, options: Any, *args, **kwargs):
  """The attention module of `kind` over the standard class `base`.

  options: the merged `model.attention_options` (an object with
  attributes); args, kwargs: the standard class's constructor arguments.
  """
  return get(kind).build(base, options, *args, **kwargs)


# Registrations: one line per kind module.
# pylint: disable=g-import-not-at-top,wrong-import-position
from vmoe.nn.attention import standard
from vmoe.nn.attention import moh
from vmoe.nn.attention import gated
