"""Reader of big_vision / vit_jax `.npz` ViT checkpoints.

Both codebases save a flat `np.savez` archive whose keys are '/'-joined Flax
parameter paths: the AugReg and ImageNet-21k releases of vit_jax
(gs://vit_models/augreg/*.npz, gs://vit_models/imagenet21k/*.npz) and
big_vision's (gs://big_vision/*.npz). Handled, as big_vision's own loader
does: keys under 'params/' or 'opt/target/' (checkpoints with optimizer
state), 'path.npz:img'-style sub-models (e.g. the image tower of SigLIP),
bfloat16 arrays stored as 2-byte void, and the `lax.scan` layout
(Transformer/encoderblock/... with a leading depth axis). Names and layouts
are mapped to ours by `vmoe.checkpoints.mapping`.
"""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from vmoe.checkpoints import mapping
from vmoe.checkpoints.source import CheckpointError, Source, fix_dtype

FORMAT = 'big_vision'

_SUBMODEL = re.compile(r'^(?P<file>.*?\.npz)(?::(?P<key>[\w/]+))?$')


def split_path(path: str) -> tuple[str, str | None]:
  """'/x/model.npz:img' -> ('/x/model.npz', 'img')."""
  m = _SUBMODEL.match(path)
  return (m['file'], m['key']) if m else (path, None)


def is_npz(path: str) -> bool:
  return bool(_SUBMODEL.match(path))


def read_flat(path: str) -> dict[str, np.ndarray]:
  """The archive's arrays, keyed by parameter path (prefixes removed)."""
  file, key = split_path(path)
  if not os.path.isfile(file):
    raise CheckpointError(f'checkpoint {file!r} does not exist')
  try:
    with np.load(file, allow_pickle=False) as archive:
      flat = {k: fix_dtype(archive[k]) for k in archive.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise CheckpointError(f'checkpoint {file!r} is not a readable .npz '
                          f'archive ({type(e).__name__}: {e})') from None
  flat = mapping.unwrap(flat, ('params/', 'opt/target/'))
  if key:
    inner = {k[len(key) + 1:]: v for k, v in flat.items()
             if k.startswith(key + '/')}
    if not inner:
      raise CheckpointError(f'checkpoint {file!r} has no sub-model {key!r}')
    flat = inner
  return flat


def read(path: str) -> Source:
  return mapping.from_reference(read_flat(path), fmt=FORMAT, path=path)
