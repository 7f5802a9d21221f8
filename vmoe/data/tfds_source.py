"""The TFDS data source: prepared TFDS datasets read with tf.data.

One code path serves the embedded `digits` dataset (`vmoe.data.digits`, built on
first use from data shipped with scikit-learn) and any prepared TFDS dataset
(`cifar10`, `imagenet2012`, `imagenet21k`, `oxford_iiit_pet`, ...) read from a
user-supplied `data_dir`. Nothing here ever touches the network unless
`config.dataset.download=True`. TensorFlow is imported by this module and
the modules it uses (`tf_ops`, `randaug_tf`, the `digits` builder) only.

Training stream (per process; b = local batch size = batch_size // process_count):

  raw records of this process's share of the split (files in stored order,
  images left encoded)
    -> cache (optional)
    -> per epoch e: shuffle with a seed derived from (seed, process, e)
       and number the records: position = e * n + i  (n = records in the share)
    -> skip to position start_step * b (whole epochs are jumped over for free,
       only records within the current epoch are read and dropped; nothing
       skipped is decoded)
    -> decode + augment, random ops stateless and seeded by (seed, process,
       position)
    -> batch(b) -> mixup (stateless, seeded by (seed, process, batch index))
    -> prefetch

so the batch stream is a function of (config, process_index, process_count)
only, and `train_iterator(config, start_step=n)` yields bit-identical batches to
the n-th batch onwards of a fresh iterator. Changing `process_count` or the
dataset changes the stream. Batch shapes: `vmoe.data.pipeline`.
"""

import contextlib
import io
import os
import re
from typing import Iterator

# Keep TensorFlow quiet and off accelerators; must happen before TF is imported.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from vmoe.config import first_line  # pylint: disable=g-import-not-at-top
from vmoe.data import base  # pylint: disable=g-import-not-at-top
from vmoe.data import embedded  # pylint: disable=g-import-not-at-top
from vmoe.data import tf_ops  # pylint: disable=g-import-not-at-top
from vmoe.data.base import DataError, DatasetNotFoundError  # pylint: disable=g-import-not-at-top

try:  # The input pipeline runs on the host CPU; JAX owns any accelerator.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
except (RuntimeError, ValueError):  # Devices already initialised / no TPU type.
  pass
tf.get_logger().setLevel('ERROR')

EMBEDDED_DATASETS = tuple(embedded.EMBEDDED)

_BUILDERS: dict[tuple[str, str | None], tfds.core.DatasetBuilder] = {}

# Reading the record framing of a shard stops after this many seconds (the
# up-front check of large datasets is then partial).
_FRAMING_CHECK_SECONDS = 10.0
# Looking for the unreadable file after a read error stops after this long.
_LOCATE_SECONDS = 120.0


@contextlib.contextmanager
def _quiet():
  """Silences TFDS prints, progress bars and absl warnings inside the block."""
  verbosity = absl_logging.get_verbosity()
  progress = getattr(tfds.core.utils.tqdm_utils, '_active', True)
  absl_logging.set_verbosity(absl_logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.display_progress_bar(progress)
    absl_logging.set_verbosity(verbosity)


def _is_prepared(builder) -> bool:
  with _quiet():  # TFDS warns about every missing dataset_info.json.
    return builder.is_prepared()


def _data_dir(dataset_cfg) -> str | None:
  data_dir = dataset_cfg.get('data_dir', None)
  return os.path.expanduser(data_dir) if data_dir else None


def _base_name(name: str) -> str:
  """'digits:1.0.0' -> 'digits', 'cifar10/config' -> 'cifar10'."""
  return name.split(':')[0].split('/')[0]


@contextlib.contextmanager
def _build_lock(data_dir: str | None, name: str):
  """Serialises the first build of an embedded dataset between processes."""
  if not data_dir or '://' in data_dir:
    yield
    return
  import fcntl  # pylint: disable=g-import-not-at-top
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f'.{name}.build.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _check_data_dir(data_dir: str | None, *, create: bool) -> None:
  """A local data_dir must be a directory (created for embedded datasets)."""
  if not data_dir or '://' in data_dir:
    return
  field = f'config.dataset.data_dir={data_dir!r}'
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(f'{field} is a file, not a directory')
  if create:
    try:
      os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
      raise DataError(f'{field} cannot be created: {e.strerror}') from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
      raise DataError(f'{field} is not writable (the embedded dataset is '
                      'built there on first use)')


def prepare_dataset(dataset_cfg) -> tfds.core.DatasetBuilder:
  """Returns the prepared TFDS builder for `dataset_cfg.name` in its data_dir.

  The embedded `digits` is built on first use (no network, a few seconds).
  Any other dataset must already be prepared in `dataset_cfg.data_dir` unless
  `dataset_cfg.download` is True; otherwise this fails at once.

  Raises:
    DatasetNotFoundError: unknown name, or not prepared and download is off.
  """
  name = dataset_cfg.name
  if not isinstance(name, str) or not name:
    raise DataError(f'config.dataset.name={name!r} must be a dataset name')
  data_dir = _data_dir(dataset_cfg)
  key = (name, data_dir)
  if key in _BUILDERS:
    return _BUILDERS[key]
  embedded = _base_name(name) in EMBEDDED_DATASETS
  _check_data_dir(data_dir, create=embedded)
  if embedded:
    from vmoe.data import digits  # pylint: disable=g-import-not-at-top,unused-import
  try:
    with _quiet():
      builder = tfds.builder(name, data_dir=data_dir)
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(
        f'Cannot load dataset config.dataset.name={name!r} (neither a known '
        f'TFDS builder nor prepared in data_dir={data_dir!r}): '
        f'{first_line(e)}') from None
  if not _is_prepared(builder):
    if embedded:
      with _build_lock(data_dir, _base_name(name)):
        with _quiet():
          builder = tfds.builder(name, data_dir=data_dir)
        if not _is_prepared(builder):
          absl_logging.info('Preparing %s into %s', name, builder.data_dir)
          try:
            with _quiet():
              builder.download_and_prepare(
                  download_config=tfds.download.DownloadConfig(
                      try_download_gcs=False))
          except OSError as e:
            raise DataError(
                f'cannot build dataset {name!r} in config.dataset.data_dir='
                f'{data_dir!r}: {first_line(e)}') from None
    elif dataset_cfg.get('download', False):
      absl_logging.info('Downloading and preparing %s into %s', name,
                   builder.data_dir)
      builder.download_and_prepare()
    else:
      shown_dir = data_dir or os.fspath(builder.data_dir_root)
      manual = ''
      if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):
        manual = (f' (it needs source files placed by hand in '
                  f'{os.path.join(shown_dir, "downloads", "manual")}, see its '
                  f'TFDS catalog page)')
      raise DatasetNotFoundError(
          f'Dataset {name!r} is not prepared in data_dir={shown_dir!r} '
          f'(looked for {builder.data_dir}); prepare it with '
          f'`tfds build {name} --data_dir={shown_dir}`{manual} or set '
          f'--config.dataset.download=True to let TFDS download it.')
  _BUILDERS[key] = builder
  return builder


def _split_info(builder, split, field: str):
  if split is None or split == '':
    raise DataError(f'{field}={split!r} must be a split name such as '
                    f'{next(iter(builder.info.splits.keys()), "train")!r}')
  try:
    return builder.info.splits[split]
  except (KeyError, ValueError, TypeError, AssertionError) as e:
    raise DataError(
        f'{field}={split!r} is not a split of dataset {builder.info.name!r} '
        f'(splits: {", ".join(builder.info.splits.keys())}): '
        f'{first_line(e)}') from None


def num_examples(dataset_cfg, split: str) -> int:
  """Number of examples in `split` (any TFDS split expression, e.g. 'train[:90%]')."""
  builder = prepare_dataset(dataset_cfg)
  return _split_info(builder, split, 'split').num_examples


def num_classes(dataset_cfg) -> int:
  """Number of classes K of the ClassLabel feature `dataset_cfg.label_key`."""
  builder = prepare_dataset(dataset_cfg)
  label_key = dataset_cfg.get('label_key', 'label')
  features = builder.info.features
  feature = features[label_key] if label_key in features.keys() else None
  if not isinstance(feature, tfds.features.ClassLabel):
    raise DataError(
        f'config.dataset.label_key={label_key!r} is not a ClassLabel feature '
        f'of {builder.info.name!r} (features: '
        f'{", ".join(builder.info.features.keys())})')
  return feature.num_classes


def _split_files(builder, split, field: str) -> list[tuple[str, int]]:
  """(path, records in the file) of every file `split` reads, in order."""
  info = _split_info(builder, split, field)
  files = {}
  for instruction in info.file_instructions:
    files[os.fspath(instruction.filename)] = instruction.examples_in_shard
  return list(files.items())


def _framing_error(path: str, num_records: int, deadline: float) -> str | None:
  """Why `path` is not a TFRecord file of `num_records` records, or None.

  Walks the 12-byte record headers (length + its CRC) and seeks over the
  data, so a truncated, cut or padded file is found without reading it;
  data CRCs are only checked when the records are read. Gives up (None) at
  `deadline` (time.monotonic()).
  """
  import struct  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  size = os.path.getsize(path)
  offset = count = 0
  with open(path, 'rb') as f:
    while offset < size:
      if count % 4096 == 0 and time.monotonic() > deadline:
        return None
      header = f.read(12)
      if len(header) < 12:
        return f'is truncated: a record header ends the file at byte {offset}'
      (length,) = struct.unpack('<Q', header[:8])
      end = offset + 12 + length + 4
      if end > size:
        return (f'is truncated or corrupted: record {count} at byte {offset} '
                f'claims {length} bytes, the file has {size}')
      f.seek(end)
      offset, count = end, count + 1
  if count != num_records:
    return f'holds {count} records, dataset_info.json says {num_records}'
  return None


def _check_files(builder, split, field: str) -> None:
  """Every file of `split` is present, and its framing is intact."""
  import time  # pylint: disable=g-import-not-at-top
  fmt = getattr(builder.info, 'file_format', None)
  tfrecord = getattr(fmt, 'value', fmt) in (None, 'tfrecord')
  deadline = time.monotonic() + _FRAMING_CHECK_SECONDS
  for path, num_records in _split_files(builder, split, field):
    if '://' in path:
      continue
    if not os.path.isfile(path):
      raise DataError(f'{field}={split!r} of dataset {builder.info.name!r} '
                      f'cannot be read: file {path} is missing')
    why = _framing_error(path, num_records, deadline) if tfrecord else None
    if why:
      raise DataError(f'{field}={split!r}: file {path} {why}')


def check_data(config, *, process_count: int = 1) -> None:
  """Every dataset error that can be known before training, in one line.

  The dataset is prepared (the embedded `digits` is built on first use);
  train and eval splits exist, are non-empty for every process and all their
  files are present with intact framing; the image and label features exist;
  config.preprocess is valid; the batch sizes divide over the processes.

  Raises:
    DataError (DatasetNotFoundError for a dataset that is not prepared).
  """
  dcfg = config.dataset
  base.check_preprocess(config.preprocess)
  base.local_batch(config.batch_size, process_count, 'config.batch_size')
  base.local_batch(config.eval_batch_size, process_count,
               'config.eval_batch_size')
  builder = prepare_dataset(dcfg)
  num_classes(dcfg)
  _image_feature(builder, dcfg.get('image_key', 'image'))
  for field, split in (('config.dataset.train_split', dcfg.train_split),
                       ('config.dataset.eval_split', dcfg.eval_split)):
    if _split_info(builder, split, field).num_examples == 0:
      raise DataError(f'{field}={split!r} has no examples')
    _check_files(builder, split, field)
  for index in range(process_count):
    share = tfds.split_for_jax_process(
        dcfg.train_split, process_index=index, process_count=process_count)
    if _split_info(builder, share,
                   'config.dataset.train_split').num_examples == 0:
      raise DataError(
          f'config.dataset.train_split={dcfg.train_split!r} has no examples '
          f'for process {index} of {process_count}')


def _tf_error_text(e: Exception) -> str:
  """The informative part of a tf.errors.OpError message, on one line."""
  text = ' '.join(str(getattr(e, 'message', e)).split())
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text)
  return text.strip() or type(e).__name__


def _unreadable_file(files: list[str]) -> tuple[str, str] | None:
  """(path, error) of the first TFRecord file in `files` that fails to read."""
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + _LOCATE_SECONDS
  for path in files:
    if '://' not in path and not os.path.isfile(path):
      return path, 'the file is missing'
    try:
      ds = tf.data.TFRecordDataset(path).batch(1024)
      for _ in ds:
        if time.monotonic() > deadline:
          return None
    except tf.errors.OpError as e:
      return path, _tf_error_text(e)
  return None


def _read_error(builder, split, field: str, e: Exception) -> DataError:
  """A one-line DataError for a TF error met while reading `split`."""
  files = [p for p, _ in _split_files(builder, split, field)]
  found = _unreadable_file(files) if isinstance(
      e, (tf.errors.DataLossError, tf.errors.NotFoundError,
          tf.errors.OutOfRangeError)) else None
  if found:
    path, why = found
    return DataError(f'{field}={split!r}: cannot read {path}: {why}')
  return DataError(f'{field}={split!r} of dataset {builder.info.name!r} '
                   f'cannot be read ({_tf_error_text(e)})')


def _image_feature(builder, image_key: str):
  features = builder.info.features
  if not isinstance(image_key, str) or image_key not in features.keys():
    raise DataError(
        f'config.dataset.image_key={image_key!r} is not a feature of '
        f'{builder.info.name!r} (features: {", ".join(features.keys())})')
  return features[image_key]


def _read_split(builder, split, dataset_cfg):
  """Raw records {image_key: encoded bytes or uint8 image, label_key: int}.

  Files are read in a fixed order (no seeded file shuffling: TF's global seed
  would leak into it). Only the image and label features are parsed; images
  stay encoded so that records skipped on resume are never decoded.
  """
  image_key = dataset_cfg.get('image_key', 'image')
  label_key = dataset_cfg.get('label_key', 'label')
  feature = _image_feature(builder, image_key)
  decoders = None
  if isinstance(feature, tfds.features.Image):
    decoders = {image_key: tfds.decode.SkipDecoding()}
  read_config = tfds.ReadConfig(
      try_autocache=False,  # Caching is config.dataset.cache's decision.
      skip_prefetch=True,
  )
  with _quiet():
    ds = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding(
            {image_key: True, label_key: True}, decoders=decoders),
        read_config=read_config)
  return ds.map(lambda x: {'image': x[image_key], 'label': x[label_key]},
                num_parallel_calls=tf.data.AUTOTUNE)


def eval_image_tf(image, pp) -> np.ndarray:
  """Encoded image bytes (JPEG/PNG/...) or a uint8 [h, w, c] array -> float32
  [S, S, C] preprocessed exactly as the eval split (decode, resize the short
  side, central crop, value_range); pp: config.preprocess."""
  base.check_preprocess(pp)
  image = tf_ops.eval_image(
      tf_ops.decode(tf.convert_to_tensor(image), pp.num_channels), pp)
  return tf_ops.normalise(image, pp.value_range).numpy()


def _as_numpy(ds, builder, split, field: str
              ) -> Iterator[dict[str, np.ndarray]]:
  """Batches of `ds` as numpy; a read error becomes a one-line DataError."""
  iterator = iter(ds.as_numpy_iterator())
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      raise _read_error(builder, split, field, e) from None
    yield batch


def train_iterator(config, *, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over this process's training batches from `start_step`.

  Yields {'image': float32 [b, S, S, C] in config.preprocess.value_range,
  'labels': float32 [b, K] one-hot (mixed up if mixup_alpha > 0)} with
  b = config.batch_size // process_count. The stream is a deterministic
  function of the config (seed, data, preprocessing) and process index/count;
  starting at `start_step` = n gives exactly batches n, n+1, ... of the stream.
  """
  b = base.stream_batch(config, 'batch_size', process_index, process_count,
                        start_step)
  dcfg, pp = config.dataset, config.preprocess
  seed = int(config.seed)
  builder = prepare_dataset(dcfg)
  k = num_classes(dcfg)
  split = tfds.split_for_jax_process(
      dcfg.train_split, process_index=process_index,
      process_count=process_count)
  n = _split_info(builder, split, 'config.dataset.train_split').num_examples
  if n == 0:
    raise ValueError(f'config.dataset.train_split={dcfg.train_split!r} has no '
                     f'examples for process {process_index}/{process_count}')

  # Files are read in their stored order (TFDS already wrote the examples in a
  # hashed, class-mixed order); the randomness is the per-epoch shuffle below.
  records = _read_split(builder, split, dcfg)
  if dcfg.get('cache', False):
    records = records.cache()
  buffer = max(1, min(int(dcfg.get('shuffle_buffer', 10_000)), n))
  shuffle_key = tf_ops.base_key(seed, process_index, base.SHUFFLE)

  def epoch(e):
    """Records of epoch e, shuffled with a seed that depends on e only."""
    # Keep TF's global seed (if anyone set it) out of the shuffle's seeds; this
    # only affects the graph of this function.
    tf.compat.v1.set_random_seed(None)
    shuffle_seed = tf.random.stateless_uniform(
        [], seed=tf.random.experimental.stateless_fold_in(shuffle_key, e),
        minval=0, maxval=2**31 - 1, dtype=tf.int64)
    shuffled = records.shuffle(buffer, seed=shuffle_seed,
                               reshuffle_each_iteration=False)
    positions = tf.data.Dataset.range(e * n, (e + 1) * n)
    return tf.data.Dataset.zip(positions, shuffled)

  first_epoch, offset = divmod(start_step * b, n)
  ds = tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(offset)

  augment_key = tf_ops.base_key(seed, process_index, base.AUGMENT)

  def preprocess(position, record):
    key = tf.random.experimental.stateless_fold_in(augment_key, position)
    image = tf_ops.train_image(tf_ops.decode(record['image'], pp.num_channels), key, pp)
    return {
        'image': tf_ops.normalise(image, pp.value_range),
        'labels': tf.one_hot(record['label'], k, dtype=tf.float32),
        'position': position,
    }

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(b, drop_remainder=True)

  alpha = float(pp.get('mixup_alpha', 0.0))
  mixup_key = tf_ops.base_key(seed, process_index, base.MIXUP)

  def finish(batch):
    position = batch.pop('position')
    if alpha > 0:
      key = tf.random.experimental.stateless_fold_in(mixup_key,
                                                     position[0] // b)
      batch = tf_ops.mixup(batch, key, alpha)
    return batch

  ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(tf_ops.options())
  return _as_numpy(ds, builder, dcfg.train_split, 'config.dataset.train_split')


def _eval_shares(builder, split, process_count: int):
  shares = tfds.even_splits(split, n=process_count)
  sizes = [_split_info(builder, s, 'config.dataset.eval_split').num_examples
           for s in shares]
  return shares, sizes


def num_eval_batches(config, *, process_count: int = 1) -> int:
  """Batches per process of `eval_iterator` (the same on every process)."""
  b = base.local_batch(config.eval_batch_size, process_count,
                   'config.eval_batch_size')
  builder = prepare_dataset(config.dataset)
  _, sizes = _eval_shares(builder, config.dataset.eval_split, process_count)
  return max(1, -(-max(sizes) // b))


def eval_iterator(config, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's share of config.dataset.eval_split.

  Yields {'image': float32 [b, S, S, C], 'label': int32 [b], 'mask': float32
  [b]} with b = config.eval_batch_size // process_count, in a fixed order.
  Padding examples (mask 0, zero image, label 0) fill the last batch, and every
  process yields the same number of batches (`num_eval_batches`) so that
  collective evaluation steps stay in lockstep; each real example appears
  exactly once across all processes.
  """
  b = base.stream_batch(config, 'eval_batch_size', process_index,
                        process_count)
  dcfg, pp = config.dataset, config.preprocess
  builder = prepare_dataset(dcfg)
  shares, sizes = _eval_shares(builder, dcfg.eval_split, process_count)
  steps = max(1, -(-max(sizes) // b))
  num_pad = steps * b - sizes[process_index]

  def preprocess(record):
    image = tf_ops.eval_image(tf_ops.decode(record['image'], pp.num_channels), pp)
    return {
        'image': tf_ops.normalise(image, pp.value_range),
        'label': tf.cast(record['label'], tf.int32),
        'mask': tf.constant(1.0, tf.float32),
    }

  ds = _read_split(builder, shares[process_index], dcfg)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  s, c = pp.image_size, pp.num_channels
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([s, s, c], tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(0.0, tf.float32),
  }).repeat(num_pad)
  ds = ds.concatenate(padding).batch(b, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(tf_ops.options())
  return _as_numpy(ds, builder, dcfg.eval_split, 'config.dataset.eval_split')


class TfdsSource(base.Source):
  """A prepared TFDS dataset (`config.dataset.name` in `data_dir`)."""

  FIELDS = ('download', 'cache', 'shuffle_buffer', 'image_key',
            'label_key')

  def prepare(self) -> None:
    prepare_dataset(self.dataset_cfg)

  def num_classes(self) -> int:
    return num_classes(self.dataset_cfg)

  def num_examples(self, split: str) -> int:
    return num_examples(self.dataset_cfg, split)

  def label_names(self) -> list[str] | None:
    builder = prepare_dataset(self.dataset_cfg)
    feature = builder.info.features[self.dataset_cfg.get('label_key',
                                                         'label')]
    return list(feature.names) if hasattr(feature, 'names') else None

  def check(self, config, *, process_count: int) -> None:
    check_data(config, process_count=process_count)

  def train_iterator(self, config, *, start_step: int, process_index: int,
                     process_count: int):
    return train_iterator(config, start_step=start_step,
                          process_index=process_index,
                          process_count=process_count)

  def num_eval_batches(self, config, *, process_count: int) -> int:
    return num_eval_batches(config, process_count=process_count)

  def eval_iterator(self, config, *, process_index: int,
                    process_count: int):
    return eval_iterator(config, process_index=process_index,
                         process_count=process_count)
