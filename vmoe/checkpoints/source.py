"""What every checkpoint reader returns: parameters under our names.

A `Source` holds a checkpoint's parameters as a flat dict keyed by the path
of the parameter in OUR model tree (`vmoe.nn.vit.VisionTransformer`, e.g.
'blocks/3/mlp/experts/kernel1'), already in our layouts (qkv kernel
[d, 3, heads, head_dim], router kernel [e, d], Soft MoE slots [e, p, d],
position embeddings including the class-token row when there is a class
token), plus the original name of each (for error messages) and what the
checkpoint contains that our model cannot express.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint cannot be read or does not fit the model (one line)."""


@dataclasses.dataclass
class Source:
  """Parameters of a checkpoint under our names.

  Attributes:
    format: 'big_vision' | 'vmoe' | 'ours'.
    path: what was read.
    params: {our name: np.ndarray}.
    origin: {our name: name (or names) in the checkpoint}.
    extras: {what: checkpoint name} for parts our model has no place for
      ('map_head', 'qk_norm'); importing fails on them.
    config: the config the checkpoint records (ours), as JSON values.
  """
  format: str
  path: str
  params: dict[str, np.ndarray]
  origin: dict[str, str]
  extras: dict[str, str] = dataclasses.field(default_factory=dict)
  config: dict[str, Any] | None = None

  def describe(self) -> str:
    return f'checkpoint {self.path!r} ({self.format})'

  def name_of(self, key: str) -> str:
    """'ours (theirs)' for error messages."""
    theirs = self.origin.get(key)
    return f'{key} ({theirs})' if theirs and theirs != key else key

  def block_indices(self) -> list[int]:
    return sorted({int(m[1]) for k in self.params
                   if (m := re.match(r'blocks/(\d+)/', k))})

  def summary(self) -> str:
    """Architecture in a few words: width, blocks, MoE blocks, head."""
    p = self.params
    parts = []
    if 'patch_kernel' in p:
      k = p['patch_kernel'].shape
      parts.append(f'width {k[-1]}, patch {k[0]}')
    parts.append(f'{len(self.block_indices())} blocks')
    moe = [i for i in self.block_indices()
           if f'blocks/{i}/mlp/experts/kernel1' in p]
    if moe:
      e = p[f'blocks/{moe[0]}/mlp/experts/kernel1'].shape[0]
      parts.append(f'MoE blocks {moe} with {e} experts')
    if 'head/kernel' in p:
      parts.append(f'{p["head/kernel"].shape[-1]} classes')
    parts.append('class token' if 'cls_token' in p else 'no class token')
    return ', '.join(parts)


def fix_dtype(a: Any) -> np.ndarray:
  """numpy stores bfloat16 as 2-byte void; view it as bfloat16 again."""
  a = np.asarray(a)
  if a.dtype.kind == 'V' and a.dtype.itemsize == 2:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return a.view(ml_dtypes.bfloat16)
  return a
