"""Encoder block kinds (`model.block`), registered by name; their options
live in `model.block_options`.

  'standard'  the pre-LN ViT block (`vmoe.nn.vit.EncoderBlock`);
  'mod'       Mixture-of-Depths (Raposo et al. 2024): a router sends the
              top-c tokens of each image through the block, the others skip
              it on the residual path;
  'mone'      Mixture of Nested Experts (Jain et al. 2024): every token goes
              through a nested slice (the weights' prefix) of the block, the
              slice chosen by a router under a compute budget.

A kind applies to the blocks its `<kind>_layers` option selects (same
syntax as `model.moe.layers`); the other blocks stay standard. The kinds
are mixins over the standard block class (`vmoe.nn.kinds.compose`), which
the model passes in, so they keep its parameters (a standard checkpoint
loads into them) and reuse its computation:

  blocks.build('mod', EncoderBlock, options, dim, num_heads, mlp, ...)

`options` is the merged `model.block_options` with the context the model
adds (`num_prefix_tokens`: 1 with a class token). A new kind is a module of
this package with a class registered by `@registry.BLOCKS.register(name)`
(`LAYERS_OPTION`: the name of its layers option) plus one import line below.
"""

from __future__ import annotations

from typing import Any

from vmoe.nn.blocks.registry import BLOCKS

get = BLOCKS.get
names = BLOCKS.names
default_options = BLOCKS.default_options


def build(kind: str, base: type, options: Any, *args, **kwargs):
  """The block of `kind` over the standard block class `base`."""
  return get(kind).build(base, options, *args, **kwargs)


def layers_spec(kind: str, options: Any) -> Any:
  """The spec of the blocks `kind` applies to ('none' for 'standard')."""
  option = getattr(get(kind), 'LAYERS_OPTION', None)
  return 'none' if option is None else getattr(options, option)


# Registrations: one line per kind module.
# pylint: disable=g-import-not-at-top,wrong-import-position
from vmoe.nn.blocks import standard
from vmoe.nn.blocks import mod
from vmoe.nn.blocks import mone
