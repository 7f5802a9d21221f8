"""Trained models and evaluation data for the analysis functions.

  trained = load('/tmp/vmoe_b16_digits')   # newest checkpoint + its config
  batches = eval_batches(trained.config, max_examples=300)

A `Trained` holds the resolved config, the model with its parameters (a
`vmoe.nn.vit.VisionTransformer`, NNX) and the step; every analysis function
takes the model (or the trained run) and eval batches
{'image' [b, H, W, C], 'label' [b], 'mask' [b]} of `vmoe.data.pipeline`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from vmoe.checkpoints import layout
from vmoe.checkpoints import mapping
from vmoe.nn import vit
from vmoe.train import steps


@dataclasses.dataclass
class Trained:
  """A model with parameters and the config it was trained with."""
  config: ml_collections.ConfigDict
  model: vit.VisionTransformer
  step: int | None = None
  workdir: str | None = None

  @property
  def params(self) -> dict[str, Any]:
    """Parameters as a pure dict (the trainer's `state['params']`)."""
    return nnx.to_pure_dict(nnx.state(self.model, nnx.Param))

  @property
  def num_classes(self) -> int:
    return int(self.model.head.kernel.shape[-1])


def unscanned(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the model in the unscanned layout, without remat (the
  same function; the analysis hooks address `model.blocks[i]`)."""
  if not config.model.get('scan_layers') and config.model.get(
      'remat', 'none') == 'none':
    return config
  out = ml_collections.ConfigDict(config.to_dict())
  out.model = vit.unscanned_config(config.model)
  return out


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config of the run in `workdir`: the one its newest
  checkpoint records (config.json for older checkpoints)."""
  from vmoe import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vmoe.checkpoints import checkpointer as checkpoint_lib  # pylint: disable=g-import-not-at-top
  config, _ = checkpoint_lib.run_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{workdir} records no config (no checkpoint of '
                            'ours, no config.json): not a training workdir')
  return workdir_lib.as_config(config)


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the checkpoints kept in `workdir`, ascending (creates
  nothing)."""
  from vmoe.checkpoints import checkpointer as checkpoint_lib  # pylint: disable=g-import-not-at-top
  return checkpoint_lib.list_steps(os.path.join(workdir, 'checkpoints'))


def from_params(config: ml_collections.ConfigDict, params: dict[str, Any], *,
                step: int | None = None, workdir: str | None = None
                ) -> Trained:
  """A `Trained` from a config and a pure parameter dict; the number of
  classes is read from the head. The model is the unscanned one (one
  module per block, `model.blocks[i]`), whatever `config.model.scan_layers`
  (parameters of a scanned run are unstacked)."""
  config = unscanned(config)
  if layout.is_scanned(params):
    params = mapping.unflatten(layout.to_canonical_flat(mapping.flatten(
        jax.tree.map(np.asarray, params))))
    params['blocks'] = {int(k): v for k, v in params['blocks'].items()}
  num_classes = int(np.shape(params['head']['kernel'])[-1])
  abstract = nnx.eval_shape(lambda: vit.create_model(
      config.model, num_classes=num_classes,
      image_size=config.preprocess.image_size,
      num_channels=config.preprocess.num_channels, rngs=nnx.Rngs(0)))
  model = steps.ModelFn(abstract).merge(jax.tree.map(jnp.asarray, params))
  return Trained(config=config, model=model, step=step, workdir=workdir)


def load(workdir: str, step: int | None = None, *,
         config: ml_collections.ConfigDict | None = None) -> Trained:
  """The model of `workdir` at `step` (default: the newest checkpoint that
  restores and verifies), with the config that checkpoint records.

  Reads as the trainer's resume does (`vmoe.checkpoints.checkpointer.read`):
  content digests checked, corrupt checkpoints skipped with a warning, one
  deleted meanwhile by a running training replaced by the next newest;
  nothing is created. `config`, if given, must match the recorded config in
  every field that defines the run (ValueError, one line, otherwise).
  """
  from vmoe import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vmoe.checkpoints import checkpointer as checkpoint_lib  # pylint: disable=g-import-not-at-top
  restored = checkpoint_lib.read(os.path.join(workdir, 'checkpoints'), step)
  stored, where = restored.info.config, (
      f'the config recorded by checkpoint {restored.step}')
  if stored is None:  # a checkpoint from before configs were recorded
    stored = workdir_lib.read_config(workdir)
    where = os.path.join(workdir, workdir_lib.CONFIG_NAME)
  if config is None:
    if stored is None:
      raise FileNotFoundError(f'{workdir} records no config (no '
                              'config.json): pass config=')
    config = workdir_lib.as_config(stored)
  elif stored is not None:
    changes = workdir_lib.config_differences(config, stored)
    if changes:
      raise ValueError(
          f'{changes}: the given config is not the one the run in {workdir} '
          f'was trained with ({where}); only vmoe.workdir.RESUME_CHANGEABLE '
          "fields may differ: leave it out to use the run's")
  return from_params(config, restored.state['params'], step=restored.step,
                     workdir=workdir)


def eval_batches(config: ml_collections.ConfigDict, *,
                 split: str | None = None, dataset: str | None = None,
                 max_examples: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Eval batches of `split` (default: config.dataset.eval_split) with the
  eval preprocessing and batch size of `config`, in a fixed order; with
  `max_examples`, batches stop once that many real examples were yielded
  (the last one masked beyond it)."""
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  from vmoe.evaluate import fewshot  # pylint: disable=g-import-not-at-top
  cfg = fewshot.split_config(config, split or config.dataset.eval_split,
                             dataset)
  seen = 0
  for batch in pipeline.eval_iterator(cfg):
    if max_examples is not None:
      if seen >= max_examples:
        return
      mask = batch['mask'].copy()
      real = np.flatnonzero(mask > 0)
      mask[real[max_examples - seen:]] = 0
      batch = dict(batch, mask=mask)
    seen += int(np.sum(batch['mask'] > 0))
    yield batch


def initialized(config: ml_collections.ConfigDict, *, num_classes: int,
                seed: int = 0) -> Trained:
  """The model of `config` with freshly initialised parameters (seed)."""
  config = unscanned(config)
  model = vit.create_model(config.model, num_classes=num_classes,
                           image_size=config.preprocess.image_size,
                           num_channels=config.preprocess.num_channels,
                           rngs=nnx.Rngs(seed))
  return Trained(config=config, model=model, step=0)
