"""Pallas kernels against the XLA path and the one-hot einsum reference.

    python -m bench.kernels               # GPU / TPU: every row
    python -m bench.kernels --quick       # GPU / TPU: ViT-S rows, no train steps
    python -m bench.kernels --no-train    # kernel rows only
    python -m bench.kernels --no-kernels  # train steps only
    bash bench/gpu_check.sh OUT_DIR       # on a GPU: compiled tests + all rows

On a CPU host the kernels only run interpreted, which says nothing about
their speed: there the benchmark runs the interpret-mode correctness rows
only (tiny shapes, each kernel's forward and gradients against its
reference, both backends) and says so.

Kernels (`pallas_kernels/`) and what each row times (ViT-S: d=384, h=1536;
ViT-B: d=768, h=3072; 197 tokens per image, groups of one image):

  routing   token choice (k=2, BPR, 8 experts) and expert choice (8 experts,
            capacity factor 2) decisions from [g, s, e] logits: the routing
            kernel vs `vmoe.nn.routing` (XLA). GB/s of logits read and
            decision written.
  dispatch  token-choice dispatch + combine of a fixed decision (k=2, 8
            experts, capacity factor 1.05, experts replaced by x2): kernels vs
            'indices' gathers (XLA) vs 'einsum' (one-hot contractions). GB/s
            of tokens and buffers moved.
  gmm       the dropless experts' first grouped matmul [m, d] x [e, d, h]
            (m = 2 choices x tokens, 8 experts, random group sizes): ours vs
            `jax.lax.ragged_dot` (XLA) vs a one-hot einsum, and tokamax's
            Triton ragged dot where tokamax is installed. TFLOP/s of 2 m d h
            (x3 with the backward).
  soft      Soft MoE dispatch + combine + router statistics (128 slots, the
            experts replaced by x2): the fused kernels vs the XLA path
            (`routing.soft_routing` + `dispatch.soft_dispatch /
            soft_combine`, metrics from the logits) vs one-hot einsums.
            TFLOP/s of the 6 g s n d useful FLOPs (logits, dispatch,
            combine; x3 with the backward) and GB/s of tokens and slots moved.

Each row: forward ('fwd') and forward+backward ('fwd+bwd': the gradient of
<output, fixed cotangent> w.r.t. every float input), median of interleaved
rounds (`bench.common.time_interleaved`, all variants of a case in one
round-robin), the rate against the device's peak (matmul peak measured with
`bench.common.matmul_peak`; bandwidth peak measured here with a large copy),
and the largest difference of the output and gradients from the XLA variant
(a correctness check at real shapes, compiled). Train steps: V-MoE-B/16
(configs/vmoe_b16.py, also with dispatch='dropless') and Soft MoE-B/16
(configs/soft_moe_b16.py), bfloat16, `model.moe.kernels` = 'xla' vs
'pallas', images/s.

Importable without TensorFlow; the kernel rows need only jax. The train
steps also need flax, optax and ml_collections and are skipped (with a
note) where these are missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from vmoe.kernels import compat
from vmoe.kernels import gmm as gmm_lib
from vmoe.kernels import soft_moe
from vmoe.nn import dispatch as dp
from vmoe.nn import routing as rt

SEQ = 197
DIMS = {'S': (384, 1536), 'B': (768, 3072)}
Array = jax.Array


def _optional(module: str):
  """A kernel module of another part, or None where it is not there."""
  try:
    return importlib.import_module(module)
  except ImportError:
    return None


# ----------------------------------------------------------------------------
# Cases: a computation in several variants, timed and compared together.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
  """One kernel at one shape.

  variants: name -> fn(*args) -> output pytree (the first is the XLA
    reference the others are compared with).
  args: inputs (float arrays are differentiated in 'fwd+bwd').
  flops / bytes: forward work, for the rates (0: not reported).
  bwd_factor: work of fwd+bwd over fwd.
  """
  kernel: str
  shape: str
  variants: dict[str, Callable]
  args: tuple
  flops: float = 0.0
  bytes: float = 0.0
  bwd_factor: float = 3.0


def _float_argnums(args) -> tuple[int, ...]:
  return tuple(i for i, a in enumerate(args)
               if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating))


def _loss(fn, args):
  """<fn(*args), fixed pseudo-random cotangent> (float leaves only)."""
  leaves = [v for v in jax.tree.leaves(fn(*args))
            if jnp.issubdtype(v.dtype, jnp.floating)]
  total = jnp.zeros((), jnp.float32)
  for i, v in enumerate(leaves):
    cot = jnp.cos(jnp.arange(v.size, dtype=jnp.float32) * (0.37 + i))
    total = total + jnp.sum(v.astype(jnp.float32).reshape(-1) * cot)
  return total


def programs(case: Case, with_bwd: bool = True):
  """name -> (fwd compiled, bwd compiled or None)."""
  argnums = _float_argnums(case.args)
  out = {}
  for name, fn in case.variants.items():
    fwd = jax.jit(fn).lower(*case.args).compile()
    bwd = None
    if with_bwd:
      grad = jax.grad(lambda *a, fn=fn: _loss(fn, a), argnums=argnums)
      bwd = jax.jit(grad).lower(*case.args).compile()
    out[name] = (fwd, bwd)
  return out


def _max_diff(a, b) -> float:
  """Largest |a - b| over all leaves (integer and boolean leaves too: any
  differing expert index or position shows)."""
  diffs = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)) if x.size]
  return max(diffs, default=0.0)


def _scale(a) -> float:
  vals = [float(jnp.max(jnp.abs(x.astype(jnp.float32))))
          for x in jax.tree.leaves(a) if x.size]
  return max(vals + [1.0])


def check_rows(case: Case, progs) -> dict[str, dict[str, float]]:
  """name -> {'fwd_err', 'bwd_err'}: max |diff| / max |reference| vs the
  first variant."""
  ref = None
  errs = {}
  for name, (fwd, bwd) in progs.items():
    out = (fwd(*case.args), bwd(*case.args) if bwd is not None else None)
    if ref is None:
      ref = out
    errs[name] = dict(
        fwd_err=_max_diff(out[0], ref[0]) / _scale(ref[0]),
        bwd_err=(_max_diff(out[1], ref[1]) / _scale(ref[1])
                 if out[1] is not None else float('nan')))
  return errs


# ----------------------------------------------------------------------------
# The kernels' cases.
# ----------------------------------------------------------------------------


def _rng(seed=0):
  return np.random.default_rng(seed)


def _normal(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)


def routing_cases(images: int, backend, interpret, e: int = 8) -> list[Case]:
  routing = _optional('vmoe.kernels.routing')
  rng = _rng(1)
  logits = _normal(rng, (images, SEQ, e), jnp.float32)
  kw = dict(backend=backend, interpret=interpret)
  cases = []
  c_tc = rt.compute_capacity(SEQ, e, capacity_factor=1.05, num_selected=2)
  tc = dict(num_selected=2, capacity=c_tc, batch_priority=True)
  variants = {'xla': lambda l: rt.token_choice_from_logits(l, **tc)}
  if routing is not None:
    variants['pallas'] = lambda l: routing.token_choice_from_logits(
        l, **tc, **kw)
  decision = 4 * images * SEQ * 2 * 4  # expert, position, weight, valid
  cases.append(Case('routing', f'token choice k=2 bpr e={e}', variants,
                    (logits,), bytes=logits.size * 4 + decision, bwd_factor=2))
  c_ec = rt.compute_capacity(SEQ, e, capacity_factor=2.0)
  variants = {'xla': lambda l: rt.expert_choice_from_logits(l, capacity=c_ec)}
  if routing is not None:
    variants['pallas'] = lambda l: routing.expert_choice_from_logits(
        l, capacity=c_ec, **kw)
  cases.append(Case('routing', f'expert choice cf=2 e={e}', variants,
                    (logits,), bytes=logits.size * 4 + 2 * images * e * c_ec
                    * 4, bwd_factor=2))
  return cases


def dispatch_cases(images: int, d: int, label: str, dtype, backend,
                   interpret, e: int = 8) -> list[Case]:
  kernel = _optional('vmoe.kernels.dispatch')
  rng = _rng(2)
  x = _normal(rng, (images, SEQ, d), dtype)
  c = rt.compute_capacity(SEQ, e, capacity_factor=1.05, num_selected=2)
  r = rt.token_choice_from_logits(_normal(rng, (images, SEQ, e), jnp.float32),
                      num_selected=2, capacity=c, batch_priority=True)
  # The combine weights are an input of their own, so that fwd+bwd also
  # times their gradient.
  weight = r.combine_weight

  def via(dispatch, combine):
    def f(x, weight, r=r):
      r = dataclasses.replace(r, combine_weight=weight)
      return combine(r, 2 * dispatch(r, x))
    return f

  variants = {
      'xla': via(lambda r, x: dp.dispatch(r, x, 'indices'),
                 lambda r, o: dp.combine(r, o, 'indices')),
      'einsum': via(lambda r, x: dp.dispatch(r, x, 'einsum'),
                    lambda r, o: dp.combine(r, o, 'einsum')),
  }
  if kernel is not None:
    kw = dict(backend=backend, interpret=interpret)
    variants['pallas'] = via(functools.partial(kernel.dispatch, **kw),
                             functools.partial(kernel.combine, **kw))
  item = jnp.dtype(dtype).itemsize
  moved = (2 * images * SEQ * d + 2 * e * images * c * d) * item
  return [Case('dispatch', f'token choice k=2 e={e} {label}', variants,
               (x, weight), bytes=moved, bwd_factor=2)]


def gmm_cases(images: int, d: int, h: int, label: str, dtype, backend,
              interpret, e: int = 8) -> list[Case]:
  m = 2 * images * SEQ
  rng = _rng(3)
  lhs = _normal(rng, (m, d), dtype)
  rhs = _normal(rng, (e, d, h), dtype) * (d ** -0.5)
  # Group sizes of a random top-2 routing, ~3% of the pairs dropped (the
  # padding rows of the dropless layout).
  sizes = rng.multinomial(int(0.97 * m), np.full(e, 1.0 / e))
  sizes = jnp.asarray(sizes, jnp.int32)

  def one_hot(lhs, rhs, sizes):
    ends = jnp.cumsum(sizes)
    rows = jnp.arange(lhs.shape[0])
    group = jnp.sum(rows[:, None] >= ends[None, :], axis=1)
    mask = jax.nn.one_hot(group, e, dtype=lhs.dtype)   # [m, e], 0 past the end
    return jnp.einsum('mk,me,ekn->mn', lhs, mask, rhs)

  variants = {
      'xla': gmm_lib.gmm_reference,
      'pallas': functools.partial(gmm_lib.gmm, backend=backend,
                                  interpret=interpret),
      'einsum': one_hot,
  }
  tokamax = _optional('tokamax')
  if tokamax is not None and jax.default_backend() == 'gpu':
    variants['tokamax'] = lambda a, b, s: tokamax.ragged_dot(
        a, b, s, implementation='triton')
  return [Case('gmm', f'e={e} {m}x{d}x{h} {label}', variants,
               (lhs, rhs, sizes), flops=2.0 * int(jnp.sum(sizes)) * d * h)]


def soft_cases(images: int, d: int, label: str, dtype, backend, interpret,
               n: int = 128) -> list[Case]:
  rng = _rng(4)
  x = _normal(rng, (images, SEQ, d), dtype)
  phi = _normal(rng, (n, 1, d), jnp.float32) * (d ** -0.5)
  scale = jnp.float32(1.0)

  def metrics_of(r):
    # As in the model: only the z-loss carries a gradient (the entropy and
    # the expert load are logged, not trained).
    return (rt.z_loss(r.logits),
            jax.lax.stop_gradient(rt.entropy(r.combine_weights())),
            jax.lax.stop_gradient(rt.expert_load(r)))

  def xla(x, phi, scale):
    r = rt.soft_routing(x, phi, scale)
    slots = dp.soft_dispatch(r.logits, x)
    return dp.soft_combine(r.logits, 2 * slots), metrics_of(r)

  def einsum(x, phi, scale):
    # The one-hot formulation: [g, s, e, p] dispatch / combine tensors.
    r = rt.soft_routing(x, phi, scale)
    buffers = jnp.einsum('gsec,gsd->egcd',
                         rt.dense_dispatch(r).astype(x.dtype), x)
    y = jnp.einsum('gsec,egcd->gsd', rt.dense_combine(r).astype(x.dtype),
                   2 * buffers)
    return y, metrics_of(r)

  kw = dict(backend=backend, interpret=interpret)

  def pallas(x, phi, scale):
    slots = soft_moe.soft_dispatch(x, phi, scale, **kw)
    y, stats = soft_moe.soft_combine(x, phi, scale, 2 * slots,
                                     with_stats=True, **kw)
    return y, soft_moe.metric_values(stats, n)

  item = jnp.dtype(dtype).itemsize
  moved = 2 * images * (SEQ + n) * d * item
  return [Case('soft', f'n={n} {label}',
               {'xla': xla, 'pallas': pallas, 'einsum': einsum},
               (x, phi, scale), flops=6.0 * images * SEQ * n * d,
               bytes=moved)]


def kernel_cases(images: int, dims_list, dtype, backend, interpret, *,
                 slots: int = 128) -> list[Case]:
  """Every kernel's cases; dims_list: (label, d, h) triples."""
  cases = routing_cases(images, backend, interpret)
  for label, d, h in dims_list:
    cases += dispatch_cases(images, d, label, dtype, backend, interpret)
    cases += gmm_cases(images, d, h, label, dtype, backend, interpret)
    cases += soft_cases(images, d, label, dtype, backend, interpret, n=slots)
  return cases


# ----------------------------------------------------------------------------
# Accelerator: timings.
# ----------------------------------------------------------------------------


def bandwidth_peak(mb: int = 1024, repeats: int = 7) -> float:
  """Measured HBM GB/s: y = x * 2 on an `mb` MB float32 array (read+write)."""
  x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 2)
  t = common.time_interleaved({'copy': lambda: f(x)}, repeats, warmup=2,
                              reduce=min)['copy']
  return 2 * x.size * 4 / t / 1e9


def time_case(case: Case, repeats: int, peak_tflops: float,
              peak_gbs: float) -> list[dict]:
  progs = programs(case)
  errs = check_rows(case, progs)
  calls = {}
  for name, (fwd, bwd) in progs.items():
    calls['fwd', name] = lambda f=fwd: f(*case.args)
    calls['bwd', name] = lambda f=bwd: f(*case.args)
  t = common.time_interleaved(calls, repeats, warmup=2)
  rows = []
  ref = next(iter(progs))
  for name in progs:
    row = dict(kernel=case.kernel, shape=case.shape, variant=name,
               fwd_ms=t['fwd', name] * 1e3, fwd_bwd_ms=t['bwd', name] * 1e3,
               fwd_vs_xla=t['fwd', ref] / t['fwd', name],
               fwd_bwd_vs_xla=t['bwd', ref] / t['bwd', name], **errs[name])
    if case.flops:
      row['fwd_tflops'] = case.flops / t['fwd', name] / 1e12
      row['fwd_bwd_tflops'] = (case.bwd_factor * case.flops
                               / t['bwd', name] / 1e12)
      row['pct_peak'] = 100 * row['fwd_bwd_tflops'] / peak_tflops
    if case.bytes:
      row['fwd_gbs'] = case.bytes / t['fwd', name] / 1e9
      row['fwd_pct_bw'] = 100 * row['fwd_gbs'] / peak_gbs
    rows.append(row)
  return rows


# name -> (config under configs/, model.moe overrides, classes). The dense
# ViT-B/16 is the baseline of the MoE models' img/s (kernels do not apply).
TRAIN_MODELS = {
    'ViT-B/16': ('vit_b16', None, 1000),
    'V-MoE-B/16': ('vmoe_b16', {}, 1000),
    'V-MoE-B/16 dropless': ('vmoe_b16', {'dispatch': 'dropless'}, 1000),
    'Soft MoE-B/16': ('soft_moe_b16', {}, 1000),
}
# --models may also name CPU-sized models, to rehearse the train-step path
# on a CPU host (bench/gpu_check.sh).
MODELS = {**TRAIN_MODELS, 'V-MoE digits': ('vmoe_b16_digits', {}, 10)}


def train_rows(batch: int, repeats: int, models=None,
               modes=('xla', 'pallas'), dtype: str = 'bfloat16',
               peak_tflops: float | None = None
               ) -> tuple[list[dict], str]:
  """Train step images/s and MFU for each model and `model.moe.kernels`.

  The library's train step (`vmoe.train.steps.make_train_step`: AdamW,
  router noise and auxiliary losses on) on random images of the config's
  size, jitted with the state donated; all steps interleaved. MFU = the
  compiled step's FLOPs (XLA's cost analysis) per second over
  `peak_tflops` (the measured bf16 matmul peak). Returns (rows, note): no
  rows and the reason where flax / optax / ml_collections are missing.
  """
  try:
    import optax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
    from vmoe.train import steps  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return [], f'train steps skipped: {e}'
  calls, states, flops = {}, {}, {}
  for model, (module, overrides, classes) in (models or TRAIN_MODELS).items():
    for kernels in (modes if overrides is not None else ('xla',)):
      config = common.load_config(module)
      cfg = config.model
      cfg.dtype = dtype
      if overrides is not None:
        cfg.moe.update(dict(overrides, kernels=kernels))
      image = config.preprocess.image_size
      channels = config.preprocess.num_channels
      make = functools.partial(vit.create_model, cfg, num_classes=classes,
                               image_size=image, num_channels=channels)
      model_fn = steps.ModelFn(nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0))))
      # Initialised as one compiled program (op-by-op is slow).
      params = jax.jit(lambda make=make: nnx.to_pure_dict(
          nnx.state(make(rngs=nnx.Rngs(0)), nnx.Param)))()
      tx = optax.adamw(1e-4, weight_decay=1e-4)
      key = (model, kernels)
      states[key] = {'step': jnp.zeros((), jnp.int32), 'params': params,
                     'opt_state': tx.init(params),
                     'nonfinite_step': jnp.full((), -1, jnp.int32)}
      data = {'image': jax.random.normal(jax.random.key(0),
                                         (batch, image, image, channels)),
              'labels': jax.nn.one_hot(jnp.arange(batch) % classes, classes)}
      step = jax.jit(steps.make_train_step(
          model_fn, tx, seed=0, label_smoothing=0.0,
          learning_rate_fn=lambda s: 1e-4), donate_argnums=0)
      compiled = step.lower(states[key], data).compile()
      flops[key] = common.compiled_flops(compiled)

      def call(key=key, compiled=compiled, data=data):
        states[key], metrics = compiled(states[key], data)
        return metrics['loss']

      calls[key] = call
  t = common.time_interleaved(calls, repeats, warmup=1)
  rows = []
  for (model, kernels), sec in t.items():
    tflops = flops[model, kernels] / sec / 1e12
    rows.append(dict(model=model, kernels=kernels, batch=batch,
                     step_ms=sec * 1e3, img_s=batch / sec,
                     vs_xla=(t[model, 'xla'] / sec if (model, 'xla') in t
                             else float('nan')),
                     tflops=tflops,
                     mfu_pct=(100 * tflops / peak_tflops if peak_tflops
                              else float('nan'))))
  return rows, ''


# ----------------------------------------------------------------------------
# CPU: interpret-mode correctness rows.
# ----------------------------------------------------------------------------


def cpu_rows(backends=compat.BACKENDS, only=None) -> list[dict]:
  """Tiny shapes, interpreted, every kernel against its XLA reference.

  only: kernel names to include (None: all).
  """
  rows = []
  for backend in backends:
    interpret = True if backend == 'triton' else compat.tpu_interpret()
    cases = kernel_cases(1, [('tiny', 32, 64)], jnp.float32, backend,
                         interpret, slots=16)
    for case in cases:
      if only is not None and case.kernel not in only:
        continue
      t0 = time.perf_counter()
      errs = check_rows(case, programs(case))
      sec = time.perf_counter() - t0
      for name, e in errs.items():
        if name != 'xla':
          rows.append(dict(kernel=case.kernel, shape=case.shape, variant=name,
                           backend=backend if name == 'pallas' else 'xla',
                           **e, seconds=sec))
  return rows


def _sci(rows: list[dict], keys=('fwd_err', 'bwd_err')) -> list[dict]:
  """Rows with the error columns as short scientific strings (the markdown
  tables print floats with two decimals)."""
  return [{**r, **{k: f'{r[k]:.1e}' for k in keys if k in r}} for r in rows]
  return rows


# ----------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------

KERNEL_COLUMNS = ['kernel', 'shape', 'variant', 'fwd_ms', 'fwd_bwd_ms',
                  'fwd_vs_xla', 'fwd_bwd_vs_xla', 'fwd_tflops',
                  'fwd_bwd_tflops', 'pct_peak', 'fwd_gbs', 'fwd_pct_bw',
                  'fwd_err', 'bwd_err']
KERNEL_HEADERS = ['kernel', 'shape', 'variant', 'fwd ms', 'fwd+bwd ms',
                  'fwd speed-up vs XLA', 'fwd+bwd speed-up vs XLA',
                  'fwd TFLOP/s', 'fwd+bwd TFLOP/s', '% matmul peak',
                  'fwd GB/s', '% bandwidth', 'fwd err', 'grad err']
CPU_COLUMNS = ['kernel', 'shape', 'variant', 'backend', 'fwd_err', 'bwd_err',
               'seconds']
CPU_HEADERS = ['kernel', 'shape', 'variant', 'backend', 'fwd err vs XLA',
               'grad err vs XLA', 'seconds (compile + run)']
TRAIN_COLUMNS = ['model', 'kernels', 'batch', 'step_ms', 'img_s', 'vs_xla',
                 'tflops', 'mfu_pct']
TRAIN_HEADERS = ['model', 'model.moe.kernels', 'batch', 'step ms', 'img/s',
                 'speed-up vs xla', 'TFLOP/s', 'MFU % (bf16 peak)']
CPU_NOTE = ('CPU host: the Pallas kernels run only interpreted here, which '
            'says nothing about their speed, so this run checks correctness '
            'only (tiny shapes, forward and gradients, each variant against '
            'the XLA path; errors are max |diff| / max |reference|). Run '
            '`python -m bench.kernels` on a GPU or TPU for timings.')


def run(quick: bool = False, repeats: int | None = None, train: bool = True,
        batch: int = 128, backends=compat.BACKENDS, only=None,
        kernel_rows: bool = True, dims: tuple[str, ...] = ('S', 'B'),
        models=None,
        out_dir: str = common.RESULTS_DIR) -> tuple[str, list[dict]]:
  """Runs the kernel benchmark on the local backend: (markdown, rows).

  kernel_rows / train: which parts run; dims: the ViT sizes of the kernel
  rows ('S', 'B'). backends, only: CPU mode only: which kernel backends to
  interpret and which kernels (None: all). Writes
  kernels[_quick|_train|_cpu].{md,csv,json} to out_dir.
  """
  platform = jax.default_backend()
  if platform == 'cpu':
    info = common.machine_info()
    rows = cpu_rows(backends, only) if kernel_rows else []
    if train and models:  # the train-step code path, at CPU-sized models
      t_rows, _ = train_rows(batch, 2, models=models,
                             peak_tflops=common.matmul_peak()['f32'] / 1e3)
      rows += t_rows
    md = '\n'.join([
        '### Pallas kernels (CPU: interpret-mode correctness only)', '',
        common.machine_line(info), '', CPU_NOTE, '',
        common.markdown_table(_sci(rows), CPU_COLUMNS, CPU_HEADERS)])
    common.save_results('kernels_cpu', rows, info, md, out_dir=out_dir)
    return md, rows
  peak = common.matmul_peak(n=8192)
  gbs = bandwidth_peak()
  info = common.machine_info(peak)
  info['bandwidth_peak_gbs'] = round(gbs, 1)
  reps = repeats or 10
  dtype = jnp.bfloat16
  backend = compat.default_backend()
  t0 = time.perf_counter()
  rows = []
  if kernel_rows:
    sizes = ('S',) if quick else dims
    cases = kernel_cases(64 if quick else 256,
                         [(f'ViT-{k}', *DIMS[k]) for k in sizes], dtype,
                         backend, False)
    for case in cases:
      if only is not None and case.kernel not in only:
        continue
      rows += time_case(case, reps, peak['bf16'] / 1e3, gbs)
      print(f'  [kernels: {case.kernel} {case.shape}: '
            f'{time.perf_counter() - t0:.0f} s]', flush=True)
  t_rows, note = ([], 'train steps not run (--quick / --no-train)')
  if train and not quick:
    t_rows, note = train_rows(batch, max(3, reps // 2), models=models,
                              peak_tflops=peak['bf16'] / 1e3)
  md = '\n'.join([
      f'### Pallas kernels on {info["devices"]} ({"quick" if quick else "full"})',
      '', common.machine_line(info) + f' Measured bandwidth {gbs:.0f} GB/s.',
      '', common.markdown_table(_sci(rows), KERNEL_COLUMNS, KERNEL_HEADERS),
      '',
      'bfloat16 activations; speed-up = XLA time / variant time (measured '
      'interleaved); % matmul peak of the bf16 peak measured in this run; '
      'errors: max |diff| / max |XLA output| (forward) and of the gradients.',
      '', '#### Train steps (bfloat16)', '',
      (common.markdown_table(t_rows, TRAIN_COLUMNS, TRAIN_HEADERS)
       if t_rows else note)])
  name = 'kernels_quick' if quick else 'kernels'
  if not kernel_rows:
    name += '_train'
  common.save_results(name, rows + t_rows, info, md, out_dir=out_dir)
  return md, rows + t_rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--no-train', action='store_true',
                      help='skip the train steps')
  parser.add_argument('--no-kernels', action='store_true',
                      help='skip the kernel rows (train steps only)')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--dims', default='S,B',
                      help='ViT sizes of the kernel rows (S, B)')
  parser.add_argument('--only', default=None,
                      help='comma-separated kernels (routing, dispatch, gmm, '
                      'soft)')
  parser.add_argument('--backends', default=','.join(compat.BACKENDS),
                      help='CPU mode: kernel backends to interpret')
  parser.add_argument('--models', default=None,
                      help='comma-separated train-step models (default: '
                      + ', '.join(TRAIN_MODELS) + '; also: '
                      + ', '.join(set(MODELS) - set(TRAIN_MODELS)) + ')')
  parser.add_argument('--max-error', type=float, default=None,
                      help='exit 1 if a kernel row differs from XLA by more '
                      '(relative, forward or gradient)')
  args = parser.parse_args()
  only = tuple(args.only.split(',')) if args.only else None
  if args.models:
    unknown = set(args.models.split(',')) - set(MODELS)
    if unknown:
      parser.error(f'--models: unknown {sorted(unknown)}; known: '
                   f'{list(MODELS)}')
  models = ({m: MODELS[m] for m in args.models.split(',')}
            if args.models else None)
  md, rows = run(args.quick, args.repeats, train=not args.no_train,
                 batch=args.batch, backends=tuple(args.backends.split(',')),
                 only=only, kernel_rows=not args.no_kernels,
                 dims=tuple(args.dims.split(',')), models=models)
  print(md)
  if args.max_error is not None:
    bad = [r for r in rows for k in ('fwd_err', 'bwd_err')
           if k in r and r[k] > args.max_error]
    if bad:
      print(f'FAIL: {len(bad)} kernel rows differ from XLA by more than '
            f'{args.max_error}: ' + '; '.join(
                f"{r['kernel']} {r['shape']} {r['variant']}" for r in bad[:5]))
      raise SystemExit(1)


if __name__ == '__main__':
  main()
