"""TFDS builder `digits`: the 8x8 handwritten digits that ship with scikit-learn.

This is the embedded default data set of the project: it is built from
`sklearn.datasets.load_digits()` (bundled inside the scikit-learn package), so
preparing it never touches the network. It goes through exactly the same
`tfds` + `tf.data` input pipeline (`vmoe.data.pipeline`) as real datasets.

Importing this module registers the builder, after which
`tfds.builder('digits', data_dir=...)` works like for any TFDS dataset.

Contents (1797 examples, 10 classes):
  image: uint8 [8, 8, 1], PNG-encoded. scikit-learn stores counts 0..16 (on
    pixels in a 4x4 block of the 32x32 original); they are rescaled to 0..255 as
    `floor(v * 255 / 16 + 0.5)` (0 -> 0, 16 -> 255, exact inverse of the
    rescale up to rounding, so `round(image * 16 / 255) == v`).
  label: ClassLabel with names '0'..'9'.
  id: int64, the row index of the example in `load_digits()`.

Splits (fixed, stratified, independent of any run seed):
  test: 30 examples of every class = 300. For each class c, the indices
    `np.flatnonzero(target == c)` are permuted with
    `np.random.RandomState(SPLIT_SEED + c)` and the first 30 go to test.
  train: the remaining 1497 examples (144..153 per class).
"""

import os

# Keep TensorFlow quiet and off accelerators; must happen before TF is imported.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from etils import epath  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

NAME = 'digits'
NUM_CLASSES = 10
TEST_PER_CLASS = 30
SPLIT_SEED = 0
NUM_TRAIN_EXAMPLES = 1497
NUM_TEST_EXAMPLES = 300

_DESCRIPTION = """\
Optical Recognition of Handwritten Digits (UCI), as shipped with scikit-learn
(`sklearn.datasets.load_digits`): 1797 grayscale 8x8 images of the digits 0-9.
Pixel counts 0..16 are rescaled to uint8 0..255 with floor(v * 255 / 16 + 0.5).
Fixed stratified split: 30 test images per class (300 test, 1497 train), chosen
per class with numpy RandomState(class_index).
"""

_CITATION = """\
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49},
}
"""


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [n, 8, 8, 1] in 0..255, labels int64 [n]), n = 1797."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  counts = np.asarray(digits.images, dtype=np.float64)  # [n, 8, 8], 0..16.
  images = np.floor(counts * 255.0 / 16.0 + 0.5).astype(np.uint8)[..., None]
  return images, np.asarray(digits.target, dtype=np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Returns the fixed {'train': idx, 'test': idx} (sorted row indices)."""
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    perm = np.random.RandomState(SPLIT_SEED + c).permutation(len(members))
    test.append(members[perm[:TEST_PER_CLASS]])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {'train': train, 'test': test}


class Digits(tfds.core.GeneratorBasedBuilder):
  """8x8 handwritten digits from scikit-learn, with fixed train/test splits."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: 1497 train / 300 test (30 per class), '
               'images rescaled 0..16 -> 0..255.',
  }

  # TFDS locates a builder's source (for download checksums) through the
  # optional `importlib_resources` package; this builder downloads nothing, so
  # point it at this file directly and avoid the extra dependency.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(8, 8, 1), dtype=np.uint8, encoding_format='png'),
            'label': tfds.features.ClassLabel(
                names=[str(i) for i in range(NUM_CLASSES)]),
            'id': tfds.features.Scalar(
                dtype=np.int64, doc='Row index in sklearn load_digits().'),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with scikit-learn: nothing to download.
    images, labels = load_sklearn_digits()
    return {
        split: self._generate_examples(images, labels, idx)
        for split, idx in split_indices(labels).items()
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': int(labels[i]), 'id': int(i)}
