"""Datasets that ship inside the package (no download, no extra package).

`digits`: the 8x8 handwritten digits that ship with scikit-learn
(`sklearn.datasets.load_digits`, the UCI "Optical Recognition of Handwritten
Digits" test set), stored as `vmoe/data/digits.npz` (51 kB) so that neither
scikit-learn nor TensorFlow is needed to train on them. The arrays source
reads the file directly; the TFDS builder `digits` (`vmoe.data.digits`)
writes the same examples into a TFDS dataset.

Contents (1797 examples, 10 classes):
  <split>_image: uint8 [n, 8, 8, 1]. scikit-learn stores counts 0..16 (on
    pixels in a 4x4 block of the 32x32 original); they are rescaled to 0..255
    as `floor(v * 255 / 16 + 0.5)` (0 -> 0, 16 -> 255, exact inverse of the
    rescale up to rounding, so `round(image * 16 / 255) == v`).
  <split>_label: int32 [n], the digit.
  <split>_id: int32 [n], the row index of the example in `load_digits()`.
  label_names: '0'..'9'.

Splits (fixed, stratified, independent of any run seed):
  test: 30 examples of every class = 300. For each class c, the indices
    `np.flatnonzero(target == c)` are permuted with
    `np.random.RandomState(SPLIT_SEED + c)` and the first 30 go to test.
  train: the remaining 1497 examples (144..153 per class).

`python -m vmoe.data.embedded` rewrites the file from scikit-learn (a test
checks that it equals what scikit-learn gives, where scikit-learn is
installed).
"""

from __future__ import annotations

import functools
import io
import os
import sys

import numpy as np

NUM_CLASSES = 10
TEST_PER_CLASS = 30
SPLIT_SEED = 0
SPLITS = ('train', 'test')
EMBEDDED = {'digits': 'digits.npz'}


def path(name: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      EMBEDDED[name])


@functools.lru_cache(maxsize=None)
def load(name: str) -> dict[str, np.ndarray]:
  """The arrays of the embedded dataset `name` (read once per process)."""
  with np.load(path(name)) as f:
    return {k: f[k] for k in f.files}


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed {'train': idx, 'test': idx} (sorted row indices)."""
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    perm = np.random.RandomState(SPLIT_SEED + c).permutation(len(members))
    test.append(members[perm[:TEST_PER_CLASS]])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {'train': train, 'test': test}


def digits_from_sklearn() -> dict[str, np.ndarray]:
  """The contents of digits.npz, computed from scikit-learn."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  counts = np.asarray(digits.images, dtype=np.float64)  # [n, 8, 8], 0..16.
  images = np.floor(counts * 255.0 / 16.0 + 0.5).astype(np.uint8)[..., None]
  labels = np.asarray(digits.target, dtype=np.int64)
  out = {'label_names': np.array([str(i) for i in range(NUM_CLASSES)])}
  for split, index in split_indices(labels).items():
    out[f'{split}_image'] = images[index]
    out[f'{split}_label'] = labels[index].astype(np.int32)
    out[f'{split}_id'] = index.astype(np.int32)
  return out


def main() -> None:
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **digits_from_sklearn())
  with open(path('digits'), 'wb') as f:
    f.write(buffer.getvalue())
  print(f'wrote {path("digits")} ({len(buffer.getvalue())} bytes)',
        file=sys.stderr)


if __name__ == '__main__':
  main()
