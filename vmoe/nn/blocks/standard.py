"""The standard encoder block (`model.block='standard'`): the class the
model passes in, `vmoe.nn.vit.EncoderBlock`."""

from vmoe.nn import kinds
from vmoe.nn.blocks.registry import BLOCKS


@BLOCKS.register('standard')
class Standard(kinds.Standard):
  """Builds the base class as is; no options."""
