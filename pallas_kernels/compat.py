"""The one place where the kernels meet jax versions and platforms.

Every kernel module builds its compiler parameters, interpret-mode options,
Triton loads/stores and cross-platform lowering through these helpers, so a
jax upgrade that renames one of them (0.10.x -> 0.11.x) is fixed here only.
Importable without TensorFlow and without an accelerator.

Backends (the `backend` argument of every kernel):
  'tpu'     Mosaic TPU kernels (`pltpu.CompilerParams`).
  'triton'  Triton kernels for NVIDIA / AMD GPUs (`pltriton.CompilerParams`;
            without them Pallas would pick Mosaic GPU). jax 0.11.0
            deprecated Pallas' Triton backend (still present in 0.11.x, with
            Mosaic GPU as its successor): a Mosaic GPU variant is the way
            forward once it has been measured on a GPU.
On a CPU host a kernel runs only interpreted (`interpret=True`); it can still
be *lowered* for TPU or CUDA (`lower`), which is how CPU tests check that the
kernels compile into the expected custom call.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from typing import Any, Callable

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

try:
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # a jax build without the Triton bindings
  pltriton = None

BACKENDS = ('tpu', 'triton')
# The custom call each backend's kernels lower to (checked by the tests).
CUSTOM_CALL = {'tpu': 'tpu_custom_call', 'triton': '__gpu$xla.gpu.triton'}
_PLATFORM = {'tpu': 'tpu', 'triton': 'cuda'}


def _first_attr(module, *names):
  for name in names:
    if module is not None and hasattr(module, name):
      return getattr(module, name)
  raise ImportError(f'none of {names} in {getattr(module, "__name__", module)}'
                    f' (jax {jax.__version__})')


def tpu_params(**kwargs) -> Any:
  """Mosaic TPU compiler parameters (`dimension_semantics`, ...)."""
  return _first_attr(pltpu, 'CompilerParams', 'TPUCompilerParams')(**kwargs)


def triton_params(**kwargs) -> Any:
  """Triton compiler parameters (`num_warps`, `num_stages`)."""
  return _first_attr(pltriton, 'CompilerParams',
                     'TritonCompilerParams')(**kwargs)


def tpu_interpret(detect_races: bool = False) -> Any:
  """`interpret=` value for TPU kernels on CPU: the TPU interpreter if any.

  `pltpu.InterpretParams` simulates TPU memory semantics; with detect_races
  it runs the grid's 'parallel' dimensions on two simulated cores (as on a
  megacore chip: races exist only between cores) and records any data race
  (`races_detected`). Older jax versions only have the generic interpreter
  (`True`).
  """
  params = getattr(pltpu, 'InterpretParams', None)
  if params is None:
    return True
  if not detect_races:
    return params()
  # on_race='warn': record races instead of raising at the first (the
  # default since jax 0.12); older versions lack it, or the multi-core
  # simulation.
  for kwargs in (dict(num_cores_or_threads=2, on_race='warn'),
                 dict(num_cores_or_threads=2), {}):
    try:
      return params(detect_races=True, **kwargs)
    except TypeError:
      continue


def races_detected() -> bool | None:
  """Whether the last TPU-interpreted run with detect_races saw a data race.

  None where this jax version does not expose the detector's state.
  """
  for path in ('jax._src.pallas.mosaic.interpret.interpret_pallas_call',
               'jax._src.pallas.mosaic.interpret'):
    try:
      module = importlib.import_module(path)
    except ImportError:
      continue
    races = getattr(module, 'races', None)
    if races is not None and hasattr(races, 'races_found'):
      return bool(races.races_found)
  return None


def triton_load(ref, *, mask=None, other=None):
  """Masked Triton load of `ref` (a `.at[...]` view); `other` where masked."""
  return _first_attr(pltriton, 'load')(ref, mask=mask, other=other)


def triton_store(ref, value, *, mask=None):
  """Masked Triton store of `value` into `ref` (a `.at[...]` view)."""
  return _first_attr(pltriton, 'store')(ref, value, mask=mask)


def block_spec(block_shape, index_map) -> pl.BlockSpec:
  """`pl.BlockSpec` by keyword (the positional order changed in the past)."""
  return pl.BlockSpec(block_shape=block_shape, index_map=index_map)


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
  """`jax.ShapeDtypeStruct` for a pallas_call output computed from `operands`.

  Inside a `shard_map` with check_vma, outputs must say along which manual
  mesh axes they vary: the union of the operands' (a kernel run per device
  inside the expert-parallel shard_map). The keyword was `vma` (a frozenset)
  before jax 0.10 and is `manual_axis_type` in 0.10.x.
  """
  avals = [jax.typeof(x) for x in operands]
  mats = [a.mat for a in avals if getattr(a, 'mat', None) is not None]
  if mats:
    varying = frozenset().union(*(m.varying for m in mats))
    widest = max(mats, key=lambda m: len(m.varying))
    mat = (widest if widest.varying == varying
           else type(widest)(varying=varying))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)
  vmas = [a.vma for a in avals if getattr(a, 'vma', None) is not None]
  if vmas:
    return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset().union(*vmas))
  return jax.ShapeDtypeStruct(shape, dtype)


def without_vma(fn: Callable, *operands):
  """fn(*operands) for a third-party kernel whose pallas_call outputs carry no
  varying-axes type (megablox builds plain `ShapeDtypeStruct`s), inside a
  `shard_map` with check_vma.

  The call is traced with the varying-axes check off and its outputs are then
  cast to vary along every axis the operands vary along (what a per-device
  kernel's outputs do). Only for calls inside a custom VJP's rules, which are
  never differentiated themselves. Outside a shard_map: just fn(*operands).
  """
  axes = _varying_axes(operands)
  if not axes:
    return fn(*operands)
  from jax._src import config  # pylint: disable=g-import-not-at-top
  with config._check_vma(False):  # pylint: disable=protected-access
    out = fn(*operands)
  return jax.tree.map(
      lambda v: jax.lax.pcast(v, tuple(sorted(axes)), to='varying'), out)


def sum_to_vma(grad, primal):
  """grad summed over the mesh axes it varies along but `primal` does not.

  Inside a `shard_map`, a custom VJP's cotangent of an operand replicated
  across devices (a weight) must be replicated too: the per-device partial
  gradients are summed, as autodiff of the implicit broadcast would.
  Outside a shard_map: grad unchanged.
  """
  extra = _varying_axes((grad,)) - _varying_axes((primal,))
  return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def _varying_axes(operands) -> frozenset:
  """Mesh axes along which any operand varies (inside a shard_map)."""
  out = frozenset()
  for x in operands:
    aval = jax.typeof(x)
    mat = getattr(aval, 'mat', None)
    out |= frozenset(mat.varying if mat is not None
                     else getattr(aval, 'vma', ()) or ())
  return out


def resolve_for(operands, backend: str | None, interpret: Any
                ) -> tuple[str, Any]:
  """`resolve` for a kernel applied to `operands`.

  jax's generic Pallas interpreter (interpret=True, the 'triton' kernels on
  a CPU host) cannot evaluate a kernel on values that vary along shard_map
  axes (jax 0.10.2: the kernel is traced without varying-axis types and its
  loops, gathers and output carries then fail the varying-axes check). So a
  kernel interpreted inside a shard_map on values varying along mesh axes
  (the expert-parallel MoE layer on CPU devices), with the backend left to
  the default, runs its 'tpu' variant in the TPU interpreter, which models
  devices. Compiled kernels are unaffected.
  """
  if (backend is None and interpret is not False
      and jax.default_backend() == 'cpu' and _varying_axes(operands)):
    return 'tpu', tpu_interpret() if interpret in (None, True) else interpret
  return resolve(backend, interpret)


def default_backend() -> str:
  """The kernel backend of the default jax device ('tpu' | 'triton').

  On a CPU host this is 'triton' (run interpreted): its kernels carry no TPU
  memory simulation, so the interpreter is the fastest.
  """
  return 'tpu' if jax.default_backend() == 'tpu' else 'triton'


def resolve(backend: str | None, interpret: Any) -> tuple[str, Any]:
  """(backend, interpret) with defaults: the device's backend; interpret on CPU.

  interpret=None means: interpret exactly when the default device is a CPU.
  """
  backend = backend or default_backend()
  if backend not in BACKENDS:
    raise ValueError(f'kernel backend={backend!r} is not one of {BACKENDS}')
  if interpret is None:
    interpret = jax.default_backend() == 'cpu'
  if interpret is True and backend == 'tpu':
    interpret = tpu_interpret()
  return backend, interpret


def lower(fn: Callable, *args, backend: str) -> str:
  """Lowers jit(fn)(*args) for the backend's platform from any host: MLIR text.

  Raises whatever the Pallas lowering raises (bad block shapes, unsupported
  operations); the text contains the kernel's custom call on success.
  """
  platform = _PLATFORM[backend]
  with _target_device(platform):
    traced = jax.jit(fn).trace(*args)
    return traced.lower(lowering_platforms=(platform,)).as_text()


# The GPU that `lower` targets from a host without one: compute capability
# 9.0, jax 0.10's fallback for Triton lowering without a GPU.
_CUDA_DEVICE_KIND = 'NVIDIA H100'


def _target_device(platform: str):
  """Context in which jit lowers for `platform` from this host.

  Since jax 0.11 Triton kernels lower only for a known GPU: a local one or
  the abstract device of the context's abstract mesh (`AbstractDevice`, with
  no default for `num_cores`). Other platforms need nothing.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if (platform != 'cuda' or jax.default_backend() == 'gpu'
      or mesh.abstract_device is not None):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(
      device_kind=_CUDA_DEVICE_KIND, num_cores=None, platform='cuda')
  return jax.sharding.use_abstract_mesh(mesh.update(abstract_device=device))


def custom_calls(mlir_text: str) -> list[str]:
  """Custom-call targets in lowered MLIR text, in order of appearance."""
  return re.findall(r'custom_call @([\w$.]+)', mlir_text)


def next_power_of_2(x: int) -> int:
  return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def round_up(x: int, multiple: int) -> int:
  return -(-int(x) // multiple) * multiple
