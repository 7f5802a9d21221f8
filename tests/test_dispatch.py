"""Every dispatch strategy agrees with the one-hot einsum reference."""

import functools

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import fast_jit
from vmoe.nn import dispatch as dp
from vmoe.nn import routing as rt
from vmoe.nn.moe import Experts

G, S, D, H, E = 2, 6, 8, 16, 4



def make_routing(kind, logits, x, phi=None, *, k=1, capacity=None,
                 bpr=False):
  """Routing decision of `kind` from logits [g, s, e] (or x, phi for soft)."""
  s, e = logits.shape[1:]
  if kind == 'token_choice':
    c = capacity or rt.compute_capacity(s, e, capacity_factor=1.0,
                                        num_selected=k)
    return rt.token_choice_from_logits(logits, num_selected=k, capacity=c,
                           batch_priority=bpr)
  if kind == 'expert_choice':
    c = capacity or rt.compute_capacity(s, e, capacity_factor=1.0)
    return rt.expert_choice_from_logits(logits, capacity=c)
  return rt.soft_routing(x, phi, jnp.asarray(2.0))


def inputs(seed=0, skew=0.0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (G, S, D))
  w = jax.random.normal(ks[1], (D, E))
  phi = jax.random.normal(ks[2], (E, 2, D))
  return x, w, phi, skew


def run(method, kind, x, w, phi, params, graphdef, *, skew=0.0, **kw):
  """y [g, s, d] of the full route -> dispatch -> experts -> combine path."""
  logits = jnp.einsum('gsd,de->gse', x, w) + skew * jnp.arange(E)[::-1]
  r = make_routing(kind, logits, x, phi, **kw)
  experts = nnx.merge(graphdef, params)
  ragged = functools.partial(experts.ragged)
  return dp.moe_apply(r, x, experts, method=method, ragged_fn=ragged)


CASES = [
    ('token_choice', dict(k=1)),
    ('token_choice', dict(k=2, bpr=True)),
    ('token_choice', dict(k=1, capacity=1)),              # heavy dropping
    ('token_choice', dict(k=2, capacity=1, skew=50.0)),   # all to expert 0
    ('token_choice', dict(k=2, capacity=100)),            # capacity > group
    ('expert_choice', dict()),
    ('expert_choice', dict(capacity=1)),
    ('soft', dict()),
]


@pytest.fixture(scope='module')
def experts():
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: Experts(E, D, H, rngs=nnx.Rngs(0))))
  params = fast_jit(lambda: nnx.state(Experts(E, D, H, rngs=nnx.Rngs(0))))()
  # Non-trivial biases so that empty slots would show up if mishandled.
  params = jax.tree.map(lambda p: p + 0.1, params)
  return graphdef, params


@pytest.mark.parametrize('kind, kw', CASES)
def test_outputs_and_gradients_match_einsum(kind, kw, experts):
  graphdef, params = experts
  x, w, phi, _ = inputs()

  def loss(method, x, w, phi, params):
    y = run(method, kind, x, w, phi, params, graphdef, **kw)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

  @fast_jit
  def all_methods(x, w, phi, params):
    # One program for the three strategies keeps the test fast.
    return {m: jax.value_and_grad(functools.partial(loss, m),
                                  argnums=(0, 1, 2, 3), has_aux=True)(
                                      x, w, phi, params)
            for m in dp.METHODS}

  out = all_methods(x, w, phi, params)
  (_, y_ref), g_ref = out['einsum']
  for method in ('indices', 'dropless'):
    (_, y), g = out[method]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5,
                               err_msg=method)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=method)
    # Gradients reach x, the router (w or phi) and every expert parameter.
    router_grad = g[2] if kind == 'soft' else g[1]
    assert float(jnp.abs(router_grad).sum()) > 0
    assert all(float(jnp.abs(p).sum()) > 0 for p in jax.tree.leaves(g[3]))


@pytest.mark.parametrize('kind, kw', [CASES[i] for i in (1, 3, 4, 6)])
def test_buffers_match_einsum(kind, kw):
  x, w, _, _ = inputs(1)
  kw = dict(kw)
  skew = kw.pop('skew', 0.0)
  out = jax.random.normal(jax.random.key(3), (E, G, 100, D))  # [e, g, c, d]

  @fast_jit
  def both(x, w, out):
    logits = jnp.einsum('gsd,de->gse', x, w) + skew * jnp.arange(E)[::-1]
    r = make_routing(kind, logits, x, **kw)
    o = out[:, :, :r.capacity]
    return {m: (dp.dispatch(r, x, m), dp.combine(r, o, m))
            for m in ('einsum', 'indices')}

  res = both(x, w, out)
  for a, b in zip(res['indices'], res['einsum']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_token_choice_maps_are_inverse():
  x, w, _, _ = inputs(2)
  r = make_routing('token_choice', jnp.einsum('gsd,de->gse', x, w), x, k=2)
  slot, pair = fast_jit(lambda r: (rt.token_choice_slot_of_pair(r),   # [g,s,k]
                                   rt.token_choice_pair_of_slot(r)))(r)
  slot, pair = np.asarray(slot), np.asarray(pair)           # pair: [g, e, c]
  n = r.num_experts * r.capacity
  for gi in range(G):
    for t in range(S):
      for j in range(2):
        if slot[gi, t, j] < n:
          assert pair[gi].ravel()[slot[gi, t, j]] == t * 2 + j


def test_soft_custom_vjp_matches_autodiff():
  x, _, phi, _ = inputs(4)
  logits = rt.soft_routing(x, phi, jnp.asarray(3.0)).logits
  o = jax.random.normal(jax.random.key(5), (G, E * 2, D))

  def custom(logits, x, o):
    return jnp.sum(jnp.sin(dp.soft_dispatch(logits, x))) + jnp.sum(
        jnp.sin(dp.soft_combine(logits, o)))

  def plain(logits, x, o):
    dw = jax.nn.softmax(logits, axis=1)
    cw = jax.nn.softmax(logits, axis=2)
    return jnp.sum(jnp.sin(jnp.einsum('gsn,gsd->gnd', dw, x))) + jnp.sum(
        jnp.sin(jnp.einsum('gsn,gnd->gsd', cw, o)))

  grads = fast_jit(lambda *a: (jax.grad(custom, (0, 1, 2))(*a),
                               jax.grad(plain, (0, 1, 2))(*a)))(logits, x, o)
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _largest_intermediate(fn, *args) -> int:
  """Largest element count of any value in fn's jaxpr (and sub-jaxprs)."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for v in eqn.outvars:
        best = max(best, int(np.prod(getattr(v.aval, 'shape', ()))))
      for sub in jex_core.jaxprs_in_params(eqn.params):
        best = max(best, walk(sub))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize('kind', ['token_choice', 'expert_choice'])
def test_indices_never_builds_gsec(kind):
  g, s, d, e = 2, 64, 4, 16
  x = jax.random.normal(jax.random.key(0), (g, s, d))
  logits = jax.random.normal(jax.random.key(1), (g, s, e))
  c = 16  # g*s*e*c = 32768 >> every legitimate intermediate

  def f(method, x, logits):
    if kind == 'token_choice':
      r = rt.token_choice_from_logits(logits, num_selected=2, capacity=c)
    else:
      r = rt.expert_choice_from_logits(logits, capacity=c)
    y = dp.combine(r, dp.dispatch(r, x, method) * 2.0, method)
    return jnp.sum(y)

  big = g * s * e * c
  grad_idx = jax.grad(functools.partial(f, 'indices'), argnums=(0, 1))
  grad_ein = jax.grad(functools.partial(f, 'einsum'), argnums=(0, 1))
  assert _largest_intermediate(grad_ein, x, logits) >= big
  assert _largest_intermediate(grad_idx, x, logits) < big // 4


def test_unknown_method():
  x, w, _, _ = inputs()
  r = make_routing('token_choice', jnp.einsum('gsd,de->gse', x, w), x)
  with pytest.raises(ValueError, match='not one of'):
    dp.dispatch(r, x, 'magic')
