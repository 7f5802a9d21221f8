"""Command and library: write a trained model's parameters for other code.

  python -m vmoe.export --workdir=/tmp/vit_digits --format=big_vision \
      --output=/tmp/vit_digits.npz
  python -m vmoe.export --workdir=/tmp/vmoe_digits --format=safetensors \
      --output=/tmp/vmoe_digits.safetensors

Formats:
  'big_vision': a dense ViT as big_vision's `.npz` (its `vit.py` names:
    embedding, cls, pos_embedding without a class-token row,
    Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0,
    LayerNorm_1, MlpBlock_0}, Transformer/encoder_norm, pre_logits, head),
    which big_vision's loader and ours (`vmoe.checkpoints`, format
    'big_vision') read back to the same logits. big_vision adds position
    embeddings before prepending the class token: our class-token row of
    the position embedding is folded into `cls` (cls + pos[0]), which
    computes the same function. MoE models have no big_vision layout.
  'safetensors': any model, MoE included: one tensor per parameter under
    our names ('blocks/3/mlp/experts/kernel1'), plus `<output>.json` mapping
    each name to its shape, dtype and meaning (with the axis letters of the
    docstrings: d model dim, h MLP hidden dim, e experts, p Soft MoE slots
    per expert), for PyTorch and other frameworks (`safetensors.torch`).

The checkpoint read is the workdir's newest that restores and verifies, as
the trainer's resume finds it (`--step` for another); errors are one line and
nothing is written on an error.
"""

from __future__ import annotations

import json
import os
import re
import sys
import types
from typing import Any

import numpy as np
from absl import app
from absl import flags

from vmoe import config
from vmoe.checkpoints.source import CheckpointError

FORMATS = ('big_vision', 'safetensors')


class ExportError(ValueError):
  """The model cannot be written in the asked format (one line)."""


# -- big_vision ---------------------------------------------------------------


def _is_moe(flat: dict[str, np.ndarray]) -> bool:
  return any('/mlp/experts/' in k or '/mlp/router/' in k for k in flat)


def to_big_vision(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our flat parameters of a dense ViT -> big_vision's flat npz names."""
  if _is_moe(flat):
    raise ExportError('an MoE model has no big_vision layout: export it with '
                      "--format=safetensors")
  if 'pos_embedding' not in flat:
    raise ExportError('the model has no learned position embedding')
  out = {'embedding/kernel': flat['patch_kernel'],
         'embedding/bias': flat['patch_bias']}
  pos = flat['pos_embedding']
  if 'cls_token' in flat:
    # big_vision: x = patches + pos_grid, then [cls, x]; ours adds pos to
    # [cls, patches]. cls + pos[0] keeps the class token's input.
    out['cls'] = flat['cls_token'] + pos[:, :1]
    pos = pos[:, 1:]
  out['pos_embedding'] = pos
  blocks = sorted({int(m[1]) for k in flat
                   if (m := re.match(r'blocks/(\d+)/', k))})
  for i in blocks:
    ours, theirs = f'blocks/{i}', f'Transformer/encoderblock_{i}'
    for norm, name in (('ln1', 'LayerNorm_0'), ('ln2', 'LayerNorm_1')):
      for leaf in ('scale', 'bias'):
        out[f'{theirs}/{name}/{leaf}'] = flat[f'{ours}/{norm}/{leaf}']
    attn = f'{theirs}/MultiHeadDotProductAttention_0'
    qkv_kernel = flat[f'{ours}/attn/qkv_kernel']  # [d, 3, heads, head_dim]
    qkv_bias = flat[f'{ours}/attn/qkv_bias']      # [3, heads, head_dim]
    for j, name in enumerate(('query', 'key', 'value')):
      out[f'{attn}/{name}/kernel'] = qkv_kernel[:, j]
      out[f'{attn}/{name}/bias'] = qkv_bias[j]
    out[f'{attn}/out/kernel'] = flat[f'{ours}/attn/out_kernel']
    out[f'{attn}/out/bias'] = flat[f'{ours}/attn/out_bias']
    for j, fc in enumerate(('fc1', 'fc2')):
      for leaf in ('kernel', 'bias'):
        out[f'{theirs}/MlpBlock_0/Dense_{j}/{leaf}'] = (
            flat[f'{ours}/mlp/{fc}/{leaf}'])
  for leaf in ('scale', 'bias'):
    out[f'Transformer/encoder_norm/{leaf}'] = flat[f'encoder_norm/{leaf}']
  for name in ('pre_logits', 'head'):
    for leaf in ('kernel', 'bias'):
      if f'{name}/{leaf}' in flat:
        out[f'{name}/{leaf}'] = flat[f'{name}/{leaf}']
  covered = {k for k in flat if not k.startswith('blocks/')} | {
      k for k in flat if re.match(r'blocks/\d+/(ln1|ln2|attn|mlp/fc[12])/', k)}
  missed = sorted(set(flat) - covered - {'patch_kernel', 'patch_bias'})
  if missed:
    raise ExportError(f'parameter {missed[0]} has no place in the big_vision '
                      'layout')
  return {k: np.asarray(v) for k, v in out.items()}


def write_big_vision(flat: dict[str, np.ndarray], path: str) -> None:
  arrays = to_big_vision(flat)
  _write_atomically(path, lambda f: np.savez(f, **arrays))


# -- safetensors ----------------------------------------------------------------

# (pattern, meaning with the shape's axis letters); the first match names a
# parameter.
_MEANINGS = (
    (r'patch_kernel$', 'patch embedding kernel [p, p, c, d]'),
    (r'patch_bias$', 'patch embedding bias [d]'),
    (r'cls_token$', 'class token [1, 1, d]'),
    (r'pos_embedding$', 'learned position embedding [1, tokens, d], the '
     'class-token row first when there is a class token'),
    (r'ln[12]/scale$', 'LayerNorm scale [d]'),
    (r'ln[12]/bias$', 'LayerNorm bias [d]'),
    (r'attn/qkv_kernel$', 'query, key, value projections [d, 3, heads, '
     'head_dim]'),
    (r'attn/qkv_bias$', 'query, key, value biases [3, heads, head_dim]'),
    (r'attn/out_kernel$', 'attention output projection [heads, head_dim, d]'),
    (r'attn/out_bias$', 'attention output bias [d]'),
    (r'mlp/fc1/kernel$', 'MLP first layer [d, h]'),
    (r'mlp/fc1/bias$', 'MLP first-layer bias [h]'),
    (r'mlp/fc2/kernel$', 'MLP second layer [h, d]'),
    (r'mlp/fc2/bias$', 'MLP second-layer bias [d]'),
    (r'mlp/router/kernel$', 'router gate [e, d]: logits = x @ kernel^T'),
    (r'mlp/router/phi$', 'Soft MoE slot parameters [e, p, d]'),
    (r'mlp/router/scale$', 'Soft MoE logit scale []'),
    (r'mlp/experts/kernel1$', 'experts\' first layers [e, d, h]'),
    (r'mlp/experts/bias1$', 'experts\' first-layer biases [e, h]'),
    (r'mlp/experts/kernel2$', 'experts\' second layers [e, h, d]'),
    (r'mlp/experts/bias2$', 'experts\' second-layer biases [e, d]'),
    (r'mlp/shared_experts/', 'shared (always-on) experts, laid out as '
     'mlp/experts'),
    (r'encoder_norm/', 'final LayerNorm [d]'),
    (r'pre_logits/', 'pre-logits Dense (+ tanh) [d, r] / [r]'),
    (r'head/kernel$', 'classifier [d or r, classes]'),
    (r'head/bias$', 'classifier bias [classes]'),
)


def meaning(name: str) -> str:
  where = re.match(r'blocks/(\d+)/', name)
  for pattern, text in _MEANINGS:
    if re.search(pattern, name):
      return f'block {where[1]}: {text}' if where else text
  return 'parameter of a layer kind without a description'


def safetensors_map(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  return {k: {'shape': list(np.shape(v)), 'dtype': str(np.asarray(v).dtype),
              'meaning': meaning(k)} for k, v in sorted(flat.items())}


def write_safetensors(flat: dict[str, np.ndarray], path: str) -> None:
  """`path` (safetensors) and `path`.json (the map of names)."""
  try:
    numpy_io = config.require('safetensors.numpy', 'safetensors',
                              '--format=safetensors')
  except config.MissingPackageError as e:
    raise ExportError(str(e)) from None
  tensors = {k: np.ascontiguousarray(v) for k, v in flat.items()}
  _write_atomically(path, lambda f: f.write(numpy_io.save(tensors)))
  text = json.dumps(safetensors_map(flat), indent=1)
  _write_atomically(path + '.json', lambda f: f.write(text.encode()))


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Our flat parameters back from `write_safetensors`'s file."""
  from safetensors import numpy as numpy_io  # pylint: disable=g-import-not-at-top
  return dict(numpy_io.load_file(path))


def _write_atomically(path: str, write) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    write(f)
  os.replace(tmp, path)


# -- the command ------------------------------------------------------------------


def export(flat: dict[str, np.ndarray], fmt: str, output: str) -> None:
  """Writes our flat parameters (`vmoe.checkpoints.mapping.flatten` of the
  trainer's params) to `output` in `fmt`."""
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r} is not one of {FORMATS}')
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent):
    raise ExportError(f'--output={output!r}: directory {parent} does not '
                      'exist')
  if fmt == 'big_vision':
    write_big_vision(flat, output)
  else:
    write_safetensors(flat, output)


def read_workdir(workdir: str, step: int | None = None
                 ) -> dict[str, np.ndarray]:
  """Flat parameters of a training workdir's checkpoint (latest or `step`)."""
  from vmoe.checkpoints import ours  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.expanduser(workdir), 'checkpoints')
  if step is not None:
    path = os.path.join(path, str(step))
  return ours.read_flat(path)


def define_flags() -> types.SimpleNamespace:
  """The command's flags (defined only when run as a command)."""
  return types.SimpleNamespace(
      workdir=flags.DEFINE_string('workdir', None, 'Training workdir.'),
      step=flags.DEFINE_integer('step', None, 'Checkpoint step (default: '
                                'the latest).'),
      format=flags.DEFINE_enum('format', 'safetensors', FORMATS,
                               'Output format.'),
      output=flags.DEFINE_string('output', None, 'File to write.'))


def main(argv, f: types.SimpleNamespace) -> None:
  del argv
  if not f.workdir.value or not f.output.value:
    print('error: --workdir and --output are required', file=sys.stderr)
    sys.exit(2)
  try:
    flat = read_workdir(f.workdir.value, f.step.value)
    export(flat, f.format.value, f.output.value)
  except (CheckpointError, ExportError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {f.output.value} ({f.format.value}, {len(flat)} parameters)')


if __name__ == '__main__':
  _flags = define_flags()
  app.run(lambda argv: main(argv, _flags))
