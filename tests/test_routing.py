"""Hand-computed cases for the routing decisions and auxiliary losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import fast_jit
from vmoe.nn import routing as rt




token_choice = fast_jit(rt.token_choice_from_logits, static_argnames=(
    'num_selected', 'capacity', 'batch_priority', 'renormalize'))
expert_choice = fast_jit(rt.expert_choice_from_logits,
                         static_argnames='capacity')


def two_expert_logits(p0):
  """[1, s, 2] logits whose softmax gives gate p0[i] to expert 0."""
  p0 = np.asarray(p0, np.float64)
  return jnp.asarray(np.stack([np.log(p0), np.log1p(-p0)], -1)[None],
                     jnp.float32)


def assignment(r):
  """{(token, choice): (expert, position)} for kept pairs of group 0."""
  out = {}
  e, pos, valid = (np.asarray(a[0]) for a in (r.expert_index, r.position,
                                               r.valid))
  for t in range(e.shape[0]):
    for j in range(e.shape[1]):
      if valid[t, j]:
        out[(t, j)] = (int(e[t, j]), int(pos[t, j]))
  return out


# -- capacity -----------------------------------------------------------------


@pytest.mark.parametrize('kw, expected', [
    (dict(capacity_factor=1.0), 2),                     # ceil(1*8*1/4)
    (dict(capacity_factor=1.0, num_selected=2), 4),     # ceil(2*8/4)
    (dict(capacity_factor=1.1), 3),                     # ceil(2.2)
    (dict(capacity_factor=1.1, multiple=4), 4),
    (dict(capacity_factor=0.01), 1),                    # at least one
    (dict(capacity_factor=10.0), 8),                    # at most s
    (dict(capacity_factor=1.0, capacity=5), 5),         # explicit override
])
def test_compute_capacity(kw, expected):
  assert rt.compute_capacity(8, 4, **kw) == expected


# -- token choice -------------------------------------------------------------

# Token t prefers expert 0 with gate P0[t]; tokens 0, 1, 3 want expert 0.
P0 = [0.6, 0.9, 0.3, 0.8]


def test_token_choice_drops_latest_without_bpr():
  r = token_choice(two_expert_logits(P0), num_selected=1, capacity=2)
  # Sequence order: expert 0 gets tokens 0 and 1; token 3 is dropped.
  assert assignment(r) == {(0, 0): (0, 0), (1, 0): (0, 1), (2, 0): (1, 0)}
  np.testing.assert_allclose(r.combine_weight[0, :, 0], [0.6, 0.9, 0.7, 0.0],
                             rtol=1e-6)
  assert float(rt.dropped_fraction(r)) == pytest.approx(0.25)


def test_token_choice_bpr_drops_least_confident():
  r = token_choice(two_expert_logits(P0), num_selected=1, capacity=2,
                      batch_priority=True)
  # Priority by max gate: t1 (.9), t3 (.8), t2 (.7), t0 (.6). Token 0 dropped.
  assert assignment(r) == {(1, 0): (0, 0), (3, 0): (0, 1), (2, 0): (1, 0)}
  np.testing.assert_allclose(r.combine_weight[0, :, 0], [0.0, 0.9, 0.7, 0.8],
                             rtol=1e-6)


def test_token_choice_k2_is_choice_major():
  r = token_choice(two_expert_logits(P0), num_selected=2, capacity=3)
  # 1st choices: e0 <- t0, t1, t3 (pos 0, 1, 2); e1 <- t2 (pos 0).
  # 2nd choices: e1 <- t0 (1), t1 (2), t3 is 4th in e1 -> dropped;
  #              e0 <- t2 would be 4th -> dropped.
  assert assignment(r) == {
      (0, 0): (0, 0), (1, 0): (0, 1), (2, 0): (1, 0), (3, 0): (0, 2),
      (0, 1): (1, 1), (1, 1): (1, 2)}
  np.testing.assert_allclose(
      r.combine_weight[0], [[0.6, 0.4], [0.9, 0.1], [0.7, 0.0], [0.8, 0.0]],
      rtol=1e-5, atol=1e-7)
  assert float(rt.dropped_fraction(r)) == 0.0  # everyone kept a choice


def test_token_choice_k2_bpr():
  r = token_choice(two_expert_logits(P0), num_selected=2, capacity=3,
                      batch_priority=True)
  # Order t1, t3, t2, t0. 1st: e0 <- t1, t3, t0; e1 <- t2.
  # 2nd (same order): e1 <- t1 (1), t3 (2); t2 -> e0 full; t0 -> e1 full.
  assert assignment(r) == {
      (1, 0): (0, 0), (3, 0): (0, 1), (2, 0): (1, 0), (0, 0): (0, 2),
      (1, 1): (1, 1), (3, 1): (1, 2)}


def test_token_choice_renormalize():
  r = token_choice(two_expert_logits(P0), num_selected=2, capacity=4,
                      renormalize=True)
  np.testing.assert_allclose(jnp.sum(r.combine_weight, -1), 1.0, rtol=1e-6)
  r1 = token_choice(two_expert_logits(P0), num_selected=1, capacity=4,
                       renormalize=True)
  np.testing.assert_allclose(r1.combine_weight, 1.0, rtol=1e-6)


def test_token_choice_groups_are_independent():
  logits = jax.random.normal(jax.random.key(0), (3, 6, 4))
  route = fast_jit(lambda l: rt.token_choice_from_logits(l, num_selected=2, capacity=2,
                                            batch_priority=True))
  r = route(logits)
  for i in range(3):
    np.testing.assert_array_equal(r.position[i],
                                  route(logits[i:i + 1]).position[0])


def test_token_choice_gates_in_float32():
  logits = jax.random.normal(jax.random.key(0), (1, 4, 3), jnp.bfloat16)
  r = token_choice(logits, num_selected=1, capacity=2)
  assert r.combine_weight.dtype == jnp.float32


def test_dense_combine_token_choice():
  r = token_choice(two_expert_logits(P0), num_selected=2, capacity=3)
  comb = np.asarray(rt.dense_combine(r))[0]            # [s, e, c]
  disp = np.asarray(rt.dense_dispatch(r))[0]
  assert comb.shape == (4, 2, 3)
  assert comb[0, 0, 0] == pytest.approx(0.6) and comb[0, 1, 1] == \
      pytest.approx(0.4)
  assert comb[3, 1].sum() == 0.0                       # t3's 2nd choice dropped
  assert disp.sum(0).max() == 1.0                      # one token per slot
  np.testing.assert_allclose(comb.sum((1, 2)), r.combine_weight[0].sum(-1),
                             rtol=1e-6)


# -- expert choice ------------------------------------------------------------


def test_expert_choice_picks_top_c_per_expert():
  r = expert_choice(two_expert_logits(P0), capacity=2)
  idx = np.asarray(r.token_index[0])
  # Expert 0: largest p0 are t1 (.9), t3 (.8); expert 1: t2 (.7), t0 (.4).
  assert idx[0].tolist() == [1, 3] and idx[1].tolist() == [2, 0]
  np.testing.assert_allclose(r.combine_weight[0], [[0.9, 0.8], [0.7, 0.4]],
                             rtol=1e-6)
  assert float(rt.dropped_fraction(r)) == 0.0


def test_expert_choice_token_can_be_skipped_or_shared():
  gates = np.asarray([[.45, .45, .10],    # favourite of experts 0 and 1
                      [.10, .20, .70],    # favourite of expert 2
                      [.40, .30, .30],
                      [.34, .33, .33]])
  r = expert_choice(jnp.asarray(np.log(gates)[None], jnp.float32),
                       capacity=1)
  assert np.asarray(r.token_index[0, :, 0]).tolist() == [0, 0, 1]
  np.testing.assert_allclose(r.combine_weight[0, :, 0], [.45, .45, .70],
                             rtol=1e-5)
  assert float(rt.dropped_fraction(r)) == pytest.approx(0.5)
  disp = np.asarray(rt.dense_dispatch(r))[0]            # [s, e, c]
  assert disp.sum(0).tolist() == [[1], [1], [1]]       # each slot one token
  assert disp.sum((1, 2)).tolist() == [2, 1, 0, 0]     # experts per token


def test_expert_choice_capacity_validated():
  with pytest.raises(ValueError, match='capacity'):
    rt.expert_choice_from_logits(jnp.zeros((1, 4, 2)), capacity=5)


# -- soft MoE -----------------------------------------------------------------


def test_soft_routing_weights_normalised():
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  phi = jax.random.normal(jax.random.key(1), (3, 2, 8))     # [e, p, d]
  r, dispatch, combine, load, dropped = fast_jit(lambda x, phi: (
      r := rt.soft_routing(x, phi, jnp.asarray(1.7)), r.dispatch_weights(),
      r.combine_weights(), rt.expert_load(r), rt.dropped_fraction(r)))(x, phi)
  assert r.logits.shape == (2, 5, 6) and r.capacity == 2
  np.testing.assert_allclose(jnp.sum(dispatch, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.sum(combine, axis=2), 1.0, rtol=1e-5)
  # Logits are scale * cosine similarity.
  xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  pn = phi.reshape(6, 8).T / jnp.linalg.norm(phi.reshape(6, 8).T, axis=0)
  np.testing.assert_allclose(r.logits, 1.7 * xn @ pn, rtol=1e-4, atol=1e-5)
  assert float(jnp.max(jnp.abs(r.logits))) <= 1.7 + 1e-5
  np.testing.assert_allclose(jnp.sum(load), 1.0, rtol=1e-5)
  assert float(dropped) == 0.0


# -- losses -------------------------------------------------------------------


def test_importance_loss():
  uniform = jnp.full((2, 4, 4), 0.25)
  assert float(rt.importance_loss(uniform)) == pytest.approx(0.0, abs=1e-7)
  # Importance [3, 1] over 2 experts: mean 2, var 1 -> CV^2 = 1/4.
  gates = jnp.asarray([[[1., 0.], [1., 0.], [1., 0.], [0., 1.]]])
  assert float(rt.importance_loss(gates)) == pytest.approx(0.25)


def test_balance_loss():
  uniform = jnp.full((1, 4, 4), 0.25)
  assert float(rt.balance_loss(uniform)) == pytest.approx(1.0)
  # All tokens to expert 0 with gate .75: e * f0 * P0 = 2 * 1 * .75.
  gates = jnp.asarray([[[.75, .25]] * 4])
  assert float(rt.balance_loss(gates)) == pytest.approx(1.5)


def test_z_loss():
  logits = jnp.asarray([[[0., 0.], [math.log(3.), 0.]]])
  expected = (math.log(2.) ** 2 + math.log(4.) ** 2) / 2
  assert float(rt.z_loss(logits)) == pytest.approx(expected, rel=1e-6)


def test_load_loss_matches_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 4)).astype(np.float32)
  noisy = (logits + 0.3 * rng.normal(size=logits.shape)).astype(np.float32)
  k, std = 2, 0.3
  per_group = []
  for g in range(2):
    thr = np.sort(noisy[g], axis=-1)[:, -k]
    z = (thr[:, None] - logits[g]) / std
    p = 1 - 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    load = p.mean(0)
    per_group.append(load.var() / load.mean() ** 2)
  fn = fast_jit(jax.value_and_grad(rt.load_loss), static_argnums=(2, 3))
  got, grad = fn(jnp.asarray(logits), jnp.asarray(noisy), std, k)
  assert float(got) == pytest.approx(np.mean(per_group), rel=1e-4)
  # It is differentiable w.r.t. the clean logits (trains the router).
  assert float(jnp.abs(grad).sum()) > 0


def test_entropy_and_expert_load():
  assert float(rt.entropy(jnp.full((3, 4), 0.25))) == pytest.approx(
      math.log(4), rel=1e-6)
  assert float(rt.entropy(jnp.asarray([[1., 0.]]))) == 0.0
  r = token_choice(two_expert_logits(P0), num_selected=1, capacity=2)
  # Kept: e0 <- t0, t1; e1 <- t2.
  np.testing.assert_allclose(rt.expert_load(r), [2 / 3, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize('e', [1, 3, 8, 70])
def test_queue_positions_sort_matches_one_hot(e):
  queue = jax.random.randint(jax.random.key(e), (3, 50), 0, e)
  want = rt.queue_positions(queue, e, method='one_hot')
  got = rt.queue_positions(queue, e, method='sort')
  np.testing.assert_array_equal(got, want)
  # Hand check: the i-th occurrence of an expert gets position i.
  q = np.asarray(queue)
  for gi in range(q.shape[0]):
    for i in range(q.shape[1]):
      assert want[gi, i] == np.sum(q[gi, :i] == q[gi, i])


@pytest.mark.parametrize('bpr', [False, True])
def test_token_choice_sorted_positions_match_one_hot(monkeypatch, bpr):
  logits = jax.random.normal(jax.random.key(0), (2, 40, 9))
  kw = dict(num_selected=2, capacity=5, batch_priority=bpr)
  monkeypatch.setattr(rt, 'SORT_POSITIONS_MIN_EXPERTS', 1000)
  want = rt.token_choice_from_logits(logits, **kw)
  monkeypatch.setattr(rt, 'SORT_POSITIONS_MIN_EXPERTS', 1)
  got = rt.token_choice_from_logits(logits, **kw)
  for field in ('position', 'valid', 'combine_weight', 'expert_index'):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


@pytest.mark.parametrize('k', [1, 2, 3, 6])
def test_top_k_matches_lax_top_k(k):
  x = jax.random.normal(jax.random.key(k), (2, 5, 9))
  x = x.at[0, 0, :4].set(1.5)  # ties go to the lower index
  x = x.at[1, 0, 1:].set(-jnp.inf)  # fewer than k finite entries
  x = x.at[1, 1, :].set(-jnp.inf)
  want_v, want_i = jax.lax.top_k(x, k)
  got_v, got_i = rt.top_k(x, k)
  np.testing.assert_array_equal(got_i, want_i)
  np.testing.assert_array_equal(got_v, want_v)
  g_want = jax.grad(lambda x: jnp.sum(jax.lax.top_k(x, k)[0] ** 2))(x)
  g_got = jax.grad(lambda x: jnp.sum(rt.top_k(x, k)[0] ** 2))(x)
  np.testing.assert_allclose(g_got, g_want)


def test_losses_reuse_the_ranking_of_the_decision():
  """load and balance losses with the decision's ranking equal the search."""
  logits = jax.random.normal(jax.random.key(0), (3, 10, 6))
  noisy = rt.add_gating_noise(logits, 0.5, jax.random.key(1))
  r = rt.token_choice_from_logits(noisy, num_selected=2, capacity=4)
  gates = jax.nn.softmax(noisy, axis=-1)

  def load(logits, noisy, selected):
    return rt.load_loss(logits, noisy, 0.5, 2, selected=selected)

  want, got = (jax.value_and_grad(load, argnums=(0, 1))(logits, noisy, sel)
               for sel in (None, r.expert_index))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(rt.balance_loss(gates, r.expert_index[..., 0]),
                             rt.balance_loss(gates), rtol=1e-6)
