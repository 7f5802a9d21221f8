"""The contract every data source keeps (vmoe.data.pipeline): shapes, value
range, determinism, exact resume, per-process shards, evaluation padding and
mixup; plus each source's own one-line errors.

Sources: 'arrays' (the embedded digits), 'synthetic', 'folder' (a tree of
PNG and JPEG files written here; needs grain) and 'tfds' (the TFDS digits;
needs TensorFlow Datasets).
"""

import glob
import hashlib
import importlib.util
import os

import ml_collections
import numpy as np
import pytest

from tests.helpers import set_fields
from vmoe.data import base
from vmoe.data import embedded
from vmoe.data import pipeline

HAS_GRAIN = importlib.util.find_spec('grain') is not None
HAS_TFDS = importlib.util.find_spec('tensorflow_datasets') is not None
SOURCES = ['arrays', 'synthetic',
           pytest.param('folder', marks=pytest.mark.skipif(
               not HAS_GRAIN, reason='grain is not installed')),
           pytest.param('tfds', marks=pytest.mark.skipif(
               not HAS_TFDS, reason='tensorflow_datasets is not installed'))]


def _config(source: str, data_dir: str, **overrides):
  dataset = dict(source=source, name='digits', data_dir=data_dir,
                 train_split='train', eval_split='test')
  if source == 'tfds':
    dataset.update(cache=True, shuffle_buffer=2000)
  if source == 'synthetic':
    dataset.update(num_classes=5, num_examples=(40, 23))
  if source == 'folder':
    dataset.update(name='tree', num_workers=2)
  config = ml_collections.ConfigDict({
      'seed': 3, 'batch_size': 8, 'eval_batch_size': 6,
      'dataset': dataset,
      'preprocess': dict(image_size=8, num_channels=1,
                         train_crop='pad_random_crop', crop_padding=1,
                         crop_scale=(0.5, 1.0), flip=True,
                         value_range=(-1.0, 1.0), mixup_alpha=0.0,
                         resize_method='bilinear', randaug=None)})
  set_fields(config, overrides)
  return config


@pytest.fixture(scope='module')
def folder_dir(tmp_path_factory):
  """data_dir/tree/{train,test}/<digit>/*.png|jpg: digits as image files
  (some RGB JPEGs, some grayscale PNGs), test = the first 23 test digits."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('folder')
  arrays = embedded.load('digits')
  for split, count in (('train', 40), ('test', 23)):
    images = arrays[f'{split}_image'][:count]
    labels = arrays[f'{split}_label'][:count]
    for i, (image, label) in enumerate(zip(images, labels)):
      folder = root / 'tree' / split / f'class_{label}'
      folder.mkdir(parents=True, exist_ok=True)
      if i % 3:
        Image.fromarray(image[..., 0]).save(folder / f'{i:03d}.png')
      else:
        Image.fromarray(np.repeat(image, 3, -1)).save(
            folder / f'{i:03d}.JPG', quality=95)
  (root / 'tree' / 'train' / 'README.txt').write_text('not an image folder')
  return str(root)


@pytest.fixture(params=SOURCES)
def config(request, digits_data_dir, folder_dir):
  source = request.param
  data_dir = folder_dir if source == 'folder' else digits_data_dir
  return _config(source, data_dir)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def digest(batches) -> str:
  h = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      h.update(key.encode())
      h.update(np.ascontiguousarray(batch[key]).tobytes())
  return h.hexdigest()


def test_shapes_dtypes_and_range(config):
  pipeline.check_data(config)
  k = pipeline.num_classes(config.dataset)
  batch = next(pipeline.train_iterator(config))
  assert batch['image'].shape == (8, 8, 8, 1)
  assert batch['image'].dtype == np.float32
  assert batch['labels'].shape == (8, k) and batch['labels'].dtype == np.float32
  np.testing.assert_array_equal(batch['labels'].sum(-1), 1.0)
  assert -1.0 <= batch['image'].min() < batch['image'].max() <= 1.0
  evals = next(pipeline.eval_iterator(config))
  assert evals['image'].shape == (6, 8, 8, 1)
  assert evals['label'].dtype == np.int32 and evals['mask'].dtype == np.float32


def test_same_seed_same_stream_other_seed_differs(config):
  a = digest(take(pipeline.train_iterator(config), 4))
  assert digest(take(pipeline.train_iterator(config), 4)) == a
  config.seed = 4
  assert digest(take(pipeline.train_iterator(config), 4)) != a


def test_resume_is_bit_identical(config):
  """Starting at step t gives batches t, t+1, ... of a fresh stream, across
  epoch boundaries, with mixup."""
  config.preprocess.mixup_alpha = 0.4
  fresh = take(pipeline.train_iterator(config), 9)
  resumed = take(pipeline.train_iterator(config, start_step=6), 3)
  assert digest(fresh[6:]) == digest(resumed)


def test_mixup_mixes_images_and_labels(config):
  plain = next(pipeline.train_iterator(config))
  config.preprocess.mixup_alpha = 0.5
  mixed = next(pipeline.train_iterator(config))
  np.testing.assert_allclose(mixed['labels'].sum(-1), 1.0, rtol=1e-6)
  assert (mixed['labels'] > 0).sum() > (plain['labels'] > 0).sum()
  assert not np.array_equal(mixed['image'], plain['image'])


def _eval_rows(batches):
  rows = []
  for b in batches:
    for image, label, mask in zip(b['image'], b['label'], b['mask']):
      if mask:
        rows.append(image.tobytes() + bytes([label]))
      else:
        assert not image.any() and label == 0
  return sorted(rows)


@pytest.mark.parametrize('processes', [2, 3])
def test_processes_share_the_eval_split_with_padding(config, processes):
  n = pipeline.num_examples(config.dataset, config.dataset.eval_split)
  config.eval_batch_size = 6 if processes == 2 else 3
  single = list(pipeline.eval_iterator(config))
  assert sum(int(b['mask'].sum()) for b in single) == n
  shares = [list(pipeline.eval_iterator(config, process_index=i,
                                        process_count=processes))
            for i in range(processes)]
  steps = pipeline.num_eval_batches(config, process_count=processes)
  assert all(len(s) == steps for s in shares)
  assert _eval_rows(sum(shares, [])) == _eval_rows(single)


def test_processes_read_disjoint_train_shares(config):
  """Each process's batches come from its own share: with no augmentation,
  the images of two processes never coincide over an epoch."""
  config.preprocess.flip = False
  config.preprocess.train_crop = 'resize'
  n = pipeline.num_examples(config.dataset, config.dataset.train_split)
  steps = n // 8  # about one epoch of both shares
  seen = []
  for index in range(2):
    rows = set()
    for batch in take(pipeline.train_iterator(
        config, process_index=index, process_count=2), steps):
      rows.update(image.tobytes() for image in batch['image'])
    seen.append(rows)
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_randaug_is_deterministic_and_changes_images(config):
  if config.dataset.source == 'tfds':
    pytest.importorskip('tensorflow')
  config.preprocess.num_channels = 3
  config.preprocess.randaug = (2, 15)
  a = take(pipeline.train_iterator(config), 2)
  assert digest(a) == digest(take(pipeline.train_iterator(config), 2))
  config.preprocess.randaug = None
  b = take(pipeline.train_iterator(config), 2)
  assert not np.array_equal(a[0]['image'], b[0]['image'])


# -- the random-access sources ---------------------------------------------


def test_one_epoch_reads_every_record_once(digits_data_dir):
  """Random-access sources shuffle whole epochs: the first n examples of the
  stream are a permutation of the split."""
  config = _config('arrays', digits_data_dir, batch_size=1497,
                   **{'preprocess.flip': False,
                      'preprocess.train_crop': 'resize'})
  epoch = next(pipeline.train_iterator(config))
  images = embedded.load('digits')['train_image']
  got = sorted(row.tobytes() for row in epoch['image'])
  expected = sorted(
      (image.astype(np.float32) * np.float32(2 / 255) - np.float32(1)).tobytes()
      for image in images)
  assert got == expected


def test_grain_threads_and_inline_give_the_same_batches(folder_dir,
                                                       monkeypatch):
  if not HAS_GRAIN:
    pytest.skip('grain is not installed')
  from vmoe.data import folder_source  # pylint: disable=g-import-not-at-top
  config = _config('folder', folder_dir, **{
      'preprocess.train_crop': 'random_resized', 'preprocess.image_size': 6,
      'preprocess.mixup_alpha': 0.3})
  threaded = take(pipeline.train_iterator(config, start_step=2), 3)
  evals = list(pipeline.eval_iterator(config))
  monkeypatch.setattr(folder_source.FolderSource, 'DECODES_IMAGES', False)
  inline = take(pipeline.train_iterator(config, start_step=2), 3)
  assert digest(threaded) == digest(inline)
  assert digest(evals) == digest(pipeline.eval_iterator(config))


def test_digits_arrays_and_tfds_hold_the_same_examples(digits_data_dir):
  if not HAS_TFDS:
    pytest.skip('tensorflow_datasets is not installed')
  arrays = _config('arrays', digits_data_dir, eval_batch_size=300)
  tfds = _config('tfds', digits_data_dir, eval_batch_size=300)
  assert pipeline.num_classes(arrays.dataset) == pipeline.num_classes(
      tfds.dataset) == 10
  for split in ('train', 'test'):
    assert pipeline.num_examples(arrays.dataset, split) == (
        pipeline.num_examples(tfds.dataset, split))
  assert (_eval_rows(pipeline.eval_iterator(arrays))
          == _eval_rows(pipeline.eval_iterator(tfds)))


def test_split_slices(digits_data_dir):
  config = _config('arrays', digits_data_dir)
  dcfg = config.dataset
  assert pipeline.num_examples(dcfg, 'train') == 1497
  assert pipeline.num_examples(dcfg, 'train[:10%]') == 150
  assert pipeline.num_examples(dcfg, 'train[10%:]') == 1347
  assert pipeline.num_examples(dcfg, 'test[100:]') == 200
  assert pipeline.num_examples(dcfg, 'test[-20:]') == 20
  with pytest.raises(base.DataError, match=r"split='train\[:x\]'"):
    pipeline.num_examples(dcfg, 'train[:x]')


def test_embedded_digits_equal_sklearn():
  datasets = pytest.importorskip('sklearn.datasets')
  del datasets
  stored = embedded.load('digits')
  fresh = embedded.digits_from_sklearn()
  assert stored.keys() == fresh.keys()
  for key in stored:
    np.testing.assert_array_equal(stored[key], fresh[key], err_msg=key)


@pytest.mark.parametrize('source, overrides, message', [
    ('arrays', {'dataset.name': 'nothing'}, "config.dataset.name='nothing'"),
    ('arrays', {'dataset.name': '/no/such.npz'}, 'no such file'),
    ('arrays', {'dataset.train_split': 'validation'},
     "config.dataset.train_split='validation' is not a split of "
     "config.dataset.name='digits' (splits: test, train)"),
    ('arrays', {'preprocess.resize_method': 'bicubic'},
     "resize_method='bicubic' has no numpy implementation"),
    ('synthetic', {'dataset.num_classes': 0}, 'config.dataset.num_classes=0'),
    ('synthetic', {'dataset.num_examples': (3,)},
     'config.dataset.num_examples=(3,)'),
    ('nope', {}, "config.dataset.source='nope' is not one of"),
    ('arrays', {'dataset.label_key': 'id'},
     "config.dataset.label_key='id' does not apply to "
     "config.dataset.source='arrays'"),
])
def test_bad_datasets_fail_in_one_line(digits_data_dir, source, overrides,
                                       message):
  config = _config(source if source != 'nope' else 'arrays', digits_data_dir,
                   **overrides)
  if source == 'nope':
    config.dataset.source = 'nope'
  with pytest.raises(base.DataError) as info:
    pipeline.check_data(config)
  assert message in str(info.value) and '\n' not in str(info.value)


def test_folder_errors(folder_dir, tmp_path):
  if not HAS_GRAIN:
    pytest.skip('grain is not installed')
  config = _config('folder', str(tmp_path))
  with pytest.raises(base.DatasetNotFoundError, match='no folder'):
    pipeline.check_data(config)
  config = _config('folder', folder_dir,
                   **{'dataset.eval_split': 'validation'})
  with pytest.raises(base.DataError, match="config.dataset.eval_split="
                     "'validation' is not a split of .*splits: test, train"):
    pipeline.check_data(config)
  # A broken file is named when it is read, in one line.
  config = _config('folder', folder_dir)
  bad = sorted(glob.glob(os.path.join(folder_dir, 'tree', 'test', '*',
                                     '*.JPG')))[0]
  saved = open(bad, 'rb').read()
  try:
    with open(bad, 'wb') as f:
      f.write(b'not a jpeg')
    with pytest.raises(base.DataError) as info:
      list(pipeline.eval_iterator(config))
    assert f'cannot read {bad}: UnidentifiedImageError' in str(info.value)
    assert '\n' not in str(info.value)
  finally:
    with open(bad, 'wb') as f:
      f.write(saved)


def test_synthetic_classes_are_learnable(digits_data_dir):
  """Examples of a class sit around their prototype: a nearest-prototype
  rule labels the eval split well above chance."""
  config = _config('synthetic', digits_data_dir,
                   **{'preprocess.flip': False,
                      'preprocess.train_crop': 'resize'})
  batch = next(pipeline.eval_iterator(config))
  train = next(pipeline.train_iterator(config))
  labels = train['labels'].argmax(-1)
  means = np.stack([train['image'][labels == c].mean(0)
                    for c in range(5) if (labels == c).any()])
  classes = [c for c in range(5) if (labels == c).any()]
  distance = ((batch['image'][:, None] - means[None]) ** 2).sum((2, 3, 4))
  predicted = np.asarray(classes)[distance.argmin(-1)]
  assert (predicted == batch['label']).mean() > 0.8
