"""Memory and compile-time levers: remat, scanned layers, gradient
accumulation, and the dry run's memory estimate against a real run.

    python -m bench.memory --quick    # small models, a few minutes
    python -m bench.memory            # the targets' sizes (long on 2 cores)
    python -m bench.memory --only remat,scan

Sections (each on the library's train step, `bench.common.train_setup`:
AdamW, state donated, random data):

  remat    ViT-B/16 at batch 64 (quick: ViT-S/16 at batch 16): XLA's
           temporaries of the compiled train step and its median step time
           for model.remat 'none', 'full', 'dots_no_batch' and 'dots'.
           Target: 'full' cuts the temporaries >= 3x at <= 1.35x the time.
  scan     compile time (lower + compile) of the train step of 24-block
           models, unscanned vs model.scan_layers=True: ViT-L/16 and a
           V-MoE-L/16 with MoE in every other block (quick: a 24-block
           ViT-Ti/16). Target: >= 3x faster.
  accum    ViT-S/16 at batch 64 (quick: batch 16) in one pass vs
           grad_accum_steps k (micro-batches of 16, quick: 4): time per
           image. Target: <= 1.05x.
  estimate the dry run's per-device estimate (XLA memory analysis of the
           compiled step) against what the process allocates running it:
           the growth of its resident set during one step (sampled every
           millisecond) against the estimate's new allocations (outputs
           not in donated buffers + temporaries) during the program's first
           run (XLA:CPU keeps the temporaries for later runs), in a child
           process whose malloc maps large blocks and returns them when
           freed, so that the resident set follows the allocations; also on
           8 simulated CPU devices, where the process holds all 8 devices'
           buffers.

Times are medians of interleaved repeats (bench.common.time_interleaved);
compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import jax
import ml_collections

from bench import common
from vmoe.recipes import common as recipes
from vmoe.train import cost

SECTIONS = ('remat', 'scan', 'accum', 'estimate')


def _vit(variant: str, **fields) -> ml_collections.ConfigDict:
  cfg = recipes.get_base_config().model
  cfg.variant = variant
  for k, v in fields.items():
    cfg[k] = v
  return cfg


def _temp_and_time(cfgs: dict[str, ml_collections.ConfigDict], *, batch: int,
                   repeats: int, image: int = 224,
                   accum: dict[str, int] | None = None) -> dict[str, dict]:
  """{name: {'temp', 'total', 'seconds'}} of each model's train step."""
  calls, out, states = {}, {}, {}
  for name, cfg in cfgs.items():
    train, state, data = common.train_setup(
        cfg, batch=batch, image=image, classes=1000,
        grad_accum_steps=(accum or {}).get(name, 1))
    compiled = train.lower(state, data).compile()
    memory = cost.program_memory(compiled)
    out[name] = {'temp': memory['temporaries'], 'total': memory['total']}
    states[name] = state

    def call(name=name, compiled=compiled, data=data):
      states[name], metrics = compiled(states[name], data)
      return metrics['loss']
    calls[name] = call
    print(f'  [memory: {name} compiled, temporaries '
          f"{cost.format_bytes(memory['temporaries'])}]", flush=True)
  times = common.time_interleaved(calls, repeats, warmup=1)
  for name, seconds in times.items():
    out[name]['seconds'] = seconds
  return out


def remat_rows(quick: bool, repeats: int) -> list[dict]:
  variant, batch = ('S/16', 16) if quick else ('B/16', 64)
  policies = ('none', 'full', 'dots_no_batch', 'dots')
  cfgs = {p: _vit(variant, remat=p) for p in policies}
  res = _temp_and_time(cfgs, batch=batch, repeats=repeats)
  base = res['none']
  return [{'model': f'ViT-{variant}', 'batch': batch, 'remat': p,
           'temp_mib': res[p]['temp'] / 2**20,
           'temp_reduction': base['temp'] / max(res[p]['temp'], 1),
           'step_s': res[p]['seconds'],
           'time_ratio': res[p]['seconds'] / base['seconds']}
          for p in policies]


def _compile_seconds(cfg, batch: int) -> float:
  train, state, data = common.train_setup(cfg, batch=batch, image=224,
                                          classes=1000)
  t0 = time.perf_counter()
  train.lower(state, data).compile()
  return time.perf_counter() - t0


def scan_rows(quick: bool) -> list[dict]:
  moe = recipes.moe_config(layers='every:2', num_experts=8, k=2,
                           group_size=197)
  models = ({'ViT-Ti/16, 24 blocks': _vit('Ti/16', depth=24)} if quick else
            {'ViT-L/16': _vit('L/16'),
             'V-MoE-L/16 every-2, 8 experts': _vit('L/16', moe=moe)})
  rows = []
  for name, cfg in models.items():
    seconds = {}
    for scanned in (False, True):
      c = ml_collections.ConfigDict(cfg.to_dict())
      c.scan_layers = scanned
      seconds[scanned] = _compile_seconds(c, batch=2)
      print(f'  [memory: {name} scan_layers={scanned} compiled in '
            f'{seconds[scanned]:.1f} s]', flush=True)
    rows.append({'model': name, 'blocks': 24,
                 'compile_s': seconds[False], 'scanned_compile_s': seconds[True],
                 'speedup': seconds[False] / seconds[True]})
  return rows


def accum_rows(quick: bool, repeats: int) -> list[dict]:
  batch, micro = (16, 4) if quick else (64, 16)
  ks = (batch // micro,)
  cfgs = {'1': _vit('S/16')}
  cfgs.update({str(k): _vit('S/16') for k in ks})
  res = _temp_and_time(cfgs, batch=batch, repeats=repeats,
                       accum={str(k): k for k in ks})
  base = res['1']
  return [{'model': 'ViT-S/16', 'batch': batch, 'grad_accum_steps': int(k),
           'micro_batch': batch // int(k), 'temp_mib': r['temp'] / 2**20,
           'step_s': r['seconds'],
           'per_image_ratio': r['seconds'] / base['seconds']}
          for k, r in res.items()]


# ---------------------------------------------------------------------------
# The dry run's estimate against a real run (child processes).
# ---------------------------------------------------------------------------


def _rss() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _estimate_child(variant: str, batch: int) -> dict:
  """In the child: the step's estimate and its measured RSS growth."""
  cfg = _vit(variant)
  train, state, data = common.train_setup(cfg, batch=batch, image=224,
                                          classes=1000)
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding
  batch_sharding = sharding.NamedSharding(mesh, sharding.PartitionSpec('data'))
  replicated = sharding.NamedSharding(mesh, sharding.PartitionSpec())
  state = jax.device_put(state, replicated)
  data = jax.device_put(data, batch_sharding)
  step = jax.jit(train, donate_argnums=0,
                 out_shardings=(replicated, replicated))
  compiled = step.lower(state, data).compile()
  memory = cost.program_memory(compiled)
  # The first run allocates the temporaries (XLA:CPU keeps them for the
  # next runs of the program): its growth is what the estimate predicts.
  peak = [0]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss())
      time.sleep(0.001)

  before = _rss()
  thread = threading.Thread(target=sample)
  thread.start()
  state, metrics = compiled(state, data)
  jax.block_until_ready((state, metrics))
  done.set()
  thread.join()
  devices = jax.device_count()
  new = memory['outputs'] - memory['aliased'] + memory['temporaries']
  return {'model': f'ViT-{variant}', 'devices': devices, 'batch': batch,
          'estimate_total_mib': memory['total'] / 2**20,
          'estimate_new_mib': devices * new / 2**20,
          'measured_growth_mib': (peak[0] - before) / 2**20,
          'ratio': (peak[0] - before) / max(devices * new, 1)}


def estimate_rows(quick: bool) -> list[dict]:
  variant, batch = ('Ti/16', 8) if quick else ('S/16', 32)
  rows = []
  for devices in (1, 8):
    # Large blocks from mmap, returned to the OS when freed: the resident
    # set follows what is allocated (not what malloc keeps for reuse).
    env = dict(os.environ, VMOE_TUNE_MALLOC='0',
               GLIBC_TUNABLES='glibc.malloc.mmap_threshold=65536:'
               'glibc.malloc.trim_threshold=65536',
               XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                          f' --xla_force_host_platform_device_count={devices}'))
    code = ('import json, sys; from bench import memory; '
            f'print(json.dumps(memory._estimate_child({variant!r}, '
            f'{batch * devices})))')
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=common.REPO,
                         capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f'  [memory: estimate on {devices} devices done]', flush=True)
  return rows


def run(quick: bool, repeats: int | None = None,
        only: tuple[str, ...] = SECTIONS) -> tuple[str, dict]:
  reps = repeats or (3 if quick else 2)
  info = common.machine_info()
  parts = [f'### Memory levers ({"quick" if quick else "full"})', '',
           common.machine_line(info)]
  # section: (its rows, title, row keys, column headers)
  tables = {
      'remat': (lambda: remat_rows(quick, reps),
                'Rematerialisation (XLA temporaries of the compiled train '
                'step; step time):',
                ['model', 'batch', 'remat', 'temp_mib', 'temp_reduction',
                 'step_s', 'time_ratio'],
                ['model', 'batch', 'model.remat', 'temporaries MiB',
                 'temporaries / none', 'step s', 'time vs none']),
      'scan': (lambda: scan_rows(quick),
               'Compile time of the train step (lower + compile):',
               ['model', 'blocks', 'compile_s', 'scanned_compile_s',
                'speedup'],
               ['model', 'blocks', 'unscanned s', 'scan_layers s',
                'speedup']),
      'accum': (lambda: accum_rows(quick, reps),
                'Gradient accumulation (same batch per step):',
                ['model', 'batch', 'grad_accum_steps', 'micro_batch',
                 'temp_mib', 'step_s', 'per_image_ratio'],
                ['model', 'batch', 'grad_accum_steps', 'micro-batch',
                 'temporaries MiB', 'step s', 'time per image vs k=1']),
      'estimate': (lambda: estimate_rows(quick),
                   "The dry run's estimate against a run (all devices of the "
                   'process):',
                   ['model', 'devices', 'batch', 'estimate_total_mib',
                    'estimate_new_mib', 'measured_growth_mib', 'ratio'],
                   ['model', 'devices', 'batch', 'estimate per device MiB',
                    'estimated new allocations MiB', 'measured RSS growth MiB',
                    'measured / estimated']),
  }
  results = {}
  for section in SECTIONS:
    if section not in only:
      continue
    make_rows, title, keys, headers = tables[section]
    rows = results[section] = make_rows()
    parts += ['', title, '', common.markdown_table(rows, keys, headers)]
  md = '\n'.join(parts)
  flat = [dict(section=k, **r) for k, rows in results.items() for r in rows]
  common.save_results('memory_quick' if quick else 'memory', flat, info, md)
  return md, results


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--only', default=','.join(SECTIONS))
  args = parser.parse_args()
  only = tuple(s.strip() for s in args.only.split(',') if s.strip())
  for s in only:
    if s not in SECTIONS:
      parser.error(f'--only: {s!r} is not one of {SECTIONS}')
  print(run(args.quick, args.repeats, only)[0])


if __name__ == '__main__':
  main()
