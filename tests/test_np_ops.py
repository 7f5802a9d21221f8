"""The numpy preprocessing (vmoe/data/np_ops.py) against tf.data's ops
(vmoe/data/tf_ops.py): resizes and evaluation crops equal bit for bit,
decoding the same, Inception crops from the same distribution."""

import ml_collections
import numpy as np
import pytest

from vmoe.data import np_ops

tf = pytest.importorskip('tensorflow')
from vmoe.data import tf_ops  # pylint: disable=g-import-not-at-top,wrong-import-position


def _pp(**kw):
  return ml_collections.ConfigDict({**dict(
      image_size=16, num_channels=3, resize_method='bilinear',
      eval_crop_fraction=1.0, train_crop='resize', crop_padding=2,
      flip=False, value_range=(-1.0, 1.0)), **kw})


@pytest.mark.parametrize('method', np_ops.RESIZE_METHODS)
@pytest.mark.parametrize('shape, size', [
    ((8, 8, 1), (16, 16)), ((37, 23, 3), (16, 16)), ((375, 500, 3), (224, 224)),
    ((5, 9, 3), (17, 3)), ((16, 16, 3), (16, 16))])
def test_resize_equals_tf(method, shape, size):
  image = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(
      np.uint8)
  want = tf.clip_by_value(tf.image.resize(tf.cast(image, tf.float32), size,
                                          method=method), 0.0, 255.0)
  np.testing.assert_array_equal(np_ops.resize(image, size, method), want)


@pytest.mark.parametrize('fraction', [1.0, 0.875])
@pytest.mark.parametrize('shape', [(375, 500, 3), (500, 333, 3), (16, 16, 3),
                                   (9, 40, 3)])
def test_eval_image_equals_tf(fraction, shape):
  pp = _pp(eval_crop_fraction=fraction)
  image = np.random.default_rng(7).integers(0, 256, shape).astype(np.uint8)
  want = tf_ops.eval_image(tf.constant(image), pp)
  np.testing.assert_array_equal(np_ops.eval_image(image, pp), want)


@pytest.mark.parametrize('channels_in', [1, 2, 3, 4])
@pytest.mark.parametrize('channels_out', [1, 3])
def test_decode_arrays_equals_tf(channels_in, channels_out):
  image = np.random.default_rng(3).integers(0, 256, (6, 5, channels_in)
                                            ).astype(np.uint8)
  want = tf_ops.decode(tf.constant(image), channels_out)
  np.testing.assert_array_equal(np_ops.decode(image, channels_out), want)


def test_decode_encoded_images():
  """PNG (exact) and JPEG (PIL's and TF's decoders agree to a few levels)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
  for fmt in ('PNG', 'JPEG'):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, quality=95)
    data = buffer.getvalue()
    got = np_ops.decode(data, 3)
    want = tf_ops.decode(tf.constant(data), 3).numpy()
    if fmt == 'PNG':
      np.testing.assert_array_equal(got, image)
      np.testing.assert_array_equal(got, want)
    else:
      assert np.abs(got.astype(int) - want).max() <= 8
    assert np_ops.decode(data, 1).shape == (12, 10, 1)


def test_decode_refuses_what_it_cannot_read():
  with pytest.raises(ValueError, match='must be uint8'):
    np_ops.decode(np.zeros((4, 4, 3), np.float32), 3)
  with pytest.raises(ValueError, match='5 channels'):
    np_ops.decode(np.zeros((4, 4, 5), np.uint8), 3)


def test_inception_crops_follow_tf_distribution():
  """Crop areas and aspect ratios of np_ops.inception_crop_box have the
  statistics of tf.image.sample_distorted_bounding_box with the same
  arguments (4000 draws each; means within 3%, never out of range)."""
  height, width = 375, 500
  area_range, ratio_range = (0.05, 1.0), (3 / 4, 4 / 3)
  rng = np.random.default_rng(0)
  ours = np.array([np_ops.inception_crop_box(
      height, width, rng, area_range=area_range, ratio_range=ratio_range)
                   for _ in range(4000)], np.float64)
  theirs = []
  for i in range(4000):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [height, width, 3], bounding_boxes=tf.zeros([0, 0, 4]),
        seed=[i, 0], min_object_covered=0.0,
        aspect_ratio_range=ratio_range, area_range=area_range,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    theirs.append([begin[0], begin[1], size[0], size[1]])
  theirs = np.array(theirs, np.float64)
  for boxes in (ours, theirs):
    assert (boxes[:, 0] + boxes[:, 2] <= height).all()
    assert (boxes[:, 1] + boxes[:, 3] <= width).all()
  stat = lambda b: (np.mean(b[:, 2] * b[:, 3] / (height * width)),
                    np.mean(b[:, 3] / b[:, 2]),
                    np.mean((b[:, 0] + b[:, 2] / 2) / height))
  np.testing.assert_allclose(stat(ours), stat(theirs), rtol=0.03)


def test_pad_random_crop_and_flip_stay_in_range():
  pp = _pp(train_crop='pad_random_crop', flip=True)
  image = np.full((16, 16, 3), 200, np.uint8)
  rng = np.random.default_rng(0)
  outs = [np_ops.train_image(image, rng, pp) for _ in range(50)]
  for out in outs:
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
  # Some crops show the black padding, as TF's pad-then-crop.
  assert any((out == 0).any() for out in outs)
  assert any(not (out == 0).any() for out in outs)
