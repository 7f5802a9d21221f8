"""Expert / final output masking (Elbayad et al. 2023) and expert forcing
(Mixture of Tunable Experts): the MoE layer against loops over tokens and
experts, and the analysis functions on a tiny model."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import (D, build, fast_jit, moe_config, moe_layer,
                           np_expert, np_params, np_softmax)
from vmoe import analysis
from vmoe.analysis import forcing as forcing_lib
from vmoe.nn import moe
from vmoe.nn import routing as rt
from vmoe.nn import vit

E, S = 4, 8


def _run(layer, x, *, train, key=0, forcing=None):
  graphdef, state = nnx.split(layer)

  @fast_jit
  def f(state, x, key, forcing):
    m = nnx.merge(graphdef, state)
    m.forcing = forcing
    rngs = nnx.Rngs(gating=key, dropout=key) if train else None
    return m(x, train=train, rngs=rngs)

  return f(state, x, jax.random.key(key), forcing)


def _contributions(layer, x):
  """[tokens, e, d] gate-free expert outputs and [tokens, e] softmax gates
  (float64) of every token under the layer's clean logits."""
  tokens = np.asarray(x, np.float64).reshape(-1, D)
  params = np_params(layer)
  outs = np.stack([np_expert(params, e, tokens) for e in range(E)], 1)
  logits = tokens @ np.asarray(layer.router.kernel[...], np.float64).T
  return outs, logits


# -- output masking -------------------------------------------------------------


@pytest.mark.parametrize('kind', ['expert_output_mask_rate',
                                  'final_output_mask_rate'])
def test_evaluation_scales_by_the_keep_rate(kind):
  kw = dict(num_experts=E, group_size=S, k=2, noise_std=0.0,
            num_shared_experts=1, capacity_factor=2.0)
  plain = moe_layer(**kw)
  masked = moe_layer(**kw, **{kind: 0.25})
  x = jax.random.normal(jax.random.key(1), (2, S, D))
  y0, _ = _run(plain, x, train=False)
  y1, _ = _run(masked, x, train=False)
  if kind == 'final_output_mask_rate':  # the whole output, shared included
    np.testing.assert_allclose(y1, 0.75 * y0, rtol=1e-5, atol=1e-6)
  else:  # the routed experts' outputs only
    shared = plain.shared_experts.as_one_mlp(x.reshape(-1, D)).reshape(y0.shape)
    np.testing.assert_allclose(y1 - shared, 0.75 * (y0 - shared),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dispatch', ['indices', 'einsum', 'dropless'])
def test_expert_output_masking_drops_whole_token_expert_outputs(dispatch):
  """Training: every (token, expert) output of a top-2 token is kept or
  dropped whole; no rescaling; about the rate of them dropped."""
  layer = moe_layer(num_experts=E, group_size=S, k=2, noise_std=0.0,
                    capacity_factor=2.0, dispatch=dispatch,
                    expert_output_mask_rate=0.5)
  x = jax.random.normal(jax.random.key(2), (8, S, D))
  y, _ = _run(layer, x, train=True, key=3)
  outs, logits = _contributions(layer, x)
  gates = np_softmax(logits, -1)
  top2 = np.argsort(-gates, axis=-1, kind='stable')[:, :2]
  y = np.asarray(y, np.float64).reshape(-1, D)
  kept = []
  for t in range(len(y)):
    pairs = [gates[t, e] * outs[t, e] for e in top2[t]]
    options = {m: sum(p for p, keep in zip(pairs, m) if keep) + 0 * pairs[0]
               for m in itertools.product((0, 1), repeat=2)}
    best = min(options, key=lambda m: np.abs(options[m] - y[t]).max())
    np.testing.assert_allclose(y[t], options[best], atol=1e-5)
    kept.extend(best)
  assert 0.3 < np.mean(kept) < 0.7


def test_final_output_masking_drops_whole_tokens():
  kw = dict(num_experts=E, group_size=S, k=1, noise_std=0.0,
            capacity_factor=4.0, num_shared_experts=1)
  plain = moe_layer(**kw)
  masked = moe_layer(**kw, final_output_mask_rate=0.5)
  x = jax.random.normal(jax.random.key(4), (8, S, D))
  full = np.asarray(_run(plain, x, train=False)[0]).reshape(-1, D)
  y = np.asarray(_run(masked, x, train=True, key=5)[0]).reshape(-1, D)
  zero = np.all(y == 0, axis=-1)
  np.testing.assert_allclose(y[~zero], full[~zero], rtol=1e-5, atol=1e-6)
  assert 0.3 < zero.mean() < 0.7
  # Gradients reach the kept tokens only.
  graphdef, state = nnx.split(masked)

  def loss(x):
    m = nnx.merge(graphdef, state)
    out = m(x, train=True, rngs=nnx.Rngs(gating=jax.random.key(5),
                                         dropout=jax.random.key(5)))[0]
    return jnp.sum(out ** 2)
  g = np.asarray(fast_jit(jax.grad(loss))(x)).reshape(-1, D)
  assert np.all(g[zero] == 0) and np.all(np.abs(g[~zero]).sum(-1) > 0)


@pytest.mark.parametrize('rate', [-0.1, 1.0, 'x'])
def test_masking_rates_are_validated(rate):
  with pytest.raises(ValueError, match=r'model.moe.expert_output_mask_rate='
                     r'.* must be a number in \[0, 1\)'):
    moe.validate_moe_config(moe_config(expert_output_mask_rate=rate))


# -- forcing --------------------------------------------------------------------


def _forced_reference(layer, x, forcing, k):
  """Loop reference: off experts out, on experts first with gate 1 / #on,
  else the top-k of the softmax over the allowed experts."""
  outs, logits = _contributions(layer, x)
  forcing = np.asarray(forcing).reshape(-1, E)
  y = np.zeros((len(outs), D))
  for t in range(len(outs)):
    on = [e for e in range(E) if forcing[t, e] > 0]
    allowed = [e for e in range(E) if forcing[t, e] == 0]
    if on:
      for e in on[:k]:
        y[t] += outs[t, e] / len(on)
      continue
    g = np_softmax(logits[t, allowed], -1)
    for i in np.argsort(-g, kind='stable')[:k]:
      y[t] += g[i] * outs[t, allowed[i]]
  return y


@pytest.mark.parametrize('k', [1, 2])
def test_forcing_on_and_off_per_token_equals_a_loop(k):
  layer = moe_layer(num_experts=E, group_size=S, k=k, noise_std=0.0,
                    capacity_factor=float(E))  # no token over capacity
  x = jax.random.normal(jax.random.key(6), (2, S, D))
  rng = np.random.default_rng(0)
  forcing = rng.choice([-1, 0, 0, 0, 1], size=(2, S, E)).astype(np.int32)
  forcing[0, 0] = [-1, -1, -1, 0]          # one expert left
  forcing[0, 1] = [1, 1, 0, -1]            # two forced on
  forcing[0, 2] = 0                        # free
  y, metrics = _run(layer, x, train=False, forcing=jnp.asarray(forcing))
  np.testing.assert_allclose(np.asarray(y).reshape(-1, D),
                             _forced_reference(layer, x, forcing, k),
                             rtol=1e-5, atol=1e-5)
  assert np.isfinite(metrics['router_entropy'])


def test_forcing_an_expert_off_for_every_image_empties_it():
  layer = moe_layer(num_experts=E, group_size=S, k=1, noise_std=0.0,
                    capacity_factor=float(E))
  x = jax.random.normal(jax.random.key(7), (3, S, D))
  forcing = jnp.zeros((3, E), jnp.int32).at[:, 2].set(rt.FORCE_OFF)
  _, metrics = _run(layer, x, train=False, forcing=forcing)
  assert float(metrics['expert_load'][2]) == 0.0
  # Expert choice: the expert still fills its slots, with zero weight.
  ec = moe_layer(router='expert_choice', num_experts=E, group_size=S,
                 noise_std=0.0, capacity_factor=1.0)
  y, _ = _run(ec, x, train=False, forcing=forcing)
  outs, logits = _contributions(ec, x)
  logits[:, 2] = -np.inf
  gates = np_softmax(logits, -1).reshape(3, S, E)
  ref = np.zeros((3, S, D))
  c = S // E
  for img in range(3):
    for e in range(E):
      if e == 2:
        continue
      for t in np.argsort(-gates[img, :, e], kind='stable')[:c]:
        ref[img, t] += gates[img, t, e] * outs.reshape(3, S, E, D)[img, t, e]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_forcing_refusals_are_one_line():
  layer = moe_layer(router='sinkhorn_token_choice', num_experts=E,
                    group_size=S, noise_std=0.0)
  with pytest.raises(ValueError, match="router='sinkhorn_token_choice' does "
                     'not support expert forcing'):
    _run(layer, jnp.ones((1, S, D)), train=False,
         forcing=jnp.zeros((1, E), jnp.int32))
  layer = moe_layer(num_experts=E, group_size=S, noise_std=0.0)
  with pytest.raises(ValueError, match=r'expert forcing of shape \(1, 3\)'):
    _run(layer, jnp.ones((1, S, D)), train=False,
         forcing=jnp.zeros((1, 3), jnp.int32))


# -- analysis -------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_model_and_batches():
  cfg = moe_config(layers=(1,), num_experts=E, k=1, group_size=None,
                   noise_std=0.0, capacity_factor=float(E))
  model = build(lambda rngs: vit.VisionTransformer(
      num_classes=3, image_size=8, num_channels=1, variant='mu/4', moe=cfg,
      head_zero_init=False, rngs=rngs))
  rng = np.random.default_rng(0)
  batches = [dict(image=rng.normal(size=(12, 8, 8, 1)).astype(np.float32),
                  label=rng.integers(0, 3, 12), mask=np.ones(12))
             for _ in range(2)]
  batches[1]['mask'][-2:] = 0
  return model, batches


def test_forced_accuracy_and_targeted_ablation(tiny_model_and_batches):
  model, batches = tiny_model_and_batches
  graphdef, state = nnx.split(model)
  preds = np.concatenate([np.argmax(np.asarray(nnx.merge(graphdef, state)(
      jnp.asarray(b['image']))[0]), -1)[b['mask'] > 0] for b in batches])
  labels = np.concatenate([b['label'][b['mask'] > 0] for b in batches])
  frame = analysis.forced_accuracy(model, batches, off={1: [0, 1, 2]},
                                   classes=[2])
  base = [np.mean(preds[labels == c] == c) for c in range(3)]
  np.testing.assert_allclose(frame.base_accuracy, base)
  # Only the forced class can change.
  np.testing.assert_allclose(frame.accuracy[:2], frame.base_accuracy[:2])
  check = analysis.targeted_ablation(model, batches, num_off=1,
                                     random_draws=2)
  assert list(check.block.unique()) == [1] and len(check) == 3
  np.testing.assert_allclose(check.targeted_minus_random,
                             check.random_accuracy - check.targeted_accuracy)
  trace = analysis.collect(model, batches)
  for row in check.itertuples():
    assert row.targeted == tuple(forcing_lib.distinctive_experts(
        trace, 1, row.label, 1))


def test_distinctive_experts_by_hand():
  # 2 classes, 3 experts: class 0 uses expert 2 most relative to class 1.
  assigned = np.zeros((4, 1, 3), bool)
  assigned[0, 0, 2] = assigned[1, 0, 0] = True   # class 0
  assigned[2, 0, 0] = assigned[3, 0, 0] = True   # class 1
  layer = analysis.LayerTrace(
      block=0, router='token_choice', num_experts=3, capacity=1,
      group_size=1, top_expert=np.zeros((4, 1), np.int32),
      assigned=assigned, dropped=np.zeros((4, 1), bool),
      entropy=np.zeros((4, 1)), gate_mass=np.zeros((4, 3)))
  trace = analysis.Trace(layers={0: layer}, labels=np.array([0, 0, 1, 1]),
                         logits=np.zeros((4, 2)), num_prefix_tokens=0,
                         grid=(1, 1))
  assert forcing_lib.distinctive_experts(trace, 0, 0, 1) == [2]
  assert forcing_lib.distinctive_experts(trace, 0, 1, 1) == [0]
