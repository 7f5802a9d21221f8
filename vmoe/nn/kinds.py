"""A small registry of swappable units (routers, attention kinds, block
kinds, MoE layer kinds): name -> class, each class declaring its config
`OPTIONS` (name -> default) and, optionally, `validate(c, need)`.

  ATTENTION = kinds.Registry('attention kind')
  @ATTENTION.register('moh')
  class MixtureOfHeads(...):
    OPTIONS = dict(moh_shared_heads=1)

Units of one registry share one flat option namespace (the fields of one
config dict), so two units declaring the same option must give it the same
default. The model asks the registry for the class by name and never
branches on names itself.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Callable

from vmoe.config import ConfigError, checker, fail


class Registry:
  """name -> class, in registration order."""

  def __init__(self, what: str):
    self.what = what  # 'router', 'attention kind', ... (for messages)
    self._classes: dict[str, type] = {}

  def register(self, name: str) -> Callable[[type], type]:
    """Class decorator registering `cls` under `name` (sets `cls.NAME`)."""
    def wrap(cls: type) -> type:
      if name in self._classes:
        raise ValueError(f'{self.what} {name!r} is registered twice')
      for option, default in getattr(cls, 'OPTIONS', {}).items():
        for other_name, other in self._classes.items():
          if option in other.OPTIONS and other.OPTIONS[option] != default:
            raise ValueError(
                f'{self.what} {name!r} option {option!r} defaults to '
                f'{default!r} but {self.what} {other_name!r} declares '
                f'{other.OPTIONS[option]!r}')
      cls.NAME = name
      self._classes[name] = cls
      return cls
    return wrap

  def unregister(self, name: str) -> None:
    """Removes `name` (tests registering a throwaway unit)."""
    self._classes.pop(name)

  def get(self, name: str) -> type:
    """The class registered as `name` (KeyError naming the choices)."""
    if name not in self._classes:
      raise KeyError(f'{self.what} {name!r} is not one of {self.names()}')
    return self._classes[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._classes)

  def default_options(self) -> dict[str, Any]:
    """{option: default} of every registered class."""
    out = {}
    for cls in self._classes.values():
      out.update(getattr(cls, 'OPTIONS', {}))
    return out

  def options(self, values: Any = None, **extra) -> types.SimpleNamespace:
    """Every option's default overridden by `values` (a mapping or None),
    plus `extra` (context the model adds), as attributes."""
    merged = self.default_options()
    merged.update(dict(values.items()) if values is not None else {})
    merged.update(extra)
    return types.SimpleNamespace(**merged)

  def check(self, name: Any, values: Any, *, field: str, options_field: str,
            **context) -> None:
    """Validates a config's choice of unit and its options: `name` (the
    value of `field`) is registered, every key of `values` (the mapping at
    `options_field`, or None) is a known option and none of another unit is
    set away from its default, then the unit's own `validate(c, need,
    **context)`. Raises ConfigError with one line naming the field."""
    if not isinstance(name, str) or name not in self._classes:
      fail(field, name, f'is not one of {self.names()}')
    values = values if values is not None else {}
    known = self.default_options()
    for key in values.keys():
      if key not in known:
        raise ConfigError(f'{options_field}.{key} is not a known option '
                          f'(known: {", ".join(sorted(known)) or "none"})')
    for key in self.foreign_options(name, values):
      fail(f'{options_field}.{key}', values[key],
           f'is not an option of {field}={name!r}')
    cls = self.get(name)
    validate = getattr(cls, 'validate', None)
    if validate is not None:
      validate(self.options(values), checker(options_field, values_or(
          values, known)), **context)

  def foreign_options(self, name: str, values: Any) -> list[str]:
    """Options of other units that `values` (a mapping) sets away from their
    defaults: they would be ignored by unit `name`."""
    own = getattr(self.get(name), 'OPTIONS', {})
    return [key for key, default in self.default_options().items()
            if key not in own and key in values and values[key] != default]


def values_or(values: Any, defaults: dict[str, Any]) -> dict[str, Any]:
  """`values` (a mapping) over `defaults`, for messages naming a value."""
  return {**defaults, **dict(values.items())}


@functools.cache
def compose(mixin: type, base: type) -> type:
  """The class `mixin` over `base` (cached: one class per pair).

  Kinds that extend a standard module (an attention kind adding a router to
  the standard attention, a block kind routing tokens around the standard
  block) are mixins: their `__init__` calls the base's, so they keep its
  parameters (same names and shapes: checkpoints of the standard model load
  into them), and they reuse its methods. The base comes from the caller,
  so kind modules never import the model that uses them.
  """
  return type(mixin.__name__, (mixin, base),
              {'__module__': mixin.__module__, '__doc__': mixin.__doc__,
               '__qualname__': f'{mixin.__qualname__}[{base.__qualname__}]'})


class Standard:
  """The kind that is the base class itself (no options)."""
  OPTIONS: dict[str, Any] = {}

  @classmethod
  def validate(cls, c, need, **context):
    """Checks the kind's options in the merged options `c`."""
    del c, need, context

  @classmethod
  def build(cls, base: type, options: Any, *args, **kwargs):
    del options
    return base(*args, **kwargs)


class Mixin(Standard):
  """A kind composed over the standard class (see `compose`); its
  `__init__` takes `options` (the merged kind options) besides the base's
  arguments."""

  @classmethod
  def build(cls, base: type, options: Any, *args, **kwargs):
    return compose(cls, base)(*args, options=options, **kwargs)
