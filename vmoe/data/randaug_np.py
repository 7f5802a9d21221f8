"""RandAugment in big_vision's / google-research/vmoe's convention, in numpy.

`randaugment(image, rng, num_layers, magnitude)`: `num_layers` times, one of
the 16 ops of `OPS` chosen uniformly is applied at the fixed `magnitude`
(always applied: big_vision draws a per-op probability but never uses it);
Rotate, ShearX/Y and TranslateX/Y get a random sign each. This is
`distort_image_with_randaugment` of big_vision's `pp/autoaugment.py`
(forked from tensorflow/tpu's EfficientNet `autoaugment.py`, which vmoe
calls), with its arithmetic kept where it changes pixels:

  * uint8 in and out, float32 arithmetic, casts truncate toward zero;
  * Contrast blends towards the constant H*W/256 (the reference takes the
    mean of a histogram's counts, i.e. of the image size, not of the image);
  * Solarize's threshold wraps modulo 256 (magnitudes 10 and 20 invert every
    pixel, 15 is threshold 128); Posterize shifts by at most 7 bits;
  * geometric ops sample the nearest source pixel (coordinates rounded half
    away from zero, validity decided after rounding) and fill with 128.

Every op equals the reference bit for bit on the fixture
`tests/data/randaug_big_vision.npz` (made by running big_vision's code;
at exactly 45 degrees a few "tie" pixels depend on TF's graph vs eager
arithmetic, and this matches the eager result). The random draws are a
numpy Generator's (`rng`), so a run is deterministic under its seed.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
# big_vision's hyper-parameters of randaugment.
CUTOUT_CONST = 40
TRANSLATE_CONST = 100
REPLACE = 128
MAX_LEVEL = 10.0
OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize',
       'Solarize', 'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX',
       'ShearY', 'TranslateX', 'TranslateY', 'Cutout', 'SolarizeAdd')
SIGNED = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')


# -- photometric ops: uint8 [h, w, 3] -> uint8 [h, w, 3] ---------------------


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
  """image1 + factor * (image2 - image1); clipped only when extrapolating."""
  if factor == 0.0:
    return image1.copy()
  if factor == 1.0:
    return image2.copy()
  a, b = image1.astype(F32), image2.astype(F32)
  mixed = a + F32(factor) * (b - a)
  if 0.0 < factor < 1.0:
    return mixed.astype(np.uint8)
  return np.clip(mixed, F32(0), F32(255)).astype(np.uint8)


def grayscale(image: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3] -> uint8 [h, w, 1] as tf.image.rgb_to_grayscale on
  uint8 (through float32 in [0, 1])."""
  x = image.astype(F32) * F32(1.0 / 255.0)
  gray = (x[..., 0] * F32(0.2989) + x[..., 1] * F32(0.5870)
          + x[..., 2] * F32(0.1140))
  return (gray * F32(255.5)).astype(np.uint8)[..., None]


def color(image, factor):
  return blend(np.repeat(grayscale(image), 3, axis=-1), image, factor)


def contrast(image, factor):
  h, w = image.shape[:2]
  degenerate = np.clip(F32(h * w) / F32(256.0), 0, 255).astype(np.uint8)
  return blend(np.full_like(image, degenerate), image, factor)


def brightness(image, factor):
  return blend(np.zeros_like(image), image, factor)


def sharpness(image, factor):
  """Blend with the image smoothed by [[1,1,1],[1,5,1],[1,1,1]] / 13 (the
  1-pixel border kept)."""
  kernel = np.array([1, 1, 1, 1, 5, 1, 1, 1, 1], F32) / F32(13.0)
  x = image.astype(F32)
  h, w = image.shape[:2]
  smooth = np.zeros((h - 2, w - 2, image.shape[2]), F32)
  for i in range(3):
    for j in range(3):
      smooth = smooth + x[i:i + h - 2, j:j + w - 2] * kernel[3 * i + j]
  degenerate = image.copy()
  degenerate[1:-1, 1:-1] = np.clip(smooth, 0, 255).astype(np.uint8)
  return blend(degenerate, image, factor)


def posterize(image, bits):
  shift = min(max(8 - int(bits), 0), 7)  # TF clamps uint8 shifts to [0, 7]
  return (image >> shift) << shift


def solarize(image, threshold):
  threshold = int(threshold) % 256  # the reference's uint8 conversion wraps
  return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def solarize_add(image, addition, threshold=128):
  added = np.clip(image.astype(np.int64) + int(addition), 0, 255)
  return np.where(image < threshold, added.astype(np.uint8), image)


def invert(image):
  return 255 - image


def autocontrast(image):
  """Each channel stretched to 0..255 (unchanged when constant)."""
  out = image.copy()
  for c in range(image.shape[2]):
    channel = image[..., c]
    lo, hi = F32(channel.min()), F32(channel.max())
    if hi > lo:
      scale = F32(255.0) / (hi - lo)
      offset = -lo * scale
      out[..., c] = np.clip(channel.astype(F32) * scale + offset, 0,
                            255).astype(np.uint8)
  return out


def equalize(image):
  """PIL's histogram equalisation, per channel."""
  out = image.copy()
  for c in range(image.shape[2]):
    channel = image[..., c].astype(np.int64)
    histogram = np.bincount(channel.ravel(), minlength=256)
    nonzero = histogram[histogram != 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      continue
    lut = (np.cumsum(histogram) + step // 2) // step
    lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255)
    out[..., c] = lut[channel].astype(np.uint8)
  return out


# -- geometric ops --------------------------------------------------------------


def _round_half_away(v: np.ndarray) -> np.ndarray:
  """std::round of float32 values (exact in float64)."""
  v = v.astype(np.float64)
  return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def project(image: np.ndarray, transform) -> np.ndarray:
  """Output pixel (x, y) <- input (a0 x + a1 y + a2, b0 x + b1 y + b2),
  nearest pixel, 128 outside (TF's ImageProjectiveTransformV3 with the
  reference's wrap / unwrap fill)."""
  h, w = image.shape[:2]
  a0, a1, a2, b0, b1, b2 = (F32(t) for t in transform)
  y, x = np.mgrid[0:h, 0:w]
  x, y = x.astype(F32), y.astype(F32)
  xi = _round_half_away(a0 * x + a1 * y + a2)
  yi = _round_half_away(b0 * x + b1 * y + b2)
  valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
  out = image[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)]
  out[~valid] = REPLACE
  return out


def geometric_transform(op: str, value, height, width, cos=np.cos,
                        sin=np.sin) -> tuple:
  """(a0, a1, a2, b0, b1, b2) of `project` for the geometric op at `value`
  (pixels, shear level or degrees; rotation counter-clockwise about the
  centre ((w-1)/2, (h-1)/2)). float32 arithmetic on numpy scalars, or on TF
  tensors with cos / sin = tf.cos / tf.sin (randaug_tf)."""
  if op == 'TranslateX':
    return (1, 0, value, 0, 1, 0)
  if op == 'TranslateY':
    return (1, 0, 0, 0, 1, value)
  if op == 'ShearX':
    return (1, value, 0, 0, 1, 0)
  if op == 'ShearY':
    return (1, 0, 0, value, 1, 0)
  if op != 'Rotate':
    raise ValueError(f'{op!r} is not a geometric op')
  rad = value * F32(math.pi / 180.0)
  c, s = cos(rad), sin(rad)
  wm1, hm1 = width - 1, height - 1
  x_offset = (wm1 - (c * wm1 - s * hm1)) / 2
  y_offset = (hm1 - (s * wm1 + c * hm1)) / 2
  return (c, -s, x_offset, s, c, y_offset)


def _geometric(op: str):
  def apply(image, value):
    h, w = image.shape[:2]
    return project(image, geometric_transform(op, F32(value), F32(h),
                                              F32(w)))
  apply.__name__ = op
  return apply


translate_x = _geometric('TranslateX')
translate_y = _geometric('TranslateY')
shear_x = _geometric('ShearX')
shear_y = _geometric('ShearY')
rotate = _geometric('Rotate')


def cutout(image, pad, center_y, center_x):
  """A square of side <= 2 * pad around (center_y, center_x) set to 128."""
  h, w = image.shape[:2]
  out = image.copy()
  out[max(0, center_y - pad):min(h, center_y + pad),
      max(0, center_x - pad):min(w, center_x + pad)] = REPLACE
  return out


FUNCTIONS = dict(
    AutoContrast=autocontrast, Equalize=equalize, Invert=invert,
    Rotate=rotate, Posterize=posterize, Solarize=solarize, Color=color,
    Contrast=contrast, Brightness=brightness, Sharpness=sharpness,
    ShearX=shear_x, ShearY=shear_y, TranslateX=translate_x,
    TranslateY=translate_y, Cutout=cutout, SolarizeAdd=solarize_add)


def op_args(op: str, magnitude: float, negate: bool = False) -> tuple:
  """The reference's `level_to_arg`: the op's arguments at `magnitude`
  (levels are magnitude / 10 of each op's range, not clipped)."""
  level = float(magnitude) / MAX_LEVEL
  sign = -1.0 if negate else 1.0
  if op == 'Rotate':
    return (sign * level * 30.0,)
  if op in ('ShearX', 'ShearY'):
    return (sign * level * 0.3,)
  if op in ('TranslateX', 'TranslateY'):
    return (sign * level * TRANSLATE_CONST,)
  if op in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (level * 1.8 + 0.1,)
  if op == 'Posterize':
    return (int(level * 4),)
  if op == 'Solarize':
    return (int(level * 256),)
  if op == 'SolarizeAdd':
    return (int(level * 110),)
  if op == 'Cutout':
    return (int(level * CUTOUT_CONST),)
  return ()


def randaugment(image: np.ndarray, rng: np.random.Generator, *,
                num_layers: int, magnitude: float) -> np.ndarray:
  """uint8 [h, w, 3] (or [h, w, 1]: grayscale, worked on as RGB and
  converted back) -> uint8, `num_layers` random ops at `magnitude`."""
  gray = image.shape[-1] == 1
  if gray:
    image = np.repeat(image, 3, axis=-1)
  for _ in range(int(num_layers)):
    op = OPS[int(rng.integers(0, len(OPS)))]
    negate = op in SIGNED and rng.uniform() >= 0.5
    args = op_args(op, magnitude, negate)
    if op == 'Cutout':
      h, w = image.shape[:2]
      args = (*args, int(rng.integers(0, h)), int(rng.integers(0, w)))
    image = FUNCTIONS[op](image, *args)
  if gray:
    image = grayscale(image)
  return image
