"""vit_jax / big_vision / google-research/vmoe ViT names and layouts -> ours.

The three reference codebases are Flax Linen models whose parameter names
differ in a few places (ours <- vit_jax AugReg npz | big_vision npz | vmoe):

  patch_kernel [p, p, c, d], patch_bias <- embedding/{kernel,bias} (all)
  cls_token [1, 1, d] <- cls (all)
  pos_embedding [1, n (+1), d] <- Transformer/posembed_input/pos_embedding
      (with the class-token row) | pos_embedding (grid only) |
      Encoder/posembed_input/pos_embedding (with the class-token row)
  blocks/{i}/ <- Transformer/encoderblock_{i}/ | the same |
      Encoder/encoderblock_{i}/
    ln1, ln2 <- LayerNorm_0, LayerNorm_2 | LayerNorm_0, LayerNorm_1 | the same
    attn <- MultiHeadDotProductAttention_1 | ..._0 | SelfAttention
    mlp/fc1, mlp/fc2 <- MlpBlock_3/Dense_{0,1} | MlpBlock_0/Dense_{0,1} |
        Mlp/Dense_{0,1}
    (vmoe MoE blocks) mlp/router/kernel [e, d] <- Moe/Router/dense/kernel
        [d, e]; mlp/router/phi [e, p, d], scale <- Moe/Router/mu [d, e, p],
        scale (Soft MoE); mlp/experts/{kernel1 [e, d, h], bias1, kernel2,
        bias2} <- Moe/Mlp/Dense_{0,1}/{kernel,bias}
  encoder_norm <- Transformer/encoder_norm | the same | Encoder/encoder_norm
  pre_logits/{kernel,bias} <- pre_logits (representation_size; all)
  head/{kernel [d, K], bias} <- head (all)

vit_jax releases predate Flax Linen: the sub-modules of a block are numbered
in call order over all module types (LayerNorm_0, ..._1, LayerNorm_2,
MlpBlock_3); Linen numbers each type separately. Both are read by ordering
the children of each type by their number. Attention kernels query/key/value
[d, heads, head_dim] are stacked into our qkv kernel [d, 3, heads, head_dim];
out [heads, head_dim, d] is ours unchanged.

Position embeddings: vit_jax and vmoe add them after prepending the class
token, big_vision (since 2022) before it, so the class token has none; ours
has a row for the class token, which is zero for big_vision checkpoints
(identical function). A big_vision embedding of g*g + 1 rows is the older
combined layout (big_vision's own loader folds that row into `cls`).
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import numpy as np

from vmoe.checkpoints.source import CheckpointError, Source

_INDEXED = re.compile(r'^(?P<type>.*?)(?:_(?P<index>\d+))?$')


def _children(tree: dict) -> dict[str, list[str]]:
  """{module type: [child names ordered by their number]} of tree."""
  out: dict[str, list[tuple[int, str]]] = {}
  for name in tree:
    m = _INDEXED.match(name)
    out.setdefault(m['type'], []).append((int(m['index'] or 0), name))
  return {t: [n for _, n in sorted(v)] for t, v in out.items()}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise CheckpointError(f'parameter name {name!r} clashes with another')
    node[leaf] = value
  return tree


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'blocks/0/attn/qkv_kernel': leaf} of a nested dict (keys may be ints)."""
  out = {}
  for k, v in tree.items():
    name = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, name + '/'))
    else:
      out[name] = v
  return out


def unwrap(flat: dict[str, np.ndarray],
           wrappers: Iterable[str]) -> dict[str, np.ndarray]:
  """The parameters of a checkpoint that also holds optimizer state etc.:
  the names under the first of `wrappers` ('params/', ...) present, unless
  the parameters sit at the top level."""
  if any(k.startswith('embedding/') for k in flat):
    return flat
  for w in wrappers:
    inner = {k[len(w):]: v for k, v in flat.items() if k.startswith(w)}
    if inner:
      return inner
  return flat


class _Builder:
  """Collects our parameters, their origin, and checks every source name is
  consumed (an unknown name means a model we cannot express)."""

  def __init__(self, fmt: str, path: str, flat: dict[str, np.ndarray]):
    self.fmt, self.path = fmt, path
    self.flat = dict(flat)
    self.used: set[str] = set()
    self.params: dict[str, np.ndarray] = {}
    self.origin: dict[str, str] = {}
    self.extras: dict[str, str] = {}

  def take(self, name: str) -> np.ndarray:
    if name not in self.flat:
      raise CheckpointError(
          f'checkpoint {self.path!r} ({self.fmt}) has no parameter {name!r}')
    self.used.add(name)
    return self.flat[name]

  def put(self, ours: str, value: np.ndarray, theirs: str):
    self.params[ours] = np.asarray(value)
    self.origin[ours] = theirs

  def copy(self, ours: str, theirs: str):
    self.put(ours, self.take(theirs), theirs)

  def extra(self, what: str, prefix: str):
    names = [n for n in self.flat if n == prefix or n.startswith(prefix + '/')]
    self.used.update(names)
    self.extras[what] = prefix

  def finish(self) -> Source:
    unused = sorted(set(self.flat) - self.used)
    if unused:
      raise CheckpointError(
          f'checkpoint {self.path!r} ({self.fmt}) has parameter {unused[0]!r} '
          f'that no part of our ViT corresponds to ({len(unused)} such)')
    return Source(self.fmt, self.path, self.params, self.origin, self.extras)


def _dense(b: _Builder, ours: str, theirs: str):
  b.copy(f'{ours}/kernel', f'{theirs}/kernel')
  b.copy(f'{ours}/bias', f'{theirs}/bias')


def _layer_norm(b: _Builder, ours: str, theirs: str):
  b.copy(f'{ours}/scale', f'{theirs}/scale')
  b.copy(f'{ours}/bias', f'{theirs}/bias')


def _attention(b: _Builder, ours: str, theirs: str, tree: dict):
  if 'query_ln' in tree or 'key_ln' in tree:
    b.extra('qk_norm', theirs)
    return
  kernels = [b.take(f'{theirs}/{n}/kernel') for n in ('query', 'key', 'value')]
  biases = [b.take(f'{theirs}/{n}/bias') for n in ('query', 'key', 'value')]
  b.put(f'{ours}/qkv_kernel', np.stack(kernels, axis=1),
        f'{theirs}/{{query,key,value}}/kernel')
  b.put(f'{ours}/qkv_bias', np.stack(biases, axis=0),
        f'{theirs}/{{query,key,value}}/bias')
  b.copy(f'{ours}/out_kernel', f'{theirs}/out/kernel')
  b.copy(f'{ours}/out_bias', f'{theirs}/out/bias')


def _moe(b: _Builder, ours: str, theirs: str, tree: dict):
  """vmoe's MlpMoeBlock: Router (gate or Soft MoE slots) + Mlp of e experts."""
  router = tree.get('Router', {})
  if 'dense' in router:  # NoisyTopExpertsPerItem / TopItemsPerExpert routers
    kernel = b.take(f'{theirs}/Router/dense/kernel')  # [d, e]
    b.put(f'{ours}/router/kernel', kernel.T, f'{theirs}/Router/dense/kernel')
  elif 'mu' in router:  # vmoe.projects.soft_moe SoftRouter
    mu = b.take(f'{theirs}/Router/mu')  # [d, e, p]
    b.put(f'{ours}/router/phi', np.transpose(mu, (1, 2, 0)),
          f'{theirs}/Router/mu')
    b.copy(f'{ours}/router/scale', f'{theirs}/Router/scale')
  else:
    raise CheckpointError(
        f'checkpoint {b.path!r} ({b.fmt}): router {theirs}/Router with '
        f'parameters {sorted(router)} is not a router we know')
  for ours_k, theirs_k in (('kernel1', 'Dense_0/kernel'),
                           ('bias1', 'Dense_0/bias'),
                           ('kernel2', 'Dense_1/kernel'),
                           ('bias2', 'Dense_1/bias')):
    b.copy(f'{ours}/experts/{ours_k}', f'{theirs}/Mlp/{theirs_k}')


def _block(b: _Builder, i: int, theirs: str, tree: dict):
  kinds = _children(tree)
  norms = kinds.pop('LayerNorm', [])
  if len(norms) != 2:
    raise CheckpointError(
        f'checkpoint {b.path!r} ({b.fmt}): block {theirs} has {len(norms)} '
        f'LayerNorms, a pre-LN ViT block has 2')
  _layer_norm(b, f'blocks/{i}/ln1', f'{theirs}/{norms[0]}')
  _layer_norm(b, f'blocks/{i}/ln2', f'{theirs}/{norms[1]}')
  attn = (kinds.pop('MultiHeadDotProductAttention', None)
          or kinds.pop('SelfAttention', None))
  if not attn:
    raise CheckpointError(f'checkpoint {b.path!r} ({b.fmt}): block {theirs} '
                          'has no attention parameters')
  _attention(b, f'blocks/{i}/attn', f'{theirs}/{attn[0]}', tree[attn[0]])
  mlp = kinds.pop('MlpBlock', None) or kinds.pop('Mlp', None)
  if mlp:
    _dense(b, f'blocks/{i}/mlp/fc1', f'{theirs}/{mlp[0]}/Dense_0')
    _dense(b, f'blocks/{i}/mlp/fc2', f'{theirs}/{mlp[0]}/Dense_1')
  elif kinds.pop('Moe', None):
    _moe(b, f'blocks/{i}/mlp', f'{theirs}/Moe', tree['Moe'])
  else:
    raise CheckpointError(f'checkpoint {b.path!r} ({b.fmt}): block {theirs} '
                          'has no MLP parameters')


def _is_square(n: int) -> bool:
  return n >= 1 and math.isqrt(n) ** 2 == n


def _position_embedding(b: _Builder, names: Iterable[str], has_cls: bool):
  for name in names:
    if name in b.flat:
      pe = b.take(name)
      break
  else:
    raise CheckpointError(
        f'checkpoint {b.path!r} ({b.fmt}) has no learned position embedding '
        '(fixed sin-cos embeddings are not supported)')
  if pe.ndim != 3 or pe.shape[0] != 1:
    raise CheckpointError(f'checkpoint {b.path!r} ({b.fmt}): {name} has shape '
                          f'{pe.shape}, expected [1, tokens, width]')
  n = pe.shape[1]
  if has_cls and _is_square(n):  # big_vision: no row for the class token
    pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
  elif not _is_square(n - 1 if has_cls else n):
    raise CheckpointError(
        f'checkpoint {b.path!r} ({b.fmt}): {name} has {n} rows, which is '
        f'not a square grid{" plus a class token" if has_cls else ""}')
  b.put('pos_embedding', pe, name)


def from_reference(flat: dict[str, np.ndarray], *, fmt: str,
                   path: str) -> Source:
  """Flat '/'-joined names of a vit_jax / big_vision / vmoe ViT -> Source."""
  b = _Builder(fmt, path, flat)
  tree = unflatten(flat)
  encoder_name = 'Encoder' if 'Encoder' in tree else 'Transformer'
  encoder = tree.get(encoder_name)
  if not isinstance(encoder, dict) or 'embedding' not in tree:
    raise CheckpointError(
        f'checkpoint {path!r} ({fmt}) is not a ViT: it has no embedding/ and '
        f'no Transformer/ or Encoder/ parameters (top level: {sorted(tree)})')
  if 'encoderblock' in encoder:  # big_vision scan layout: blocks stacked
    stacked = flatten(encoder.pop('encoderblock'))
    if len({v.shape[0] for v in stacked.values()}) != 1:
      raise CheckpointError(f'checkpoint {path!r} ({fmt}): scanned encoder '
                            'blocks of different depths')
    for name, value in stacked.items():
      b.used.add(f'{encoder_name}/encoderblock/{name}')
      for i in range(value.shape[0]):
        b.flat[f'{encoder_name}/encoderblock_{i}/{name}'] = value[i]
    encoder.update(unflatten(
        {k[len(encoder_name) + 1:]: v for k, v in b.flat.items()
         if k.startswith(f'{encoder_name}/encoderblock_')}))
  b.copy('patch_kernel', 'embedding/kernel')
  b.copy('patch_bias', 'embedding/bias')
  has_cls = 'cls' in tree
  if has_cls:
    b.copy('cls_token', 'cls')
  _position_embedding(b, (f'{encoder_name}/posembed_input/pos_embedding',
                          f'{encoder_name}/pos_embedding', 'pos_embedding'),
                      has_cls)
  blocks = sorted(int(m[1]) for k in encoder
                  if (m := re.fullmatch(r'encoderblock_(\d+)', k)))
  if blocks != list(range(len(blocks))):
    raise CheckpointError(f'checkpoint {path!r} ({fmt}): encoder blocks '
                          f'{blocks} are not numbered 0..{len(blocks) - 1}')
  for i in blocks:
    name = f'encoderblock_{i}'
    _block(b, i, f'{encoder_name}/{name}', encoder[name])
  _layer_norm(b, 'encoder_norm', f'{encoder_name}/encoder_norm')
  if 'head' in tree:
    _dense(b, 'head', 'head')
  if 'pre_logits' in tree:  # representation_size: Dense + tanh
    _dense(b, 'pre_logits', 'pre_logits')
  for name in tree:
    if name.lower().startswith('maphead'):
      b.extra('map_head', name)
  return b.finish()
