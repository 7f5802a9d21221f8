"""Grouped matmul kernels (vmoe.kernels.gmm) against jax.lax.ragged_dot.

Interpret mode on CPU (the TPU kernels under the TPU interpreter, once with
race detection), and lowering for TPU and CUDA from CPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import fast_jit
from vmoe.kernels import compat
from vmoe.kernels import gmm as G

# Interpret-mode programs are small; XLA's optimisation passes are not needed.

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Triton kernels run compiled on a GPU host (bench/gpu_check.sh), interpreted
# elsewhere; TPU kernels run under the TPU interpreter off TPU.
TRITON_INTERPRET = jax.default_backend() != 'gpu'


def inputs(m, k, n, sizes, dtype, seed=0):
  rng = np.random.default_rng(seed)  # numpy: no compilation per shape
  lhs, rhs, dout = (jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
                    for shape in ((m, k), (len(sizes), k, n), (m, n)))
  return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout


def value_and_grads(fn, lhs, rhs, sizes, dout):
  """(out, d lhs, d rhs) of <fn(lhs, rhs, sizes), dout>, one compiled program."""
  def loss(lhs, rhs):
    out = fn(lhs, rhs, sizes)
    return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out

  @fast_jit
  def run(lhs, rhs):
    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1),
                                         has_aux=True)(lhs, rhs)
    return (out, *grads)

  return run(lhs, rhs)


def assert_close(got, want, dtype, what):
  got, want = (np.asarray(a, np.float32) for a in (got, want))
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max()) / scale
  assert err <= TOL[dtype], f'{what}: max relative error {err:.2e}'


# (m, k, n, group sizes, tiling): 'mixed' has empty groups (first, middle),
# padding rows past the groups and tiles smaller than the groups, so that row
# tiles straddle group boundaries; then all rows in one group; then no rows.
CASES = {
    'mixed': (70, 32, 24, [0, 9, 30, 0, 21, 5], (16, 16, 16)),
    'one_group': (37, 16, 16, [0, 37, 0], None),
    'no_rows': (16, 16, 16, [0, 0], None),
}


def check_case(backend, dtype, case, interpret):
  m, k, n, sizes, tiling = CASES[case]
  if backend == 'tpu' and tiling:
    tiling = (16, k, n)  # TPU lane dims: full dims when not multiples of 128
  lhs, rhs, sizes, dout = inputs(m, k, n, sizes, dtype)
  got = value_and_grads(
      lambda a, b, s: G.gmm(a, b, s, backend=backend, interpret=interpret,
                            tiling=tiling, tgmm_tiling=tiling),
      lhs, rhs, sizes, dout)
  want = value_and_grads(G.gmm_reference, lhs, rhs, sizes, dout)
  for name, a, b in zip(('out', 'd lhs', 'd rhs'), got, want):
    assert a.dtype == b.dtype, name
    assert_close(a, b, dtype, f'{backend} {case} {name}')
  total = int(np.sum(sizes))
  # Padding rows: zero output and zero gradient.
  assert not np.any(np.asarray(got[0][total:], np.float32))
  assert not np.any(np.asarray(got[1][total:], np.float32))


@pytest.mark.parametrize('backend,dtype,case', [
    ('triton', jnp.float32, 'mixed'),
    ('triton', jnp.bfloat16, 'mixed'),
    ('triton', jnp.float32, 'one_group'),
    ('triton', jnp.bfloat16, 'no_rows'),
    ('tpu', jnp.float32, 'mixed'),
    ('tpu', jnp.float32, 'no_rows'),
])
def test_matches_ragged_dot(backend, dtype, case):
  # TPU kernels under the generic interpreter here (fast); the TPU
  # interpreter with race detection below.
  check_case(backend, dtype, case,
             TRITON_INTERPRET if backend == 'triton' else True)


def test_tpu_matches_ragged_dot_race_free():
  check_case('tpu', jnp.bfloat16, 'one_group',
             compat.tpu_interpret(detect_races=True))
  assert compat.races_detected() is False


@pytest.mark.parametrize('backend', compat.BACKENDS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_to_kernels(backend, dtype):
  # V-MoE-B expert shapes: 8 experts, d=768 -> h=3072, 2 x 197 tokens x k=2.
  lhs = jax.ShapeDtypeStruct((788, 768), dtype)
  rhs = jax.ShapeDtypeStruct((8, 768, 3072), dtype)
  sizes = jax.ShapeDtypeStruct((8,), jnp.int32)

  def f(lhs, rhs, sizes):
    out, vjp = jax.vjp(lambda a, b: G.gmm(a, b, sizes, backend=backend,
                                          interpret=False), lhs, rhs)
    return out, vjp(out)

  calls = compat.custom_calls(compat.lower(f, lhs, rhs, sizes,
                                           backend=backend))
  # Forward, d lhs (gmm with rhs transposed) and d rhs (tgmm).
  assert calls == [compat.CUSTOM_CALL[backend]] * 3, calls


def test_bad_inputs_fail_with_one_line():
  lhs, rhs, sizes, _ = inputs(8, 4, 4, [4, 4], jnp.float32)
  with pytest.raises(ValueError, match=r'lhs \[m, k\] and rhs \[e, k, n\]'):
    G.gmm(lhs, rhs[:, :3], sizes)
  with pytest.raises(ValueError, match='group_sizes has shape'):
    G.gmm(lhs, rhs, sizes[:1])
  with pytest.raises(ValueError, match="backend='cuda'"):
    G.gmm(lhs, rhs, sizes, backend='cuda')


def test_tpu_race_detector_catches_a_race():
  """The race check above can fail: two cores adding into one output block."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top

  def racy(x_ref, o_ref):
    o_ref[...] = o_ref[...] + x_ref[...]

  f = pl.pallas_call(
      racy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), grid=(2,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
      compiler_params=compat.tpu_params(dimension_semantics=('parallel',)),
      interpret=compat.tpu_interpret(detect_races=True))
  jax.block_until_ready(f(jnp.ones((16, 128), jnp.float32)))
  assert compat.races_detected() is True


@pytest.mark.parametrize('backend', [None, 'tpu'])
def test_inside_shard_map(backend):
  """Per device inside a shard_map (the data-parallel MoE layer): outputs
  typed as varying, the weight gradient summed over devices. On a CPU host
  backend=None picks the TPU kernels (jax's generic interpreter cannot run
  on varying values); a one-device mesh has the same types as a larger one."""
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((1,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  lhs, rhs, sizes, dout = inputs(40, 24, 48, [10, 0, 17, 8], jnp.float32)

  def per_device(fn):
    def f(lhs, rhs, sizes):
      return jax.shard_map(fn, mesh=mesh, in_specs=(P('data'), P(), P()),
                           out_specs=P('data'))(lhs, rhs, sizes)
    return f

  got = value_and_grads(per_device(functools.partial(
      G.gmm, backend=backend, interpret=None)), lhs, rhs, sizes, dout)
  want = value_and_grads(per_device(G.gmm_reference), lhs, rhs, sizes, dout)
  for name, a, b in zip(('out', 'd lhs', 'd rhs'), got, want):
    assert_close(a, b, jnp.float32, f'shard_map {name}')
