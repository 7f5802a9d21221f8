"""TensorFlow image ops of the TFDS source's tf.data pipeline.

Every random op is stateless: it takes a key (an int64 [2] seed tensor) so
that the augmentation of an example is a function of (seed, process,
position) only, which makes the stream resumable bit-exactly.

Images: uint8 [h, w, c] in, float32 [S, S, c] in pixel units out of the
crops and resizes, then `normalise` to `config.preprocess.value_range`
(S = config.preprocess.image_size, c = config.preprocess.num_channels).
"""

import math

import tensorflow as tf

def decode(image, num_channels: int) -> tf.Tensor:
  """Encoded bytes or uint8 [h, w, c] -> uint8 [h, w, num_channels]: gray
  (c 1 or 2, alpha dropped) is repeated to RGB, RGB(A) becomes TF's
  grayscale, an alpha channel is dropped (np_ops.decode does the same)."""
  if image.dtype == tf.string:
    # The decoders convert grayscale <-> RGB themselves when asked for channels.
    image = tf.io.decode_image(image, channels=num_channels,
                               expand_animations=False, dtype=tf.uint8)
  else:
    if image.dtype != tf.uint8:
      raise ValueError(f'images must be uint8, not {image.dtype.name}')
    c = image.shape[-1]
    if c not in (1, 2, 3, 4):
      raise ValueError(f'images have {c} channels, not 1-4')
    image = image[..., :1] if c in (1, 2) else image[..., :3]
    if num_channels == 3 and c in (1, 2):
      image = tf.tile(image, [1, 1, 3])
    elif num_channels == 1 and c in (3, 4):
      image = tf.cast(tf.round(tf.image.rgb_to_grayscale(
          tf.cast(image, tf.float32))), tf.uint8)
  image.set_shape([None, None, num_channels])
  return image


def resize(image, size, pp) -> tf.Tensor:
  """Any [h, w, c] -> float32 [size[0], size[1], c] in pixel units.

  `preprocess.antialias` (default False, like tf.image.resize) only matters
  when shrinking; it costs about 2.5x per resize.
  """
  image = tf.image.resize(tf.cast(image, tf.float32), size,
                          method=pp.get('resize_method', 'bilinear'),
                          antialias=bool(pp.get('antialias', False)))
  return tf.clip_by_value(image, 0.0, 255.0)  # Cubic kernels overshoot.


def normalise(image, value_range) -> tf.Tensor:
  lo, hi = (float(v) for v in value_range)
  return tf.cast(image, tf.float32) * ((hi - lo) / 255.0) + lo


def train_image(image, key, pp) -> tf.Tensor:
  """uint8 [h, w, c] -> augmented float32 [S, S, c] (stateless, seeded by
  key): crop, flip, RandAugment (`pp.randaug`)."""
  size = pp.image_size
  crop_key, flip_key = tf.unstack(
      tf.random.experimental.stateless_split(key, 2))
  if pp.train_crop == 'random_resized':
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=crop_key,
        min_object_covered=0.0,
        aspect_ratio_range=tuple(pp.get('crop_ratio', (3 / 4, 4 / 3))),
        area_range=tuple(pp.get('crop_scale', (0.08, 1.0))),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    image = resize(tf.slice(image, begin, crop_size), [size, size], pp)
  elif pp.train_crop == 'pad_random_crop':
    pad = pp.get('crop_padding', 4)
    image = resize(image, [size, size], pp)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])  # Black border.
    image = tf.image.stateless_random_crop(
        image, [size, size, pp.num_channels], seed=crop_key)
  else:  # 'resize'
    image = resize(image, [size, size], pp)
  if pp.get('flip', False):
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
  randaug = pp.get('randaug', None)
  if randaug:
    from vmoe.data import randaug_tf  # pylint: disable=g-import-not-at-top
    # On the uint8 crop, as big_vision (its crop casts back to uint8); its own
    # key, so that the crop and flip draws stay those of runs without it.
    image = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
    image = tf.cast(randaug_tf.randaugment(
        image, tf.random.experimental.stateless_fold_in(key, 2),
        num_layers=randaug[0], magnitude=randaug[1]), tf.float32)
  return image


def eval_image(image, pp) -> tf.Tensor:
  """uint8 [h, w, c] -> float32 [S, S, c]: resize the short side, central crop.

  The short side goes to ceil(S / eval_crop_fraction) (default fraction 1:
  square images are just resized to S x S).
  """
  size = pp.image_size
  frac = pp.get('eval_crop_fraction', 1.0)
  target = math.ceil(size / frac)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = target / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = resize(image, new, pp)
  top = (new[0] - size) // 2
  left = (new[1] - size) // 2
  return tf.ensure_shape(image[top:top + size, left:left + size],
                         [size, size, pp.num_channels])


def mixup(batch, key, alpha: float):
  """Mixes each example with its neighbour: x' = lam x + (1 - lam) roll(x).

  One lam ~ Beta(alpha, alpha) per batch (stateless, from key). Labels are
  probability vectors [b, K], so mixed labels still sum to 1.
  """
  k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  g1 = tf.random.stateless_gamma([], seed=k1, alpha=alpha)
  g2 = tf.random.stateless_gamma([], seed=k2, alpha=alpha)
  lam = tf.math.divide_no_nan(g1, g1 + g2)  # Tiny alpha: both may underflow.
  mix = lambda x: lam * x + (1.0 - lam) * tf.roll(x, shift=1, axis=0)
  return dict(batch, image=mix(batch['image']), labels=mix(batch['labels']))


def base_key(seed: int, process_index: int, tag: int) -> tf.Tensor:
  key = tf.constant([seed, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, tag)


def options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep their input order.
  options.threading.max_intra_op_parallelism = 1
  options.experimental_optimization.map_parallelization = True
  return options
