"""The registry of encoder block kinds (`model.block`)."""

from vmoe.nn import kinds

BLOCKS = kinds.Registry('block kind')
