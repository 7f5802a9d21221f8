"""The dispatch / combine kernels (pallas_kernels/dispatch.py) against
vmoe.nn.dispatch's 'indices' (gathers) and 'einsum' (one-hot) paths.

Forward and gradients (tokens, expert outputs and combine weights), token
choice and expert choice decisions, float32 and bfloat16, interpreted on CPU
('triton' kernels through the generic interpreter, 'tpu' kernels through the
TPU interpreter with race detection), and lowered for TPU and CUDA.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import fast_jit
from vmoe.kernels import compat
from vmoe.kernels import dispatch as pd
from vmoe.nn import dispatch as dp
from vmoe.nn import routing as rt


D = 16


def _interpret(backend):
  return compat.tpu_interpret(detect_races=True) if backend == 'tpu' else True


def _with_weight(r, w):
  """The decision r with combine weights w (to differentiate them)."""
  fields = {f: getattr(r, f) for f in r.__dataclass_fields__}
  return type(r)(**{**fields, 'combine_weight': w})


def _moe(move, r, x, w):
  """dispatch -> a nonlinear 'expert' -> combine; move = (dispatch, combine)."""
  rr = _with_weight(r, w)
  buffers = move[0](rr, x)
  e = buffers.shape[0]
  scale = (1.0 + jnp.arange(e, dtype=jnp.float32))[:, None, None, None]
  outputs = jnp.tanh(buffers.astype(jnp.float32) * scale).astype(x.dtype)
  return buffers, move[1](rr, outputs)


@functools.lru_cache(maxsize=None)
def _compare_fn(backend):
  bound = dict(backend=backend, interpret=_interpret(backend))
  kernel = (functools.partial(pd.dispatch, **bound),
            functools.partial(pd.combine, **bound))
  paths = {'kernel': kernel}
  for method in ('indices', 'einsum'):
    paths[method] = (functools.partial(dp.dispatch, method=method),
                     functools.partial(dp.combine, method=method))

  def run(r, x, w, ct):
    out = {}
    for name, move in paths.items():
      def loss(x, w, move=move):
        buffers, y = _moe(move, r, x, w)
        return jnp.sum(y.astype(jnp.float32) * ct), (buffers, y)
      grads, (buffers, y) = jax.grad(loss, argnums=(0, 1), has_aux=True)(x, w)
      out[name] = (buffers, y, *grads)
    return out

  return fast_jit(run)


def _check(r, dtype, backend='triton', seed=0):
  g, s = ((r.expert_index.shape[:2]) if isinstance(r, rt.TokenChoiceRouting)
          else (r.token_index.shape[0], r.num_tokens))
  x = jax.random.normal(jax.random.key(seed), (g, s, D)).astype(dtype)
  ct = jax.random.normal(jax.random.key(seed + 1), (g, s, D))
  out = _compare_fn(backend)(r, x, r.combine_weight, ct)
  kernel = out['kernel']
  # Dispatch moves bits: identical buffers.
  np.testing.assert_array_equal(kernel[0], out['indices'][0])
  for ref in ('indices', 'einsum'):
    for name, a, b in zip(('buffers', 'y', 'dx', 'dweight'), kernel, out[ref]):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      if dtype == jnp.float32:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5,
                                   err_msg=f'{name} vs {ref}')
      else:  # the kernels accumulate in float32, the references in bfloat16
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6)
        assert err < 1e-2, (name, ref, err)
  return kernel


def _token_choice(seed, g=2, s=197, e=4, k=2, capacity=80, bias=None,
                  bpr=True):
  logits = jax.random.normal(jax.random.key(seed), (g, s, e))
  if bias is not None:
    logits = logits + bias
  return rt.token_choice_from_logits(logits, num_selected=k, capacity=capacity,
                         batch_priority=bpr)


def _expert_choice(seed, g=2, s=197, e=4, capacity=50):
  logits = jax.random.normal(jax.random.key(seed), (g, s, e))
  return rt.expert_choice_from_logits(logits, capacity=capacity)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_token_choice_matches_indices_and_einsum(dtype):
  r = _token_choice(0)
  assert 0 < float(jnp.mean(r.valid)) < 1
  _check(r, dtype)


def test_token_choice_one_expert_drops_and_empty_experts():
  # Everybody's first choice is expert 0 (it overflows); expert 3 is empty.
  r = _token_choice(1, bias=jnp.array([9.0, 0.0, 0.0, -30.0]))
  assert not bool(jnp.any(r.valid & (r.expert_index == 3)))
  _, y, _, _ = _check(r, jnp.float32)
  assert bool(jnp.all(y[~jnp.any(r.valid, axis=-1)] == 0))  # dropped: zero


def test_token_choice_capacity_one_and_k_equals_e():
  _check(_token_choice(2, s=33, e=4, k=1, capacity=1, bpr=False),
         jnp.float32)
  _check(_token_choice(3, s=33, e=4, k=4, capacity=33), jnp.float32)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_expert_choice_matches_indices_and_einsum(dtype):
  _check(_expert_choice(4), dtype)


def test_expert_choice_capacity_one_and_full():
  _check(_expert_choice(5, s=33, capacity=1), jnp.float32)
  _check(_expert_choice(6, s=33, capacity=33), jnp.float32)


def test_tpu_kernels_interpreted_without_races():
  # The TPU kernels (DMA row gathers; bfloat16 rows moved as int32 words) in
  # the TPU interpreter with race detection; one small group (it is slow).
  # Expert choice runs the same two kernels (float32 rows: the test below).
  _check(_token_choice(7, g=1, s=16, capacity=8), jnp.bfloat16,
         backend='tpu')
  assert compat.races_detected() in (False, None)


@pytest.mark.parametrize('backend', compat.BACKENDS)
def test_gather_primitives_out_of_range_rows_are_zero(backend):
  n, r, k = 20, 12, 3
  table = jax.random.normal(jax.random.key(0), (n, D))
  index = jax.random.randint(jax.random.key(1), (r, k), -3, n + 3)
  weight = jax.random.normal(jax.random.key(2), (r, k))
  other = jax.random.normal(jax.random.key(3), (r, D))
  rows = jnp.where(((index >= 0) & (index < n))[..., None],
                   table[jnp.clip(index, 0, n - 1)], 0.0)      # [r, k, D]
  kw = dict(backend=backend, interpret=_interpret(backend))
  got = fast_jit(lambda t, i, w, o: (pd.gather_rows(t, i, w, **kw),
                                     pd.gather_dot(t, i, o, **kw)))(
                                         table, index, weight, other)
  np.testing.assert_allclose(got[0], jnp.einsum('rkd,rk->rd', rows, weight),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], jnp.einsum('rkd,rd->rk', rows, other),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('backend', compat.BACKENDS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_with_custom_call(backend, dtype):
  d = 256
  for r in (_token_choice(0, e=8, capacity=60), _expert_choice(0, e=8)):
    x = jnp.zeros(r.combine_weight.shape[:1] + (197, d), dtype)
    move = (functools.partial(pd.dispatch, backend=backend, interpret=False),
            functools.partial(pd.combine, backend=backend, interpret=False))

    def grads(x, w, r=r, move=move):
      return jax.grad(lambda x, w: jnp.sum(
          _moe(move, r, x, w)[1].astype(jnp.float32)), argnums=(0, 1))(x, w)

    calls = compat.custom_calls(compat.lower(grads, x, r.combine_weight,
                                             backend=backend))
    # dispatch, combine's two backward kernels, dispatch's backward (the
    # forward combine is dead code in a gradient).
    assert calls.count(compat.CUSTOM_CALL[backend]) >= 4, calls
