"""The registry of MoE layer kinds (`model.moe.kind`)."""

from vmoe.nn import kinds

KINDS = kinds.Registry('MoE layer kind')
