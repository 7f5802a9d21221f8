"""Transport plans: Sinkhorn and k-sparse OT against independent float64
references, google-research/vmoe fixtures, marginals, sparsity and gradients."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import (fast_jit, np_simplex, np_sinkhorn,
                           np_sparse_plan, np_sparse_projection,
                           np_sparse_projection_bruteforce)
from vmoe.nn import optimal_transport as ot

DATA = pathlib.Path(__file__).parent / 'data'


def random_logits(shape, scale=1.5, seed=0):
  return (scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


# -- Sinkhorn -------------------------------------------------------------------


@pytest.mark.parametrize('mode', ot.SINKHORN_MODES)
@pytest.mark.parametrize('num_iters', [1, 20])
def test_sinkhorn_matches_float64_numpy(mode, num_iters):
  logits = random_logits((3, 13, 5))  # s / e = 2.6: not an integer
  plan = fast_jit(lambda l: ot.sinkhorn(l, num_iters=num_iters, mode=mode))(
      logits)
  np.testing.assert_allclose(plan, np_sinkhorn(logits, num_iters),
                             rtol=2e-5, atol=2e-6)


def test_sinkhorn_marginals_after_20_iterations():
  # Router logits at initialisation are O(1): ViT-S-like groups, 32 experts.
  logits = random_logits((4, 197, 32), scale=1.0)
  plan = np.asarray(fast_jit(ot.sinkhorn)(logits), np.float64)
  assert np.all(plan > 0)
  row_err = np.abs(plan.sum(-1) - 1).max()
  col_err = np.abs(plan.sum(-2) - 197 / 32).max()
  assert row_err < 1e-5, row_err      # exact after every iteration
  assert col_err < 1e-4, col_err      # measured: about 2e-6
  # Wider logits converge more slowly; more iterations close the gap.
  wide = random_logits((2, 64, 8), scale=4.0)
  errs = [np.abs(np.asarray(ot.sinkhorn(wide, num_iters=n)).sum(-2)
                 - 8).max() for n in (20, 200)]
  assert errs[1] < min(errs[0], 1e-4), errs


def test_sinkhorn_matches_vmoe():
  ref = np.load(DATA / 'ot_sinkhorn.npz')
  for mode, tol in (('kernel', 1e-6), ('log', 1e-6)):
    plan = ot.sinkhorn(ref['sinkhorn_logits'], mode=mode)
    np.testing.assert_allclose(plan, ref['sinkhorn_plan'], atol=tol)
  # Logits of std 8 (range 28): kernel mode as exact as vmoe's own kernel
  # mode; log mode rounds potentials of size ~15 (relative 1e-7).
  big = ref['sinkhorn_big_logits']
  np.testing.assert_allclose(ot.sinkhorn(big), ref['sinkhorn_big_plan'],
                             atol=2e-6)
  np.testing.assert_allclose(ot.sinkhorn(big, mode='log'),
                             ref['sinkhorn_big_plan'], atol=5e-4)


def test_sinkhorn_edge_cases():
  # Constant logits: the uniform plan (vmoe's test); one expert: all ones.
  np.testing.assert_allclose(ot.sinkhorn(jnp.zeros((1, 5, 4))), 0.25,
                             rtol=1e-6)
  np.testing.assert_allclose(ot.sinkhorn(random_logits((2, 6, 1))), 1.0,
                             rtol=1e-6)
  # Huge logits overflow exp() in plain kernel mode; the group-max shift
  # keeps the plan finite and equal to the plan of the shifted logits.
  logits = random_logits((2, 8, 4))
  shifted = fast_jit(ot.sinkhorn)(logits + 200.0)
  assert np.all(np.isfinite(shifted))
  # (logits + 200 carries float32 rounding of 1e-5 relative.)
  np.testing.assert_allclose(shifted, ot.sinkhorn(logits), rtol=1e-4)
  # Log mode also survives a range that underflows the kernel.
  wide = np.zeros((1, 4, 2), np.float32)
  wide[0, :, 1] = -200.0
  plan = ot.sinkhorn(wide, mode='log', num_iters=50)
  assert np.all(np.isfinite(plan))
  np.testing.assert_allclose(np.asarray(plan).sum(-2), 2.0, rtol=1e-4)


@pytest.mark.parametrize('mode', ot.SINKHORN_MODES)
def test_sinkhorn_gradient_matches_finite_differences(mode):
  logits = random_logits((2, 6, 3), scale=1.0, seed=1)
  w = np.random.RandomState(2).randn(*logits.shape)
  grad = fast_jit(jax.grad(
      lambda l: jnp.sum(w * ot.sinkhorn(l, mode=mode))))(logits)
  assert np.all(np.isfinite(grad))
  rs = np.random.RandomState(3)
  h = 1e-5
  for _ in range(3):
    d = rs.randn(*logits.shape)
    fd = (np.sum(w * np_sinkhorn(logits + h * d))
          - np.sum(w * np_sinkhorn(logits - h * d))) / (2 * h)
    np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * d), fd,
                               rtol=1e-4, atol=1e-5)


def test_sinkhorn_rejects_bad_arguments():
  with pytest.raises(ValueError, match="mode='lse' is not one of"):
    ot.sinkhorn(jnp.zeros((1, 4, 2)), mode='lse')
  with pytest.raises(ValueError, match='num_iters=0 must be'):
    ot.sinkhorn(jnp.zeros((1, 4, 2)), num_iters=0)
  with pytest.raises(ValueError, match=r'must be \[g, s, e\]'):
    ot.sinkhorn(jnp.zeros((4, 2)))


# -- sparsity-constrained OT ----------------------------------------------------


@pytest.mark.parametrize('c', [1, 2, 3, 6])
def test_sparse_projection_is_the_exact_projection(c):
  x = random_logits((3, 6, 2), scale=0.7, seed=c)
  x[2, :, 1] = 0.1  # ties: the lower index wins, like lax.top_k
  got = np.asarray(ot.sparse_simplex_projection(jnp.asarray(x), c))
  for i in range(3):
    want = np_sparse_projection_bruteforce(x[i], c)
    if i == 2:  # tied column: any c-subset is optimal; same distance
      d_got = np.sum((x[i] - got[i]) ** 2, 0)
      d_want = np.sum((x[i] - want) ** 2, 0)
      np.testing.assert_allclose(d_got, d_want, atol=1e-6)
      np.testing.assert_allclose(got[i][:, 1], np_sparse_projection(
          x[i], c)[:, 1], atol=1e-6)
    else:
      np.testing.assert_allclose(got[i], want, atol=1e-6)
  np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)
  assert np.all((got > 0).sum(1) <= c)


def _check_plan(plan, c, s, e):
  plan = np.asarray(plan)
  assert np.all(plan >= 0)
  assert np.all((plan > 0).sum(-2) <= c)
  np.testing.assert_allclose(plan.sum(-2), s / e, rtol=1e-5)


@pytest.mark.parametrize('s, e, c', [(12, 4, 3), (12, 4, 2), (10, 3, 10),
                                     (9, 3, 1)])
def test_sparse_plan_constraints_objective_and_replay(s, e, c):
  gates = np.asarray(jax.nn.softmax(random_logits((2, s, e), seed=s + c)))
  plan, alpha = fast_jit(lambda x: ot.sparse_plan(
      x, max_nonzeros=c, return_potentials=True))(gates)
  _check_plan(plan, c, s, e)
  # The same schedule replayed in float64 numpy.
  np.testing.assert_allclose(plan, np_sparse_plan(gates, c), atol=2e-5)
  # Adam lowered the semi-dual objective from alpha = 0.
  f0 = ot.sparse_semi_dual(jnp.zeros((2, s)), gates, c)
  f1 = ot.sparse_semi_dual(alpha, gates, c)
  assert np.all(np.asarray(f1) < np.asarray(f0)), (f0, f1)
  # Its gradient is the row sums of the plan minus 1.
  grad = jax.grad(lambda a: jnp.sum(ot.sparse_semi_dual(a, gates, c)))(alpha)
  np.testing.assert_allclose(grad, np.asarray(plan).sum(-1) - 1, atol=1e-5)


def test_sparse_plan_matches_vmoe():
  ref = np.load(DATA / 'ot_sparse.npz')
  for tag, c, steps in (('it20_cf100', 3, 20), ('it20_cf50', 2, 20),
                        ('it500_cf100', 3, 500), ('it500_cf50', 2, 500)):
    gates = ref[f'{tag}_gates']
    np.testing.assert_allclose(gates, jax.nn.softmax(ref['logits']),
                               atol=1e-6)
    plan = ot.sparse_plan(gates, max_nonzeros=c, num_steps=steps)
    np.testing.assert_allclose(plan, ref[f'{tag}_plan'], atol=2e-6,
                               err_msg=tag)
    np.testing.assert_array_equal(np.asarray(plan) > 0, ref[f'{tag}_plan'] > 0)
  # 20 steps are far from converged, 500 are close (feasible: c * e >= s).
  rows20 = ref['it20_cf100_plan'].sum(-1)
  rows500 = ref['it500_cf100_plan'].sum(-1)
  assert np.abs(rows20 - 1).max() > 0.5
  assert np.abs(rows500 - 1).max() < 5e-3


def test_sparse_plan_early_stop_and_no_gradient():
  gates = np.asarray(jax.nn.softmax(random_logits((2, 8, 4))))
  # tol above every gradient norm: only jaxopt's first step is taken, which
  # for Adam is -lr * g / (|g| + eps) per coordinate.
  _, alpha = ot.sparse_plan(gates, max_nonzeros=2, tol=1e9,
                            return_potentials=True)
  g0 = (8 / 4) * np.asarray(ot.sparse_simplex_projection(
      jnp.asarray(gates) / 2.0, 2)).sum(-1) - 1
  np.testing.assert_allclose(alpha, -1e-2 * g0 / (np.abs(g0) + 1e-8),
                             rtol=1e-5)
  grad = jax.grad(lambda x: jnp.sum(ot.sparse_plan(x, max_nonzeros=2)))(gates)
  np.testing.assert_array_equal(grad, 0.0)


def test_sparse_plan_rejects_bad_arguments():
  with pytest.raises(ValueError, match=r'max_nonzeros=9 must be in \[1, 8\]'):
    ot.sparse_plan(jnp.zeros((1, 8, 2)), max_nonzeros=9)
  with pytest.raises(ValueError, match='num_steps=0 must be'):
    ot.sparse_plan(jnp.zeros((1, 8, 2)), max_nonzeros=2, num_steps=0)
