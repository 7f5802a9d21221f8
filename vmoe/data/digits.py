"""TFDS builder `digits`: the embedded 8x8 digits as a TFDS dataset.

The examples are those of `vmoe/data/digits.npz` (`vmoe.data.embedded`: the
8x8 handwritten digits that ship with scikit-learn, with its fixed 1497 / 300
train / test split), so preparing the dataset never touches the network and
needs no scikit-learn. It goes through exactly the same `tfds` + `tf.data`
input pipeline as real datasets; the arrays source reads the same examples
without TensorFlow.

Importing this module registers the builder, after which
`tfds.builder('digits', data_dir=...)` works like for any TFDS dataset.
Features: image uint8 [8, 8, 1] (PNG-encoded), label (ClassLabel '0'..'9'),
id (int64, the row index of the example in scikit-learn's `load_digits()`).
"""

import os

# Keep TensorFlow quiet and off accelerators; must happen before TF is imported.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from etils import epath  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from vmoe.data import embedded  # pylint: disable=g-import-not-at-top

NAME = 'digits'
NUM_CLASSES = embedded.NUM_CLASSES
NUM_TRAIN_EXAMPLES = 1497
NUM_TEST_EXAMPLES = 300

_DESCRIPTION = """\
Optical Recognition of Handwritten Digits (UCI), as shipped with scikit-learn
(`sklearn.datasets.load_digits`): 1797 grayscale 8x8 images of the digits 0-9.
Pixel counts 0..16 are rescaled to uint8 0..255 with floor(v * 255 / 16 + 0.5).
Fixed stratified split: 30 test images per class (300 test, 1497 train), chosen
per class with numpy RandomState(class_index) (vmoe/data/embedded.py).
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
    del dl_manager  # The data ships with this package: nothing to download.
    arrays = embedded.load(NAME)
    return {split: self._generate_examples(arrays, split)
            for split in embedded.SPLITS}

  def _generate_examples(self, arrays, split):
    for image, label, index in zip(arrays[f'{split}_image'],
                                   arrays[f'{split}_label'],
                                   arrays[f'{split}_id']):
      yield int(index), {'image': image, 'label': int(label),
                         'id': int(index)}
