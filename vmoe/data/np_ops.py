"""Numpy / PIL image ops: the TFDS source's preprocessing without TensorFlow.

The random-access sources (arrays, folder, synthetic) and the inference
command preprocess with these. They follow `tf_ops` op for op: the same
crops (the algorithm of TF's `sample_distorted_bounding_box` kernel for
Inception crops),
`tf.image.resize`'s bilinear / nearest arithmetic (half-pixel centres, no
antialiasing), the same flips, value range and mixup, so a model trained
through one source evaluates the same through another (eval preprocessing
equals TF's to float32 rounding: tested). Random draws come from a numpy
Generator per example (`example_rng`), so they are not TF's numbers.

Images: uint8 [h, w, c] in; crops and resizes give float32 [S, S, c] in
pixel units (0..255); `normalise` maps them to config.preprocess.value_range
(S = config.preprocess.image_size, c = config.preprocess.num_channels).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

# Resize methods with a numpy implementation (the others need TensorFlow:
# config.dataset.source='tfds').
RESIZE_METHODS = ('bilinear', 'nearest')
# TF's grayscale weights (tf.image.rgb_to_grayscale).
_GRAY = np.array([0.2989, 0.5870, 0.1140], np.float32)


def example_rng(seed: int, *key: int) -> np.random.Generator:
  """A Generator that is a function of (seed, *key) only: the random stream of
  one example (or batch) of a deterministic, resumable pipeline."""
  return np.random.default_rng([int(seed) % 2**64, *(int(k) for k in key)])


def decode(image: Any, num_channels: int) -> np.ndarray:
  """Encoded bytes (JPEG/PNG/GIF/BMP) or a uint8 [h, w, c] array -> uint8
  [h, w, num_channels]: gray (c 1 or 2, alpha dropped) is repeated to RGB,
  RGB(A) becomes TF's grayscale, an alpha channel is dropped (as
  tf_ops.decode). ValueError for other dtypes or channel counts."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(io.BytesIO(bytes(image))) as img:
      img = img.convert('L' if num_channels == 1 else 'RGB')
      image = np.asarray(img, np.uint8)
    return image[..., None] if image.ndim == 2 else image
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8:
    raise ValueError(f'images must be uint8, not {image.dtype}')
  c = image.shape[-1]
  if c not in (1, 2, 3, 4):
    raise ValueError(f'images have {c} channels, not 1-4')
  image = image[..., :1] if c in (1, 2) else image[..., :3]
  if num_channels == 3 and c in (1, 2):
    return np.repeat(image, 3, axis=-1)
  if num_channels == 1 and c in (3, 4):
    gray = image.astype(np.float32) @ _GRAY
    return np.round(gray).astype(np.uint8)[..., None]
  return image


def _source_coords(out_size: int, in_size: int) -> np.ndarray:
  """Half-pixel-centre source coordinates of the output pixels."""
  scale = in_size / out_size
  return (np.arange(out_size, dtype=np.float32) + 0.5) * np.float32(
      scale) - 0.5


def _bilinear_axis(out_size: int, in_size: int):
  """(lower, upper, lerp) along one axis, as TF's ResizeBilinear computes
  them with half_pixel_centers."""
  coord = _source_coords(out_size, in_size)
  floor = np.floor(coord)
  lower = np.maximum(floor, 0).astype(np.int64)
  upper = np.minimum(np.ceil(coord), in_size - 1).astype(np.int64)
  return lower, upper, (coord - floor).astype(np.float32)


def _nearest_axis(out_size: int, in_size: int) -> np.ndarray:
  scale = np.float32(in_size / out_size)
  index = np.floor((np.arange(out_size, dtype=np.float32) + 0.5) * scale)
  return np.minimum(index, in_size - 1).astype(np.int64)


def resize(image: np.ndarray, size: tuple[int, int],
           method: str = 'bilinear') -> np.ndarray:
  """[h, w, c] -> float32 [size[0], size[1], c] in pixel units, clipped to
  0..255 (`tf.image.resize` without antialiasing)."""
  image = np.asarray(image, np.float32)
  h, w = image.shape[:2]
  out_h, out_w = size
  if method == 'nearest':
    return image[_nearest_axis(out_h, h)][:, _nearest_axis(out_w, w)]
  if method != 'bilinear':
    raise ValueError(_no_numpy('resize_method', method))
  top, bottom, dy = _bilinear_axis(out_h, h)
  left, right, dx = _bilinear_axis(out_w, w)
  rows_top, rows_bottom = image[top], image[bottom]
  dx = dx[None, :, None]
  upper = rows_top[:, left] + (rows_top[:, right] - rows_top[:, left]) * dx
  lower = (rows_bottom[:, left]
           + (rows_bottom[:, right] - rows_bottom[:, left]) * dx)
  out = upper + (lower - upper) * dy[:, None, None]
  return np.clip(out, 0.0, 255.0)


def normalise(image: np.ndarray, value_range) -> np.ndarray:
  lo, hi = (float(v) for v in value_range)
  return np.asarray(image, np.float32) * np.float32((hi - lo) / 255.0) + (
      np.float32(lo))


def _random_crop(height: int, width: int, min_area: float, max_area: float,
                 ratio: float, rng: np.random.Generator):
  """One attempt of TF's GenerateRandomCrop: the crop height uniform between
  the heights of the smallest and largest allowed areas at this aspect
  ratio, the offset uniform; None when the crop does not fit."""
  crop_h = round(math.sqrt(min_area / ratio))
  max_h = round(math.sqrt(max_area / ratio))
  if round(max_h * ratio) > width:  # the largest height whose width fits
    max_h = int((width + 0.5 - 1e-7) / ratio)
    if round(max_h * ratio) > width:
      max_h -= 1
  max_h = min(max_h, height)
  crop_h = min(crop_h, max_h)
  if crop_h < max_h:
    crop_h += int(rng.integers(0, max_h - crop_h + 1))
  crop_w = round(crop_h * ratio)
  if crop_w * crop_h < min_area:
    crop_h += 1
    crop_w = round(crop_h * ratio)
  if crop_w * crop_h > max_area:
    crop_h -= 1
    crop_w = round(crop_h * ratio)
  area = crop_w * crop_h
  if (area < min_area or area > max_area or not 0 < crop_w <= width
      or not 0 < crop_h <= height):
    return None
  top = int(rng.integers(0, height - crop_h)) if crop_h < height else 0
  left = int(rng.integers(0, width - crop_w)) if crop_w < width else 0
  return top, left, crop_h, crop_w


def inception_crop_box(height: int, width: int, rng: np.random.Generator, *,
                       area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3),
                       max_attempts: int = 10) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) of an Inception crop.

  TF's `sample_distorted_bounding_box` (min_object_covered 0, as tf_ops
  calls it): up to `max_attempts` aspect ratios uniform in `ratio_range`,
  each tried as `_random_crop`; the whole image when none fits.
  """
  area = height * width
  min_area, max_area = area_range[0] * area, area_range[1] * area
  for _ in range(max_attempts):
    ratio = rng.uniform(*ratio_range)
    box = _random_crop(height, width, min_area, max_area, ratio, rng)
    if box is not None:
      return box
  return 0, 0, height, width


def train_image(image: np.ndarray, rng: np.random.Generator, pp
                ) -> np.ndarray:
  """uint8 [h, w, c] -> augmented float32 [S, S, c] (tf_ops.train_image's
  crops and flip; RandAugment when `pp.randaug` is set)."""
  size = pp.image_size
  method = pp.get('resize_method', 'bilinear')
  if pp.train_crop == 'random_resized':
    top, left, ch, cw = inception_crop_box(
        image.shape[0], image.shape[1], rng,
        area_range=tuple(pp.get('crop_scale', (0.08, 1.0))),
        ratio_range=tuple(pp.get('crop_ratio', (3 / 4, 4 / 3))))
    out = resize(image[top:top + ch, left:left + cw], (size, size), method)
  elif pp.train_crop == 'pad_random_crop':
    pad = pp.get('crop_padding', 4)
    out = resize(image, (size, size), method)
    out = np.pad(out, ((pad, pad), (pad, pad), (0, 0)))  # Black border.
    top = int(rng.integers(0, 2 * pad + 1))
    left = int(rng.integers(0, 2 * pad + 1))
    out = out[top:top + size, left:left + size]
  else:  # 'resize'
    out = resize(image, (size, size), method)
  if pp.get('flip', False) and rng.uniform() < 0.5:
    out = out[:, ::-1]
  randaug = pp.get('randaug', None)
  if randaug:
    from vmoe.data import randaug_np  # pylint: disable=g-import-not-at-top
    # RandAugment works on uint8 images, as in big_vision: after the crop.
    out = randaug_np.randaugment(
        np.clip(out, 0, 255).astype(np.uint8), rng,
        num_layers=randaug[0], magnitude=randaug[1]).astype(np.float32)
  return np.ascontiguousarray(out, np.float32)


def eval_image(image: np.ndarray, pp) -> np.ndarray:
  """uint8 [h, w, c] -> float32 [S, S, c]: the short side resized to
  ceil(S / eval_crop_fraction), then the central S x S crop (tf_ops)."""
  size = pp.image_size
  target = math.ceil(size / pp.get('eval_crop_fraction', 1.0))
  h, w = image.shape[:2]
  scale = np.float32(target) / np.float32(min(h, w))
  new = np.maximum(np.round(np.array([h, w], np.float32) * scale).astype(
      np.int64), size)
  out = resize(image, (int(new[0]), int(new[1])),
               pp.get('resize_method', 'bilinear'))
  top, left = (int(new[0]) - size) // 2, (int(new[1]) - size) // 2
  return out[top:top + size, left:left + size]


def mixup(batch: dict[str, np.ndarray], rng: np.random.Generator,
          alpha: float) -> dict[str, np.ndarray]:
  """Mixes each example with its neighbour, x' = lam x + (1 - lam) roll(x),
  one lam ~ Beta(alpha, alpha) per batch (as two Gamma draws, like
  tf_ops.mixup); labels [b, K] stay probability vectors."""
  g1, g2 = rng.gamma(alpha), rng.gamma(alpha)
  lam = np.float32(g1 / (g1 + g2) if g1 + g2 > 0 else 0.0)
  mix = lambda x: lam * x + (np.float32(1) - lam) * np.roll(x, 1, axis=0)
  return dict(batch, image=mix(batch['image']), labels=mix(batch['labels']))


def _no_numpy(field: str, value: Any) -> str:
  choices = f' (one of {RESIZE_METHODS})' if field == 'resize_method' else ''
  return (f'config.preprocess.{field}={value!r} has no numpy implementation'
          f"{choices}; use config.dataset.source='tfds'")


def check_supported(pp) -> None:
  """ValueError (one line) for preprocessing these ops cannot do."""
  method = pp.get('resize_method', 'bilinear')
  if method not in RESIZE_METHODS:
    raise ValueError(_no_numpy('resize_method', method))
  if pp.get('antialias', False):
    raise ValueError(_no_numpy('antialias', True))
