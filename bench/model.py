"""End-to-end ViT / V-MoE / Soft MoE throughput and model FLOP utilisation.

    python -m bench.model --quick     # 3 models, train step, batch 8
    python -m bench.model             # 5 models, train and inference, batch 32

Models (224 px, patch 16, class token: 197 tokens per image, 1000 classes):
  ViT-S/16 dense; V-MoE-S/16 with 8 and 32 experts in every other block
  (top-1 token choice with BPR, capacity factor 1.05, groups of one image,
  the default 'indices' dispatch), which has the active FLOPs of the dense
  model and so is the like-for-like comparison (the paper's top-2 does twice
  the MLP FLOPs in its MoE blocks, 1.34x the model's); Soft MoE-S/16 with 8
  and 32 experts in every other block, slots = tokens (ceil(197 / e) slots per
  expert: 25 for 8 experts, 7 for 32).

Batch 32 per step (the full mode): a per-device batch of V-MoE training on a
TPU core. The optimizer update of the 242M parameters of a 32-expert model is
a fixed cost per step (AdamW reads and writes 7 values per parameter, about
0.25 s on this CPU), so smaller batches show the update, not the layers.

The train step is the library's `vmoe.train.steps.make_train_step` (AdamW,
router noise and auxiliary losses on), jitted with the state donated; the
inference step is the forward pass. Steps of all models are interleaved and
summarised by their medians.

MFU = model FLOPs per second / f32 matmul peak measured in the same run. Model
FLOPs are counted analytically as matmul FLOPs of the active path (patch
embedding, attention projections and score/value products, MLP or active
expert slots, router, head), x3 for a train step; Soft MoE's dispatch and
combine contractions and routing are not counted (they are overhead).
`xla_train_gflop` and `xla_mfu_pct` (CSV/JSON only) use XLA's own
`cost_analysis()` count of the lowered train step instead, as the trainer's
MFU does (`vmoe.train.cost`).

    python -m bench.model --config=configs/vit_digits.py

times one config's train step at its batch size and reports img/s, TFLOP/s
per device and MFU exactly as the trainer computes them (the check of the
trainer's MFU line).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import ml_collections
from flax import nnx

from bench import common
from vmoe.nn import moe as moe_lib
from vmoe.nn import vit
from vmoe.train import cost
from vmoe.train import steps

IMAGE, PATCH, CLASSES = 224, 16, 1000


MODELS = ('ViT-S/16 dense', 'V-MoE-S/16 8E top-1', 'V-MoE-S/16 32E top-1',
          'Soft MoE-S/16 8E', 'Soft MoE-S/16 32E')


def model_config(name: str) -> ml_collections.ConfigDict:
  """ConfigDict for `vit.create_model` for the benchmarked model `name`."""
  cfg = ml_collections.ConfigDict(dict(variant='S/16', pool='tok', moe=None,
                                       dropout=0.0, dtype='float32'))
  seq = (IMAGE // PATCH) ** 2 + 1
  if name.startswith('V-MoE'):  # 'V-MoE-S/16 32E top-2'
    e = int(name.split(' ')[1].rstrip('E'))
    k = int(name.rsplit('-', 1)[1])
    cfg.moe = moe_lib.default_moe_config()
    cfg.moe.update(dict(router='token_choice', num_experts=e, k=k,
                        capacity_factor=1.05, batch_priority=True,
                        group_size=seq))
    cfg.moe.layers = 'every:2'
  elif name.startswith('Soft MoE'):
    e = int(name.rsplit(' ', 1)[1].rstrip('E'))
    cfg.moe = moe_lib.default_moe_config()
    cfg.moe.update(dict(router='soft', num_experts=e, group_size=seq,
                        capacity_factor=1.0, importance_loss_weight=0.0,
                        load_loss_weight=0.0))
    cfg.moe.layers = 'every:2'
  return cfg


def active_flops_per_image(model: vit.VisionTransformer) -> float:
  """Forward matmul FLOPs per image on the active path (see module doc)."""
  size, patch = vit.parse_variant('S/16')
  d, h, depth = size.width, size.mlp_dim, size.depth
  n = (IMAGE // patch) ** 2 + 1
  fl = 2.0 * (n - 1) * patch * patch * 3 * d          # patch embedding
  fl += depth * (8.0 * n * d * d + 4.0 * n * n * d)   # qkv + out, QK^T, AV
  for i, block in enumerate(model.blocks):
    mlp = block.mlp
    if isinstance(mlp, moe_lib.MoeLayer):
      s = mlp.group_size or n
      e = mlp.num_experts
      slots = n / s * e * mlp.capacity_for(s, True)
      fl += 4.0 * slots * d * h + 2.0 * n * d * e     # experts + router
    else:
      fl += 4.0 * n * d * h
    del i
  return fl + 2.0 * d * CLASSES


def build(name: str, batch: int):
  """Returns (train_step, eval_step, state, batch, flops/image, xla flops)."""
  cfg = model_config(name)
  model = vit.create_model(cfg, num_classes=CLASSES, image_size=IMAGE,
                           num_channels=3, rngs=nnx.Rngs(0))
  flops = active_flops_per_image(model)
  train, state, data = common.train_setup(cfg, batch=batch, image=IMAGE,
                                          classes=CLASSES, model=model)
  model_fn = steps.ModelFn(nnx.eval_shape(
      lambda: vit.create_model(cfg, num_classes=CLASSES, image_size=IMAGE,
                               num_channels=3, rngs=nnx.Rngs(0))))
  del model
  lowered = train.lower(state, data)
  # XLA's count of the step, as the trainer's MFU (vmoe.train.cost).
  xla_flops = cost.program_flops(lowered)
  compiled = lowered.compile()
  infer = jax.jit(lambda p, x: model_fn(p, x, train=False)[0])
  return compiled, infer, state, data, flops, xla_flops


def run(quick: bool, repeats: int | None = None, peak: dict | None = None,
        batch: int | None = None):
  peak = peak or common.matmul_peak()
  info = common.machine_info(peak)
  batch = batch or (8 if quick else 32)
  reps = repeats or 3
  names = list(MODELS)
  if quick:  # compilation dominates: three models, no inference
    names = ['ViT-S/16 dense', 'V-MoE-S/16 32E top-1', 'Soft MoE-S/16 32E']
  t0 = time.perf_counter()
  states, train_calls, infer_calls, meta = {}, {}, {}, {}
  for name in names:
    train, infer, state, data, flops, xla_flops = build(name, batch)
    states[name] = state
    meta[name] = dict(flops=flops, xla_flops=xla_flops,
                      params=sum(x.size for x in
                                 jax.tree.leaves(state['params'])))

    def train_call(name=name, train=train, data=data):
      # The state is donated: keep the new one for the next call.
      states[name], metrics = train(states[name], data)
      return metrics['loss']

    train_calls[name] = train_call
    if not quick:
      infer_calls[name] = (lambda infer=infer, name=name, data=data:
                           infer(states[name]['params'], data['image']))
  print(f'  [model: compiled {len(names)} train steps in '
        f'{time.perf_counter() - t0:.0f} s]', flush=True)
  # A square f32 matmul in the same round-robin gives the peak under the
  # same background load; MFU uses the larger of it and the start-of-run peak.
  peak_fn, peak_flops = common.peak_call()
  t_train = common.time_interleaved({**train_calls, '_peak': peak_fn}, reps,
                                    warmup=1)
  peak_f32 = max(peak['f32'], peak_flops / t_train.pop('_peak') / 1e9)
  t_infer = (common.time_interleaved(infer_calls, reps, warmup=1)
             if infer_calls else {})
  print(f'  [model: {time.perf_counter() - t0:.0f} s, peak RSS '
        f'{common.peak_rss_mb():.0f} MB]', flush=True)

  rows = []
  dense = names[0]
  for name in names:
    m = meta[name]
    tt = t_train[name]
    row = dict(model=name, params_m=m['params'] / 1e6, batch=batch,
               train_step_ms=tt * 1e3, train_img_s=batch / tt,
               train_vs_dense=t_train[dense] / tt,
               active_gflop_img=m['flops'] / 1e9,
               mfu_pct=100 * 3 * m['flops'] * batch / tt / 1e9 / peak_f32,
               xla_mfu_pct=100 * m['xla_flops'] / tt / 1e9 / peak_f32,
               peak_gflops=peak_f32,
               xla_train_gflop=m['xla_flops'] / 1e9)
    if name in t_infer:
      ti = t_infer[name]
      row.update(infer_img_s=batch / ti,
                 infer_vs_dense=t_infer[dense] / ti,
                 infer_mfu_pct=100 * m['flops'] * batch / ti / 1e9
                 / peak_f32)
    rows.append(row)
  cols = ['model', 'params_m', 'batch', 'active_gflop_img', 'train_step_ms',
          'train_img_s', 'train_vs_dense', 'mfu_pct']
  heads = ['model', 'params (M)', 'batch', 'active GFLOP/img (fwd)',
           'train step ms', 'train img/s', 'train vs dense', 'train MFU %']
  if t_infer:
    cols += ['infer_img_s', 'infer_vs_dense', 'infer_mfu_pct']
    heads += ['infer img/s', 'infer vs dense', 'infer MFU %']
  md = '\n'.join([
      f'### End-to-end model throughput ({"quick" if quick else "full"})', '',
      common.machine_line(info), '',
      common.markdown_table(rows, cols, heads), '',
      f'MFU = 3 x active forward FLOPs x images/s / f32 matmul peak '
      f'({peak_f32:.0f} GFLOP/s, measured interleaved with the train steps) '
      '(train); 1 x for inference.'])
  common.save_results('model_quick' if quick else 'model', rows, info, md)
  return md, rows, info


def run_config(path: str, repeats: int = 5) -> dict:
  """Train-step throughput and MFU of a config file's model at its batch
  size, the way the trainer reports them (`vmoe.train.cost`): model FLOPs
  from `cost.model_flops`, the peak from `cost.peak_flops`, against the
  median time of the library's train step on random data."""
  from vmoe import config_flag  # pylint: disable=g-import-not-at-top
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  config = config_flag.load_config_file(path)
  pp = config.preprocess
  classes = pipeline.num_classes(config.dataset)
  train, state, data = common.train_setup(
      config.model, batch=config.batch_size, image=pp.image_size,
      classes=classes, channels=pp.num_channels,
      grad_accum_steps=config.get('grad_accum_steps', 1))
  states = {'state': state}

  def call():
    states['state'], metrics = train(states['state'], data)
    return metrics['loss']

  seconds = common.time_interleaved({'train': call}, repeats, warmup=2,
                                    min_time=2.0)['train']
  flops = cost.model_flops(config, classes)
  peak, source = cost.peak_flops(config)
  tflops = flops / jax.device_count() / seconds / 1e12
  return {'config': os.path.relpath(path, common.REPO),
          'batch': config.batch_size, 'step_ms': seconds * 1e3,
          'img_s': config.batch_size / seconds, 'tflops_per_device': tflops,
          'mfu_pct': 100 * tflops * 1e12 / peak if peak else float('nan'),
          'peak_tflops': (peak or float('nan')) / 1e12, 'peak_source': source}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--batch', type=int, default=None)
  parser.add_argument('--config', default=None,
                      help="a config file: its model's train step only, "
                      'measured as the trainer reports it')
  args = parser.parse_args()
  if args.config:
    row = run_config(args.config, args.repeats or 5)
    print(common.markdown_table([row], list(row)))
    return
  print(run(args.quick, args.repeats, batch=args.batch)[0])


if __name__ == '__main__':
  main()
