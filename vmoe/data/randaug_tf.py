"""RandAugment in big_vision's / google-research/vmoe's convention, as
TensorFlow ops for the TFDS source's tf.data pipeline.

The same ops and arithmetic as `randaug_np` (see its docstring for the
convention and what it keeps of the reference), written with TF core ops
(the reference uses tensorflow-addons for the geometric ops, which no longer
installs beside current TensorFlow; `ImageProjectiveTransformV3` is what it
called). Random draws are stateless, from the example's key, so the stream
stays a function of (seed, process, position). Every op equals the
reference bit for bit on `tests/data/randaug_big_vision.npz`.
"""

from __future__ import annotations

import math

import tensorflow as tf

from vmoe.data import randaug_np

OPS = randaug_np.OPS
SIGNED = randaug_np.SIGNED
REPLACE = randaug_np.REPLACE


def _u8(x):
  return tf.cast(x, tf.uint8)


def blend(image1, image2, factor: float):
  """image1 + factor * (image2 - image1) in float32, truncated to uint8;
  clipped only when extrapolating."""
  if factor == 0.0:
    return image1
  if factor == 1.0:
    return image2
  a, b = tf.cast(image1, tf.float32), tf.cast(image2, tf.float32)
  mixed = a + tf.constant(factor, tf.float32) * (b - a)
  if 0.0 < factor < 1.0:
    return _u8(mixed)
  return _u8(tf.clip_by_value(mixed, 0.0, 255.0))


def grayscale(image):
  x = tf.cast(image, tf.float32) * tf.constant(1.0 / 255.0, tf.float32)
  gray = (x[..., 0] * tf.constant(0.2989, tf.float32)
          + x[..., 1] * tf.constant(0.5870, tf.float32)
          + x[..., 2] * tf.constant(0.1140, tf.float32))
  return _u8(gray * tf.constant(255.5, tf.float32))[..., None]


def color(image, factor):
  return blend(tf.tile(grayscale(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
  shape = tf.shape(image)
  pixels = tf.cast(shape[0] * shape[1], tf.float32)
  degenerate = _u8(tf.clip_by_value(pixels / 256.0, 0.0, 255.0))
  return blend(tf.fill(shape, degenerate), image, factor)


def brightness(image, factor):
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  # One depthwise convolution, as the reference: graph-mode rewrites of nine
  # separate multiply-adds change the rounding of a few pixels.
  x = tf.cast(image, tf.float32)[None]
  weights = tf.constant([1, 1, 1, 1, 5, 1, 1, 1, 1], tf.float32) / 13.0
  kernel = tf.tile(tf.reshape(weights, [3, 3, 1, 1]), [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], 'VALID')[0]
  inner = _u8(tf.clip_by_value(smooth, 0.0, 255.0))
  degenerate = tf.pad(inner, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(inner, tf.bool), [[1, 1], [1, 1], [0, 0]],
                  constant_values=True)
  degenerate = tf.where(border, image, degenerate)
  return blend(degenerate, image, factor)


def posterize(image, bits):
  shift = min(max(8 - int(bits), 0), 7)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
  threshold = int(threshold) % 256
  return tf.where(image < threshold, image, 255 - image)


def solarize_add(image, addition, threshold=128):
  added = _u8(tf.clip_by_value(tf.cast(image, tf.int64) + int(addition), 0,
                               255))
  return tf.where(image < threshold, added, image)


def invert(image):
  return 255 - image


def autocontrast(image):
  channels = []
  for c in range(3):
    channel = image[..., c]
    lo = tf.cast(tf.reduce_min(channel), tf.float32)
    hi = tf.cast(tf.reduce_max(channel), tf.float32)
    scale = 255.0 / tf.maximum(hi - lo, 1e-30)
    stretched = _u8(tf.clip_by_value(
        tf.cast(channel, tf.float32) * scale - lo * scale, 0.0, 255.0))
    channels.append(tf.where(hi > lo, stretched, channel))
  return tf.stack(channels, axis=-1)


def equalize(image):
  channels = []
  for c in range(3):
    channel = tf.cast(image[..., c], tf.int32)
    histogram = tf.math.bincount(channel, minlength=256, maxlength=256,
                                 dtype=tf.int64)
    nonzero = tf.boolean_mask(histogram, histogram != 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
    safe_step = tf.maximum(step, 1)
    lut = (tf.cumsum(histogram) + safe_step // 2) // safe_step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    equalized = _u8(tf.gather(lut, channel))
    channels.append(tf.where(step == 0, image[..., c], equalized))
  return tf.stack(channels, axis=-1)


def project(image, transform):
  """ImageProjectiveTransformV3 (nearest, constant fill), with pixels that
  came from outside the image set to 128."""
  ones = tf.ones_like(image[..., :1])
  wrapped = tf.concat([image, ones], axis=-1)
  transform = tf.stack([tf.cast(t, tf.float32) for t in transform]
                       + [tf.constant(0.0), tf.constant(0.0)])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=wrapped[None], transforms=transform[None],
      output_shape=tf.shape(image)[:2], fill_value=0.0,
      interpolation='NEAREST', fill_mode='CONSTANT')[0]
  inside = out[..., 3:] > 0
  return tf.where(inside, out[..., :3], tf.constant(REPLACE, tf.uint8))


def _geometric(op: str):
  def apply(image, value):
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    return project(image, randaug_np.geometric_transform(
        op, tf.cast(value, tf.float32), h, w, cos=tf.cos, sin=tf.sin))
  apply.__name__ = op
  return apply


translate_x = _geometric('TranslateX')
translate_y = _geometric('TranslateY')
shear_x = _geometric('ShearX')
shear_y = _geometric('ShearY')
rotate = _geometric('Rotate')


def cutout(image, pad, center_y, center_x):
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  inside = ((rows >= center_y - pad) & (rows < center_y + pad)
            & (cols >= center_x - pad) & (cols < center_x + pad))
  return tf.where(inside, tf.constant(REPLACE, tf.uint8), image)


FUNCTIONS = dict(
    AutoContrast=autocontrast, Equalize=equalize, Invert=invert,
    Rotate=rotate, Posterize=posterize, Solarize=solarize, Color=color,
    Contrast=contrast, Brightness=brightness, Sharpness=sharpness,
    ShearX=shear_x, ShearY=shear_y, TranslateX=translate_x,
    TranslateY=translate_y, Cutout=cutout, SolarizeAdd=solarize_add)


def randaugment(image, key, *, num_layers: int, magnitude: float):
  """uint8 [h, w, 3] (or [h, w, 1]) -> uint8: `num_layers` ops chosen
  uniformly, each applied at `magnitude`, signs and Cutout centres drawn;
  every draw stateless from `key` (an int64 [2] seed tensor)."""
  gray = image.shape[-1] == 1
  if gray:
    image = tf.tile(image, [1, 1, 3])
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  for layer in range(int(num_layers)):
    layer_key = tf.random.experimental.stateless_fold_in(key, layer)
    op_key, sign_key, y_key, x_key = tf.unstack(
        tf.random.experimental.stateless_split(layer_key, 4))
    choice = tf.random.stateless_uniform([], op_key, maxval=len(OPS),
                                         dtype=tf.int32)
    negate = tf.random.stateless_uniform([], sign_key) >= 0.5
    center_y = tf.random.stateless_uniform([], y_key, maxval=h,
                                           dtype=tf.int32)
    center_x = tf.random.stateless_uniform([], x_key, maxval=w,
                                           dtype=tf.int32)

    def branch(op, image=image, negate=negate, center_y=center_y,
               center_x=center_x):
      def apply():
        if op in SIGNED:
          (value,) = randaug_np.op_args(op, magnitude)
          arg = tf.where(negate, -value, value)
          return FUNCTIONS[op](image, arg)
        args = randaug_np.op_args(op, magnitude)
        if op == 'Cutout':
          args = (*args, center_y, center_x)
        return FUNCTIONS[op](image, *args)
      return apply

    image = tf.switch_case(choice, [branch(op) for op in OPS])
    image = tf.ensure_shape(image, [None, None, 3])
  if gray:
    image = grayscale(image)
  return image
