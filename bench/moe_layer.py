"""MoE layer vs dense MLP: time, FLOP rate and memory on the local backend.

    python -m bench.moe_layer --quick    # target rows at 6304 tokens (~1 min)
    python -m bench.moe_layer            # full sweep (~6 min on 2 cores)

Every program is compiled ahead of time, warmed up, then timed as the median
of repeats interleaved across all programs of a section in one process (so
background noise hits every variant alike). 'fwd' times y = layer(x);
'fwd+bwd' times the gradient of sum(y * t) + auxiliary loss w.r.t. all
parameters and x. 'temp MB' is the compiled fwd+bwd program's
`memory_analysis()` scratch size.

Each MoE row is also given as a ratio to a dense MLP of equal active FLOPs: the
same MLP (d, h) run on as many tokens as the MoE has expert slots (g * e * c;
g * e * p for Soft MoE; k * tokens for dropless). Router, dispatch and combine
(and for Soft MoE its three [s, n, d] contractions) are the overhead the ratio
measures. 'GFLOP/s' is the active (expert MLP) FLOPs per second, '% peak' its
share of the f32 matmul peak measured in the same run.

Sections (full mode; --quick runs five rows of the first one on half the
batch, 32 images):
  targets  ViT-S dims, 12608 tokens (64 images of 197), capacity factor 1;
           8 and 32 experts, groups of 1 and 4 images.
  methods  every router x dispatch strategy, 8 experts, 6304 tokens.
  capacity capacity factors 1.25 and 2.0 (1.0 is in targets), 6304 tokens.
  vit_b    ViT-B dims (d=768, h=3072), 3152 tokens.
  memory   temp memory of routing + dispatch + combine vs tokens and group
           (compiled, not run).
The number of experts (8 .. 256, groups of 16 images) is swept by
`bench.scaling`.
There is no Pallas dispatch among `vmoe.nn.dispatch.METHODS` yet; Pallas runs
on CPU only in interpret mode, which says nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

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

  @property
  def name(self) -> str:
    if self.router == 'soft':
      r = 'soft'
    elif self.router == 'expert_choice':
      r = 'expert choice'
    else:
      r = f'token choice k={self.k}{" bpr" if self.bpr else ""}'
    return r


def make_layer(c: Case) -> moe.MoeLayer:
  d, h = DIMS[c.dims]
  cfg = moe.default_moe_config()
  cfg.update(dict(router=c.router, num_experts=c.e, group_size=c.group * SEQ,
                  k=c.k, batch_priority=c.bpr, dispatch=c.method,
                  capacity_factor=c.cf, num_slots=c.num_slots,
                  capacity=c.capacity,
                  noise_std=0.0 if c.router == 'expert_choice' else None))
  return moe.MoeLayer(d, h, config=cfg, rngs=nnx.Rngs(0))


def programs(module: nnx.Module, x: jax.Array, train_rngs: bool):
  """AOT-compiled fwd and fwd+bwd of module on x: (fwd, bwd, args, temp)."""
  graphdef, state = nnx.split(module)
  target = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

  def apply(state, x, key):
    m = nnx.merge(graphdef, state)
    rngs = nnx.Rngs(gating=key, dropout=key) if train_rngs else None
    return m(x, train=True, rngs=rngs)

  def loss(state, x, key):
    y, metrics = apply(state, x, key)
    return jnp.sum(y * target) + metrics.get('auxiliary_loss', 0.0)

  args = (state, x, jax.random.key(0))
  fwd = jax.jit(lambda *a: apply(*a)[0]).lower(*args).compile()
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
  mem = bwd.memory_analysis()
  temp = int(mem.temp_size_in_bytes) if mem is not None else 0
  return fwd, bwd, args, temp


def slots_of(layer: moe.MoeLayer, tokens: int) -> int:
  """Token-rows the experts process in a batch (active FLOPs / MLP FLOPs)."""
  s = layer.group_size
  if layer.dispatch == 'dropless' and layer.router_type == 'token_choice':
    return tokens * layer.k  # no buffers: only the (token, choice) pairs
  return tokens // s * layer.num_experts * layer.capacity_for(s, True)


def mlp_flops(rows: int, d: int, h: int) -> float:
  """Forward matmul FLOPs of an MLP (d -> h -> d) on `rows` tokens."""
  return 4.0 * rows * d * h


def run_section(title: str, cases: list[Case], images: int, repeats: int,
                peak: float, warmup: int = 1,
                base_dense: bool = True) -> list[dict]:
  """Times `cases` and their dense references interleaved; returns rows.

  Each case gets a dense MLP reference on exactly its number of slots
  (shared between cases with equal slots); `base_dense` adds one on the
  tokens of the batch. '% peak' is relative to the larger of `peak` and a
  3072^2 f32 matmul timed in the same round-robin.
  """
  t_start = time.perf_counter()
  fwd_calls, bwd_calls, info, dense = {}, {}, {}, {}
  xs = {}

  def x_for(dims, n):
    if (dims, n) not in xs:
      d = DIMS[dims][0]
      base = jax.random.normal(jax.random.key(1), (images * SEQ, d))
      xs[dims, n] = jnp.resize(base, (n, d))
    return xs[dims, n]

  def add(key, fwd, bwd, args):
    fwd_calls[key] = lambda f=fwd, a=args: f(*a)
    bwd_calls[key] = lambda b=bwd, a=args: b(*a)

  def dense_ref(dims, rows):
    key = f'dense {dims} @{rows}'
    if key not in dense:
      d, h = DIMS[dims]
      x = x_for(dims, rows)[None]
      f, b, a, temp = programs(MlpBlock(d, h, rngs=nnx.Rngs(0)), x, False)
      add(key, f, b, a)
      dense[key] = dict(rows=rows, temp=temp, dims=dims)
    return key

  tokens = images * SEQ
  if base_dense:
    for dims in sorted({c.dims for c in cases}):
      dense_ref(dims, tokens)
  for c in cases:
    layer = make_layer(c)
    d = DIMS[c.dims][0]
    x = x_for(c.dims, tokens).reshape(images, SEQ, d)
    f, b, a, temp = programs(layer, x, True)
    add(c, f, b, a)
    slots = slots_of(layer, tokens)
    info[c] = dict(temp=temp, slots=slots, ref=dense_ref(c.dims, slots),
                   capacity=layer.capacity_for(c.group * SEQ, True))
    del layer
  # fwd and fwd+bwd programs of all cases and a square f32 matmul (the peak
  # under the same load) in one round-robin.
  peak_fn, peak_flops = common.peak_call()
  t = common.time_interleaved(
      {**{('fwd', k): f for k, f in fwd_calls.items()},
       **{('bwd', k): f for k, f in bwd_calls.items()},
       ('peak', None): peak_fn}, repeats, warmup)
  t_fwd = {k: t['fwd', k] for k in fwd_calls}
  t_bwd = {k: t['bwd', k] for k in bwd_calls}
  peak = max(peak, peak_flops / t['peak', None] / 1e9)

  rows = []
  for key, v in dense.items():
    d, h = DIMS[v['dims']]
    fl = mlp_flops(v['rows'], d, h)
    rows.append(dict(
        section=title, layer='dense MLP', dims=f'ViT-{v["dims"]}',
        peak_gflops=peak,
        tokens=v['rows'], experts='', group_images='', capacity_factor='',
        dispatch='', capacity='', slots=v['rows'],
        fwd_ms=t_fwd[key] * 1e3, fwd_bwd_ms=t_bwd[key] * 1e3,
        fwd_ratio=1.0, fwd_bwd_ratio=1.0,
        gflops=3 * fl / t_bwd[key] / 1e9,
        pct_peak=100 * 3 * fl / t_bwd[key] / 1e9 / peak,
        temp_mb=v['temp'] / 2**20))
  for c in cases:
    v = info[c]
    d, h = DIMS[c.dims]
    fl = mlp_flops(v['slots'], d, h)
    ref = v['ref']
    rows.append(dict(
        section=title, layer=c.name, dims=f'ViT-{c.dims}', tokens=tokens,
        peak_gflops=peak,
        experts=c.e, group_images=c.group, capacity_factor=c.cf,
        dispatch=c.method, capacity=v['capacity'], slots=v['slots'],
        fwd_ms=t_fwd[c] * 1e3, fwd_bwd_ms=t_bwd[c] * 1e3,
        fwd_ratio=t_fwd[c] / t_fwd[ref], fwd_bwd_ratio=t_bwd[c] / t_bwd[ref],
        gflops=3 * fl / t_bwd[c] / 1e9,
        pct_peak=100 * 3 * fl / t_bwd[c] / 1e9 / peak,
        temp_mb=v['temp'] / 2**20))
  print(f'  [{title}: {len(cases)} cases in '
        f'{time.perf_counter() - t_start:.0f} s, peak RSS '
        f'{common.peak_rss_mb():.0f} MB]', flush=True)
  return rows


def target_cases(quick: bool) -> list[Case]:
  """The rows of the README targets (quick: those sharing 2 dense refs)."""
  if quick:
    return [Case('token_choice', 8, 1, k=2, bpr=True),
            Case('token_choice', 32, 4, k=2, bpr=True),
            Case('token_choice', 32, 4, k=2, bpr=True, method='einsum'),
            Case('token_choice', 32, 1, k=1),
            Case('soft', 32, 1)]
  cases = [Case('token_choice', e, g, k=2, bpr=True)
           for e in (8, 32) for g in (1, 4)]
  cases += [Case('token_choice', 8, 1, k=1), Case('token_choice', 32, 4, k=1),
            Case('token_choice', 32, 4, k=2, bpr=True, method='einsum')]
  cases += [Case('soft', 32, g) for g in (1, 4)]  # slots = tokens (cf 1)
  return cases


def method_cases() -> list[Case]:
  """Every router x dispatch strategy, 8 experts, groups of one image."""
  cases = []
  for method in ('indices', 'einsum'):
    for k, bpr in ((1, False), (2, False), (2, True)):
      cases.append(Case('token_choice', 8, 1, k, bpr, method))
    cases.append(Case('expert_choice', 8, 1, method=method))
    cases.append(Case('soft', 8, 1, method=method))
  # ragged_dot on CPU slows down with the number of experts: 8 only.
  cases.append(Case('token_choice', 8, 1, 1, False, 'dropless'))
  cases.append(Case('token_choice', 8, 1, 2, True, 'dropless'))
  return cases


def capacity_cases() -> list[Case]:
  cases = []
  for cf in (1.25, 2.0):
    cases.append(Case('token_choice', 32, 4, k=2, bpr=True, cf=cf))
    cases.append(Case('token_choice', 32, 4, k=2, bpr=True, cf=cf,
                      method='einsum'))
    cases.append(Case('expert_choice', 32, 4, cf=cf))
  return cases


def vit_b_cases() -> list[Case]:
  return [Case('token_choice', 8, 1, k=2, bpr=True, dims='B'),
          Case('token_choice', 32, 4, k=2, bpr=True, dims='B'),
          Case('token_choice', 32, 4, k=2, bpr=True, dims='B',
               method='einsum'),
          Case('soft', 32, 1, dims='B')]


def dispatch_memory_rows(quick: bool) -> list[dict]:
  """Temp memory of router + dispatch + combine (fwd+bwd), experts = x2.

  Token choice k=2 BPR, 32 experts, capacity factor 1, ViT-S dims. Compiled
  only (not run).
  """
  d = DIMS['S'][0]
  e = 32
  points = (((32, 1), (64, 1), (64, 4), (128, 4)) if not quick
            else ((32, 1), (64, 1), (64, 4)))
  rows = []
  for method in ('indices', 'einsum'):
    for n_images, group in points:
      layer = make_layer(Case('token_choice', e, group, 2, True, method))
      layer.experts = None  # pytype: disable=annotation-type-mismatch
      graphdef, state = nnx.split(layer)
      s = group * SEQ

      def loss(state, x, graphdef=graphdef, s=s, method=method):
        m = nnx.merge(graphdef, state)
        xg = x.reshape(-1, s, d)
        r, metrics = m.route(xg, train=False)
        y = dp.moe_apply(r, xg, lambda b: 2.0 * b, method=method)
        return jnp.sum(y) + metrics['auxiliary_loss']

      x = jax.ShapeDtypeStruct((n_images, SEQ, d), jnp.float32)
      fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
      mb = common.compiled_temp_bytes(fn, state, x) / 2**20
      n = n_images * SEQ
      c = math.ceil(2 * s / e)
      rows.append(dict(dispatch=method, tokens=n, group_tokens=s,
                       gsec_millions=n * e * c / 1e6, temp_mb=mb,
                       mb_per_1k_tokens=mb / n * 1e3))
  return rows


LAYER_COLUMNS = ['section', 'dims', 'layer', 'dispatch', 'experts',
                 'group_images', 'capacity_factor', 'capacity', 'slots',
                 'fwd_ms', 'fwd_bwd_ms', 'fwd_ratio', 'fwd_bwd_ratio',
                 'gflops', 'pct_peak', 'temp_mb']
LAYER_HEADERS = ['section', 'dims', 'layer', 'dispatch', 'e', 'group (img)',
                 'cf', 'c', 'slots', 'fwd ms', 'fwd+bwd ms', 'fwd ratio',
                 'fwd+bwd ratio', 'GFLOP/s', '% peak', 'temp MB']


def run(quick: bool, repeats: int | None = None,
        peak: dict | None = None) -> tuple[str, list[dict], dict]:
  """Runs the layer benchmark; returns (markdown, rows, machine info)."""
  peak = peak or common.matmul_peak()
  info = common.machine_info(peak)
  reps = repeats or 3
  # Quick: half the batch (6304 tokens) and only the target rows. The other
  # sections use smaller batches to fit the time budget; the number of
  # experts is swept by `bench.scaling`.
  sections = [('targets', target_cases(quick), 32 if quick else 64)]
  if not quick:
    sections += [('methods', method_cases(), 32),
                 ('capacity', capacity_cases(), 32),
                 ('vit_b', vit_b_cases(), 16)]
  rows = []
  for title, cases, images in sections:
    rows += run_section(title, cases, images, reps, peak['f32'],
                        base_dense=not quick)
  mem_rows = dispatch_memory_rows(quick)
  md = [f'### MoE layer ({"quick" if quick else "full"})', '',
        common.machine_line(info), '',
        common.markdown_table(rows, LAYER_COLUMNS, LAYER_HEADERS), '',
        'ratio = time / time of the dense MLP on `slots` tokens (equal '
        'active FLOPs), measured interleaved in the same section. GFLOP/s = '
        'active fwd+bwd FLOPs (3 x 4 x slots x d x h) per second; % peak of '
        'the f32 matmul peak measured in the same section (max of the start '
        'of the run and a 3072^2 matmul interleaved with the section). Soft MoE additionally spends '
        '6 x s x n x d FLOPs per group (logits, dispatch, combine; x3 with '
        'the backward), counted here as overhead.', '',
        'Temp memory of routing + dispatch + combine, fwd+bwd (token choice '
        'k=2 BPR, 32 experts, cf 1, ViT-S; experts replaced by x2):', '',
        common.markdown_table(
            mem_rows, ['dispatch', 'tokens', 'group_tokens', 'gsec_millions',
                       'temp_mb', 'mb_per_1k_tokens'],
            ['dispatch', 'tokens', 'group', 'g*s*e*c (M)', 'temp MB',
             'MB per 1k tokens'])]
  markdown = '\n'.join(md)
  common.save_results('moe_layer_quick' if quick else 'moe_layer', rows, info,
                      markdown, extra={'dispatch_memory': mem_rows})
  return markdown, rows, info


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  args = parser.parse_args()
  markdown, _, _ = run(args.quick, args.repeats)
  print(markdown)


if __name__ == '__main__':
  main()
