"""The routing kernels (pallas_kernels/routing.py) against vmoe.nn.routing.

Interpreted on CPU ('triton' kernels through the generic interpreter, 'tpu'
kernels through the TPU interpreter with race detection) and lowered for TPU
and CUDA. The integer fields of every decision (experts, positions, drops,
chosen tokens) must be identical to the reference's, ties included; the
combine weights and their gradients equal up to float rounding (the gates
come from the kernel's own softmax).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import fast_jit
from vmoe.kernels import compat
from vmoe.kernels import routing as pr
from vmoe.nn import routing as rt

# Interpreted kernels compile to large loops: compile them fast.

# Shapes: one image of 197 tokens per group (odd size), 8 experts.
G, S, E = 2, 197, 8


def _logits(seed, shape=(G, S, E), scale=2.0):
  return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _ties(seed, shape=(G, S, E)):
  """Logits on a coarse grid: many exact ties of gates and of priorities."""
  return jnp.round(_logits(seed, shape))


def _interpret(backend):
  return compat.tpu_interpret(detect_races=True) if backend == 'tpu' else True


@functools.lru_cache(maxsize=None)
def _token_choice_pair(backend, k, capacity, bpr, renormalize, from_gates):
  """jit(logits, ct, combine?) -> (kernel decision, reference decision,
  kernel grad, reference grad); one compilation per configuration."""
  kw = dict(num_selected=k, capacity=capacity, batch_priority=bpr,
            renormalize=renormalize)

  def decide(impl, logits, combine):
    if from_gates:
      return impl.token_choice_from_gates(jax.nn.softmax(logits),
                                          combine_gates=combine, **kw)
    return impl.token_choice_from_logits(logits, **kw)

  bound = dict(backend=backend, interpret=_interpret(backend))
  kernel = types.SimpleNamespace(  # the kernel module with the backend bound
      token_choice_from_logits=functools.partial(pr.token_choice_from_logits, **bound),
      token_choice_from_gates=functools.partial(pr.token_choice_from_gates,
                                                **bound))

  def run(logits, ct, combine):
    out = []
    for impl in (kernel, rt):
      def loss(l, c, impl=impl):
        r = decide(impl, l, c)
        return jnp.sum(jnp.sin(3 * r.combine_weight) * ct), r
      grads, r = jax.grad(loss, argnums=(0, 1), has_aux=True)(logits,
                                                                combine)
      out.append((r, grads))
    return out

  return fast_jit(run)


def _check_token_choice(got, want):
  for field in ('expert_index', 'position', 'valid'):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field),
                                  err_msg=field)
  assert got.capacity == want.capacity
  assert got.num_experts == want.num_experts
  np.testing.assert_allclose(got.combine_weight, want.combine_weight,
                             rtol=2e-6, atol=1e-7)


def _check_grads(got, want):
  for a, b in zip(got, want):
    if b is None:
      assert a is None
      continue
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def _run_token_choice(logits, *, backend='triton', k=2, capacity=50,
                      bpr=True, renormalize=False, combine=None):
  fn = _token_choice_pair(backend, k, capacity, bpr, renormalize,
                          combine is not None)
  ct = jax.random.normal(jax.random.key(7), logits.shape[:2] + (k,))
  (got, got_grads), (want, want_grads) = fn(logits, ct, combine)
  _check_token_choice(got, want)
  _check_grads(got_grads, want_grads)
  return got


@pytest.mark.parametrize('backend', ['triton', 'tpu'])
def test_token_choice_bpr_random_and_ties(backend):
  r = _run_token_choice(_logits(0), backend=backend)
  assert 0 < float(jnp.mean(r.valid)) < 1  # some pairs dropped
  if backend == 'triton':  # same compiled program, exact ties everywhere
    _run_token_choice(_ties(1))
    _run_token_choice(jnp.zeros((G, S, E)))  # every gate and priority tied


def test_token_choice_one_expert_and_empty_experts():
  # Every token's first choice is expert 3: it overflows, others are empty.
  logits = _logits(2).at[..., 3].add(20.0)
  r = _run_token_choice(logits)
  assert int(jnp.sum(r.valid[..., 0])) == G * 50
  # Experts 5..7 are nobody's choice.
  _run_token_choice(_logits(3).at[..., 5:].add(-30.0))


def test_token_choice_from_gates_with_combine_gates():
  combine = jax.random.uniform(jax.random.key(4), (G, S, E))
  _run_token_choice(_ties(5), combine=combine)


def test_token_choice_k_equals_e_renormalized():
  # k = e = 4 with capacity = s: nothing dropped; sequence order (no BPR).
  _run_token_choice(_ties(6, (3, 16, 4)), k=4, capacity=16, bpr=False,
                    renormalize=True)


def test_token_choice_capacity_one():
  r = _run_token_choice(_logits(8, (2, 33, 5)), k=1, capacity=1)
  assert int(jnp.sum(r.valid)) <= 2 * 5


def test_token_choice_bfloat16_logits():
  _run_token_choice(_logits(9).astype(jnp.bfloat16))


@functools.lru_cache(maxsize=None)
def _expert_choice_pair(backend, capacity, from_gates):
  kernel = functools.partial(
      pr.expert_choice_from_gates if from_gates else pr.expert_choice_from_logits,
      backend=backend, interpret=_interpret(backend))
  reference = rt.expert_choice_from_gates if from_gates else rt.expert_choice_from_logits

  def run(logits, ct, combine):
    out = []
    for impl in (kernel, reference):
      def decide(l, c, impl=impl):
        if from_gates:
          return impl(jax.nn.softmax(l), capacity=capacity, combine_gates=c)
        return impl(l, capacity=capacity)

      def loss(l, c, decide=decide):
        r = decide(l, c)
        return jnp.sum(jnp.sin(3 * r.combine_weight) * ct), r
      grads, r = jax.grad(loss, argnums=(0, 1), has_aux=True)(logits,
                                                                combine)
      out.append((r, grads))
    return out

  return fast_jit(run)


def _run_expert_choice(logits, *, backend='triton', capacity=50,
                       combine=None):
  fn = _expert_choice_pair(backend, capacity, combine is not None)
  g, s, e = logits.shape
  ct = jax.random.normal(jax.random.key(7), (g, e, capacity))
  (got, got_grads), (want, want_grads) = fn(logits, ct, combine)
  np.testing.assert_array_equal(got.token_index, want.token_index)
  assert got.num_tokens == want.num_tokens
  np.testing.assert_allclose(got.combine_weight, want.combine_weight,
                             rtol=2e-6, atol=1e-7)
  _check_grads(got_grads, want_grads)


@pytest.mark.parametrize('backend', ['triton', 'tpu'])
def test_expert_choice_random_and_ties(backend):
  _run_expert_choice(_logits(10), backend=backend)
  if backend == 'triton':
    _run_expert_choice(_ties(11))
    _run_expert_choice(jnp.zeros((G, S, E)))


def test_expert_choice_edge_capacities_and_combine_gates():
  _run_expert_choice(_ties(12, (2, 16, 4)), capacity=1)
  _run_expert_choice(_ties(13, (2, 16, 4)), capacity=16)  # every token
  _run_expert_choice(_ties(14), combine=jax.random.uniform(
      jax.random.key(15), (G, S, E)))


def test_expert_choice_rejects_bad_capacity():
  with pytest.raises(ValueError, match='capacity=0'):
    pr.expert_choice_from_logits(_logits(0), capacity=0)


@pytest.mark.parametrize('backend', compat.BACKENDS)
def test_lowers_with_custom_call(backend):
  logits = _logits(0)
  combine = jnp.ones_like(logits)
  kw = dict(backend=backend, interpret=False)
  calls = {
      'token_choice': lambda l: pr.token_choice_from_logits(
          l, num_selected=2, capacity=50, batch_priority=True,
          renormalize=True, **kw).combine_weight,
      'token_choice_from_gates': lambda l: pr.token_choice_from_gates(
          l, num_selected=3, capacity=70, batch_priority=True,
          combine_gates=combine, **kw).position,
      'expert_choice': lambda l: pr.expert_choice_from_logits(
          l, capacity=50, **kw).token_index,
      'expert_choice_from_gates': lambda l: pr.expert_choice_from_gates(
          l, capacity=50, combine_gates=combine, **kw).combine_weight,
  }
  for name, fn in calls.items():
    text = compat.lower(fn, logits, backend=backend)
    assert compat.CUSTOM_CALL[backend] in compat.custom_calls(text), name
  # The backward pass lowers too (XLA around the forward kernel).
  grad = jax.grad(lambda l: jnp.sum(calls['token_choice'](l)))
  assert compat.CUSTOM_CALL[backend] in compat.lower(grad, logits,
                                                     backend=backend)
