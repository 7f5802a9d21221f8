"""Vision Transformer (Dosovitskiy et al. 2021) and ViT-MoE in Flax NNX.

The encoder is the standard pre-LN ViT. The MLP slot of every block is pluggable:
a dense `MlpBlock` or an MoE layer (`vmoe.nn.moe.build_layer`: token choice as
in V-MoE, Riquelme et al. 2021; expert choice, Zhou et al. 2022; Soft MoE,
Puigcerver et al. 2023; Multi-Head MoE, ...), chosen per block from
`config.model.moe`. The attention of every block is a registered kind
(`vmoe.nn.attention`, `config.model.attention`: standard, mixture-of-head,
gated) and so is the block itself (`vmoe.nn.blocks`, `config.model.block`:
standard, mixture-of-depths, nested experts).

Shapes: images [b, H, W, C]; tokens [b, n, d] with n = (H/p)*(W/p) (+1 with a
class token); logits [b, num_classes].
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from vmoe.config import ConfigError, check, is_int
from vmoe.nn import attention as attention_lib
from vmoe.nn import batched_mlp
from vmoe.nn import blocks as blocks_lib
from vmoe.nn import layers
from vmoe.nn import moe as moe_lib
from vmoe.nn import scan as scan_lib
# pylint: disable-next=unused-import
from vmoe.nn.layers import (AUX_LOSS_KEY, Dense, LayerNorm, MlpBlock, dropout,
                            drop_path)


@dataclasses.dataclass(frozen=True)
class VitSize:
  width: int  # d
  depth: int
  mlp_dim: int  # h
  num_heads: int


# Standard sizes (ViT paper, Table 1; Ti/S from DeiT; g/G from Zhai et al. 2022).
VIT_SIZES = {
    'mu': VitSize(width=64, depth=4, mlp_dim=128, num_heads=2),  # tests/CPU demos
    'Ti': VitSize(width=192, depth=12, mlp_dim=768, num_heads=3),
    'S': VitSize(width=384, depth=12, mlp_dim=1536, num_heads=6),
    'M': VitSize(width=512, depth=12, mlp_dim=2048, num_heads=8),
    'B': VitSize(width=768, depth=12, mlp_dim=3072, num_heads=12),
    'L': VitSize(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    'H': VitSize(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    'g': VitSize(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    'G': VitSize(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}

_VARIANT_RE = re.compile(r'^(?P<size>[A-Za-z]+)/(?P<patch>\d+)$')


def parse_variant(variant: str) -> tuple[VitSize, int]:
  """'B/16' -> (VitSize of B, patch size 16). Raises ValueError on bad input."""
  m = _VARIANT_RE.match(str(variant))
  if not m or m['size'] not in VIT_SIZES or int(m['patch']) < 1:
    raise ValueError(
        f'model.variant={variant!r} is not SIZE/PATCH with SIZE in '
        f'{sorted(VIT_SIZES)} and PATCH a positive integer (e.g. "S/16")')
  return VIT_SIZES[m['size']], int(m['patch'])


SIZE_FIELDS = ('width', 'depth', 'mlp_dim', 'num_heads')


def model_size(model_cfg: ml_collections.ConfigDict) -> tuple[VitSize, int]:
  """(VitSize, patch) of `config.model`: `variant` with the optional
  overrides model.width / depth / mlp_dim / num_heads (None = the variant's),
  for checkpoints whose size is not a named variant (e.g. the V-MoE paper's
  S: width 512, depth 8). Raises a one-line ConfigError on bad values."""
  size, patch = parse_variant(model_cfg.variant)
  overrides = {}
  for name in SIZE_FIELDS:
    value = model_cfg.get(name)
    if value is None:
      continue
    check(is_int(value) and value >= 1, f'model.{name}', value,
          'must be None (from model.variant) or a positive integer')
    overrides[name] = value
  size = dataclasses.replace(size, **overrides)
  check(size.width % size.num_heads == 0, 'model.num_heads', size.num_heads,
        f'does not divide the width {size.width}')
  return size, patch


def moe_block_indices(spec: Any, depth: int,
                      field: str = 'model.moe.layers') -> tuple[int, ...]:
  """Which blocks (0-based) get an MoE MLP (or, with another `field`, a
  block kind: `model.block_options.<kind>_layers`).

  spec: a sequence of block indices; 'every:N' (blocks N-1, 2N-1, ..., i.e.
  V-MoE's "every other layer" for N=2); 'last:N' (the last N blocks);
  'second_half' (blocks depth//2 .. depth-1, as in Soft MoE B/16); or 'none'.
  """
  if spec is None or spec == 'none':
    return ()
  if isinstance(spec, str):
    kind, _, arg = spec.partition(':')
    if kind == 'second_half' and not arg:
      return tuple(range(depth // 2, depth))
    if kind in ('every', 'last') and arg.isdigit() and int(arg) >= 1:
      n = int(arg)
      if kind == 'every':
        return tuple(range(n - 1, depth, n))
      return tuple(range(max(depth - n, 0), depth))
    raise ValueError(
        f"{field}={spec!r} is not one of 'every:N', 'last:N', "
        f"'second_half', 'none' or a list of block indices")
  indices = tuple(int(i) for i in spec)
  bad = [i for i in indices if not 0 <= i < depth]
  if bad or len(set(indices)) != len(indices):
    raise ValueError(f'{field}={tuple(spec)!r} must be distinct block '
                     f'indices in [0, {depth})')
  return tuple(sorted(indices))


def validate_kinds(*, size: VitSize, pool: str, attention: Any,
                   attention_options: Any, block: Any, block_options: Any,
                   moe: Any, prefix: str = 'model') -> tuple[int, ...]:
  """Checks the attention and block kinds and their options against the
  model (ConfigError, one line); returns the blocks the block kind applies
  to."""
  attention_lib.ATTENTION.check(
      attention, attention_options, field=f'{prefix}.attention',
      options_field=f'{prefix}.attention_options', num_heads=size.num_heads)
  if block not in blocks_lib.names():  # named before its options are read
    blocks_lib.BLOCKS.check(block, None, field=f'{prefix}.block',
                            options_field=f'{prefix}.block_options')
  options = blocks_lib.BLOCKS.options(block_options)
  option = getattr(blocks_lib.get(block), 'LAYERS_OPTION', None)
  try:
    kind_blocks = moe_block_indices(
        blocks_lib.layers_spec(block, options), size.depth,
        field=f'{prefix}.block_options.{option}')
    moe_blocks = moe_block_indices(moe.get('layers') if moe else None,
                                   size.depth)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  blocks_lib.BLOCKS.check(
      block, block_options, field=f'{prefix}.block',
      options_field=f'{prefix}.block_options', dim=size.width,
      attention=attention, moe=moe, moe_blocks=moe_blocks,
      kind_blocks=kind_blocks, num_prefix_tokens=int(pool == 'tok'))
  return kind_blocks


class MultiHeadAttention(nnx.Module):
  """Multi-head self-attention; qkv kernel [d, 3, heads, d/heads]."""

  def __init__(self, dim: int, num_heads: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'width {dim} not divisible by num_heads {num_heads}')
    head_dim = dim // num_heads
    init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2, 3))
    self.qkv_kernel = layers.param(rngs, init, (dim, 3, num_heads, head_dim),
                                   ('embed', None, 'heads', 'kv'), param_dtype)
    self.qkv_bias = layers.param(rngs, nnx.initializers.zeros_init(),
                                 (3, num_heads, head_dim),
                                 (None, 'heads', 'kv'), param_dtype)
    out_init = nnx.initializers.xavier_uniform(in_axis=(0, 1), out_axis=2)
    self.out_kernel = layers.param(rngs, out_init, (num_heads, head_dim, dim),
                                   ('heads', 'kv', 'embed'), param_dtype)
    self.out_bias = layers.param(rngs, nnx.initializers.zeros_init(), (dim,),
                                 ('embed',), param_dtype)
    self.dtype = dtype

  def qkv(self, x: jax.Array) -> jax.Array:
    """x [b, n, d] -> [3, b, n, h, k]: queries, keys, values."""
    dtype = self.dtype or x.dtype
    qkv = jnp.einsum('bnd,dthk->tbnhk', x.astype(dtype),
                     self.qkv_kernel[...].astype(dtype))
    qkv = qkv + self.qkv_bias[...].astype(dtype)[:, None, None]
    return checkpoint_name(qkv, 'qkv')  # for model.remat='save:qkv'

  def attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Scaled dot-product attention per head: q, k, v [b, n, h, k] -> the
    heads' outputs [b, n, h, k]."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum('bqhk,bmhk->bhqm', q * scale, k)
    # Softmax in float32 for stability under bf16 activations.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(
        q.dtype)
    return jnp.einsum('bhqm,bmhk->bqhk', weights, v)

  def heads(self, x: jax.Array) -> jax.Array:
    """x [b, n, d] -> every head's output [b, n, h, k] (before the output
    projection)."""
    return self.attention(*self.qkv(x))

  def project(self, heads: jax.Array) -> jax.Array:
    """The output projection: heads [b, n, h, k] -> [b, n, d]."""
    dtype = heads.dtype
    out = jnp.einsum('bqhk,hkd->bqd', heads, self.out_kernel[...].astype(dtype))
    return out + self.out_bias[...].astype(dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [b, n, d] -> [b, n, d]."""
    return self.project(self.heads(x))

  def attend(self, x: jax.Array, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """The attention-kind interface (`vmoe.nn.attention`): (y, metrics)."""
    del train, rngs
    return self(x), {}


class EncoderBlock(nnx.Module):
  """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)); MLP dense or MoE.

  attention, attention_options: the attention kind (`vmoe.nn.attention`)
  and its merged options; its metrics join the block's under 'attention/'.

  Called as block(x, drop_path_rate=..., train=..., rngs=...) -> (x,
  metrics): the stochastic depth rate is an argument, not an attribute, so
  that blocks at every depth are the same module and scan together
  (`vmoe.nn.scan`). Every block kind (`vmoe.nn.blocks`) follows this call
  signature.
  """

  def __init__(self, dim: int, num_heads: int, mlp: nnx.Module, *,
               dropout_rate: float, dtype, param_dtype, rngs: nnx.Rngs,
               attention: str = 'mha', attention_options: Any = None):
    self.ln1 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn = attention_lib.build(
        attention, MultiHeadAttention,
        attention_lib.ATTENTION.options(attention_options), dim, num_heads,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln2 = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp = mlp
    self.dropout_rate = dropout_rate

  def __call__(self, x, *, drop_path_rate: float | jax.Array = 0.0,
               train: bool, rngs: Any):
    x = layers.materialize_cotangent(x)
    y, attn_metrics = self.attn.attend(self.ln1(x), train=train, rngs=rngs)
    y = checkpoint_name(y, 'attn')
    y = dropout(y, self.dropout_rate, train=train, rngs=rngs)
    x = x + drop_path(y, drop_path_rate, train=train, rngs=rngs)
    x = layers.materialize_cotangent(x)
    y, metrics = self.mlp(self.ln2(x), train=train, rngs=rngs)
    y = checkpoint_name(y, 'mlp')
    y = dropout(y, self.dropout_rate, train=train, rngs=rngs)
    x = x + drop_path(y, drop_path_rate, train=train, rngs=rngs)
    return x, layers.join_metrics(metrics, attention=attn_metrics)


def encoder_block(index: int, *, size: VitSize, moe: Any,
                  moe_blocks: tuple[int, ...], block: str,
                  kind_blocks: tuple[int, ...], block_options: Any,
                  attention: str, attention_options: Any,
                  dropout_rate: float, gelu: str, dtype, param_dtype,
                  rngs: nnx.Rngs) -> nnx.Module:
  """Block `index` of the encoder: the model's one block factory.

  The block kind `block` (`vmoe.nn.blocks`) at the blocks it selects
  (`kind_blocks`), the standard block elsewhere; the MLP slot an MoE layer
  (`vmoe.nn.moe.build_layer`) at `moe_blocks`. Blocks whose modules come out
  identical (same kind, same MLP, same static options) scan together
  (`model.scan_layers`).
  """
  d = size.width
  if index in moe_blocks:
    # model.moe.dropout: dropout inside the experts (vmoe's moe.dropout_rate;
    # None = model.dropout).
    expert_dropout = moe.get('dropout')
    mlp = moe_lib.build_layer(
        d, size.mlp_dim, config=moe,
        dropout_rate=dropout_rate if expert_dropout is None else expert_dropout,
        gelu=gelu, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  else:
    mlp = MlpBlock(d, size.mlp_dim, dropout_rate=dropout_rate, gelu=gelu,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  return blocks_lib.build(
      block if index in kind_blocks else 'standard', EncoderBlock,
      block_options, d, size.num_heads, mlp, dropout_rate=dropout_rate,
      dtype=dtype, param_dtype=param_dtype, rngs=rngs, attention=attention,
      attention_options=attention_options)


class VisionTransformer(nnx.Module):
  """ViT / ViT-MoE classifier: images [b, H, W, C] -> logits [b, classes].

  `__call__` returns (logits, metrics); metrics holds 'auxiliary_loss' (sum of
  the weighted MoE auxiliary losses, 0 for a dense model) and, per MoE block i,
  its routing metrics under 'block_{i}/<name>'.

  gelu: 'tanh' (the approximation that vit_jax, big_vision and
  google-research/vmoe use, so imported weights compute the published
  function) or 'exact' (erf), in every dense MLP and expert.
  representation_size: r, a pre-logits layer Dense(d -> r) + tanh before the
    head (the ImageNet-21k pre-training of ViT and V-MoE); None = none.
  size: width / depth / mlp_dim / heads overriding those of `variant` (whose
    patch size is kept); see `model_size`.
  attention, attention_options: the attention kind of every block
    (`vmoe.nn.attention`: 'mha', 'moh', 'gated') and its options (a mapping;
    None = defaults).
  block, block_options: the block kind (`vmoe.nn.blocks`: 'standard', 'mod',
    'mone') of the blocks its `<kind>_layers` option selects, and its
    options; the other blocks are standard.
  scan_layers: runs of identical blocks as scanned stacks with stacked
    parameters (`vmoe.nn.scan`; `layout` says which). Parameters are then
    'stacks/{n}/unit/{j}/...' [reps, ...] and, for blocks outside a stack,
    'blocks/{i}/...'; `vmoe.nn.scan.to_canonical` converts them to the
    unscanned 'blocks/{i}/...' of every block.
  remat: `jax.checkpoint` policy of every block or scanned unit
    (`vmoe.nn.scan.REMAT_POLICIES`; 'none' = no rematerialisation).
  head_bias_init: the initial head bias (big_vision and vmoe start sigmoid
    cross-entropy training at about -log(classes)).
  param_dtype: dtype of the stored parameters (float32, or bfloat16 to halve
    their memory; computations cast them to `dtype`).

  Randomness: block i draws from its own streams, the model's 'dropout' and
  'gating' keys folded with i, and the router noise of an example from its
  own key, so the scanned and unscanned layouts, with or without remat,
  compute the same function with the same draws.
  """

  def __init__(self, *, num_classes: int, image_size: int, num_channels: int,
               variant: str, pool: str = 'tok', dropout_rate: float = 0.0,
               stochastic_depth: float = 0.0,
               moe: ml_collections.ConfigDict | None = None,
               gelu: str = batched_mlp.DEFAULT_GELU,
               representation_size: int | None = None,
               size: VitSize | None = None, dtype=None,
               param_dtype=jnp.float32, head_zero_init: bool = True,
               head_bias_init: float = 0.0,
               scan_layers: bool = False, remat: str = 'none',
               attention: str = 'mha', attention_options: Any = None,
               block: str = 'standard', block_options: Any = None,
               rngs: nnx.Rngs):
    variant_size, patch = parse_variant(variant)
    size = size or variant_size
    if image_size % patch:
      raise ValueError(f'image size {image_size} is not divisible by the '
                       f'patch size {patch} of model.variant={variant!r}')
    if pool not in ('tok', 'gap'):
      raise ValueError(f"model.pool={pool!r} is not one of 'tok', 'gap'")
    d = size.width
    self.patch = patch
    self.pool = pool
    self.dtype = dtype
    self.dropout_rate = dropout_rate
    num_patches = (image_size // patch) ** 2
    self.patch_kernel = layers.param(
        rngs, nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
        (patch, patch, num_channels, d), (None, None, None, 'embed'),
        param_dtype)
    self.patch_bias = layers.param(rngs, nnx.initializers.zeros_init(), (d,),
                                   ('embed',), param_dtype)
    num_tokens = num_patches + (1 if pool == 'tok' else 0)
    self.pos_embedding = layers.param(
        rngs, nnx.initializers.normal(stddev=0.02), (1, num_tokens, d),
        (None, None, 'embed'), param_dtype)
    self.cls_token = (layers.param(rngs, nnx.initializers.zeros_init(),
                                   (1, 1, d), (None, None, 'embed'),
                                   param_dtype) if pool == 'tok' else None)
    moe_blocks = moe_block_indices(moe.layers if moe is not None else None,
                                   size.depth)
    self.moe_blocks = moe_blocks
    scan_lib.validate_remat(remat)
    self.remat = remat
    # Stochastic depth rate grows linearly with depth (Huang et al. 2016).
    self.drop_path_rates = tuple(stochastic_depth * i / max(size.depth - 1, 1)
                                 for i in range(size.depth))
    kind_blocks = validate_kinds(
        size=size, pool=pool, attention=attention,
        attention_options=attention_options, block=block,
        block_options=block_options, moe=moe)
    factory = functools.partial(
        encoder_block, size=size, moe=moe, moe_blocks=moe_blocks,
        block=block, kind_blocks=kind_blocks,
        block_options=blocks_lib.BLOCKS.options(
            block_options, num_prefix_tokens=1 if pool == 'tok' else 0),
        attention=attention, attention_options=attention_options,
        dropout_rate=dropout_rate, gelu=gelu, dtype=dtype,
        param_dtype=param_dtype)
    # Each block initialises from its own key, so both layouts hold the same
    # parameters for a seed.
    blocks_key = rngs.params()
    build = lambda i: factory(i, rngs=nnx.Rngs(
        params=jax.random.fold_in(blocks_key, i)))
    if scan_layers:
      self.layout = scan_lib.plan([
          scan_lib.signature(nnx.eval_shape(lambda i=i: factory(
              i, rngs=nnx.Rngs(0)))) for i in range(size.depth)])
    else:
      self.layout = tuple(scan_lib.Single(i) for i in range(size.depth))
    singles = [seg.index for seg in self.layout
               if isinstance(seg, scan_lib.Single)]
    if scan_layers:
      # Keyed by block index ('blocks/5/...', as unscanned).
      self.blocks = nnx.Dict({str(i): build(i) for i in singles})
      self.stacks = nnx.List([
          scan_lib.BlockStack([[build(seg.block(t, j))
                                for j in range(seg.period)]
                               for t in range(seg.reps)])
          for seg in self.layout if isinstance(seg, scan_lib.Stack)])
    else:
      self.blocks = nnx.List([build(i) for i in singles])
      self.stacks = None
    self.encoder_norm = LayerNorm(d, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
    self.pre_logits = (Dense(d, representation_size, axes=('embed', 'mlp'),
                             dtype=jnp.float32, param_dtype=param_dtype,
                             rngs=rngs)
                       if representation_size else None)
    head_init = (nnx.initializers.zeros_init() if head_zero_init
                 else nnx.initializers.xavier_uniform())
    self.head = Dense(representation_size or d, num_classes,
                      axes=('embed', 'vocab'), kernel_init=head_init,
                      bias_init=nnx.initializers.constant(head_bias_init),
                      dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

  def embed(self, images: jax.Array) -> jax.Array:
    """images [b, H, W, C] -> patch tokens [b, n, d] (non-overlapping conv)."""
    b, hgt, wid, c = images.shape
    p = self.patch
    dtype = self.dtype or jnp.float32
    x = images.astype(dtype).reshape(b, hgt // p, p, wid // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (hgt // p) * (wid // p), -1)
    kernel = self.patch_kernel[...].astype(dtype).reshape(p * p * c, -1)
    return x @ kernel + self.patch_bias[...].astype(dtype)

  def __call__(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None,
               example_ids: jax.Array | None = None):
    """images [b, H, W, C] -> (logits [b, classes] float32, metrics)."""
    features, metrics = self.features(images, train=train, rngs=rngs,
                                      example_ids=example_ids)
    return self.head(features), metrics

  @staticmethod
  def _block_keys(rngs: Any, batch: int, example_ids: jax.Array | None,
                  train: bool) -> dict[str, jax.Array] | None:
    """Base keys of the blocks' random streams (None at evaluation).

    'gating' (router noise) has one key per example, from its index in the
    batch (`example_ids`, default 0..b-1), so an example's router noise does
    not depend on how the batch is split into micro-batches.
    """
    if rngs is None or not train:
      return None
    keys = {}
    if 'dropout' in rngs:
      keys['dropout'], keys['drop_path'] = jax.random.split(rngs.dropout())
    if 'gating' in rngs:
      ids = jnp.arange(batch) if example_ids is None else example_ids
      keys['gating'] = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
          rngs.gating(), ids)
    return keys

  @staticmethod
  def _streams(keys: dict[str, jax.Array] | None, index) -> Any:
    """The random streams of block `index` (a Python or traced int)."""
    if keys is None:
      return None
    return layers.Streams({name: layers.fold_in(key, index)
                           for name, key in keys.items()})

  def _run_block(self, block, x, keys, *, index, rate, train):
    return block(x, drop_path_rate=rate, train=train,
                 rngs=self._streams(keys, index))

  def _run_stack(self, seg: scan_lib.Stack, x, keys, train):
    """The blocks of a scanned stack: (x, [per unit position j] metrics with
    a leading [reps] axis)."""
    rates = np.asarray([[self.drop_path_rates[seg.block(t, j)]
                         for j in range(seg.period)]
                        for t in range(seg.reps)], np.float32)
    xs = jnp.asarray(rates) if train and rates.any() else None

    def body(unit, x, t, rates_t):
      outs = []
      for j, block in enumerate(unit):
        index = seg.start + t * seg.period + j
        x, m = block(x, drop_path_rate=0.0 if rates_t is None else rates_t[j],
                     train=train, rngs=self._streams(keys, index))
        outs.append(m)
      return x, outs

    return self.stacks[seg.number].scan(x, body, xs, remat=self.remat)

  def features(self, images: jax.Array, *, train: bool = False,
               rngs: nnx.Rngs | None = None,
               example_ids: jax.Array | None = None):
    """images [b, H, W, C] -> (pre-logits [b, r or d] float32, metrics).

    example_ids: int [b], the examples' indices in the whole batch when
    these images are a micro-batch of it (default 0..b-1; see
    `_block_keys`).

    The input of the head: the pooled encoder output (class token or mean),
    through the pre-logits layer if the model has one. Few-shot linear
    evaluation and the routing analyses read these (big_vision's
    'pre_logits' representation).
    """
    x = self.embed(images)
    if self.cls_token is not None:
      cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype),
                             (x.shape[0], 1, x.shape[2]))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embedding[...].astype(x.dtype)
    x = dropout(x, self.dropout_rate, train=train, rngs=rngs)
    keys = self._block_keys(rngs, x.shape[0], example_ids, train)
    per_block = {}
    for seg in self.layout:
      if isinstance(seg, scan_lib.Single):
        block = self.blocks[str(seg.index) if self.stacks is not None
                            else seg.index]
        rate = self.drop_path_rates[seg.index]
        run = functools.partial(self._run_block, index=seg.index, rate=rate,
                                train=train)
        x, per_block[seg.index] = scan_lib.call_block(
            block, x, run, keys, remat=self.remat)
      else:
        x, outs = self._run_stack(seg, x, keys, train)
        for t in range(seg.reps):
          for j in range(seg.period):
            per_block[seg.block(t, j)] = jax.tree.map(
                lambda v, t=t: v[t], outs[j])
    metrics = {AUX_LOSS_KEY: jnp.zeros((), jnp.float32)}
    for i in sorted(per_block):  # block order, as the sum of the losses
      for name, value in per_block[i].items():
        metrics[f'block_{i}/{name}'] = value
        if name == AUX_LOSS_KEY:
          metrics[AUX_LOSS_KEY] += value.astype(jnp.float32)
    x = self.encoder_norm(x)
    x = x[:, 0] if self.pool == 'tok' else jnp.mean(x, axis=1)
    x = x.astype(jnp.float32)
    if self.pre_logits is not None:
      x = jnp.tanh(self.pre_logits(x))
    return x, metrics


def create_model(model_cfg: ml_collections.ConfigDict, *, num_classes: int,
                 image_size: int, num_channels: int,
                 rngs: nnx.Rngs) -> VisionTransformer:
  """Builds the model described by `config.model`."""
  dtype = jnp.dtype(model_cfg.get('dtype', 'float32'))
  return VisionTransformer(
      num_classes=num_classes, image_size=image_size,
      num_channels=num_channels, variant=model_cfg.variant,
      size=model_size(model_cfg)[0],
      representation_size=model_cfg.get('representation_size'),
      pool=model_cfg.get('pool', 'tok'),
      dropout_rate=model_cfg.get('dropout', 0.0),
      stochastic_depth=model_cfg.get('stochastic_depth', 0.0),
      moe=model_cfg.get('moe', None),
      gelu=model_cfg.get('gelu', batched_mlp.DEFAULT_GELU),
      dtype=dtype,
      param_dtype=jnp.dtype(model_cfg.get('param_dtype', 'float32')),
      scan_layers=bool(model_cfg.get('scan_layers', False)),
      remat=model_cfg.get('remat', 'none'),
      head_zero_init=model_cfg.get('head_zero_init', True),
      head_bias_init=float(model_cfg.get('head_bias_init', 0.0)),
      attention=model_cfg.get('attention', 'mha'),
      attention_options=model_cfg.get('attention_options'),
      block=model_cfg.get('block', 'standard'),
      block_options=model_cfg.get('block_options'), rngs=rngs)


def unscanned_config(model_cfg: ml_collections.ConfigDict
                     ) -> ml_collections.ConfigDict:
  """`config.model` with the unscanned layout and no remat: the same
  function, with one module per block (`model.blocks[i]`), which the
  analysis and inference code address."""
  out = ml_collections.ConfigDict(model_cfg.to_dict())
  if 'scan_layers' in out:
    out.scan_layers = False
  if 'remat' in out:
    out.remat = 'none'
  return out


def num_tokens(model_cfg: ml_collections.ConfigDict, image_size: int) -> int:
  """Tokens per image entering the encoder (patches + class token)."""
  _, patch = parse_variant(model_cfg.variant)
  cls = 1 if model_cfg.get('pool', 'tok') == 'tok' else 0
  return (image_size // patch) ** 2 + cls


def count_params(tree: Any) -> int:
  """Total number of parameters (elements) of a pytree of arrays/shapes."""
  return sum(int(x.size) for x in jax.tree.leaves(tree))
