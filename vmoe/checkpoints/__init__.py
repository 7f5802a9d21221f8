"""Checkpoints from other codebases and our own, mapped onto our model tree.

  source = checkpoints.read(path, format='auto')   # -> Source (our names)
  params = checkpoints.import_params(source, target_params)

Formats:
  'big_vision': `.npz` ViTs of vit_jax (AugReg, ImageNet-21k releases) and
    big_vision (`vmoe.checkpoints.big_vision`);
  'vmoe': google-research/vmoe's index + data shards, e.g. the
    gs://vmoe_checkpoints releases (`vmoe.checkpoints.vmoe_format`);
  'ours': a workdir or `checkpoints/<step>` of this project
    (`vmoe.checkpoints.ours`);
  'auto': detected from the path.

Errors are `CheckpointError` with one line naming the first missing or
mis-shaped parameter. Initialisation of a training run from a checkpoint
(new head, resized position embeddings, sparse upcycling, freezing) is
`vmoe.checkpoints.init_from`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vmoe.checkpoints import big_vision
from vmoe.checkpoints import layout
from vmoe.checkpoints import mapping
from vmoe.checkpoints import ours
from vmoe.checkpoints import vmoe_format
from vmoe.checkpoints.source import CheckpointError, Source

flat_names = mapping.flatten
FORMATS = ('auto', 'ours', 'big_vision', 'vmoe')
_READERS = {big_vision.FORMAT: big_vision.read, vmoe_format.FORMAT:
            vmoe_format.read, ours.FORMAT: ours.read}

__all__ = ['CheckpointError', 'FORMATS', 'Source', 'detect_format', 'read',
           'import_params', 'flat_names', 'unflatten_like']


def detect_format(path: str) -> str:
  """'big_vision' | 'vmoe' | 'ours' for an existing checkpoint path."""
  path = os.path.expanduser(str(path))
  if big_vision.is_npz(path):
    file, _ = big_vision.split_path(path)
    if not os.path.isfile(file):
      raise CheckpointError(f'checkpoint {file!r} does not exist')
    return big_vision.FORMAT
  if vmoe_format.is_vmoe(path):
    return vmoe_format.FORMAT
  if ours.is_ours(path):
    return ours.FORMAT
  if not os.path.exists(path) and not os.path.exists(
      vmoe_format.prefix_of(path) + '.index'):
    raise CheckpointError(f'checkpoint {path!r} does not exist')
  raise CheckpointError(
      f'cannot tell the format of checkpoint {path!r}: not a .npz file, not '
      'a vmoe prefix (PREFIX.index) and not a workdir or checkpoints/<step> '
      'directory of ours')


def check_format(path: str, fmt: str) -> str:
  """The format to read `path` with (validates `fmt`, resolves 'auto')."""
  if fmt not in FORMATS:
    raise CheckpointError(f'format={fmt!r} is not one of {FORMATS}')
  detected = detect_format(path)
  if fmt != 'auto' and fmt != detected:
    raise CheckpointError(f'checkpoint {path!r} looks like format '
                          f'{detected!r}, not {fmt!r}')
  return detected


def read(path: str, format: str = 'auto') -> Source:  # pylint: disable=redefined-builtin
  """Reads any supported checkpoint into our names and layouts."""
  path = os.path.expanduser(str(path))
  return _READERS[check_format(path, format)](path)


def unflatten_like(tree: Any, flat: dict[str, Any], prefix: str = '') -> Any:
  """A copy of nested dict `tree` with its leaves taken from `flat`."""
  return {k: (unflatten_like(v, flat, f'{prefix}{k}/') if isinstance(v, dict)
              else flat[f'{prefix}{k}']) for k, v in tree.items()}


def shape_error(source: Source, name: str, got: tuple, want: tuple,
                hint: str = '') -> CheckpointError:
  return CheckpointError(
      f'{source.describe()}: parameter {source.name_of(name)} has shape '
      f'{tuple(got)}, the model expects {tuple(want)}'
      f'{hint} (checkpoint: {source.summary()})')


def check_names(source: Source, target: dict[str, Any],
                params: dict[str, np.ndarray] | None = None) -> None:
  """Raises on the first target name missing from `params` (default: the
  source's), the first shape mismatch, then the first unused parameter."""
  params = source.params if params is None else params
  if ('cls_token' in params) != ('cls_token' in target):
    has = 'has a class token' if 'cls_token' in params else 'has no class token'
    pool = 'tok' if 'cls_token' in params else 'gap'
    raise CheckpointError(
        f'{source.describe()} {has} ({source.origin.get("cls_token", "cls")}'
        f'), the model {"not" if pool == "tok" else "does"}: set '
        f"config.model.pool='{pool}'")
  for name, leaf in target.items():
    if name not in params:
      raise CheckpointError(
          f'{source.describe()} has no parameter for {name} of the model '
          f'{tuple(np.shape(leaf))} (checkpoint: {source.summary()})')
    if tuple(np.shape(params[name])) != tuple(np.shape(leaf)):
      raise shape_error(source, name, np.shape(params[name]), np.shape(leaf))
  unused = [n for n in params if n not in target]
  if unused:
    hint = ''
    if unused[0].startswith('pre_logits/'):
      hint = (f'; set config.model.representation_size='
              f'{np.shape(params["pre_logits/bias"])[0]}, or fine-tune with '
              "config.init_from.head='new', which drops it")
    raise CheckpointError(
        f'{source.describe()}: parameter {source.name_of(unused[0])} has no '
        f'place in the model{hint} ({len(unused)} such; checkpoint: '
        f'{source.summary()})')


def check_extras(source: Source) -> None:
  """Fails on parts of the checkpoint our ViT cannot express."""
  why = {'map_head': 'a MAP (attention pooling) head, which our ViT has not '
                     "(model.pool is 'tok' or 'gap')",
         'qk_norm': 'LayerNorms on queries and keys (attention_qk_norm), '
                    'which our attention has not'}
  for what, where in source.extras.items():
    raise CheckpointError(f'{source.describe()} has {why[what]} ({where})')


def import_params(source: Source, target: Any) -> Any:
  """The source's parameters in the structure of `target` (nested dict of
  arrays or ShapeDtypeStructs: e.g. `nnx.to_pure_dict(nnx.state(model,
  nnx.Param))`), with the dtypes of `target`; every parameter must match
  exactly."""
  check_extras(source)
  flat = flat_names(target)
  check_names(source, layout.canonical_shapes(flat))
  # A scanned model (`model.scan_layers`) takes the blocks stacked.
  params = layout.to_layout_flat(source.params, flat)
  return unflatten_like(target, {
      n: np.asarray(params[n]).astype(np.dtype(leaf.dtype))
      for n, leaf in flat.items()})
