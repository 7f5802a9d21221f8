"""Command: evaluate a trained MoE checkpoint at several eval capacity factors.

V-MoE models can be evaluated at another capacity than they were trained with
(Riquelme et al. 2021, Sec. 4): more capacity drops fewer tokens at more cost.

  python -m vmoe.evaluate.capacity_sweep --config=configs/vmoe_b16_digits.py \
      --workdir=/tmp/vmoe_b16_digits --capacity_factors=0.5,1.0,1.5,2.0

Prints one line per capacity factor (accuracy, loss, mean dropped fraction)
and writes `<workdir>/capacity_sweep.json`. The computation is
`vmoe.analysis.capacity_sweep` (which also compares routing settings and
several trained models); this module is its command line.
"""

from __future__ import annotations

import json
import os
import sys
import types
from typing import Sequence

import ml_collections
from absl import app
from absl import flags

from vmoe import config_flag


def define_flags() -> types.SimpleNamespace:
  """Defines the command's flags (only when run as a command: importing the
  library defines no absl flags, which are global)."""
  return types.SimpleNamespace(
      config=config_flag.define_config_flag('config',
                                            'Config file of the run.'),
      workdir=flags.DEFINE_string('workdir', None,
                                  'Workdir with checkpoints.'),
      capacity_factors=flags.DEFINE_list(
          'capacity_factors', ['0.5', '1.0', '1.5', '2.0'],
          'Eval capacity factors to try.'))


def sweep(config: ml_collections.ConfigDict, workdir: str,
          capacity_factors: Sequence[float]) -> list[dict[str, float]]:
  """Eval metrics of the latest checkpoint of `workdir` at each capacity
  factor, with the routing options of `config` (`vmoe.analysis.capacity`)."""
  from vmoe import analysis  # pylint: disable=g-import-not-at-top
  if config.model.get('moe') is None:
    raise ValueError('config.model.moe is None: a dense model has no capacity')
  trained = analysis.load(workdir, config=config)
  priority = config.model.moe.get('batch_priority', False)
  frame = analysis.capacity_sweep(trained, capacity_factors,
                                  batch_priority=(priority,))
  return [{'capacity_factor': row.capacity_factor, 'step': int(row.step),
           'accuracy': row.accuracy, 'loss': row.loss,
           'dropped_fraction': row.dropped_fraction}
          for row in frame.itertuples()]


def main(argv, f: types.SimpleNamespace):
  """The command; f: `define_flags()`."""
  del argv
  config = config_flag.config_value(f.config)
  if config is None or not f.workdir.value:
    print('error: --config and --workdir are required', file=sys.stderr)
    sys.exit(2)
  try:
    factors = [float(x) for x in f.capacity_factors.value]
  except ValueError:
    print(f'error: --capacity_factors={",".join(f.capacity_factors.value)} '
          'must be numbers', file=sys.stderr)
    sys.exit(2)
  try:
    results = sweep(config, f.workdir.value, factors)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print('| eval capacity factor | accuracy | loss | dropped fraction |')
  print('|---:|---:|---:|---:|')
  for r in results:
    print(f"| {r['capacity_factor']:.2f} | {r['accuracy']:.4f} | "
          f"{r['loss']:.4f} | {r['dropped_fraction']:.4f} |")
  with open(os.path.join(f.workdir.value, 'capacity_sweep.json'), 'w') as out:
    json.dump(results, out, indent=1)


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags), flags_parser=config_flag.parse_flags)
