"""The registry of attention kinds (`model.attention`)."""

from vmoe.nn import kinds

ATTENTION = kinds.Registry('attention kind')
