"""Resizing learned position embeddings to another token grid.

Fine-tuning at another resolution (e.g. 224 -> 384 px) changes the number
of patches; the grid of position embeddings is interpolated bilinearly and
the class-token row (if any) kept, as big_vision's `resample_posemb` and
vit_jax's `interpolate_posembed` do: `scipy.ndimage.zoom(order=1)` on the
[g, g, d] grid, so the corner embeddings stay where they were.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage


def resize(posemb: np.ndarray, num_tokens: int, has_class_token: bool
           ) -> np.ndarray:
  """[1, n_old, d] -> [1, num_tokens, d]; rows 1.. (or all) a square grid.

  Raises ValueError if the old or new grid is not square.
  """
  posemb = np.asarray(posemb)
  if posemb.shape[1] == num_tokens:
    return posemb
  cls = 1 if has_class_token else 0
  tok, grid = posemb[:, :cls], posemb[0, cls:]
  old, new = math.isqrt(grid.shape[0]), math.isqrt(num_tokens - cls)
  if old * old != grid.shape[0] or new * new != num_tokens - cls:
    raise ValueError(f'position embeddings of {posemb.shape[1]} rows cannot '
                     f'be resized to {num_tokens}: not square grids'
                     f'{" plus a class token" if cls else ""}')
  grid = grid.reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return np.concatenate([tok, grid.reshape(1, new * new, -1)],
                        axis=1).astype(posemb.dtype)
