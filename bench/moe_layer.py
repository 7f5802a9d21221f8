"""MoE layer vs dense MLP: time, FLOP rate and memory on the local backend.

    python -m bench.moe_layer --quick    # the target rows (~1 min on 2 cores)
    python -m bench.moe_layer            # every section (~5 min)

Every program is compiled ahead of time, warmed up, then timed as the median
of repeats interleaved across all programs of a section in one process (so
background noise hits every variant alike). 'fwd' times y = layer(x);
'fwd+bwd' times the gradient of |y - t|^2 / 2 + auxiliary loss w.r.t. all
parameters and x (the output gradient depends on y, as inside a network: with
a loss linear in y, XLA would overlap the backward matmuls with the forward
ones, which no real model allows).

Each MoE row is also given as a ratio to a dense MLP of equal active FLOPs: the
same MLP (d, h) run on as many tokens as the MoE has expert slots (g * e * c;
g * e * p for Soft MoE; k * tokens for dropless), timed in the same section.
Router, dispatch and combine (and for Soft MoE its three [s, n, d]
contractions) are the overhead the ratio measures. 'GFLOP/s' is the active
(expert MLP) fwd+bwd FLOPs per second, '% peak' its share of the f32 matmul
peak measured in the same run. Memory per row, from the compiled fwd+bwd
program's `memory_analysis()`: 'temp MB' (scratch) and 'peak MB' (arguments +
outputs + scratch, an upper bound of what the program holds at once); each
section also reports the process's peak RSS.

Sections (ViT-S dims d=384, h=1536 unless noted; groups in images of 197
tokens):
  targets   12608 tokens (64 images): the rows of the README targets
            (with the Sinkhorn routers beside softmax token and expert
            choice at 32 experts).
  methods   every router x dispatch strategy, 8 experts, 3152 tokens.
  experts   token choice over 8, 32, 128, 256 experts x groups of 1, 4, 16
            images, 3152 tokens.
  capacity  capacity factors 1.25 and 2.0 (token choice with both
            dispatches, expert choice), 32 experts, 3152 tokens.
  vit_b     ViT-B dims (d=768, h=3072), 3152 tokens.
  units     the units beyond the routers, 1576 tokens (8 images): token
            choice with LIMoE's entropy losses, expert / final output
            masking and Multi-Head MoE (matched sizing) against the dense
            MLP of equal active FLOPs; mixture-of-head and gated attention
            against the standard attention; a mixture-of-depths block
            against the standard block on as many tokens (equal active
            FLOPs); a nested-experts block (budget 0.5) against the standard
            block (its FLOP ratio reported beside the time ratio).
  memory    scratch memory of routing + dispatch + combine against tokens and
            group size (compiled, not run).
  breakdown the time of two target rows (token choice k=2 BPR, 32 experts,
            groups of 4 images; Soft MoE, 32 experts, 1 image) split into
            routing, dispatch + combine and the experts beyond dense (full
            mode only).
The cost against the number of experts at fixed active compute is
`bench.scaling`. There is no Pallas dispatch among `vmoe.nn.dispatch.METHODS`;
on CPU Pallas runs only in interpret mode, which says nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from bench import common
from vmoe.nn import dispatch as dp
from vmoe.nn import moe
from vmoe.nn.layers import MlpBlock

SEQ = 197  # tokens per image (ViT-*/16 at 224 px with a class token)
DIMS = {'S': (384, 1536), 'B': (768, 3072)}


@dataclasses.dataclass(frozen=True)
class Case:
  """One MoE layer configuration. group = images (of SEQ tokens) per group."""
  router: str
  e: int
  group: int
  k: int = 1
  bpr: bool = False
  method: str = 'indices'
  cf: float = 1.0
  dims: str = 'S'
  num_slots: int | None = None   # Soft MoE: explicit slots per expert
  capacity: int | None = None    # explicit capacity (fixed active compute)
  # Other model.moe options as (name, value) pairs, and their row label.
  extra: tuple[tuple[str, object], ...] = ()
  label: str = ''

  @property
  def name(self) -> str:
    if self.router == 'soft':
      base = 'soft'
    elif self.router in EXPERT_CHOICE_NAMES:
      base = EXPERT_CHOICE_NAMES[self.router]
    else:
      prefix = 'sinkhorn ' if self.router == 'sinkhorn_token_choice' else ''
      base = f'{prefix}token choice k={self.k}{" bpr" if self.bpr else ""}'
    return f'{base} {self.label}'.strip()


EXPERT_CHOICE_NAMES = {
    'expert_choice': 'expert choice',
    'sinkhorn_expert_choice': 'sinkhorn expert choice',
    'sparsity_constrained_expert_choice': 'sparsity-constrained expert choice',
}


def make_layer(c: Case) -> moe.MoeLayer:
  d, h = DIMS[c.dims]
  cfg = moe.default_moe_config()
  cfg.update(dict(router=c.router, num_experts=c.e, group_size=c.group * SEQ,
                  k=c.k, batch_priority=c.bpr, dispatch=c.method,
                  capacity_factor=c.cf, num_slots=c.num_slots,
                  capacity=c.capacity,
                  noise_std=0.0 if c.router in EXPERT_CHOICE_NAMES
                  else None))
  cfg.update(dict(c.extra))
  return moe.build_layer(d, h, config=cfg, rngs=nnx.Rngs(0))


def programs(module: nnx.Module, x: jax.Array, train_rngs: bool):
  """AOT-compiled fwd and fwd+bwd of module on x: (fwd, bwd, args, memory).

  memory: {'temp': scratch bytes, 'peak': arguments + outputs + scratch} of
  the fwd+bwd program.
  """
  graphdef, state = nnx.split(module)
  target = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

  def apply(state, x, key):
    m = nnx.merge(graphdef, state)
    rngs = nnx.Rngs(gating=key, dropout=key) if train_rngs else None
    return m(x, train=True, rngs=rngs)

  def loss(state, x, key):
    y, metrics = apply(state, x, key)
    return (0.5 * jnp.sum(jnp.square(y - target))
            + metrics.get('auxiliary_loss', 0.0))

  args = (state, x, jax.random.key(0))
  fwd = jax.jit(lambda *a: apply(*a)[0]).lower(*args).compile()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
  return fwd, bwd, args, common.program_memory(bwd)


def slots_of(layer: nnx.Module, tokens: int) -> int:
  """Token-rows the experts process in a batch (active FLOPs / MLP FLOPs).

  For a Multi-Head MoE layer: the rows of the (d, h) dense MLP with the
  FLOPs of its inner experts (sub-token rows of d / h -> h' -> d / h) and
  of its head and merge projections (4 d^2 per token)."""
  inner = moe.routed_layer(layer)
  if inner is not layer:
    heads = layer.heads
    k1 = inner.experts.kernel1
    d_sub, hidden = k1.shape[1], k1.shape[2]
    d, h = d_sub * heads, layer.hidden_dim
    rows = slots_of(inner, tokens * heads) * d_sub * hidden
    return round((rows + tokens * d * d) / (d * h))
  s = layer.group_size
  if layer.dropless:
    return tokens * layer.router.k  # no buffers: the (token, choice) pairs
  return tokens // s * layer.num_experts * layer.capacity_for(s, True)


def mlp_flops(rows: int, d: int, h: int) -> float:
  """Forward matmul FLOPs of an MLP (d -> h -> d) on `rows` tokens."""
  return 4.0 * rows * d * h


def run_section(title: str, cases: list[Case], images: int, repeats: int,
                peak: float, warmup: int = 1) -> list[dict]:
  """Times `cases` and their dense references interleaved; returns rows.

  Each case gets a dense MLP reference on exactly its number of slots (shared
  between cases with equal slots). '% peak' is relative to the larger of
  `peak` and a 3072^2 f32 matmul timed in the same round-robin.
  """
  t_start = time.perf_counter()
  calls, info, dense, xs = {}, {}, {}, {}

  def x_for(dims, n):
    if (dims, n) not in xs:
      d = DIMS[dims][0]
      base = jax.random.normal(jax.random.key(1), (images * SEQ, d))
      xs[dims, n] = jnp.resize(base, (n, d))
    return xs[dims, n]

  def add(key, fwd, bwd, args):
    calls['fwd', key] = lambda f=fwd, a=args: f(*a)
    calls['bwd', key] = lambda b=bwd, a=args: b(*a)

  def dense_ref(dims, rows):
    key = f'dense {dims} @{rows}'
    if key not in dense:
      d, h = DIMS[dims]
      f, b, a, mem = programs(MlpBlock(d, h, rngs=nnx.Rngs(0)),
                              x_for(dims, rows)[None], False)
      add(key, f, b, a)
      dense[key] = dict(rows=rows, dims=dims, **mem)
    return key

  tokens = images * SEQ
  for c in cases:
    layer = make_layer(c)
    d = DIMS[c.dims][0]
    f, b, a, mem = programs(layer, x_for(c.dims, tokens).reshape(-1, SEQ, d),
                            True)
    add(c, f, b, a)
    slots = slots_of(layer, tokens)
    inner = moe.routed_layer(layer)
    info[c] = dict(slots=slots, ref=dense_ref(c.dims, slots),
                   capacity=inner.capacity_for(inner.group_size, True), **mem)
    del layer
  # All programs and a square f32 matmul (the peak under the same load) in
  # one round-robin.
  peak_fn, peak_flops = common.peak_call()
  t = common.time_interleaved({**calls, ('peak', None): peak_fn}, repeats,
                              warmup)
  peak = max(peak, peak_flops / t['peak', None] / 1e9)

  def row(key, v, **fields):
    d, h = DIMS[fields['dims']]
    fl = 3 * mlp_flops(v['slots'], d, h) / t['bwd', key] / 1e9
    ref = v.get('ref', key)
    return dict(
        section=title, dims=f'ViT-{fields.pop("dims")}', **fields,
        slots=v['slots'], fwd_ms=t['fwd', key] * 1e3,
        fwd_bwd_ms=t['bwd', key] * 1e3,
        fwd_ratio=t['fwd', key] / t['fwd', ref],
        fwd_bwd_ratio=t['bwd', key] / t['bwd', ref],
        gflops=fl, pct_peak=100 * fl / peak, peak_gflops=peak,
        temp_mb=v['temp'] / 2**20, peak_mb=v['peak'] / 2**20)

  rows = [row(key, dict(v, slots=v['rows']), layer='dense MLP', dims=v['dims'],
              tokens=v['rows'])
          for key, v in dense.items()]
  for c in cases:
    v = info[c]
    rows.append(row(c, v, layer=c.name, dims=c.dims, tokens=tokens,
                    dispatch=c.method, experts=c.e, group_images=c.group,
                    capacity_factor=c.cf, capacity=v['capacity'],
                    rows_per_expert=v.get('rows_per_expert',
                                          v['slots'] // c.e)))
  print(f'  [{title}: {len(cases)} cases in '
        f'{time.perf_counter() - t_start:.0f} s, peak RSS '
        f'{common.peak_rss_mb():.0f} MB]', flush=True)
  return rows


def target_cases(quick: bool) -> list[Case]:
  """The rows of the README targets (quick: one per target)."""
  tc2 = dict(k=2, bpr=True)
  einsum = Case('token_choice', 32, 4, method='einsum', **tc2)
  # Slots = tokens for Soft MoE: ceil(197 / 32) = 7 slots per expert.
  # The Sinkhorn routers against their softmax counterparts (20 iterations).
  sinkhorn_tc = Case('sinkhorn_token_choice', 32, 4, **tc2)
  if quick:
    return [Case('token_choice', 8, 1, **tc2), Case('token_choice', 32, 4, **tc2),
            einsum, Case('soft', 32, 1), sinkhorn_tc]
  cases = [Case('token_choice', e, g, **tc2) for e in (8, 32) for g in (1, 4)]
  cases += [Case('token_choice', 8, 1), Case('token_choice', 32, 4)]
  cases += [einsum, Case('soft', 32, 1), Case('soft', 32, 4)]
  return cases + [sinkhorn_tc, Case('expert_choice', 32, 4),
                  Case('sinkhorn_expert_choice', 32, 4)]


def method_cases() -> list[Case]:
  """Every router x dispatch strategy, 8 experts, groups of one image."""
  cases = []
  for method in ('indices', 'einsum'):
    for k, bpr in ((1, False), (2, False), (2, True)):
      cases.append(Case('token_choice', 8, 1, k, bpr, method))
    cases.append(Case('expert_choice', 8, 1, method=method))
    cases.append(Case('soft', 8, 1, method=method))
    cases.append(Case('sinkhorn_token_choice', 8, 1, 2, True, method))
    cases.append(Case('sinkhorn_expert_choice', 8, 1, method=method))
    cases.append(Case('sparsity_constrained_expert_choice', 8, 1,
                      method=method))
  # Dropless runs `jax.lax.ragged_dot`, whose CPU cost grows with the number
  # of experts (8-10x a dense MLP at 8): two rows. Soft MoE has no sparse
  # layout (its 'dropless' is the 'indices' path).
  cases.append(Case('token_choice', 8, 1, 1, False, 'dropless'))
  cases.append(Case('token_choice', 8, 1, 2, True, 'dropless'))
  return cases


def expert_cases() -> list[Case]:
  """Token choice (k=2, BPR) over experts x group sizes, capacity factor 1."""
  return [Case('token_choice', e, g, k=2, bpr=True)
          for e in (8, 32, 128, 256) for g in (1, 4, 16)]


def capacity_cases() -> list[Case]:
  """Capacity factors 1.25 and 2.0 (1.0 is in the targets section)."""
  cases = []
  for cf in (1.25, 2.0):
    for method in ('indices', 'einsum'):
      cases.append(Case('token_choice', 32, 4, k=2, bpr=True, cf=cf,
                        method=method))
    cases.append(Case('expert_choice', 32, 4, cf=cf))
  return cases


def vit_b_cases() -> list[Case]:
  return [Case('token_choice', 8, 1, k=2, bpr=True, dims='B'),
          Case('token_choice', 32, 4, k=2, bpr=True, dims='B'),
          Case('token_choice', 32, 4, k=2, bpr=True, dims='B',
               method='einsum'),
          Case('soft', 32, 1, dims='B')]


def unit_moe_cases() -> list[Case]:
  """The MoE-layer units against the dense MLP of equal active FLOPs."""
  tc2 = dict(k=2, bpr=True)
  entropy = (('local_entropy_loss_weight', 0.01),
             ('global_entropy_loss_weight', 0.01),
             ('global_entropy_threshold', 2.0))
  return [Case('token_choice', 32, 4, **tc2),
          Case('token_choice', 32, 4, **tc2, extra=entropy,
               label='+ entropy losses'),
          Case('token_choice', 32, 4, **tc2,
               extra=(('expert_output_mask_rate', 0.2),), label='+ EOM 0.2'),
          Case('token_choice', 32, 4, **tc2,
               extra=(('final_output_mask_rate', 0.2),), label='+ FOM 0.2'),
          Case('token_choice', 32, 4, k=1),
          Case('token_choice', 32, 4, k=1,
               extra=(('kind', 'multi_head'), ('mh_heads', 2)),
               label='multi-head (2 heads, matched)')]


class _Attend(nnx.Module):
  """An attention kind behind the MLP-slot call signature (for `programs`)."""

  def __init__(self, attention: nnx.Module):
    self.attention = attention

  def __call__(self, x, *, train: bool, rngs: nnx.Rngs | None):
    return self.attention.attend(x, train=train, rngs=rngs)


def unit_modules(dims: str = 'S') -> list[tuple[str, Callable, int, str,
                                                 Callable, int, float]]:
  """(name, make the unit, its tokens per image, counterpart name, make the
  counterpart, its tokens per image, FLOP ratio unit / counterpart) of the
  attention and block kinds, at ViT dims (heads: ViT-S 6)."""
  from vmoe.nn import attention  # pylint: disable=g-import-not-at-top
  from vmoe.nn import blocks  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  from vmoe.nn.blocks import mod  # pylint: disable=g-import-not-at-top
  from vmoe.nn.blocks import mone  # pylint: disable=g-import-not-at-top
  d, h = DIMS[dims]
  heads = d // 64

  def attn(kind, **options):
    return lambda: _Attend(attention.build(
        kind, vit.MultiHeadAttention, attention.ATTENTION.options(options),
        d, heads, rngs=nnx.Rngs(0)))

  def block(kind, **options):
    return lambda: blocks.build(
        kind, vit.EncoderBlock,
        blocks.BLOCKS.options(options, num_prefix_tokens=1), d, heads,
        MlpBlock(d, h, rngs=nnx.Rngs(1)), dropout_rate=0.0, dtype=None,
        param_dtype=jnp.float32, rngs=nnx.Rngs(0))

  c = mod.capacity_tokens(SEQ, 0.5)
  counts = mone.token_counts(SEQ, mone.capacity_distribution(0.5, 4), 1)
  nested = sum(n * (8 * d * (d >> (3 - j)) + 4 * (d >> (3 - j)) * h)
               for j, n in enumerate(counts)) + 4 * SEQ * SEQ * d
  return [
      (f'moh attention ({heads} heads: 1 shared + top-{heads // 2} routed)',
       attn('moh', moh_shared_heads=1, moh_k=heads // 2), SEQ, 'attention',
       attn('mha'), SEQ, 1.0),
      ('gated attention (headwise)', attn('gated'), SEQ, 'attention',
       attn('mha'), SEQ, 1.0),
      ('mixture-of-depths block (capacity 0.5)', block('mod'), SEQ,
       f'standard block on {c} tokens', block('standard'), c, 1.0),
      ('nested-experts block (4 experts, budget 0.5)',
       block('mone', mone_budget=0.5), SEQ, 'standard block',
       block('standard'), SEQ, nested / mod.block_flops(SEQ, d, h)),
  ]


def run_units(images: int, repeats: int, peak: float) -> list[dict]:
  """The units section: MoE-layer units as `run_section` rows, then the
  attention and block kinds against their counterparts, timed
  interleaved."""
  rows = run_section('units', unit_moe_cases(), images, repeats, peak)
  calls, meta = {}, {}
  d = DIMS['S'][0]
  x = jax.random.normal(jax.random.key(1), (images, SEQ, d))
  for name, make, n, ref_name, make_ref, n_ref, flop_ratio in unit_modules():
    for key, fn, tokens in ((name, make, n), (ref_name, make_ref, n_ref)):
      if ('fwd', key) in calls:
        continue
      f, b, a, _ = programs(fn(), x[:, :tokens], True)
      calls['fwd', key] = lambda f=f, a=a: f(*a)
      calls['bwd', key] = lambda b=b, a=a: b(*a)
    meta[name] = (ref_name, flop_ratio)
  t = common.time_interleaved(calls, repeats, warmup=1)
  for name, (ref_name, flop_ratio) in meta.items():
    rows.append(dict(
        section='units', dims='ViT-S', layer=name, dispatch='',
        tokens=images * SEQ, counterpart=ref_name, flop_ratio=flop_ratio,
        fwd_ms=t['fwd', name] * 1e3, fwd_bwd_ms=t['bwd', name] * 1e3,
        fwd_ratio=t['fwd', name] / t['fwd', ref_name],
        fwd_bwd_ratio=t['bwd', name] / t['bwd', ref_name]))
  return rows


UNIT_COLUMNS = ['layer', 'counterpart', 'flop_ratio', 'fwd_ms', 'fwd_bwd_ms',
                'fwd_ratio', 'fwd_bwd_ratio']
UNIT_HEADERS = ['unit', 'counterpart', 'FLOP ratio', 'fwd ms', 'fwd+bwd ms',
                'fwd ratio', 'fwd+bwd ratio']


def overhead_losses(graphdef, s: int, method: str, train: bool
                    ) -> dict[str, Callable]:
  """Losses (state, x [b, SEQ, d], key) -> scalar over parts of an MoE layer.

  'routing': the router and its decision alone (logits, router noise when
  `train`, top-k / soft weights, auxiliary losses), with a gradient into every
  float field of the decision. 'no_experts': routing, dispatch and combine
  with the experts replaced by x2. Build `graphdef` from a layer whose
  `experts` are None, so that no expert gradients are produced.
  """

  def route(state, x, key):
    m = nnx.merge(graphdef, state)
    xg = x.reshape(-1, s, x.shape[-1])
    r, metrics = m.route(xg, train=train,
                         rngs=nnx.Rngs(gating=key) if train else None)
    return xg, r, metrics

  def routing(state, x, key):
    _, r, metrics = route(state, x, key)
    floats = [v for v in jax.tree.leaves(r)
              if jnp.issubdtype(v.dtype, jnp.floating)]
    return metrics['auxiliary_loss'] + sum(1e-3 * jnp.sum(v) for v in floats)

  def no_experts(state, x, key):
    xg, r, metrics = route(state, x, key)
    y = dp.moe_apply(r, xg, lambda b: 2.0 * b, method=method)
    return 0.5 * jnp.sum(jnp.square(y)) + metrics['auxiliary_loss']

  return {'routing': routing, 'no_experts': no_experts}


def breakdown_cases() -> list[Case]:
  """The target rows whose overhead the README explains."""
  return [Case('token_choice', 32, 4, k=2, bpr=True), Case('soft', 32, 1)]


def breakdown_rows(images: int, repeats: int,
                   cases: list[Case] | None = None) -> list[dict]:
  """Where an MoE layer's time beyond the dense MLP goes, fwd+bwd.

  For each case, timed interleaved: the dense MLP on as many tokens as the
  MoE has slots, the whole layer, its routing alone and routing + dispatch +
  combine (experts replaced by x2). The remainder, layer - (routing +
  dispatch + combine) - dense, is what the experts cost beyond one dense
  matmul of the same FLOPs (small batched matmuls, per-expert weights).
  """
  calls, meta = {}, {}
  tokens = images * SEQ
  for c in cases or breakdown_cases():
    layer = make_layer(c)
    d, h = DIMS[c.dims]
    x = jax.random.normal(jax.random.key(1), (images, SEQ, d))
    _, full, args, _ = programs(layer, x, True)
    slots = slots_of(layer, tokens)
    calls[c, 'layer'] = lambda f=full, a=args: f(*a)
    layer.experts = None  # pytype: disable=annotation-type-mismatch
    graphdef, state = nnx.split(layer)
    for part, loss in overhead_losses(graphdef, c.group * SEQ, c.method,
                                      train=True).items():
      part_args = (state, x, jax.random.key(0))
      f = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*part_args).compile()
      calls[c, part] = lambda f=f, a=part_args: f(*a)
    xd = jnp.resize(x.reshape(-1, d), (1, slots, d))
    _, dense, dargs, _ = programs(MlpBlock(d, h, rngs=nnx.Rngs(0)), xd, False)
    calls[c, 'dense'] = lambda f=dense, a=dargs: f(*a)
    meta[c] = slots
  t = common.time_interleaved(calls, repeats, warmup=1)
  rows = []
  for c, slots in meta.items():
    dense, layer = t[c, 'dense'], t[c, 'layer']
    routing, no_experts = t[c, 'routing'], t[c, 'no_experts']
    rows.append(dict(
        section='breakdown', layer=c.name, dispatch=c.method, experts=c.e,
        group_images=c.group, slots=slots, dense_ms=dense * 1e3,
        layer_ms=layer * 1e3, ratio=layer / dense,
        routing=routing / dense,
        dispatch_combine=(no_experts - routing) / dense,
        experts_beyond_dense=(layer - no_experts - dense) / dense))
  return rows


BREAKDOWN_COLUMNS = ['layer', 'dispatch', 'experts', 'group_images', 'slots',
                     'dense_ms', 'layer_ms', 'ratio', 'routing',
                     'dispatch_combine', 'experts_beyond_dense']
BREAKDOWN_HEADERS = ['layer', 'dispatch', 'e', 'group (img)', 'slots',
                     'dense ms', 'layer ms', 'ratio', 'routing',
                     'dispatch + combine', 'experts beyond dense']


def dispatch_memory_rows(quick: bool) -> list[dict]:
  """Scratch memory of router + dispatch + combine (fwd+bwd), experts = x2.

  Token choice k=2 BPR, 32 experts, capacity factor 1, ViT-S dims. Compiled
  only (not run).
  """
  d = DIMS['S'][0]
  e = 32
  points = (((32, 1), (64, 1), (64, 4), (128, 4), (128, 16)) if not quick
            else ((32, 1), (64, 1), (64, 4)))
  rows = []
  for method in ('indices', 'einsum'):
    for n_images, group in points:
      layer = make_layer(Case('token_choice', e, group, 2, True, method))
      layer.experts = None  # pytype: disable=annotation-type-mismatch
      graphdef, state = nnx.split(layer)
      s = group * SEQ
      loss = overhead_losses(graphdef, s, method, train=False)['no_experts']
      x = jax.ShapeDtypeStruct((n_images, SEQ, d), jnp.float32)
      fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
      mb = common.compiled_temp_bytes(fn, state, x, jax.random.key(0)) / 2**20
      n = n_images * SEQ
      c = math.ceil(2 * s / e)
      rows.append(dict(dispatch=method, tokens=n, group_tokens=s,
                       gsec_millions=n * e * c / 1e6, temp_mb=mb,
                       mb_per_1k_tokens=mb / n * 1e3))
  return rows


LAYER_COLUMNS = ['section', 'dims', 'layer', 'dispatch', 'experts',
                 'group_images', 'capacity_factor', 'capacity',
                 'rows_per_expert', 'fwd_ms', 'fwd_bwd_ms', 'fwd_ratio',
                 'fwd_bwd_ratio', 'gflops', 'pct_peak', 'temp_mb', 'peak_mb']
LAYER_HEADERS = ['section', 'dims', 'layer', 'dispatch', 'e', 'group (img)',
                 'cf', 'c', 'rows/expert', 'fwd ms', 'fwd+bwd ms',
                 'fwd ratio', 'fwd+bwd ratio', 'GFLOP/s', '% peak',
                 'temp MB', 'peak MB']
DENSE_COLUMNS = ['section', 'dims', 'tokens', 'fwd_ms', 'fwd_bwd_ms',
                 'gflops', 'pct_peak', 'temp_mb', 'peak_mb']
DENSE_HEADERS = ['section', 'dims', 'tokens', 'fwd ms', 'fwd+bwd ms',
                 'GFLOP/s', '% peak', 'temp MB', 'peak MB']


def sections(quick: bool) -> list[tuple[str, list[Case], int]]:
  """(title, cases, images per batch) of the layer benchmark (the 'units'
  section runs separately: `run_units`)."""
  if quick:
    return [('targets', target_cases(True), 64)]
  return [('targets', target_cases(False), 64),
          ('methods', method_cases(), 16),
          ('experts', expert_cases(), 16),
          ('capacity', capacity_cases(), 16),
          ('vit_b', vit_b_cases(), 16)]


UNIT_IMAGES = 8


def run(quick: bool, repeats: int | None = None, peak: dict | None = None,
        units: bool = False) -> tuple[str, list[dict], list[dict], dict]:
  """Runs the layer benchmark: (markdown, rows, memory rows, machine info).
  units: also the 'units' section in quick mode (always in full mode)."""
  peak = peak or common.matmul_peak()
  info = common.machine_info(peak)
  rows = []
  for title, cases, images in sections(quick):
    rows += run_section(title, cases, images, repeats or 3, peak['f32'])
  unit_rows = ([] if quick and not units else
               run_units(UNIT_IMAGES, repeats or 3, peak['f32']))
  mem_rows = dispatch_memory_rows(quick)
  parts = [] if quick else breakdown_rows(64, repeats or 3)
  if parts:
    print(f'  [breakdown: {len(parts)} cases, peak RSS '
          f'{common.peak_rss_mb():.0f} MB]', flush=True)
  rows += unit_rows
  kind_rows = [r for r in rows if 'counterpart' in r]
  moe_rows = [r for r in rows
              if r['layer'] != 'dense MLP' and 'counterpart' not in r]
  dense_rows = [r for r in rows if r['layer'] == 'dense MLP']
  md = '\n'.join([
      f'### MoE layer ({"quick" if quick else "full"})', '',
      common.machine_line(info), '',
      common.markdown_table(moe_rows, LAYER_COLUMNS, LAYER_HEADERS), '',
      'Attention and block kinds against their standard counterparts '
      '(ViT-S, 8 images of 197 tokens; FLOP ratio = the unit\'s forward '
      'matmul FLOPs over the counterpart\'s):', '',
      common.markdown_table(kind_rows, UNIT_COLUMNS, UNIT_HEADERS), '',
      'ratio = time / time of the dense MLP on as many tokens as the MoE has '
      'expert slots (equal active FLOPs), measured interleaved in the same '
      'section. GFLOP/s = active fwd+bwd FLOPs (3 x 4 x slots x d x h) per '
      'second; % peak of the f32 matmul peak measured in the same run. Soft '
      'MoE additionally spends 18 x s x n x d FLOPs per group (logits, '
      'dispatch, combine, forward and backward), counted here as overhead.',
      '', 'Dense MLP references:', '',
      common.markdown_table(dense_rows, DENSE_COLUMNS, DENSE_HEADERS), '',
      'Scratch memory of routing + dispatch + combine, fwd+bwd (token choice '
      'k=2 BPR, 32 experts, cf 1, ViT-S; experts replaced by x2):', '',
      common.markdown_table(
          mem_rows, ['dispatch', 'tokens', 'group_tokens', 'gsec_millions',
                     'temp_mb', 'mb_per_1k_tokens'],
          ['dispatch', 'tokens', 'group', 'g*s*e*c (M)', 'temp MB',
           'MB per 1k tokens'])])
  if parts:
    md += '\n'.join([
        '', '', 'Where the time beyond the dense MLP goes (fwd+bwd, 12608 '
        'tokens; parts as fractions of the dense time: routing alone, '
        'dispatch + combine with the experts replaced by x2, and the rest, '
        'what the experts cost beyond one dense matmul of equal FLOPs):', '',
        common.markdown_table(parts, BREAKDOWN_COLUMNS, BREAKDOWN_HEADERS)])
  common.save_results('moe_layer_quick' if quick else 'moe_layer', rows, info,
                      md, extra={'dispatch_memory': mem_rows,
                                 'breakdown': parts})
  return md, rows, mem_rows, info


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--units', action='store_true',
                      help="with --quick: add the 'units' section")
  args = parser.parse_args()
  print(run(args.quick, args.repeats, units=args.units)[0])


if __name__ == '__main__':
  main()
