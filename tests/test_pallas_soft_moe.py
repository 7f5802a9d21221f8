"""Fused Soft MoE dispatch / combine kernels (vmoe.kernels.soft_moe).

Interpret mode on CPU against the plain-jnp references and the model's XLA
path (vmoe.nn.routing.soft_routing + vmoe.nn.dispatch.soft_dispatch /
soft_combine), forward, statistics and gradients; lowering for TPU and CUDA
from CPU.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import fast_jit
from vmoe.kernels import compat
from vmoe.kernels import soft_moe as S
from vmoe.nn import dispatch as dp
from vmoe.nn import routing as rt


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
# Triton kernels run compiled on a GPU host (bench/gpu_check.sh), interpreted
# elsewhere; TPU kernels run under the TPU interpreter off TPU.
TRITON_INTERPRET = jax.default_backend() != 'gpu'


def interpret_for(backend):
  return TRITON_INTERPRET if backend == 'triton' else True


def inputs(g, s, e, p, d, dtype, scale, seed=0):
  """x [g, s, d], phi [e, p, d], scale, outputs [g, n, d], cotangents."""
  rng = np.random.default_rng(seed)

  def normal(*shape, dt=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape, np.float32), dt)

  x = normal(g, s, d, dt=dtype)
  x = x.at[0, 0].set(0)  # an all-zero token (normalised by eps only)
  n = e * p
  return dict(x=x, phi=normal(e, p, d), scale=jnp.float32(scale),
              outputs=normal(g, n, d, dt=dtype)), dict(
                  slots=normal(g, n, d), y=normal(g, s, d), lse=normal(g, s))


def program(dispatch, combine):
  """Jitted (slots, y, stats, grads) of <slots, a> + <y, b> + <lse, c>."""
  def loss(args, cot):
    slots = dispatch(args['x'], args['phi'], args['scale'])
    y, stats = combine(args['x'], args['phi'], args['scale'], args['outputs'])
    f32 = lambda v: v.astype(jnp.float32)
    value = (jnp.sum(f32(slots) * cot['slots']) + jnp.sum(f32(y) * cot['y'])
             + jnp.sum(stats.token_lse * cot['lse']))
    return value, (slots, y, stats)

  @fast_jit
  def run(args, cot):
    grads, aux = jax.grad(loss, has_aux=True)(args, cot)
    return (*aux, grads)

  return run


def reference_program():
  return program(S.soft_dispatch_reference,
                 functools.partial(S.soft_combine_reference, with_stats=True))


def kernel_program(backend, interpret, **blocks):
  kw = dict(backend=backend, interpret=interpret, **blocks)
  return program(functools.partial(S.soft_dispatch, **kw),
                 functools.partial(S.soft_combine, with_stats=True, **kw))


def assert_close(got, want, dtype, what):
  got, want = (np.asarray(a, np.float32) for a in (got, want))
  assert got.shape == want.shape, what
  scale = max(1.0, float(np.abs(want).max()))
  err = float(np.abs(got - want).max()) / scale
  assert err <= TOL[dtype], f'{what}: max relative error {err:.2e}'


def compare(got, want, dtype, label):
  slots, y, stats, grads = got
  r_slots, r_y, r_stats, r_grads = want
  assert slots.dtype == r_slots.dtype and y.dtype == r_y.dtype
  assert_close(slots, r_slots, dtype, f'{label} slots')
  assert_close(y, r_y, dtype, f'{label} y')
  for name in S.SoftStats._fields:
    assert_close(getattr(stats, name), getattr(r_stats, name), dtype,
                 f'{label} {name}')
  for name in ('x', 'phi', 'scale', 'outputs'):
    assert_close(grads[name], r_grads[name], dtype, f'{label} d {name}')


# (backend, g, s, e, p, d, dtype, scale, blocks): 37 and 197 tokens (odd
# sizes, several token tiles), slots over several tiles, a large logit scale.
# The TPU case has two 128-tiles of tokens and of slots, padded in the
# wrapper, under the generic interpreter (fast); `test_tpu_race_free` runs the
# TPU interpreter with race detection.
CASES = {
    'triton_f32': ('triton', 2, 37, 3, 8, 32, jnp.float32, 2.5,
                   dict(block_s=16, block_n=16)),
    'triton_bf16': ('triton', 1, 197, 4, 4, 48, jnp.bfloat16, 10.0, {}),
    'tpu_f32_multi_tile': ('tpu', 1, 197, 17, 8, 16, jnp.float32, 4.0, {}),
}


@pytest.mark.parametrize('case', list(CASES))
def test_matches_reference(case):
  backend, g, s, e, p, d, dtype, scale, blocks = CASES[case]
  args, cot = inputs(g, s, e, p, d, dtype, scale)
  got = kernel_program(backend, interpret_for(backend), **blocks)(args, cot)
  compare(got, reference_program()(args, cot), dtype, case)


def test_tpu_race_free():
  """No data races between the two simulated cores of a TPU chip.

  Every kernel runs through one TPU driver; this checks it with a kernel
  tiled over slots (dispatch, slot mass) and one tiled over tokens (combine),
  forward only (race detection is slow), on two groups: the 'parallel' grid
  axis is split over the cores.
  """
  args, _ = inputs(2, 20, 2, 4, 16, jnp.bfloat16, 3.0)
  x, phi, scale, outputs = (args[k] for k in ('x', 'phi', 'scale', 'outputs'))
  kw = dict(backend='tpu', interpret=compat.tpu_interpret(detect_races=True))

  @fast_jit
  def forward(x, phi, scale, outputs):
    return (S.soft_dispatch(x, phi, scale, **kw),
            S.soft_combine(x, phi, scale, outputs, with_stats=True, **kw))

  slots, (y, stats) = forward(x, phi, scale, outputs)
  assert compat.races_detected() is False
  r_y, r_stats = S.soft_combine_reference(x, phi, scale, outputs,
                                          with_stats=True)
  assert_close(slots, S.soft_dispatch_reference(x, phi, scale), jnp.bfloat16,
               'slots')
  assert_close(y, r_y, jnp.bfloat16, 'y')
  assert_close(stats.slot_mass, r_stats.slot_mass, jnp.bfloat16, 'slot mass')


def test_reference_and_stats_match_the_model_path():
  """The references equal vmoe.nn's XLA path; SoftStats give its metrics."""
  args, cot = inputs(2, 13, 3, 2, 8, jnp.float32, 2.0)
  x, phi, scale, outputs = (args[k] for k in ('x', 'phi', 'scale', 'outputs'))

  @fast_jit
  def run(x, phi, scale, outputs):
    r = rt.soft_routing(x, phi, scale)
    model = (dp.soft_dispatch(r.logits, x), dp.soft_combine(r.logits, outputs),
             rt.z_loss(r.logits), rt.entropy(r.combine_weights()),
             rt.expert_load(r))
    y, stats = S.soft_combine_reference(x, phi, scale, outputs,
                                        with_stats=True)
    ours = (S.soft_dispatch_reference(x, phi, scale), y,
            *S.metric_values(stats, phi.shape[0]))
    return model, ours

  model, ours = run(x, phi, scale, outputs)
  for name, a, b in zip(('slots', 'y', 'z_loss', 'entropy', 'expert_load'),
                        ours, model):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def test_stats_without_combine():
  """soft_stats (router metrics before any combine) and its z-loss gradient."""
  args, _ = inputs(2, 37, 3, 8, 32, jnp.float32, 2.5)
  x, phi, scale = args['x'], args['phi'], args['scale']

  def metrics(stats_fn):
    def z_loss_and_metrics(x, phi, scale):
      values = S.metric_values(stats_fn(x, phi, scale), phi.shape[0])
      return values[0], values
    return fast_jit(jax.grad(z_loss_and_metrics, argnums=(0, 1, 2),
                             has_aux=True))

  kernel = functools.partial(S.soft_stats, backend='triton',
                             interpret=TRITON_INTERPRET,
                             block_s=16, block_n=16)
  reference = lambda *a: S.soft_combine_reference(
      *a, jnp.zeros((2, 24, 32)), with_stats=True)[1]
  got, want = metrics(kernel)(x, phi, scale), metrics(reference)(x, phi, scale)
  for name, a, b in zip(('d x', 'd phi', 'd scale'), got[0], want[0]):
    assert_close(a, b, jnp.float32, name)
  for name, a, b in zip(('z_loss', 'entropy', 'expert_load'), got[1], want[1]):
    assert_close(a, b, jnp.float32, name)


def test_layer_entry_points_match_vmoe_dispatch():
  """dispatch / combine / decision_metrics on a decision carrying the router
  input and slot parameters: expert-major buffers as vmoe.nn.dispatch."""
  args, _ = inputs(2, 13, 3, 2, 16, jnp.float32, 2.0)
  x, phi, scale, _ = (args[k] for k in ('x', 'phi', 'scale', 'outputs'))
  kw = dict(backend='triton', interpret=TRITON_INTERPRET)

  @fast_jit
  def run(x, phi, scale):
    r = rt.soft_routing(x, phi, scale)
    decision = types.SimpleNamespace(
        logits=r.logits, num_experts=3, tokens=x,
        slot_params=S.slot_params(phi, scale))
    buffers = S.dispatch(decision, x, **kw)                 # [e, g, p, d]
    y = S.combine(decision, jnp.tanh(buffers), **kw)
    ref_buffers = dp.dispatch(r, x)
    ref_y = dp.combine(r, jnp.tanh(ref_buffers))
    ref_metrics = (rt.z_loss(r.logits), rt.entropy(r.combine_weights()),
                   rt.expert_load(r))
    return ((buffers, y, S.decision_metrics(decision, **kw)),
            (ref_buffers, ref_y, ref_metrics))

  got, want = run(x, phi, scale)
  for name, a, b in zip(('buffers', 'y', 'metrics'), got, want):
    jax.tree.map(lambda a, b, name=name: assert_close(a, b, jnp.float32, name),
                 a, b)
  with pytest.raises(ValueError, match='need a SoftRouting with tokens'):
    S.dispatch(rt.soft_routing(x, phi, scale), x)


@pytest.mark.parametrize('backend', compat.BACKENDS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_to_kernels(backend, dtype):
  # Soft MoE-S/16 layer: 197 tokens, 128 experts x 1 slot, d=384.
  x = jax.ShapeDtypeStruct((4, 197, 384), dtype)
  phi = jax.ShapeDtypeStruct((128, 1, 384), jnp.float32)
  scale = jax.ShapeDtypeStruct((), jnp.float32)
  outputs = jax.ShapeDtypeStruct((4, 128, 384), dtype)
  kw = dict(backend=backend, interpret=False)

  def train(x, phi, scale, outputs):
    def loss(x, phi, scale, outputs):
      slots = S.soft_dispatch(x, phi, scale, **kw)
      y, stats = S.soft_combine(x, phi, scale, outputs + slots,
                                with_stats=True, **kw)
      return (jnp.sum(y.astype(jnp.float32))
              + jnp.mean(jnp.square(stats.token_lse))
              + jnp.sum(stats.token_entropy) + jnp.sum(stats.slot_mass))
    # The loss too, as a train step returns it: jax >= 0.12 drops kernels
    # whose outputs are unused (here the slot mass, without gradient).
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, phi, scale,
                                                          outputs)

  calls = compat.custom_calls(compat.lower(train, x, phi, scale, outputs,
                                           backend=backend))
  # dispatch, combine, slot mass; d x and d phi of dispatch; d x and
  # d (outputs, phi) of combine.
  assert calls == [compat.CUSTOM_CALL[backend]] * 7, calls
  # Router statistics alone: token statistics, slot mass, and the z-loss
  # gradient's d x and d phi.
  def z_loss(x, phi, scale):
    stats = S.soft_stats(x, phi, scale, **kw)
    z, _, load = S.metric_values(stats, 128)
    return z, load  # the expert load metric (slot mass) is used too

  calls = compat.custom_calls(compat.lower(
      jax.grad(z_loss, argnums=(0, 1), has_aux=True), x, phi, scale,
      backend=backend))
  assert calls == [compat.CUSTOM_CALL[backend]] * 4, calls


def test_bad_inputs_fail_with_one_line():
  args, _ = inputs(1, 4, 2, 1, 8, jnp.float32, 1.0)
  x, phi, scale = args['x'], args['phi'], args['scale']
  with pytest.raises(ValueError, match=r'x must be \[g, s, d\]'):
    S.soft_dispatch(x[0], phi, scale)
  with pytest.raises(ValueError, match='phi must be'):
    S.soft_dispatch(x, phi[..., :4], scale)
  with pytest.raises(ValueError, match='outputs must be'):
    S.soft_combine(x, phi, scale, args['outputs'][:, :1])
  with pytest.raises(ValueError, match='block_s=100 must be a multiple of 128'):
    S.soft_dispatch(x, phi, scale, backend='tpu', block_s=100)
