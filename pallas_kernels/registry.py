"""Kernel selection: `model.moe.kernels` -> the implementation of each part.

The MoE layer has four parts a Pallas kernel can replace:

  routing   the decision of a router from its scores (`vmoe.nn.routing`)
  dispatch  tokens to expert buffers and back (`vmoe.nn.dispatch`)
  gmm       the grouped matmuls of `dispatch='dropless'`
  soft      Soft MoE's softmax-weighted dispatch / combine

`model.moe.kernels` says which parts run as Pallas kernels:

  'xla'                     none: the plain XLA code everywhere
  'pallas'                  every part that has a kernel for the operation
  'pallas:routing,dispatch' only the listed parts (any of PARTS)
  'auto'                    the parts listed in AUTO for the default device's
                            platform. None anywhere yet: no kernel has been
                            measured faster than XLA on an accelerator, and
                            on CPU the kernels only run interpreted (slow).

An operation without a registered kernel, or one whose part is not
selected, uses its XLA implementation (the `default` of `lookup`): e.g. with
'pallas' a router whose decision has no kernel (Soft MoE's routing, a
Sinkhorn plan) keeps its XLA decision, and 'einsum' dispatch stays the
one-hot reference. The kernels pick their backend from the default device
('tpu' on TPU, 'triton' on GPU) and run interpreted on a CPU host (inside
the expert-parallel shard_map through the TPU interpreter, see
`compat.resolve_for`).

Consumers ask by (part, operation):

    fn = registry.lookup(kernels, 'routing', 'token_choice_from_logits',
                         rt.token_choice_from_logits)

Adding a kernel = its module plus ONE `register(part, operation, target)`
line in the block at the end of this file; the target ('module:attribute',
or a module) is imported on first use, so this file imports nothing but the
standard library (and `vmoe.config`) and nothing is imported unless selected.
The operations and the contract of their targets:

  ('routing', 'token_choice_from_logits')  = `rt.token_choice_from_logits`
  ('routing', 'token_choice_from_gates')   = `rt.token_choice_from_gates`
  ('routing', 'expert_choice_from_logits') = `rt.expert_choice_from_logits`
  ('routing', 'expert_choice_from_gates')  = `rt.expert_choice_from_gates`
  ('dispatch', <decision class name>)      a module with dispatch(r, x) ->
      [e, g, c, d] and combine(r, outputs) -> [g, s, d], as
      `vmoe.nn.dispatch.dispatch` / `combine` (used for every method but
      'einsum')
  ('gmm', 'ragged_dot')                    = `gmm(lhs [m, k], rhs [e, k, n],
      group_sizes [e]) -> [m, n]` (the dropless experts' matmuls)
  ('soft', 'SoftRouting')                  a module with dispatch(r, x) and
      combine(r, outputs) for `rt.SoftRouting` decisions
"""

from __future__ import annotations

import importlib
from typing import Any

from vmoe.config import ConfigError

PARTS = ('routing', 'dispatch', 'gmm', 'soft')
MODES = ('auto', 'xla', 'pallas')
# Parts that 'auto' runs as Pallas, per platform (jax.default_backend()).
# Empty until a kernel is measured faster than XLA on that platform.
AUTO: dict[str, tuple[str, ...]] = {'cpu': (), 'gpu': (), 'tpu': ()}

_REGISTRY: dict[tuple[str, str], Any] = {}


def register(part: str, operation: str, target: Any) -> None:
  """Registers `target` ('module:attr', 'module' or an object) as the kernel
  of `operation` in `part`."""
  if part not in PARTS:
    raise ValueError(f'kernel part {part!r} is not one of {PARTS}')
  if (part, operation) in _REGISTRY:
    raise ValueError(f'kernel ({part!r}, {operation!r}) is registered twice')
  _REGISTRY[(part, operation)] = target


def registered() -> tuple[tuple[str, str], ...]:
  """(part, operation) pairs that have a kernel."""
  return tuple(_REGISTRY)


def validate(spec: Any, field: str = 'model.moe.kernels') -> None:
  """Raises ConfigError with one line naming `field` for a bad spec."""
  _parse(spec, field)


def _parse(spec: Any, field: str) -> tuple[str, tuple[str, ...] | None]:
  """-> (mode, listed parts or None)."""
  if not isinstance(spec, str):
    raise ConfigError(f'{field}={spec!r} must be a string: one of {MODES} or '
                      "'pallas:PART,...'")
  mode, sep, rest = spec.partition(':')
  if mode not in MODES or (sep and mode != 'pallas'):
    raise ConfigError(f'{field}={spec!r} is not one of {MODES} or '
                      f"'pallas:PART,...' with PART in {PARTS}")
  if not sep:
    return mode, None
  listed = tuple(p.strip() for p in rest.split(','))
  bad = [p for p in listed if p not in PARTS]
  if bad or not listed:
    raise ConfigError(f'{field}={spec!r} names unknown kernel part '
                      f'{(bad or [""])[0]!r}; parts: {", ".join(PARTS)}')
  return mode, listed


def pallas_parts(spec: str, platform: str | None = None) -> frozenset[str]:
  """The parts that `spec` runs as Pallas on `platform` (default: jax's)."""
  mode, listed = _parse(spec, 'kernels')
  if mode == 'xla':
    return frozenset()
  if mode == 'auto':
    if platform is None:
      import jax  # pylint: disable=g-import-not-at-top
      platform = jax.default_backend()
    return frozenset(AUTO.get(platform, ()))
  return frozenset(PARTS if listed is None else listed)


def _resolve(target: Any) -> Any:
  if not isinstance(target, str):
    return target
  module, _, attr = target.partition(':')
  obj = importlib.import_module(module)
  return getattr(obj, attr) if attr else obj


def lookup(spec: str, part: str, operation: str, default: Any = None) -> Any:
  """The kernel of (part, operation) if `spec` selects it, else `default`."""
  if part not in pallas_parts(spec) or (part, operation) not in _REGISTRY:
    return default
  target = _REGISTRY[(part, operation)]
  if isinstance(target, str):
    target = _REGISTRY[(part, operation)] = _resolve(target)
  return target


def uses_kernel(spec: str, part: str, operation: str) -> bool:
  """Whether `lookup` would return a kernel (for tests and logs)."""
  return part in pallas_parts(spec) and (part, operation) in _REGISTRY


# Registrations: one line per kernel.
register('routing', 'token_choice_from_logits',
         'vmoe.kernels.routing:token_choice_from_logits')
register('routing', 'token_choice_from_gates',
         'vmoe.kernels.routing:token_choice_from_gates')
register('routing', 'expert_choice_from_logits',
         'vmoe.kernels.routing:expert_choice_from_logits')
register('routing', 'expert_choice_from_gates',
         'vmoe.kernels.routing:expert_choice_from_gates')
register('dispatch', 'TokenChoiceRouting', 'vmoe.kernels.dispatch')
register('dispatch', 'ExpertChoiceRouting', 'vmoe.kernels.dispatch')
register('gmm', 'ragged_dot', 'vmoe.kernels.gmm:gmm')
register('soft', 'SoftRouting', 'vmoe.kernels.soft_moe')
