"""ViT backbone: shapes, published parameter counts, pluggable MLP slot."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vmoe.nn import vit
from vmoe.nn.layers import AUX_LOSS_KEY, MlpBlock

# Published parameter counts of the ImageNet-1k classifiers (224px, class
# token, 1000-way head), as reported for the reference implementations.
PUBLISHED_COUNTS = {
    'Ti/16': 5_717_416,
    'S/16': 22_050_664,
    'B/16': 86_567_656,
    'B/32': 88_224_232,
    'L/16': 304_326_632,
    'H/14': 632_045_800,
}


@pytest.mark.parametrize('variant', sorted(PUBLISHED_COUNTS))
def test_parameter_counts_match_published(variant):
  abstract = nnx.eval_shape(lambda: vit.VisionTransformer(
      num_classes=1000, image_size=224, num_channels=3, variant=variant,
      rngs=nnx.Rngs(0)))
  assert vit.count_params(nnx.state(abstract, nnx.Param)) == (
      PUBLISHED_COUNTS[variant])


@pytest.mark.parametrize('pool', ['tok', 'gap'])
def test_forward_shapes_and_metrics(pool):
  model = vit.VisionTransformer(num_classes=7, image_size=16, num_channels=3,
                                variant='mu/4', pool=pool, rngs=nnx.Rngs(0))
  logits, metrics = model(jnp.ones((3, 16, 16, 3)))
  assert logits.shape == (3, 7)
  assert float(metrics[AUX_LOSS_KEY]) == 0.0
  tokens = model.embed(jnp.ones((3, 16, 16, 3)))
  assert tokens.shape == (3, 16, 64)
  expected = 17 if pool == 'tok' else 16
  assert vit.num_tokens(ml_collections.ConfigDict(
      {'variant': 'mu/4', 'pool': pool}), 16) == expected


def test_patch_embedding_is_a_strided_convolution():
  model = vit.VisionTransformer(num_classes=2, image_size=8, num_channels=2,
                                variant='mu/4', rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 2))
  conv = jax.lax.conv_general_dilated(
      images, model.patch_kernel[...], window_strides=(4, 4), padding='VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  conv = conv.reshape(2, 4, -1) + model.patch_bias[...]
  np.testing.assert_allclose(model.embed(images), conv, atol=1e-5)


def test_dropout_and_stochastic_depth_are_random_only_in_training():
  model = vit.VisionTransformer(num_classes=3, image_size=8, num_channels=1,
                                variant='mu/4', dropout_rate=0.2,
                                stochastic_depth=0.3, head_zero_init=False,
                                rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  eval1, _ = model(x)
  eval2, _ = model(x)
  np.testing.assert_array_equal(eval1, eval2)
  train1, _ = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  train2, _ = model(x, train=True, rngs=nnx.Rngs(dropout=2))
  train1_again, _ = model(x, train=True, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(train1, train2)
  np.testing.assert_array_equal(train1, train1_again)


def test_bfloat16_activations_keep_float32_params():
  model = vit.VisionTransformer(num_classes=3, image_size=8, num_channels=1,
                                variant='mu/4', dtype=jnp.bfloat16,
                                rngs=nnx.Rngs(0))
  logits, _ = model(jnp.ones((2, 8, 8, 1)))
  assert logits.dtype == jnp.float32
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    assert leaf.dtype == jnp.float32
  tokens = model.embed(jnp.ones((2, 8, 8, 1)))
  assert tokens.dtype == jnp.bfloat16


def test_every_parameter_has_logical_axes():
  model = vit.VisionTransformer(num_classes=3, image_size=8, num_channels=1,
                                variant='mu/4', rngs=nnx.Rngs(0))
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      axes = var.get_metadata()['logical_axes']
      assert len(axes) == var[...].ndim, path


def test_the_mlp_slot_is_pluggable():
  model = vit.VisionTransformer(num_classes=3, image_size=8, num_channels=1,
                                variant='mu/4', rngs=nnx.Rngs(0))

  class ScaledMlp(MlpBlock):
    def __call__(self, x, *, train=False, rngs=None):
      y, _ = super().__call__(x, train=train, rngs=rngs)
      return y, {AUX_LOSS_KEY: jnp.float32(0.5), 'extra': jnp.float32(2.0)}

  model.blocks[1].mlp = ScaledMlp(64, 128, rngs=nnx.Rngs(1))
  _, metrics = model(jnp.ones((1, 8, 8, 1)))
  assert float(metrics[AUX_LOSS_KEY]) == 0.5
  assert float(metrics['block_1/extra']) == 2.0


@pytest.mark.parametrize('spec,expected', [
    ('every:2', (1, 3, 5, 7, 9, 11)),
    ('last:2', (10, 11)),
    ('second_half', (6, 7, 8, 9, 10, 11)),
    ((9, 11), (9, 11)),
    ('none', ()),
])
def test_moe_block_selection(spec, expected):
  assert vit.moe_block_indices(spec, 12) == expected


@pytest.mark.parametrize('spec', ['every:0', 'first:2', (12,), (1, 1)])
def test_moe_block_selection_errors(spec):
  with pytest.raises(ValueError, match='model.moe.layers'):
    vit.moe_block_indices(spec, 12)


@pytest.mark.parametrize('variant', ['X/16', 'B16', 'B/0', 'B/-4', ''])
def test_bad_variant(variant):
  with pytest.raises(ValueError, match='model.variant'):
    vit.parse_variant(variant)


def test_image_size_not_divisible_by_patch():
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    vit.VisionTransformer(num_classes=3, image_size=10, num_channels=1,
                          variant='mu/4', rngs=nnx.Rngs(0))


def test_materialize_cotangent_is_the_identity_with_its_gradient():
  from vmoe.nn import layers  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))

  def f(x, barrier):
    for _ in range(3):
      x = barrier(x)
      x = x + jnp.tanh(x) * 0.5
    return jnp.sum(jnp.sin(x))

  value, grad = jax.value_and_grad(f)(x, layers.materialize_cotangent)
  value_ref, grad_ref = jax.value_and_grad(f)(x, lambda v: v)
  np.testing.assert_allclose(value, value_ref, rtol=1e-6)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-7)
  # The compiled backward pass keeps one reduction per barrier (what XLA
  # cannot fuse into consumers); without the barriers there is none.
  def reductions(barrier):
    grad_fn = jax.jit(jax.grad(lambda x: f(x, barrier)))
    return grad_fn.lower(x).compile().as_text().count(' reduce(')
  assert reductions(layers.materialize_cotangent) == 3
  assert reductions(lambda v: v) == 0
