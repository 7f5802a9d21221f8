"""What a run costs: FLOPs, device memory, throughput, MFU, and the profiler.

The dry run (`vmoe.train.model_summary`) and the trainer ask this module:

  * model FLOPs per step (`model_flops`): XLA's cost analysis of the train
    step lowered as one pass over the batch, unscanned, without remat or
    micro-batches (XLA counts a loop body once, and MFU counts the model's
    FLOPs, not the recomputed ones);
  * per-device memory of the compiled train step (`program_memory`, from
    XLA's memory analysis: arguments, outputs, temporaries; donated inputs
    counted once) and the device's capacity (`memory_capacity`);
  * peak FLOP/s per device (`peak_flops`): `config.cost.peak_tflops`, else
    the table `PEAK_TFLOPS` by device kind and compute dtype, else (CPU)
    an f32 matmul measured once at start;
  * memory in use and at peak (`memory_in_use`): the devices'
    `memory_stats()` where the platform has them (GPU, TPU), else the
    process's resident set size (CPU);
  * `Meter`: img/s, TFLOP/s per device and MFU between log points, from the
    wall time of completed steps (the caller blocks on the step's outputs);
  * `Profiler`: a `jax.profiler` trace of `config.profile_steps`.
"""

from __future__ import annotations

import functools
import os
import resource
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

GIB = 2.0 ** 30

# Dense peak TFLOP/s per JAX device, by lower-case substring of
# `device.device_kind` (first match wins) and compute dtype. float32 on GPU
# is TF32 (XLA's default matmul precision there); TPU v2/v3 devices are
# cores (half a chip), later TPUs are chips. Vendor data sheets.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ('tpu v2', {'bfloat16': 22.5, 'float32': 22.5}),
    ('tpu v3', {'bfloat16': 61.5, 'float32': 61.5}),
    ('tpu v4', {'bfloat16': 275.0, 'float32': 275.0}),
    ('tpu v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
    ('tpu v5e', {'bfloat16': 197.0, 'float32': 197.0}),
    ('tpu v5', {'bfloat16': 459.0, 'float32': 459.0}),   # v5p
    ('tpu v6 lite', {'bfloat16': 918.0, 'float32': 918.0}),
    ('tpu v6e', {'bfloat16': 918.0, 'float32': 918.0}),
    ('h100 pcie', {'bfloat16': 756.0, 'float32': 378.0}),
    ('h100', {'bfloat16': 989.0, 'float32': 494.0}),      # SXM
    ('h200', {'bfloat16': 989.0, 'float32': 494.0}),
    ('gh200', {'bfloat16': 989.0, 'float32': 494.0}),
    ('b200', {'bfloat16': 2250.0, 'float32': 1100.0}),
    ('a100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('l4', {'bfloat16': 121.0, 'float32': 60.0}),
)


def format_bytes(n: float) -> str:
  """'1.23 GiB' / '456.7 MiB' / '12.0 KiB'."""
  for unit, size in (('GiB', GIB), ('MiB', 2.0 ** 20), ('KiB', 1024.0)):
    if abs(n) >= size or unit == 'KiB':
      return f'{n / size:.{3 if unit == "GiB" else 1}f} {unit}'
  return f'{n} B'


# ----------------------------------------------------------------------------
# Peak FLOP/s and memory capacity.
# ----------------------------------------------------------------------------


def table_peak_tflops(device_kind: str, dtype: str) -> float | None:
  kind = device_kind.lower()
  for name, peaks in PEAK_TFLOPS:
    if name in kind:
      return peaks.get(dtype, peaks['bfloat16'])
  return None


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of the fastest of `repeats` f32 n x n matmuls on the default
  device (the CPU peak, which no table knows)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best


def peak_flops(config: ml_collections.ConfigDict,
               device: jax.Device | None = None) -> tuple[float | None, str]:
  """(peak FLOP/s per device, where the number comes from)."""
  device = device or jax.devices()[0]
  override = (config.get('cost') or {}).get('peak_tflops')
  if override:
    return float(override) * 1e12, 'config.cost.peak_tflops'
  dtype = str(config.model.get('dtype', 'float32'))
  peak = table_peak_tflops(device.device_kind, dtype)
  if peak is not None:
    return peak * 1e12, f'{device.device_kind} {dtype} peak'
  if device.platform == 'cpu':
    return measured_matmul_peak(), 'f32 matmul measured on this CPU'
  return None, f'unknown for {device.device_kind}: set config.cost.peak_tflops'


def host_memory_bytes() -> int | None:
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


def memory_capacity(config: ml_collections.ConfigDict,
                    device: jax.Device | None = None
                    ) -> tuple[int | None, str]:
  """(bytes a device can hold, where the number comes from)."""
  device = device or jax.devices()[0]
  override = (config.get('cost') or {}).get('memory_gib')
  if override:
    return int(override * GIB), 'config.cost.memory_gib'
  stats = _memory_stats(device)
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.device_kind} bytes_limit'
  if device.platform == 'cpu':
    total = host_memory_bytes()
    if total:
      share = jax.local_device_count()
      return total // share, (f'host RAM / {share} CPU devices' if share > 1
                              else 'host RAM')
  return None, 'unknown: set config.cost.memory_gib'


def _memory_stats(device: jax.Device) -> dict[str, Any] | None:
  try:
    return device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None


def memory_in_use() -> dict[str, float]:
  """{'memory_in_use_gib', 'memory_peak_gib'} of this process's devices
  (largest over the local devices) or, without `memory_stats()` (CPU), of
  the process (resident set size; its peak since start)."""
  stats = [s for s in (_memory_stats(d) for d in jax.local_devices()) if s]
  if stats:
    in_use = max(s.get('bytes_in_use', 0) for s in stats)
    peak = max(s.get('peak_bytes_in_use', 0) for s in stats)
  else:
    in_use = _rss_bytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {'memory_in_use_gib': in_use / GIB, 'memory_peak_gib': peak / GIB}


def memory_source() -> str:
  if any(_memory_stats(d) for d in jax.local_devices()):
    return 'device memory_stats'
  return 'process RSS'


def _rss_bytes() -> int:
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------
# Programs.
# ----------------------------------------------------------------------------


def _first(analysis):
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else {}
  return analysis or {}


def program_flops(program) -> float:
  """XLA's FLOP count of a lowered or compiled program (NaN if unknown)."""
  return float(_first(program.cost_analysis()).get('flops', float('nan')))


def program_memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program from XLA's memory analysis.

  {'arguments', 'outputs', 'aliased' (outputs that reuse donated arguments),
  'temporaries', 'code', 'total'}; total = arguments + outputs - aliased +
  temporaries + code: what the program holds at its peak at most.
  """
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0) if m is not None else 0
  out = {'arguments': get('argument_size_in_bytes'),
         'outputs': get('output_size_in_bytes'),
         'aliased': get('alias_size_in_bytes'),
         'temporaries': get('temp_size_in_bytes'),
         'code': get('generated_code_size_in_bytes')}
  out['total'] = (out['arguments'] + out['outputs'] - out['aliased']
                  + out['temporaries'] + out['code'])
  return out


def model_flops(config: ml_collections.ConfigDict, num_classes: int) -> float:
  """Model FLOPs of one train step over the whole batch (all devices).

  XLA's cost analysis of the step lowered (not compiled) for the unscanned
  model without remat, in one pass over the batch, without a mesh: the
  FLOPs of the model's math, whatever scan, remat, micro-batching or
  sharding the run uses (XLA counts a loop body once; recomputation is not
  model FLOPs).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  from vmoe.train import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from vmoe.train import steps  # pylint: disable=g-import-not-at-top
  model_cfg = vit.unscanned_config(config.model)
  size = config.preprocess.image_size
  channels = config.preprocess.num_channels
  abstract = nnx.eval_shape(lambda: vit.create_model(
      model_cfg, num_classes=num_classes, image_size=size,
      num_channels=channels, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  tx = optimizer_lib.create_optimizer(config)
  state = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
           'opt_state': jax.eval_shape(tx.init, params),
           'nonfinite_step': jax.ShapeDtypeStruct((), jnp.int32)}
  b = config.batch_size
  batch = {'image': jax.ShapeDtypeStruct((b, size, size, channels),
                                         jnp.float32),
           'labels': jax.ShapeDtypeStruct((b, num_classes), jnp.float32)}
  step = steps.make_train_step(
      steps.ModelFn(abstract), tx, seed=0,
      label_smoothing=config.get('label_smoothing', 0.0),
      learning_rate_fn=optimizer_lib.learning_rate_schedule(config),
      loss=config.get('loss', 'softmax_xent'))
  return program_flops(jax.jit(step).lower(state, batch))


# ----------------------------------------------------------------------------
# During the run.
# ----------------------------------------------------------------------------


class Meter:
  """Throughput between log points from completed steps.

  `start(step)` once the first step's program is compiled; `measure(step)`
  after blocking on the outputs of `step` returns the perf/ metrics of the
  steps since the previous call: steps/s, img/s, TFLOP/s per device, MFU and
  device memory.
  """

  def __init__(self, *, batch_size: int, flops_per_step: float,
               num_devices: int, peak: float | None):
    self.batch_size = batch_size
    self.flops_per_device = flops_per_step / max(num_devices, 1)
    self.peak = peak
    self._t, self._step, self._excluded = None, None, 0.0

  def start(self, step: int) -> None:
    self._t, self._step, self._excluded = time.perf_counter(), step, 0.0

  def exclude(self, seconds: float) -> None:
    """Time spent on other work (saving, evaluating) since the last call."""
    self._excluded += seconds

  def measure(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    seconds = max(now - self._t - self._excluded, 1e-9)
    steps_per_sec = (step - self._step) / seconds
    self.start(step)
    out = {'perf/steps_per_sec': steps_per_sec,
           'perf/images_per_sec': steps_per_sec * self.batch_size}
    if np.isfinite(self.flops_per_device):
      achieved = self.flops_per_device * steps_per_sec
      out['perf/tflops_per_device'] = achieved / 1e12
      if self.peak:
        out['perf/mfu'] = achieved / self.peak
    out.update({f'perf/{k}': v for k, v in memory_in_use().items()})
    return out


def perf_line(perf: dict[str, float]) -> str:
  """'1,234 img/s, 0.52 TFLOP/s/device, MFU 31.0%, memory 1.2 GiB (peak
  1.5)' from `Meter.measure`'s metrics."""
  parts = [f"{perf['perf/images_per_sec']:,.0f} img/s"]
  if 'perf/tflops_per_device' in perf:
    parts.append(f"{perf['perf/tflops_per_device']:.3g} TFLOP/s/device")
  if 'perf/mfu' in perf:
    parts.append(f"MFU {100 * perf['perf/mfu']:.1f}%")
  parts.append(f"memory {perf['perf/memory_in_use_gib']:.2f} GiB (peak "
               f"{perf['perf/memory_peak_gib']:.2f})")
  return ', '.join(parts)


class Profiler:
  """A jax.profiler trace of train steps first..last (1-based, as logged)
  into `<workdir>/profile` (TensorBoard's profile plugin reads
  `tensorboard --logdir <workdir>`; `perfetto_trace.json.gz` opens in
  ui.perfetto.dev)."""

  def __init__(self, workdir: str, steps: tuple[int, int] | None,
               enabled: bool = True):
    self.directory = os.path.join(workdir, 'profile')
    self.first, self.last = steps if steps else (None, None)
    self.enabled = enabled and steps is not None
    self.active = False

  def before(self, step: int) -> None:
    """Called before running train step `step` (1-based)."""
    if self.enabled and not self.active and step == self.first:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, outputs: Any) -> None:
    """Called after dispatching step `step` with its outputs."""
    if self.active and step >= self.last:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()
