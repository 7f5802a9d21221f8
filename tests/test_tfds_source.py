"""The TFDS source: the `digits` TFDS builder and the tf.data pipeline (the
contract every source keeps is in test_data_sources.py)."""

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from etils import epath  # pylint: disable=g-bad-import-order,g-import-not-at-top
from tests.helpers import set_fields  # pylint: disable=g-import-not-at-top
from vmoe.data import digits  # pylint: disable=g-import-not-at-top
from vmoe.data import embedded  # pylint: disable=g-import-not-at-top
from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
from vmoe.data import tfds_source  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  """Digits config; overrides use dotted keys, e.g. {'preprocess.flip': True}."""
  config = ml_collections.ConfigDict({
      'seed': 0,
      'batch_size': 128,
      'eval_batch_size': 128,
      'dataset': {
          'source': 'tfds',
          'name': 'digits',
          'data_dir': str(data_dir),
          'train_split': 'train',
          'eval_split': 'test',
          'download': False,
          'cache': True,
          'shuffle_buffer': 2000,
          'image_key': 'image',
          'label_key': 'label',
      },
      'preprocess': {
          'image_size': 16,
          'num_channels': 1,
          'train_crop': 'pad_random_crop',
          'crop_padding': 2,
          'crop_scale': (0.5, 1.0),
          'flip': False,
          'value_range': (-1.0, 1.0),
          'mixup_alpha': 0.0,
          'resize_method': 'bilinear',
      },
  })
  set_fields(config, overrides)
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  start = time.time()
  pipeline.prepare_dataset(make_config(path).dataset)
  assert time.time() - start < 30
  return path


@pytest.fixture(scope='module')
def splits(data_dir):
  """{split: (images uint8 [n, 8, 8, 1], labels [n], ids [n])} read by TFDS."""
  builder = tfds.builder('digits', data_dir=str(data_dir))
  out = {}
  for split in ('train', 'test'):
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    out[split] = (ex['image'], ex['label'], ex['id'])
  return out


# ------------------------------------------------------------------ builder --


def test_builder_metadata(data_dir):
  builder = tfds.builder('digits', data_dir=str(data_dir))
  assert isinstance(builder, digits.Digits)
  assert builder.is_prepared()
  assert str(builder.version) == '1.0.0'
  assert '1.0.0' in builder.RELEASE_NOTES
  assert builder.info.description and builder.info.citation
  assert builder.info.features['label'].num_classes == 10
  assert builder.info.features['image'].shape == (8, 8, 1)
  assert builder.info.splits['train'].num_examples == digits.NUM_TRAIN_EXAMPLES
  assert builder.info.splits['test'].num_examples == digits.NUM_TEST_EXAMPLES


def test_builder_splits_are_fixed_and_stratified(splits):
  (_, train_y, train_id), (_, test_y, test_id) = splits['train'], splits['test']
  assert len(train_id) == 1497 and len(test_id) == 300
  assert not set(train_id) & set(test_id)
  assert sorted(np.concatenate([train_id, test_id])) == list(range(1797))
  assert set(train_y) == set(test_y) == set(range(10))
  np.testing.assert_array_equal(np.bincount(test_y), [30] * 10)
  assert 144 <= np.bincount(train_y).min() <= np.bincount(train_y).max() <= 153
  # The same examples as the embedded arrays.
  arrays = embedded.load('digits')
  for split, (images, labels, ids) in splits.items():
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], arrays[f'{split}_id'])
    np.testing.assert_array_equal(images[order], arrays[f'{split}_image'])
    np.testing.assert_array_equal(labels[order], arrays[f'{split}_label'])


def test_builder_images_match_sklearn(splits):
  datasets = pytest.importorskip('sklearn.datasets')
  sk = datasets.load_digits()
  for images, labels, ids in splits.values():
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
    counts = sk.images[ids]
    np.testing.assert_array_equal(
        images[..., 0], np.floor(counts * 255 / 16 + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(np.round(images[..., 0].astype(np.float64) * 16 / 255), counts)
    np.testing.assert_array_equal(labels, sk.target[ids])


# ----------------------------------------------------------- dataset errors --


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
  config = make_config(tmp_path, **{'dataset.name': 'cifar10'})
  start = time.time()
  with pytest.raises(pipeline.DatasetNotFoundError) as e:
    pipeline.prepare_dataset(config.dataset)
  assert time.time() - start < 10
  msg = str(e.value)
  assert '\n' not in msg
  assert 'cifar10' in msg and str(tmp_path) in msg and 'tfds build' in msg
  assert 'download=True' in msg
  with pytest.raises(pipeline.DatasetNotFoundError):  # Via the iterators too.
    pipeline.train_iterator(config)


def test_unknown_dataset_name(tmp_path):
  config = make_config(tmp_path, **{'dataset.name': 'no_such_dataset_xyz'})
  with pytest.raises(pipeline.DatasetNotFoundError) as e:
    pipeline.num_classes(config.dataset)
  assert '\n' not in str(e.value) and 'no_such_dataset_xyz' in str(e.value)


def test_bad_split_and_preprocess_fields(data_dir):
  config = make_config(data_dir)
  with pytest.raises(ValueError, match='foo'):
    pipeline.num_examples(config.dataset, 'foo')
  bad = make_config(data_dir, **{'preprocess.train_crop': 'wobble'})
  with pytest.raises(ValueError, match='config.preprocess.train_crop'):
    pipeline.train_iterator(bad)
  bad = make_config(data_dir, batch_size=127)
  with pytest.raises(ValueError, match='config.batch_size'):
    pipeline.train_iterator(bad, process_count=2)


def test_num_examples_and_classes(data_dir):
  config = make_config(data_dir)
  assert pipeline.num_classes(config.dataset) == 10
  assert pipeline.num_examples(config.dataset, 'train') == 1497
  assert pipeline.num_examples(config.dataset, 'test') == 300
  assert pipeline.num_examples(config.dataset, 'train[:10%]') == 150


# ------------------------------------------------------------ train batches --


def test_train_batches_shapes_dtypes_range(data_dir):
  config = make_config(data_dir, **{'preprocess.flip': True})
  batch = next(pipeline.train_iterator(config))
  assert set(batch) == {'image', 'labels'}
  assert batch['image'].shape == (128, 16, 16, 1)
  assert batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  assert batch['image'].min() == -1.0 and batch['image'].max() > 0.9
  assert batch['labels'].shape == (128, 10)
  assert batch['labels'].dtype == np.float32
  np.testing.assert_array_equal(batch['labels'].sum(-1), 1.0)
  assert set(np.unique(batch['labels'])) == {0.0, 1.0}
  # Per-process batch size.
  batch = next(pipeline.train_iterator(config, process_index=1,
                                       process_count=2))
  assert batch['image'].shape == (64, 16, 16, 1)


@pytest.mark.parametrize('crop', ['random_resized', 'resize'])
def test_train_crops_and_rgb(data_dir, crop):
  config = make_config(data_dir, batch_size=32, **{
      'preprocess.train_crop': crop, 'preprocess.num_channels': 3,
      'preprocess.image_size': 12, 'preprocess.value_range': (0.0, 1.0)})
  image = next(pipeline.train_iterator(config))['image']
  assert image.shape == (32, 12, 12, 3)
  assert 0.0 <= image.min() and image.max() <= 1.0
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # Gray -> RGB.


def test_one_epoch_is_a_permutation_of_the_split(data_dir, splits):
  # 1497 = 3 * 499: three batches are exactly one epoch. With an identity-like
  # preprocessing the images can be compared with the stored ones.
  config = make_config(data_dir, batch_size=499, **{
      'preprocess.train_crop': 'resize', 'preprocess.image_size': 8,
      'preprocess.value_range': (0.0, 255.0)})
  batches = take(pipeline.train_iterator(config), 6)
  images, labels, _ = splits['train']

  def rows(imgs, labs):
    flat = np.concatenate([imgs.reshape(len(imgs), -1), labs[:, None]], 1)
    return sorted(map(bytes, np.round(flat).astype(np.uint8)))

  for epoch in (batches[:3], batches[3:]):
    got_images = np.concatenate([b['image'] for b in epoch])
    got_labels = np.concatenate([b['labels'].argmax(-1) for b in epoch])
    assert rows(got_images, got_labels) == rows(images, labels)
  # Epochs are shuffled differently.
  assert not np.array_equal(batches[0]['image'], batches[3]['image'])


def test_same_seed_same_batches_other_seed_differs(data_dir):
  config = make_config(data_dir, **{'preprocess.train_crop': 'random_resized',
                                    'preprocess.flip': True})
  a = take(pipeline.train_iterator(config), 3)
  b = take(pipeline.train_iterator(config), 3)
  assert_batches_equal(a, b)
  # TF's global seed (e.g. set by other code in the process) plays no part.
  tf.random.set_seed(0)
  try:
    assert_batches_equal(a, take(pipeline.train_iterator(config), 3))
  finally:
    tf.random.set_seed(None)
  config.seed = 1
  c = take(pipeline.train_iterator(config), 3)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  assert not np.array_equal(a[0]['labels'], c[0]['labels'])


def test_resume_is_bit_identical(data_dir):
  # 1497 examples / 128 per batch: batch 11 straddles the first epoch boundary.
  config = make_config(data_dir, **{'preprocess.train_crop': 'random_resized',
                                    'preprocess.flip': True,
                                    'preprocess.mixup_alpha': 0.4})
  reference = take(pipeline.train_iterator(config), 26)
  for start in (1, 11, 12, 23):
    resumed = take(pipeline.train_iterator(config, start_step=start), 3)
    assert_batches_equal(resumed, reference[start:start + 3])


def test_resume_far_ahead_is_cheap(data_dir):
  config = make_config(data_dir)
  start = time.time()
  batch = next(pipeline.train_iterator(config, start_step=10**7))
  assert time.time() - start < 10
  assert batch['image'].shape == (128, 16, 16, 1)


@pytest.mark.slow
def test_stream_is_identical_in_a_fresh_process(data_dir):
  config = make_config(data_dir, **{'preprocess.train_crop': 'random_resized',
                                    'preprocess.flip': True,
                                    'preprocess.mixup_alpha': 0.2})
  code = textwrap.dedent(f"""
      import hashlib, sys
      sys.path.insert(0, {REPO!r})
      sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
      from test_tfds_source import make_config, digest
      from vmoe.data import pipeline
      config = make_config({str(data_dir)!r}, **{{
          'preprocess.train_crop': 'random_resized', 'preprocess.flip': True,
          'preprocess.mixup_alpha': 0.2}})
      print(digest(pipeline.train_iterator(config, start_step=7), 3))
  """)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                       text=True, check=True, timeout=120)
  assert out.stdout.strip().splitlines()[-1] == digest(
      pipeline.train_iterator(config, start_step=7), 3)


def digest(iterator, n) -> str:
  h = hashlib.sha256()
  for batch in take(iterator, n):
    for k in sorted(batch):
      h.update(k.encode())
      h.update(np.ascontiguousarray(batch[k]).tobytes())
  return h.hexdigest()


def test_mixup_soft_labels(data_dir):
  config = make_config(data_dir, **{'preprocess.mixup_alpha': 1.0})
  batches = take(pipeline.train_iterator(config), 4)
  for batch in batches:
    labels = batch['labels']
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-6)
    assert labels.min() >= 0.0 and labels.max() <= 1.0
  all_labels = np.concatenate([b['labels'] for b in batches])
  assert ((all_labels > 0) & (all_labels < 1)).any()  # Really mixed.
  # Mixing is linear: images stay within the value range.
  assert all(-1.0 <= b['image'].min() <= b['image'].max() <= 1.0
             for b in batches)


# ------------------------------------------------------- sharding and eval --


def test_process_shares_are_disjoint_and_cover_the_split(data_dir):
  builder = tfds_source.prepare_dataset(make_config(data_dir).dataset)
  for split in ('train', 'test'):
    ids = []
    for i in range(2):
      share = tfds.split_for_jax_process(split, process_index=i,
                                         process_count=2)
      ex = tfds.as_numpy(builder.as_dataset(split=share, batch_size=-1))
      ids.append(set(ex['id'].tolist()))
    assert not ids[0] & ids[1]
    assert len(ids[0] | ids[1]) == builder.info.splits[split].num_examples
    assert abs(len(ids[0]) - len(ids[1])) <= 1


def _eval_rows(batches):
  """Multiset of the real (mask 1) examples as bytes, plus the mask total."""
  rows = []
  for b in batches:
    keep = b['mask'] == 1
    flat = np.concatenate([b['image'][keep].reshape(keep.sum(), -1),
                           b['label'][keep][:, None].astype(np.float32)], 1)
    rows.extend(map(bytes, flat))
  return sorted(rows)


def test_eval_counts_every_example_once_with_padding(data_dir, splits):
  config = make_config(data_dir, **{'preprocess.image_size': 8,
                                    'preprocess.value_range': (0.0, 255.0)})
  batches = list(pipeline.eval_iterator(config))
  assert len(batches) == 3 == pipeline.num_eval_batches(config)  # 300 / 128
  for b in batches:
    assert b['image'].shape == (128, 8, 8, 1) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == 300 and (mask[:300] == 1).all() and (mask[300:] == 0).all()
  images, labels, _ = splits['test']
  got_images = np.concatenate([b['image'] for b in batches])[:300]
  got_labels = np.concatenate([b['label'] for b in batches])[:300]
  # Eval is deterministic and in the stored order; size 8 is the identity.
  np.testing.assert_array_equal(got_images, images.astype(np.float32))
  np.testing.assert_array_equal(got_labels, labels)
  assert_batches_equal(batches, list(pipeline.eval_iterator(config)))


def test_eval_two_processes_split_the_work(data_dir):
  config = make_config(data_dir, eval_batch_size=64)
  single = list(pipeline.eval_iterator(config))
  shares = [list(pipeline.eval_iterator(config, process_index=i,
                                        process_count=2)) for i in range(2)]
  # Same number of batches on both processes (collectives stay in lockstep).
  assert len(shares[0]) == len(shares[1]) == pipeline.num_eval_batches(
      config, process_count=2)
  assert all(b['image'].shape[0] == 32 for s in shares for b in s)
  assert [sum(b['mask'].sum() for b in s) for s in shares] == [150, 150]
  assert _eval_rows(shares[0] + shares[1]) == _eval_rows(single)


def test_eval_padding_when_shares_differ(data_dir):
  # 'test[:7]' split over 2 processes: 4 + 3 examples, batches of 2 -> both
  # processes yield 2 batches; the second has 1 (or 2) padding rows.
  config = make_config(data_dir, eval_batch_size=4,
                       **{'dataset.eval_split': 'test[:7]'})
  shares = [list(pipeline.eval_iterator(config, process_index=i,
                                        process_count=2)) for i in range(2)]
  assert [len(s) for s in shares] == [2, 2]
  assert [sum(b['mask'].sum() for b in s) for s in shares] == [4, 3]


# ------------------------------------------- a "real" dataset from data_dir --


class RgbShapesForTest(tfds.core.GeneratorBasedBuilder,
                       skip_registration=True):
  """Variable-size RGB JPEGs: stands in for a dataset prepared with `tfds build`."""

  name = 'rgb_shapes_for_test'
  VERSION = tfds.core.Version('2.0.0')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'picture': tfds.features.Image(shape=(None, None, 3),
                                           encoding_format='jpeg'),
            'kind': tfds.features.ClassLabel(num_classes=3),
        }))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, 13),
            'validation': self._generate_examples(1, 7)}

  def _generate_examples(self, seed, n):
    rng = np.random.RandomState(seed)
    for i in range(n):
      h, w = rng.randint(10, 40, size=2)
      image = rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
      yield i, {'picture': image, 'kind': i % 3}


@pytest.fixture(scope='module')
def rgb_data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('rgb')
  builder = RgbShapesForTest(data_dir=str(path))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return path


def test_prepared_tfds_dataset_through_the_same_pipeline(rgb_data_dir):
  # The builder class is not registered: TFDS reads it from data_dir alone,
  # like any dataset prepared elsewhere.
  config = make_config(rgb_data_dir, batch_size=4, eval_batch_size=4, **{
      'dataset.name': 'rgb_shapes_for_test', 'dataset.eval_split': 'validation',
      'dataset.image_key': 'picture', 'dataset.label_key': 'kind',
      'dataset.cache': False, 'preprocess.image_size': 24,
      'preprocess.num_channels': 3, 'preprocess.train_crop': 'random_resized',
      'preprocess.crop_scale': (0.08, 1.0), 'preprocess.flip': True,
      'preprocess.eval_crop_fraction': 0.875})
  assert pipeline.num_classes(config.dataset) == 3
  assert pipeline.num_examples(config.dataset, 'train') == 13
  train = take(pipeline.train_iterator(config), 5)  # Several epochs.
  assert train[0]['image'].shape == (4, 24, 24, 3)
  assert train[0]['labels'].shape == (4, 3)
  assert_batches_equal(train[3:], take(
      pipeline.train_iterator(config, start_step=3), 2))
  evals = list(pipeline.eval_iterator(config))
  assert len(evals) == 2 and evals[0]['image'].shape == (4, 24, 24, 3)
  assert sum(b['mask'].sum() for b in evals) == 7
  # RGB data, grayscale model.
  config.preprocess.num_channels = 1
  assert next(pipeline.train_iterator(config))['image'].shape == (4, 24, 24, 1)
