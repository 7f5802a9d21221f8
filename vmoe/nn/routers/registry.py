"""The router registry: name -> `base.Router` subclass (`model.moe.router`).

Router modules register their class with `@registry.register('name')`; the
package `vmoe.nn.routers` imports every router module and re-exports
`get`, `names` and `default_options`.
"""

from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator registering a `base.Router` subclass under `name`."""
  def wrap(cls: type) -> type:
    if name in _REGISTRY:
      raise ValueError(f'router {name!r} is registered twice')
    for option, default in cls.OPTIONS.items():
      for other_name, other in _REGISTRY.items():
        if option in other.OPTIONS and other.OPTIONS[option] != default:
          raise ValueError(
              f'router {name!r} option {option!r} defaults to {default!r} but '
              f'router {other_name!r} declares {other.OPTIONS[option]!r}')
    cls.NAME = name
    _REGISTRY[name] = cls
    return cls
  return wrap


def get(name: str) -> type:
  """The Router class registered as `name` (KeyError naming the choices)."""
  if name not in _REGISTRY:
    raise KeyError(f'router {name!r} is not one of {names()}')
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def default_options() -> dict[str, Any]:
  """Router-specific `model.moe` options of all routers with their defaults."""
  out = {}
  for cls in _REGISTRY.values():
    out.update(cls.OPTIONS)
  return out
