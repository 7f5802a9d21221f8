"""Attention kinds: mixture-of-head and gated attention against loops over
tokens, heads and keys (values and gradients), MoH against the reference
code's outputs (tests/data/moh_attention.npz), the registry, validation and
the model with each kind."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import REPO, build, fast_jit, max_diff
from vmoe.config import ConfigError
from vmoe.nn import attention
from vmoe.nn import vit
from vmoe.nn.attention import gated
from vmoe.nn.attention import moh

DIM, HEADS = 8, 4
X = jax.random.normal(jax.random.key(1), (2, 4, DIM))


def _build(kind, **options):
  return build(lambda rngs: attention.build(
      kind, vit.MultiHeadAttention, attention.ATTENTION.options(options), DIM,
      HEADS, rngs=rngs))


def _compare(layer, reference_fn, x=X):
  """Outputs and gradients (w.r.t. x and every parameter) of the layer's
  `attend` against `reference_fn(layer, x)`."""
  graphdef, state = nnx.split(layer)

  def fast(state, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state).attend(x)[0]))

  def ref(state, x):
    return jnp.sum(jnp.sin(reference_fn(nnx.merge(graphdef, state), x)))

  y_fast = fast_jit(lambda s, x: nnx.merge(graphdef, s).attend(x)[0])(state, x)
  y_ref = reference_fn(layer, x)
  assert max_diff(y_fast, y_ref) < 2e-6
  g_fast = fast_jit(jax.grad(fast, argnums=(0, 1)))(state, x)
  g_ref = jax.grad(ref, argnums=(0, 1))(state, x)  # eager: the loops branch on values
  assert max_diff(g_fast, g_ref) < 2e-5


# The eager loop reference is slow: the first case (shared and routed heads,
# as the digits config) runs in the slow suite only.
MOH_CASES = [pytest.param(dict(moh_shared_heads=1, moh_k=2),
                          marks=pytest.mark.slow),
             dict(moh_shared_heads=0, moh_k=2),
             dict(moh_shared_heads=2, moh_k=1), dict(moh_shared_heads=4,
                                                     moh_k=0),
             dict(moh_shared_heads=0, moh_k=4)]


@pytest.mark.parametrize('options', MOH_CASES, ids=str)
def test_mixture_of_heads_equals_loops(options):
  layer = _build('moh', **options)
  _compare(layer, lambda m, x: moh.reference(m, x)[0])
  _, metrics = layer.attend(X)
  _, balance = moh.reference(layer, X)
  np.testing.assert_allclose(metrics['balance_loss'], balance, rtol=1e-5,
                             atol=1e-7)
  k, hs = options['moh_k'], options['moh_shared_heads']
  assert float(metrics['heads_per_token']) == hs + k
  assert float(metrics['active_head_fraction']) == (hs + k) / HEADS
  np.testing.assert_allclose(metrics['auxiliary_loss'], 0.01 * balance,
                             rtol=1e-5, atol=1e-9)


def test_mixture_of_heads_with_all_heads_on_is_the_standard_attention():
  """Every head routed (k = h, no shared head): the gates are the softmax
  times h, all 1 for a zero router kernel: the standard attention."""
  layer = _build('moh', moh_shared_heads=0, moh_k=HEADS)
  layer.router_kernel.value = jnp.zeros_like(layer.router_kernel[...])
  standard = vit.MultiHeadAttention.__call__(layer, X)
  np.testing.assert_allclose(layer.attend(X)[0], standard, rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize('case, shared, k', [('s2k1', 2, 1), ('s0k2', 0, 2),
                                            ('s4k0', 4, 0), ('s2k2', 2, 2)])
def test_mixture_of_heads_equals_the_reference_code(case, shared, k):
  """Outputs and the load-balance loss of SkyworkAI/MoH's MoHAttention
  (MoH-DiT/models.py; tests/data/README.md), its weights mapped to ours."""
  data = np.load(os.path.join(REPO, 'tests', 'data', 'moh_attention.npz'))
  get = lambda name: jnp.asarray(data[f'{case}/{name}'])  # noqa: E731
  layer = _build('moh', moh_shared_heads=shared, moh_k=k)
  hd = DIM // HEADS
  layer.qkv_kernel.value = get('qkv.weight').T.reshape(DIM, 3, HEADS, hd)
  layer.qkv_bias.value = get('qkv.bias').reshape(3, HEADS, hd)
  layer.out_kernel.value = get('proj.weight').T.reshape(HEADS, hd, DIM)
  layer.out_bias.value = get('proj.bias')
  if k:
    layer.router_kernel.value = get('wg.weight')
  if shared and k:
    layer.mix_kernel.value = get('wg_0.weight')
  if shared > 1:
    layer.shared_kernel.value = get('wg_1.weight')
  y, metrics = layer.attend(get('x'))
  np.testing.assert_allclose(y, get('y'), rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(metrics['balance_loss'], get('l_aux'), rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('granularity', gated.GRANULARITIES)
def test_gated_attention_equals_loops(granularity):
  layer = _build('gated', gated_granularity=granularity)
  layer.gate_bias.value = jax.random.normal(jax.random.key(3),
                                            layer.gate_bias.shape)
  _compare(layer, gated.reference)
  gates = layer.gates(X)
  assert gates.shape == ((2, 4, HEADS) if granularity == 'headwise'
                         else (2, 4, HEADS, DIM // HEADS))
  np.testing.assert_allclose(layer.attend(X)[1]['gate_mean'],
                             jnp.mean(gates), rtol=1e-6)


def test_kinds_keep_the_standard_parameters():
  standard = nnx.state(_build('mha'), nnx.Param)
  for kind, extra in (('moh', {'router_kernel', 'mix_kernel'}),
                      ('gated', {'gate_kernel', 'gate_bias'})):
    params = nnx.state(_build(kind), nnx.Param)
    assert set(nnx.to_pure_dict(params)) == set(
        nnx.to_pure_dict(standard)) | extra
  assert attention.names()[:3] == ('mha', 'moh', 'gated')


@pytest.mark.parametrize('overrides, message', [
    (dict(attention='nope'), "config.model.attention='nope' is not one of"),
    (dict(attention='moh', attention_options=dict(moh_k=3)),
     'config.model.attention_options.moh_k=3 exceeds the 1 routed heads'),
    (dict(attention='moh', attention_options=dict(moh_shared_heads=0,
                                                  moh_k=0)),
     'config.model.attention_options.moh_k=0 must be >= 1 while 2 heads are'),
    (dict(attention='mha', attention_options=dict(moh_k=2)),
     "config.model.attention_options.moh_k=2 is not an option of "
     "config.model.attention='mha'"),
    (dict(attention='gated', attention_options=dict(
        gated_granularity='channel')),
     "config.model.attention_options.gated_granularity='channel' is not one"),
    (dict(attention='moh', attention_options=dict(typo=1)),
     'config.model.attention_options.typo is not a known option'),
])
def test_config_errors_are_one_line(overrides, message):
  from tests.helpers import load_config  # pylint: disable=g-import-not-at-top
  from vmoe.train.config_validation import validate_config  # pylint: disable=g-import-not-at-top
  config = load_config('routers/dense_digits')
  for key, value in overrides.items():
    if isinstance(value, dict):
      config.model[key].update(value)
    else:
      config.model[key] = value
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert str(info.value).startswith(message), str(info.value)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('kind', ['moh', 'gated'])
def test_the_model_reports_the_kinds_metrics(kind):
  model = build(lambda rngs: vit.VisionTransformer(
      num_classes=3, image_size=8, num_channels=1, variant='mu/4',
      attention=kind, rngs=rngs))
  graphdef, state = nnx.split(model)
  _, metrics = fast_jit(lambda s, x: nnx.merge(graphdef, s)(x))(
      state, jnp.ones((2, 8, 8, 1)))
  key = ('block_0/attention/balance_loss' if kind == 'moh'
         else 'block_0/attention/gate_mean')
  assert key in metrics
  total = sum(float(v) for k, v in metrics.items()
              if k.endswith('/auxiliary_loss'))
  np.testing.assert_allclose(metrics['auxiliary_loss'], total, rtol=1e-6)
