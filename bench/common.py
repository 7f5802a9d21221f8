"""Shared helpers of the benchmarks: timing, matmul peak, machine info, output.

Timing protocol: every program is jitted and warmed up, then all programs of a
comparison are run round-robin (interleaved) and each is summarised by the
median of its repeats, so that background load on the machine hits every
variant alike. Compare ratios measured in one process, not absolute times
across runs.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, 'bench', 'results')


def load_config(name: str):
  """`get_config()` of configs/<name>.py (e.g. 'vmoe_b16')."""
  from vmoe import config_flag  # pylint: disable=g-import-not-at-top
  return config_flag.load_config_file(
      os.path.join(REPO, 'configs', f'{name}.py'))


def block(x):
  return jax.block_until_ready(x)


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int,
                     warmup: int = 1, min_time: float = 0.0,
                     reduce: Callable = statistics.median
                     ) -> dict[str, float]:
  """Median seconds per call of each callable, repeats interleaved.

  Args:
    calls: name -> zero-argument callable returning jax arrays.
    repeats: timed rounds; each round calls every callable once.
    warmup: untimed calls of each callable first (the first one compiles).
    reduce: summary of the samples (median by default).
    min_time: keep adding rounds until the slowest callable has this many
      seconds of samples (more samples for fast programs on a noisy machine).
  """
  for f in calls.values():
    for _ in range(warmup):
      block(f())
  times = {name: [] for name in calls}
  rounds = 0
  while True:
    for name, f in calls.items():
      t0 = time.perf_counter()
      block(f())
      times[name].append(time.perf_counter() - t0)
    rounds += 1
    if rounds >= repeats and (
        min(sum(t) for t in times.values()) >= min_time or rounds >= 4 * repeats):
      break
  return {name: reduce(ts) for name, ts in times.items()}


def program_memory(compiled) -> dict[str, int]:
  """{'temp', 'peak'} bytes of a compiled program (`memory_analysis()`).

  peak = arguments + outputs + scratch: an upper bound of what the program
  holds at once (donated or aliased buffers counted once).
  """
  m = compiled.memory_analysis()
  if m is None:
    return {'temp': 0, 'peak': 0}
  temp = int(getattr(m, 'temp_size_in_bytes', 0))
  total = (temp + int(getattr(m, 'argument_size_in_bytes', 0))
           + int(getattr(m, 'output_size_in_bytes', 0))
           - int(getattr(m, 'alias_size_in_bytes', 0)))
  return {'temp': temp, 'peak': total}


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled program (XLA's cost analysis; nan when
  the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def compiled_temp_bytes(jitted, *args) -> int:
  """Temp (scratch) bytes of the compiled program, from memory_analysis()."""
  return program_memory(jitted.lower(*args).compile())['temp']


def train_setup(model_cfg, *, batch: int, image: int, classes: int,
                channels: int = 3, grad_accum_steps: int = 1,
                model=None):
  """(jitted train step, state, batch) of the library's train step
  (`vmoe.train.steps.make_train_step`: AdamW, router noise and auxiliary
  losses on) for `model_cfg` (a `config.model`), jitted with the state
  donated; random images and one-hot labels. `model`: the model already
  built from model_cfg (its parameters are used), else built here."""
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  from vmoe.train import steps  # pylint: disable=g-import-not-at-top
  make = lambda: vit.create_model(model_cfg, num_classes=classes,
                                  image_size=image, num_channels=channels,
                                  rngs=nnx.Rngs(0))
  model_fn = steps.ModelFn(nnx.eval_shape(make))
  if model is None:
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make(), nnx.Param)))()
  else:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  tx = optax.adamw(1e-4, weight_decay=1e-4)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'opt_state': tx.init(params),
           'nonfinite_step': jnp.full((), -1, jnp.int32)}
  key = jax.random.key(0)
  data = {'image': jax.random.normal(key, (batch, image, image, channels)),
          'labels': jax.nn.one_hot(jnp.arange(batch) % classes, classes)}
  train = jax.jit(steps.make_train_step(
      model_fn, tx, seed=0, label_smoothing=0.0,
      learning_rate_fn=lambda s: 1e-4, grad_accum_steps=grad_accum_steps),
                  donate_argnums=0)
  return train, state, data


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (MB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def matmul_peak(n: int = 2048, repeats: int = 7) -> dict[str, float]:
  """Measured matmul GFLOP/s: f32 and bf16 inputs (f32 accumulation).

  Square n x n matmuls, jitted; the fastest of interleaved repeats (a peak,
  so the best sample rather than the median, which background load would
  drag down). The yardstick for achieved GFLOP/s and MFU of the run.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f32 = jax.jit(lambda a, b: a @ b)
  bf16 = jax.jit(lambda a, b: jnp.matmul(a, b,
                                         preferred_element_type=jnp.float32))
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  t = time_interleaved({'f32': lambda: f32(a, b),
                        'bf16': lambda: bf16(a16, b16)}, repeats, warmup=2,
                       reduce=min)
  flops = 2.0 * n ** 3
  return {k: flops / v / 1e9 for k, v in t.items()}


def peak_call(n: int = 3072) -> tuple[Callable[[], Any], float]:
  """(zero-argument f32 n x n matmul, its FLOPs) to time beside other programs.

  Timed in the same interleaved round-robin as a benchmark's programs, it
  sees the same background load, so '% of peak' stays meaningful on a busy
  machine.
  """
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  return (lambda: f(a, b)), 2.0 * n ** 3


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info(peak: dict[str, float] | None = None) -> dict[str, Any]:
  """CPU model, cores, backend and versions (+ the measured matmul peak)."""
  import flax  # pylint: disable=g-import-not-at-top
  info = {
      'date': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'cpu': cpu_model(),
      'cores': os.cpu_count(),
      'backend': jax.default_backend(),
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'jax': jax.__version__,
      'flax': flax.__version__,
      'python': platform.python_version(),
      # vmoe.cpu_allocator sets these for `python -m bench`.
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '(glibc defaults)'),
  }
  try:
    info['load_avg_1m'] = round(os.getloadavg()[0], 2)
  except OSError:
    pass
  if peak:
    info.update({f'matmul_peak_{k}_gflops': round(v, 1)
                 for k, v in peak.items()})
  return info


def machine_line(info: dict[str, Any]) -> str:
  """One markdown line summarising `machine_info`."""
  s = (f"Machine: {info['cpu']}, {info['cores']} cores, backend "
       f"{info['backend']} ({info['devices']}), jax {info['jax']}, "
       f"flax {info['flax']}, {info['date']}")
  if 'matmul_peak_f32_gflops' in info:
    s += (f"; measured matmul peak f32 {info['matmul_peak_f32_gflops']:.0f} "
          f"GFLOP/s, bf16 {info['matmul_peak_bf16_gflops']:.0f} GFLOP/s")
  if info.get('glibc_tunables'):
    s += f"; GLIBC_TUNABLES {info['glibc_tunables']}"
  if 'load_avg_1m' in info:
    s += f"; load average at start {info['load_avg_1m']}"
  return s + '.'


def markdown_table(rows: list[dict[str, Any]], columns: list[str],
                   headers: list[str] | None = None) -> str:
  """rows (dicts) -> markdown table of `columns` (numbers right-aligned)."""
  headers = headers or columns

  def fmt(v):
    if v is None or v == '':
      return ''
    if isinstance(v, float):
      if v != v:  # nan
        return '-'
      return f'{v:.2f}' if abs(v) < 100 else f'{v:.0f}'
    return str(v)

  numeric = [all(isinstance(r.get(c), (int, float)) or r.get(c) in (None, '')
                 for r in rows) for c in columns]
  lines = ['| ' + ' | '.join(headers) + ' |',
           '|' + '|'.join('---:' if n else '---' for n in numeric) + '|']
  for r in rows:
    lines.append('| ' + ' | '.join(fmt(r.get(c)) for c in columns) + ' |')
  return '\n'.join(lines)


def save_results(name: str, rows: list[dict[str, Any]], info: dict[str, Any],
                 markdown: str, extra: dict[str, Any] | None = None,
                 out_dir: str = RESULTS_DIR) -> dict[str, str]:
  """Writes name.csv, name.json and name.md into out_dir; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {ext: os.path.join(out_dir, f'{name}.{ext}')
           for ext in ('csv', 'json', 'md')}
  keys: list[str] = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  with open(paths['csv'], 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
  with open(paths['json'], 'w') as f:
    json.dump({'machine': info, 'rows': rows, **(extra or {})}, f, indent=1,
              default=str)
  with open(paths['md'], 'w') as f:
    f.write(markdown + '\n')
  return paths
