"""The standard multi-head attention (`model.attention='mha'`): the class
the encoder block passes in, `vmoe.nn.vit.MultiHeadAttention`."""

from vmoe.nn import kinds
from vmoe.nn.attention.registry import ATTENTION


@ATTENTION.register('mha')
class Standard(kinds.Standard):
  """Builds the base class as is; no options."""
