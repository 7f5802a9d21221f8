"""Command: evaluate a trained MoE checkpoint at several eval capacity factors.

V-MoE models can be evaluated at another capacity than they were trained with
(Riquelme et al. 2021, Sec. 4): more capacity drops fewer tokens at more cost.

  python -m vmoe.evaluate.capacity_sweep --workdir=/tmp/vmoe_b16_digits \
      --capacity_factors=0.5,1.0,1.5,2.0

Prints one line per capacity factor (accuracy, loss, mean dropped fraction)
and writes `<workdir>/capacity_sweep.json`. The model is the newest
checkpoint that restores and verifies, read as the trainer's resume reads it
(`vmoe.analysis.load`), with the config it records; --config (e.g. to
evaluate on another data_dir) must match it in every field that defines the
run. Bad arguments are one line `error: ...` (exit 2) before any work, and
nothing is written on an error. The computation is
`vmoe.analysis.capacity_sweep` (which also compares routing settings and
several trained models); this module is its command line.
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from typing import Sequence

import ml_collections
from absl import app
from absl import flags

from vmoe import config_flag

RESULTS_NAME = 'capacity_sweep.json'


def define_flags() -> types.SimpleNamespace:
  """Defines the command's flags (only when run as a command: importing the
  library defines no absl flags, which are global)."""
  return types.SimpleNamespace(
      config=config_flag.define_config_flag(
          'config', "Config file of the run (default: the one the workdir's "
          'checkpoint records).'),
      workdir=flags.DEFINE_string('workdir', None,
                                  'Workdir with checkpoints.'),
      capacity_factors=flags.DEFINE_list(
          'capacity_factors', ['0.5', '1.0', '1.5', '2.0'],
          'Eval capacity factors to try.'))


def parse_factors(values: Sequence[str]) -> list[float]:
  """--capacity_factors as finite numbers > 0; ValueError (one line)."""
  shown = f'--capacity_factors={",".join(values)}'
  if not values or not any(v.strip() for v in values):
    raise ValueError(f'{shown} is empty: give capacity factors, e.g. '
                     '--capacity_factors=0.5,1.0,2.0')
  factors = []
  for v in values:
    try:
      factor = float(v)
    except ValueError:
      raise ValueError(f'{shown}: {v.strip()!r} is not a number') from None
    if not math.isfinite(factor) or factor <= 0:
      raise ValueError(f'{shown}: {v.strip()} must be a finite number > 0')
    factors.append(factor)
  return factors


def sweep(config: ml_collections.ConfigDict | None, workdir: str,
          capacity_factors: Sequence[float]) -> list[dict[str, float]]:
  """Eval metrics of the newest checkpoint of `workdir` at each capacity
  factor, with the routing options of the run's config (`config`, if given,
  must match it; `vmoe.analysis.capacity`)."""
  from vmoe import analysis  # pylint: disable=g-import-not-at-top
  trained = analysis.load(workdir, config=config)
  config = trained.config
  if config.model.get('moe') is None:
    raise ValueError('config.model.moe is None: a dense model has no capacity')
  priority = config.model.moe.get('batch_priority', False)
  frame = analysis.capacity_sweep(trained, capacity_factors,
                                  batch_priority=(priority,))
  return [{'capacity_factor': row.capacity_factor, 'step': int(row.step),
           'accuracy': row.accuracy, 'loss': row.loss,
           'dropped_fraction': row.dropped_fraction}
          for row in frame.itertuples()]


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv, f: types.SimpleNamespace):
  """The command; f: `define_flags()`."""
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not f.workdir.value:
    _fail('--workdir is required')
  try:
    factors = parse_factors(f.capacity_factors.value)
  except ValueError as e:
    _fail(str(e))
  config = config_flag.config_value(f.config)
  from vmoe import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vmoe.config import ConfigError  # pylint: disable=g-import-not-at-top
  try:
    results = sweep(config, f.workdir.value, factors)
  except (ValueError, FileNotFoundError, workdir_lib.WorkdirError,
          ConfigError) as e:
    _fail(str(e).splitlines()[0])
  print('| eval capacity factor | accuracy | loss | dropped fraction |')
  print('|---:|---:|---:|---:|')
  for r in results:
    print(f"| {r['capacity_factor']:.2f} | {r['accuracy']:.4f} | "
          f"{r['loss']:.4f} | {r['dropped_fraction']:.4f} |")
  workdir_lib.write_atomic(os.path.join(f.workdir.value, RESULTS_NAME),
                           json.dumps(results, indent=1).encode())


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags), flags_parser=config_flag.parse_flags)
