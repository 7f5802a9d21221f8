"""Runs every benchmark and writes one report into bench/results/.

    python -m bench --quick     # representative subset, < 3 min on 2 cores
    python -m bench             # full suite, < 15 min on 2 cores
    python -m bench --only layer,scaling

Measures the matmul peak once and shares it (and the machine info) with the
layer, scaling and model benchmarks; prints the markdown tables and writes
bench/results/report[_quick].md next to each benchmark's CSV/JSON/MD (and the
scaling PNG).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import common
from bench import targets

BENCHES = ('layer', 'scaling', 'model')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--only', default=','.join(BENCHES),
                      help=f'comma-separated subset of {BENCHES}')
  parser.add_argument('--repeats', type=int, default=None)
  args = parser.parse_args(argv)
  only = [b.strip() for b in args.only.split(',') if b.strip()]
  for b in only:
    if b not in BENCHES:
      parser.error(f'--only: {b!r} is not one of {BENCHES}')
  t0 = time.perf_counter()
  peak = common.matmul_peak()
  info = common.machine_info(peak)
  print(common.machine_line(info), flush=True)
  parts, layer, scaling_rows, model_rows = [], None, None, None
  if 'layer' in only:
    from bench import moe_layer  # pylint: disable=g-import-not-at-top
    md, rows, memory_rows, _ = moe_layer.run(args.quick, args.repeats, peak)
    parts.append(md)
    layer = (rows, memory_rows)
    print(md + '\n', flush=True)
  if 'scaling' in only:
    from bench import scaling  # pylint: disable=g-import-not-at-top
    md, scaling_rows, _ = scaling.run(args.quick, args.repeats, peak)
    parts.append(md)
    print(md + '\n', flush=True)
  if 'model' in only:
    from bench import model  # pylint: disable=g-import-not-at-top
    md, model_rows, _ = model.run(args.quick, args.repeats, peak)
    parts.append(md)
    print(md + '\n', flush=True)
  summary, _ = targets.evaluate(layer, scaling_rows, model_rows, args.quick)
  print(summary + '\n', flush=True)
  parts.insert(0, summary)
  cmd = 'python -m bench' + (' --quick' if args.quick else '')
  if args.only != ','.join(BENCHES):
    cmd += f' --only {args.only}'
  total = time.perf_counter() - t0
  report = '\n\n'.join([f'Command: `{cmd}` ({total / 60:.1f} min)', *parts])
  os.makedirs(common.RESULTS_DIR, exist_ok=True)
  path = os.path.join(common.RESULTS_DIR,
                      'report_quick.md' if args.quick else 'report.md')
  with open(path, 'w') as f:
    f.write(report + '\n')
  print(f'Total {total / 60:.1f} min; report written to {os.path.relpath(path)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
