"""The `--config` flag of the command-line tools, with one-line errors.

`define_config_flag()` is `ml_collections.config_flags.DEFINE_config_file`
(a Python file with `get_config()`, optionally `file.py:arg`, and overrides
such as `--config.optimizer.learning_rate=1e-3`) with three differences:

* Mistakes are reported as one line naming the flag, instead of a traceback:
  a config file that is missing, a directory or does not load; an override
  of a field that does not exist (with the nearest known name); an override
  inside a field that is None (e.g. `--config.model.moe.k=1` on a dense
  model); a value that does not parse as the field's type. `parse_flags`
  (for `absl.app.run(main, flags_parser=parse_flags)`) prints it and exits 2.
* Fields whose value is None or a tuple accept any Python literal, so that
  optional fields can be set (`--config.model.moe.capacity=4`,
  `--config.model.moe.noise_std=None`) and tuple fields take their other
  documented forms (`--config.model.moe.layers=every:2`, `...layers=1,3`).
  ml_collections would otherwise refuse every override of a None field and
  parse a tuple override element by element. The types of such values are
  checked by config validation afterwards.
* The parsed config is a plain locked ConfigDict (`config_value`), whatever
  the overrides were.
"""

from __future__ import annotations

import difflib
import importlib.machinery
import importlib.util
import os
import re
import sys
import traceback
from typing import Any, Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigFlagError(Exception):
  """A one-line message about the --config flag or one of its overrides.

  Not a ValueError on purpose: absl would wrap a ValueError raised while
  parsing into its own longer message.
  """


def _where(exc: BaseException, path: str) -> str:
  """' (file.py, line N)' of the innermost frame of `exc` in `path`."""
  frames = [f for f in traceback.extract_tb(exc.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  if not frames:
    return ''
  return f' ({os.path.basename(path)}, line {frames[-1].lineno})'


def _first_line(exc: BaseException) -> str:
  lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
  return f'{type(exc).__name__}: {lines[0]}' if lines else type(exc).__name__


def load_config_file(argument: str, flag: str = 'config'
                     ) -> ml_collections.ConfigDict:
  """Runs `get_config()` of the file in `argument` ('path' or 'path:arg')."""
  path, colon, arg = argument.partition(':')
  show = f'--{flag}={argument}'
  if not path:
    raise ConfigFlagError(f'{show}: empty path (e.g. --{flag}='
                          'configs/vit_digits.py)')
  if not os.path.exists(path):
    raise ConfigFlagError(f'{show}: no such file')
  if os.path.isdir(path):
    raise ConfigFlagError(f'{show} is a directory, not a config file (e.g. '
                          f'--{flag}=configs/vit_digits.py)')
  try:
    loader = importlib.machinery.SourceFileLoader(f'{flag}_config', path)
    # A fresh module each time (load_module would reuse an earlier one's
    # namespace); registered, as ml_collections does, for code that looks
    # the module up by name.
    module = importlib.util.module_from_spec(
        importlib.util.spec_from_loader(loader.name, loader))
    sys.modules[loader.name] = module
    loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigFlagError(
        f'{show} does not parse: {e.msg} ({os.path.basename(path)}, line '
        f'{e.lineno})') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigFlagError(f'{show} failed to load: {_first_line(e)}'
                          f'{_where(e, path)}') from None
  get_config = getattr(module, 'get_config', None)
  if not callable(get_config):
    raise ConfigFlagError(f'{show} defines no get_config() function')
  try:
    config = get_config(arg) if colon else get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigFlagError(f'{show}: get_config() raised {_first_line(e)}'
                          f'{_where(e, path)}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigFlagError(f'{show}: get_config() returned a '
                          f'{type(config).__name__}, not a ConfigDict')
  return config


def override_paths(argv: Sequence[str], flag: str = 'config') -> list[str]:
  """Field paths of the `--config.a.b=...` arguments in argv, in order."""
  pattern = re.compile(rf'^--?(?:no)?{re.escape(flag)}\.([^=]+)')
  return [m.group(1) for m in map(pattern.match, argv) if m]


def check_override_path(config: ml_collections.ConfigDict, path: str,
                        flag: str = 'config') -> None:
  """Raises ConfigFlagError unless `path` names an existing field."""
  node: Any = config
  walked = flag
  for part in path.split('.'):
    if isinstance(node, ml_collections.ConfigDict):
      if part not in node:
        names = sorted(node.keys())
        close = difflib.get_close_matches(part, names, n=1)
        hint = (f'did you mean {walked}.{close[0]}?' if close else
                f'its fields: {", ".join(names)}')
        raise ConfigFlagError(
            f'--{flag}.{path}: {walked} has no field {part!r} ({hint})')
      node = node[part]
    elif node is None:
      dense = (' (a dense model: start from an MoE config, e.g. '
               'configs/vmoe_b16_digits.py)'
               if walked == f'{flag}.model.moe' else '')
      raise ConfigFlagError(f'--{flag}.{path}: {walked} is None in this '
                            f'config, so it has no field {part!r}{dense}')
    elif isinstance(node, (tuple, list)) and part.isdigit():
      if int(part) >= len(node):
        raise ConfigFlagError(f'--{flag}.{path}: {walked} has '
                              f'{len(node)} elements')
      node = node[int(part)]
    else:
      raise ConfigFlagError(
          f'--{flag}.{path}: {walked}={node!r} is a value, not a group of '
          f'fields; it has no field {part!r}')
    walked = f'{walked}.{part}'


def _literal_fields(config: ml_collections.ConfigDict) -> None:
  """Makes None- and tuple-valued fields accept any literal (see above)."""
  for key, value in list(config.items(preserve_field_references=True)):
    if isinstance(value, ml_collections.ConfigDict):
      _literal_fields(value)
    elif value is None or isinstance(value, tuple):
      config[key] = ml_collections.FieldReference(value, field_type=object)


class _ConfigFileParser(flags.ArgumentParser):
  """Loads the config file and checks the override paths of the argv."""

  def __init__(self, name: str, sys_argv: Sequence[str] | None):
    self.name = name
    self._sys_argv = sys_argv

  def flag_type(self):
    return 'config object'

  def parse(self, path):
    config = load_config_file(path, self.name)
    argv = sys.argv if self._sys_argv is None else self._sys_argv
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    for field in override_paths(argv, self.name):
      check_override_path(config, field, self.name)
    _literal_fields(config)
    config.lock()
    return config


def define_config_flag(name: str = 'config',
                       help_string: str = 'Path to a config file '
                       '(configs/*.py).', *,
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None):
  """Defines --<name> (a config file plus --<name>.field overrides).

  sys_argv: the command line the overrides are read from (default
  sys.argv at parse time), as for `config_flags.DEFINE_config_file`.
  """
  holder = config_flags.DEFINE_config_file(
      name, None, help_string, flag_values=flag_values, lock_config=True,
      sys_argv=sys_argv)
  flag_values[name].parser = _ConfigFileParser(name, sys_argv)
  return holder


def config_value(holder) -> ml_collections.ConfigDict | None:
  """The parsed config as a plain locked ConfigDict (None if not given).

  Overridden literal fields may hold dicts; they become ConfigDicts here.
  """
  config = holder.value
  if config is None:
    return None
  plain = ml_collections.ConfigDict(config.to_dict())
  plain.lock()
  return plain


def parse_or_error(argv: Sequence[str],
                   flag_values: flags.FlagValues = flags.FLAGS
                   ) -> tuple[list[str] | None, str | None]:
  """Parses argv into flag_values: (remaining arguments, None) or
  (None, the one-line error)."""
  try:
    return flag_values(argv), None
  except ConfigFlagError as e:
    return None, str(e)
  except flags.UnrecognizedFlagError as e:
    close = difflib.get_close_matches(e.flagname, list(flag_values), n=1)
    hint = f' (did you mean --{close[0]}?)' if close else ''
    return None, f'unknown flag --{e.flagname}{hint}'
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return None, lines[0] if lines else type(e).__name__
  except Exception as e:  # pylint: disable=broad-except
    return None, f'cannot parse the command line: {_first_line(e)}'


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl flags parser: a bad flag is one line `error: ...` and exit 2."""
  remaining, message = parse_or_error(argv)
  if message is None:
    return remaining
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
