r"""Classify images with a trained or imported model: top-k classes, routing.

  python -m vmoe.predict --workdir=/tmp/vmoe_b16_digits img1.png img2.jpg
  python -m vmoe.predict --checkpoint=/ckpts/ViT-B_16.npz \
      --config=configs/finetune/vit_b16_cifar10.py img.jpg
  python -m vmoe.predict --workdir=... --routing img.png

With --workdir the config is the one the run's newest checkpoint records
(config.json for older checkpoints; a --config that differs from it in a
field that defines the run is refused) and the checkpoint the newest that
restores and verifies, as the trainer's resume finds it (corrupt ones skipped
with a warning, ones that a running training deletes meanwhile in silence);
with --checkpoint (any format of `vmoe.checkpoints`: a big_vision /
vit_jax .npz, a vmoe prefix, a workdir of ours) the model and preprocessing
come from --config. The number of classes is that of the checkpoint's head.
Images (any format TensorFlow decodes: JPEG, PNG, GIF, BMP) are preprocessed
as the eval split (`vmoe.data.pipeline`). Class names come from the TFDS
dataset info of config.dataset when TFDS knows the dataset, label indices
otherwise.

--routing prints, for every MoE block and image, the share of the image's
tokens each expert processes (token and expert choice: assignments per
token; Soft MoE: combine-weight mass) and the share of tokens no expert
processed. Routing groups tokens of group_size / tokens-per-image images: the
batch is padded with black images to fill whole groups, and like at
evaluation an image's routing can depend on the other images of its group.
"""

from __future__ import annotations

import math
import os
import sys
import types

from absl import app
from absl import flags
from absl import logging
import numpy as np

from vmoe import config_flag


def define_flags() -> types.SimpleNamespace:
  """Defines the command's flags. Only `python -m vmoe.predict` calls it, so
  that importing the library defines no absl flags (they are global)."""
  return types.SimpleNamespace(
      workdir=flags.DEFINE_string('workdir', None, 'Training workdir to use.'),
      checkpoint=flags.DEFINE_string(
          'checkpoint', None,
          'Checkpoint path (with --config instead of --workdir).'),
      format=flags.DEFINE_enum('format', 'auto',
                               ['auto', 'ours', 'big_vision', 'vmoe'],
                               'Format of --checkpoint.'),
      config=config_flag.define_config_flag(
          'config', 'Config describing the model of --checkpoint.'),
      top=flags.DEFINE_integer('top', 5, 'Classes printed per image.'),
      routing=flags.DEFINE_bool(
          'routing', False, "Print each MoE layer's expert use per image."))


class PredictError(ValueError):
  """Bad arguments or inputs (one-line message)."""


def class_names(config, num_classes: int) -> list[str] | None:
  """Label names of config.dataset, None when the data has none. For TFDS,
  from the builder's info where TFDS knows the dataset (it needs no prepared
  data for the datasets TFDS defines)."""
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  if config.dataset.get('source', 'tfds') != 'tfds':
    try:
      names = pipeline.label_names(config.dataset)
    except pipeline.DataError:
      return None
    return names if names and len(names) == num_classes else None
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None  # without TFDS: indices
  name = config.dataset.name
  if name.split(':')[0].split('/')[0] in pipeline.EMBEDDED_DATASETS:
    from vmoe.data import digits  # pylint: disable=g-import-not-at-top,unused-import
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      builder = tfds.builder(name, data_dir=config.dataset.get('data_dir'))
      names = list(builder.info.features[
          config.dataset.get('label_key', 'label')].names)
  except Exception:  # pylint: disable=broad-except
    return None  # unknown dataset or no ClassLabel: indices it is
  finally:
    logging.set_verbosity(verbosity)
  return names if len(names) == num_classes else None


def load_images(paths: list[str], preprocess) -> np.ndarray:
  """Files -> float32 [b, S, S, C] preprocessed as the eval split."""
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  images = []
  for path in paths:
    if not os.path.isfile(path):
      raise PredictError(f'image {path!r} does not exist')
    with open(path, 'rb') as f:
      data = f.read()
    try:
      images.append(pipeline.eval_image(data, preprocess))
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise
      raise PredictError(f'cannot read image {path!r}: '
                         f'{str(e).splitlines()[0][:200]}') from None
  return np.stack(images)


def build_model(config, source):
  """The model of `config` with the source's parameters (classes from its
  head)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vmoe import checkpoints  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  if 'head/bias' not in source.params:
    raise PredictError(f'{source.describe()} has no classification head')
  num_classes = int(source.params['head/bias'].shape[0])
  abstract = nnx.eval_shape(lambda: vit.create_model(
      vit.unscanned_config(config.model), num_classes=num_classes,
      image_size=config.preprocess.image_size,
      num_channels=config.preprocess.num_channels, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  values = checkpoints.import_params(source, nnx.to_pure_dict(params))
  nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, values))
  return nnx.merge(graphdef, params, rest), num_classes


def images_per_batch(model, num_images: int, tokens_per_image: int) -> int:
  """Smallest batch >= num_images whose tokens split into whole groups."""
  from vmoe.nn import moe  # pylint: disable=g-import-not-at-top
  step = 1
  for layer in moe.moe_layers(model).values():
    s = layer.group_size or tokens_per_image
    step = math.lcm(step, s // math.gcd(s, tokens_per_image))
  return -(-num_images // step) * step


def expert_use(captured, num_images: int, tokens_per_image: int):
  """{block: ([b, e] share of each image's tokens per expert, [b] dropped
  share)} from `moe.capture_routing`'s decisions."""
  import jax  # pylint: disable=g-import-not-at-top
  from vmoe.nn import routing as rt  # pylint: disable=g-import-not-at-top
  out = {}
  n = tokens_per_image
  for block, cap in captured.items():
    r = jax.device_get(cap.decision)
    s = cap.group_size
    if isinstance(r, rt.TokenChoiceRouting):
      e = r.num_experts
      counts = np.zeros((num_images * n, e))
      index = np.asarray(r.expert_index).reshape(-1, r.expert_index.shape[-1])
      valid = np.asarray(r.valid).reshape(index.shape)
      tokens = np.arange(index.shape[0])
      for k in range(index.shape[1]):
        keep = valid[:, k] & (tokens < num_images * n)
        np.add.at(counts, (tokens[keep], index[keep, k]), 1.0)
      hit = counts.sum(-1) > 0
    elif isinstance(r, rt.ExpertChoiceRouting):
      g, e, c = r.token_index.shape
      tok = (np.asarray(r.token_index) + (np.arange(g) * s)[:, None, None])
      counts = np.zeros((g * s, e))
      np.add.at(counts, (tok.reshape(-1),
                         np.tile(np.repeat(np.arange(e), c), g)), 1.0)
      counts = counts[:num_images * n]
      hit = counts.sum(-1) > 0
    elif isinstance(r, rt.SoftRouting):
      # Combine weights [g, s, e * p] summed over each expert's p slots.
      w = np.asarray(jax.nn.softmax(r.logits, axis=-1))
      counts = w.reshape(-1, r.num_experts, r.capacity).sum(-1)
      counts = counts[:num_images * n]
      hit = np.ones(counts.shape[0], bool)  # Soft MoE drops no token
    else:
      continue
    per_image = counts.reshape(num_images, n, -1).mean(axis=1)
    dropped = 1.0 - hit.reshape(num_images, n).mean(axis=1)
    out[block] = (per_image, dropped)
  return out


def predict(config, source, image_paths: list[str], *, top: int = 5,
            routing: bool = False) -> str:
  """The report printed by the CLI."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vmoe.nn import moe  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  model, num_classes = build_model(config, source)
  names = class_names(config, num_classes)
  images = load_images(image_paths, config.preprocess)
  n = vit.num_tokens(config.model, config.preprocess.image_size)
  b = images_per_batch(model, len(images), n)
  black = float(config.preprocess.value_range[0])
  batch = np.concatenate(
      [images, np.full((b - len(images),) + images.shape[1:], black,
                       images.dtype)])
  if routing:
    logits, _, captured = moe.capture_routing(model, batch)
    use = expert_use(captured, len(images), n)
  else:
    graphdef, state = nnx.split(model)
    logits, _ = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, batch)
    use = {}
  probs = np.asarray(jax.nn.softmax(np.asarray(logits[:len(images)],
                                               np.float32), axis=-1))
  lines = []
  for i, path in enumerate(image_paths):
    lines.append(path)
    for c in np.argsort(-probs[i], kind='stable')[:min(top, num_classes)]:
      if not names:
        label = f'class {c}'
      else:
        label = names[c] if names[c] == str(c) else f'{names[c]} ({c})'
      lines.append(f'  {probs[i, c]:7.2%}  {label}')
    for block, (per_image, dropped) in sorted(use.items()):
      layer = moe.routed_layer(model.blocks[block].mlp)
      shares = ' '.join(f'{v:.2f}' for v in per_image[i])
      lines.append(f'  block {block} ({layer.router_type}, '
                   f'{per_image.shape[1]} experts): expert use [{shares}], '
                   f'dropped {dropped[i]:.2f}')
  return '\n'.join(lines)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def workdir_run_config(workdir: str, given):
  """The config to predict a workdir's model with: the one its newest
  checkpoint records (config.json for older ones), or `given` (--config) if
  it matches that in every field that defines the run."""
  from vmoe import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vmoe.checkpoints import ours  # pylint: disable=g-import-not-at-top
  stored, where = ours.recorded_config(workdir)
  if stored is None:
    if given is None:
      raise PredictError(f'--workdir={workdir!r} records no config (no '
                         'config.json either); pass --config')
    return given
  if given is None:
    return workdir_lib.as_config(stored)
  changes = workdir_lib.config_differences(given, stored)
  if changes:
    raise PredictError(
        f'{changes}: --config is not the config the run in --workdir='
        f'{workdir} was trained with ({where}); only vmoe.workdir.'
        'RESUME_CHANGEABLE fields may differ: omit --config to use the run\'s')
  return given


def main(argv, f: types.SimpleNamespace):
  """The command: argv = the image files after the flags; f: `define_flags`."""
  images = argv[1:]
  if not images:
    _fail('give one or more image files to classify')
  if bool(f.workdir.value) == bool(f.checkpoint.value):
    _fail('give exactly one of --workdir or --checkpoint (with --config)')
  if f.top.value < 1:
    _fail(f'--top={f.top.value} must be an integer >= 1')
  for image in images:  # before reading a (possibly large) checkpoint
    if not os.path.isfile(image):
      _fail(f'image {image!r} does not exist or is not a file')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  logging.set_verbosity(logging.WARNING)  # orbax and TFDS chatter
  from vmoe import checkpoints  # pylint: disable=g-import-not-at-top
  from vmoe.train import config_validation  # pylint: disable=g-import-not-at-top
  from vmoe import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    config = config_flag.config_value(f.config)
    if f.workdir.value:
      # Fails (creating nothing) on a workdir without checkpoints.
      checkpoints.check_format(f.workdir.value, 'ours')
      config = workdir_run_config(f.workdir.value, config)
    elif config is None:
      _fail('--checkpoint needs --config (the model and preprocessing)')
    # The model's fields (a checkpoint it was fine-tuned from is not read).
    config_validation.validate_config(config, resuming=True)
    if f.workdir.value:
      # The newest checkpoint that restores and verifies (a training run
      # may be deleting and adding checkpoints meanwhile).
      source = checkpoints.read(f.workdir.value, 'ours')
    else:
      source = checkpoints.read(f.checkpoint.value, f.format.value)
    print(predict(config, source, images, top=f.top.value,
                  routing=f.routing.value))
  except (checkpoints.CheckpointError, PredictError,
          workdir_lib.WorkdirError, config_validation.ConfigError) as e:
    _fail(str(e))


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags),
          flags_parser=config_flag.parse_flags)
