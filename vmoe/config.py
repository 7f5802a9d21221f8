"""`ConfigError` and the value checks every validator shares.

Validation happens before any work: each check raises `ConfigError` with one
line naming the field and the bad value (`config.model.moe.k=0 must be an
integer >= 1`), which the commands print as `error: ...` and exit 2. Values
may be of any type (command-line overrides of None or tuple fields are
Python literals), so the predicates below accept anything and never raise.

    need = checker('config.fewshot', config.fewshot)
    need(is_int(c.seeds) and c.seeds >= 1, 'seeds', 'must be an integer >= 1')

This module imports only the standard library: every package (nn, data,
checkpoints, train, evaluate) may import it.
"""

from __future__ import annotations

import math
import importlib
from typing import Any, Callable, Mapping

# need(ok, field, why): raises a one-line error naming <prefix>.<field> and
# its value when `ok` is false.
Need = Callable[[bool, str, str], None]


class ConfigError(ValueError):
  """An invalid config value; the message is one line naming the field."""


class MissingPackageError(ConfigError):
  """An optional package that the config asks for is not installed (one
  line naming the `pip install` that fixes it)."""


def require(module: str, pip: str, what: str) -> Any:
  """`import module`, or MissingPackageError naming `pip install <pip>`."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise MissingPackageError(
        f'{what} needs {pip!r}, which is not installed: pip install '
        f'{pip}') from None


def is_bool(v: Any) -> bool:
  return isinstance(v, bool)


def is_int(v: Any) -> bool:
  """An int that is not a bool (True is an int in Python)."""
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  """A finite int or float that is not a bool."""
  return (isinstance(v, (int, float)) and not isinstance(v, bool)
          and math.isfinite(v))


def is_pair(v: Any) -> bool:
  """A tuple or list of two finite numbers."""
  return isinstance(v, (tuple, list)) and len(v) == 2 and all(
      map(is_number, v))


def is_name(v: Any) -> bool:
  """A non-empty string."""
  return isinstance(v, str) and bool(v)


def fail(field: str, value: Any, why: str,
         error: type[Exception] = ConfigError) -> None:
  """Raises `error('<field>=<value!r> <why>')`."""
  raise error(f'{field}={value!r} {why}')


def check(ok: bool, field: str, value: Any, why: str,
          error: type[Exception] = ConfigError) -> None:
  """`fail(...)` unless `ok`."""
  if not ok:
    fail(field, value, why, error)


def checker(prefix: str, values: Any,
            error: type[Exception] = ConfigError) -> Need:
  """need(ok, field, why) for the fields of `values` (a mapping or an
  object with attributes), named `<prefix>.<field>`."""
  def get(field):
    if isinstance(values, Mapping):
      return values.get(field)
    return getattr(values, field, None)

  def need(ok: bool, field: str, why: str) -> None:
    if not ok:
      fail(f'{prefix}.{field}', get(field), why, error)
  return need


def first_line(e: BaseException) -> str:
  """'<ExceptionType>: <first non-empty line of its message>'."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f'{type(e).__name__}: {lines[0] if lines else ""}'
