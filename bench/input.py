"""Input throughput: images/s per host core of each data source.

    python -m bench.input              # 2000 JPEGs of 500x375, ImageNet recipe
    python -m bench.input --quick      # 800 JPEGs

Synthesises ImageNet-like JPEGs (500x375 RGB, smooth random content, quality
90, 10 classes) into a temporary folder, then times the training stream of
each source under the paper recipe: Inception crop to 224 (area 5%-100%),
flip, RandAugment(2, 15), mixup 0.2, values in [-1, 1], batch 128:

  folder   the files, read with grain's threads and numpy / PIL ops
           (`config.dataset.num_workers` threads: 1 and every core)
  tfds     the same JPEGs as a prepared TFDS dataset through tf.data (TF's
           own threads, AUTOTUNE), where TensorFlow Datasets is installed
  arrays   decoded uint8 images held in memory (no JPEG decoding: the cost
           of the augmentations alone)

Each row: images/s after a warm-up batch, and per core (the rate over the
cores the source used). The last table turns that rate into the host cores
one accelerator needs to feed a V-MoE-B/16 training step, from the step's
FLOPs (`configs/vmoe_b16.py`, XLA's cost analysis of the forward pass x 3)
and an assumed MFU on the chip's bf16 peak; both are printed with the
result. Writes input.{md,csv,json} to bench/results/.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from bench import common

IMAGE_SHAPE = (375, 500, 3)
CLASSES = 10
# (chip, bf16 dense peak TFLOP/s, MFU assumed for V-MoE-B/16 training).
CHIPS = (('NVIDIA H100 SXM', 989.0, 0.40), ('TPU v5p', 459.0, 0.50))


def write_jpegs(root: str, count: int, seed: int = 0) -> None:
  """root/imagenet_like/{train,test}/class_<k>/<i>.jpg: smooth random
  images (low-frequency noise upsampled, so JPEG sizes are photo-like)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for split, n in (('train', count), ('test', max(CLASSES, count // 10))):
    for i in range(n):
      folder = os.path.join(root, 'imagenet_like', split, f'class_{i % CLASSES}')
      os.makedirs(folder, exist_ok=True)
      coarse = rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)
      image = Image.fromarray(coarse).resize(IMAGE_SHAPE[1::-1],
                                             Image.BILINEAR)
      noise = rng.integers(-12, 13, IMAGE_SHAPE)
      pixels = np.clip(np.asarray(image, np.int64) + noise, 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(
          os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def recipe_config(source: str, root: str, batch: int):
  """The ImageNet training recipe on the synthesised data."""
  from vmoe.recipes import common as recipes  # pylint: disable=g-import-not-at-top
  config = recipes.get_base_config()
  recipes.imagenet_data(config)
  config.batch_size = batch
  config.preprocess.randaug = (2, 15)
  config.preprocess.mixup_alpha = 0.2
  config.dataset.source = source
  config.dataset.name = 'imagenet_like'
  config.dataset.data_dir = root
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.shuffle_buffer = 1000 if source != 'arrays' else 10_000
  return config


def arrays_file(root: str) -> str:
  """The folder's images decoded into an .npz of the arrays source."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = {}
  for split in ('train', 'test'):
    images, labels = [], []
    base = os.path.join(root, 'imagenet_like', split)
    for k, folder in enumerate(sorted(os.listdir(base))):
      for name in sorted(os.listdir(os.path.join(base, folder))):
        with Image.open(os.path.join(base, folder, name)) as img:
          images.append(np.asarray(img.convert('RGB')))
        labels.append(k)
    out[f'{split}_image'] = np.stack(images)
    out[f'{split}_label'] = np.asarray(labels, np.int32)
  path = os.path.join(root, 'imagenet_like.npz')
  np.savez(path, **out)
  return path


def tfds_dir(root: str) -> str | None:
  """The folder as a prepared TFDS dataset (None without TFDS)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  from etils import epath  # pylint: disable=g-import-not-at-top

  class ImagenetLike(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return epath.Path(__file__)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3),
                                       encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=CLASSES)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(s) for s in ('train', 'test')}

    def _generate_examples(self, split):
      base = os.path.join(root, 'imagenet_like', split)
      for k, folder in enumerate(sorted(os.listdir(base))):
        for name in sorted(os.listdir(os.path.join(base, folder))):
          path = os.path.join(base, folder, name)
          yield path, {'image': path, 'label': k}

  data_dir = os.path.join(root, 'tfds')
  ImagenetLike(data_dir=data_dir).download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return data_dir


def time_stream(config, batches: int) -> float:
  """Images/s of the training stream, timed after two warm-up batches (the
  folder source's threads prefetch at most about one batch of examples, so
  `batches` of them are not already done when the clock starts)."""
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  stream = pipeline.train_iterator(config)
  next(stream)
  next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * config.batch_size / (time.perf_counter() - start)


def vmoe_b16_train_gflops() -> float:
  """GFLOPs of one V-MoE-B/16 training image: XLA's forward count x 3."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  config = common.load_config('vmoe_b16')
  model = nnx.eval_shape(lambda: vit.create_model(
      config.model, num_classes=1000, image_size=224, num_channels=3,
      rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=False)[0])
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jax.numpy.float32)
  cost = fwd.lower(state, x).cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return 3 * float(cost.get('flops', float('nan'))) / 1e9


def run(quick: bool = False) -> tuple[str, list[dict]]:
  count = 800 if quick else 2000
  batches = 3 if quick else 10
  batch = 128
  cores = os.cpu_count() or 1
  rows = []
  with tempfile.TemporaryDirectory() as root:
    t0 = time.perf_counter()
    write_jpegs(root, count)
    print(f'  [{count} JPEGs written in {time.perf_counter() - t0:.0f} s]',
          flush=True)
    for threads in sorted({1, cores}):
      config = recipe_config('folder', root, batch)
      config.dataset.num_workers = threads
      rate = time_stream(config, batches)
      rows.append(dict(source='folder', decode='JPEG (PIL)',
                       threads=threads, img_s=rate, img_s_per_core=rate / min(
                           threads, cores)))
      print(f'  [folder, {threads} threads: {rate:.1f} img/s]', flush=True)
    data_dir = tfds_dir(root)
    if data_dir is not None:
      config = recipe_config('tfds', data_dir, batch)
      rate = time_stream(config, batches)
      rows.append(dict(source='tfds', decode='JPEG (tf.image)',
                       threads=cores, img_s=rate,
                       img_s_per_core=rate / cores))
      print(f'  [tfds: {rate:.1f} img/s]', flush=True)
    config = recipe_config('arrays', root, batch)
    config.dataset.name = arrays_file(root)
    rate = time_stream(config, batches)
    rows.append(dict(source='arrays', decode='none (uint8 in memory)',
                     threads=1, img_s=rate, img_s_per_core=rate))
  info = common.machine_info()
  per_core = max(r['img_s_per_core'] for r in rows if r['source'] != 'arrays')
  gflops = vmoe_b16_train_gflops()
  needs = []
  for chip, peak, mfu in CHIPS:
    img_s = peak * 1e3 * mfu / gflops
    needs.append(dict(chip=chip, peak_tflops=peak, mfu=mfu,
                      train_gflops_per_image=gflops, img_s=img_s,
                      cores=img_s / per_core))
  md = '\n'.join([
      '### Input throughput (ImageNet recipe: Inception crop 224, flip, '
      'RandAugment(2, 15), mixup 0.2)', '', common.machine_line(info), '',
      f'{count} synthesised JPEGs of 500x375, batch {batch}.', '',
      common.markdown_table(rows, ['source', 'decode', 'threads', 'img_s',
                                   'img_s_per_core'],
                            ['source', 'decoding', 'threads', 'img/s',
                             'img/s per core']),
      '', '#### Host cores to feed one chip (V-MoE-B/16 training)', '',
      f'At the best decoding source\'s {per_core:.1f} img/s per core; the '
      'chip\'s img/s assumes the MFU shown on its bf16 dense peak.', '',
      common.markdown_table(needs, ['chip', 'peak_tflops', 'mfu',
                                    'train_gflops_per_image', 'img_s',
                                    'cores'],
                            ['chip', 'bf16 peak TFLOP/s', 'MFU assumed',
                             'train GFLOP/image', 'img/s', 'host cores'])])
  common.save_results('input', rows + needs, info, md)
  return md, rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  args = parser.parse_args()
  print(run(args.quick)[0])


if __name__ == '__main__':
  main()
