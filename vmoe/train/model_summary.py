"""Parameters, FLOPs and per-device memory of a config, without training.

    python main.py --config=configs/soft_moe_b16.py --config.dry_run=True
    python main.py --config=configs/soft_moe_b16.py --config.dry_run=True \
        --num_cpu_devices=8        # as on a mesh of 8 devices

Counts use abstract shapes only (no parameter is allocated). FLOPs per image
come from XLA's cost analysis of the lowered inference forward pass at the
eval capacity (one multiply-add = 2 FLOPs). The train step is then compiled
exactly as the trainer compiles it, for the configured mesh over this
host's devices (`--num_cpu_devices=N` simulates N), and XLA's memory
analysis of that program gives the bytes per device: arguments (train state
and batch), outputs, temporaries (activations, gradients, buffers) and
their total, against the device's capacity (`vmoe.train.cost`). On CPU
devices the program is XLA:CPU's: its temporaries differ from an
accelerator's by the layouts and fusions of the backend.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from vmoe.nn import moe as moe_lib
from vmoe.nn import vit
from vmoe.train import cost
from vmoe.train import steps


def _num_classes(config) -> int:
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    return pipeline.num_classes(config.dataset)
  except pipeline.DatasetNotFoundError:
    return 1000  # data not prepared here: count with an ImageNet-sized head


def expert_applications_per_token(layer: moe_lib.MoeLayer,
                                  tokens_per_image: int) -> float:
  """Expert MLP applications per token at eval (how many experts' weights a
  token's computation touches on average), asked of the layer's router: k
  for token choice, e * c / s for routers that fill every slot (expert
  choice: about the capacity factor; Soft MoE: slots / tokens)."""
  s = layer.group_size or tokens_per_image
  return layer.router.applications_per_token(s, layer.capacity_for(s, False))


def summarize(config: ml_collections.ConfigDict, train_step: bool = True
              ) -> str:
  """The dry run's report; train_step=False skips compiling the step."""
  num_classes = _num_classes(config)
  size = config.preprocess.image_size
  channels = config.preprocess.num_channels
  # Unscanned: XLA's cost analysis counts a scanned loop body once.
  factory = lambda: vit.create_model(
      vit.unscanned_config(config.model), num_classes=num_classes, image_size=size,
      num_channels=channels, rngs=nnx.Rngs(0))
  abstract = nnx.eval_shape(factory)
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  total = sum(int(x.size) for _, x in flat)
  tokens = vit.num_tokens(config.model, size)
  # Routed experts count once per application; everything else (shared
  # experts included) is active for every token.
  active = total
  for layer in moe_lib.moe_layers(abstract).values():
    expert = sum(int(w.size) for w in jax.tree.leaves(
        nnx.state(layer.experts, nnx.Param)))
    active += expert * (expert_applications_per_token(layer, tokens)
                        / layer.num_experts - 1)

  model_fn = steps.ModelFn(abstract)
  moe = config.model.moe
  # Smallest batch whose tokens fill whole routing groups.
  group = (moe.get('group_size') or tokens) if moe is not None else tokens
  batch_size = group // math.gcd(group, tokens)
  images = jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32)
  lowered = jax.jit(lambda p, x: model_fn(p, x, train=False)[0]).lower(
      params, images)
  cost = lowered.cost_analysis() or {}
  gflops = float(cost.get('flops', float('nan'))) / batch_size / 1e9
  lines = [
      f'model: {config.model.variant} '
      f"({'dense' if moe is None else moe.router + ' MoE'}), "
      f'{size}x{size}x{channels} images, {num_classes} classes',
      f'total parameters:  {total:,}',
      f'active parameters per token: {active:,.0f}',
      f'inference GFLOPs per image:  {gflops:.4f}',
  ]
  if train_step:
    lines += train_step_cost(config, num_classes)
  return '\n'.join(lines)


def train_step_cost(config: ml_collections.ConfigDict,
                    num_classes: int) -> list[str]:
  """Lines on the compiled train step: FLOPs and per-device memory."""
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  exp = trainer.Experiment(config, num_classes=num_classes)
  t0 = time.perf_counter()
  compiled = exp.train_step.lower(exp.abstract_state,
                                  exp.abstract_batch()).compile()
  seconds = time.perf_counter() - t0
  memory = cost.program_memory(compiled)
  flops = cost.model_flops(config, num_classes)
  devices = exp.mesh.devices.size
  capacity, source = cost.memory_capacity(config)
  gib = cost.format_bytes
  device = jax.devices()[0]
  lines = [
      f'train step: batch {config.batch_size} on mesh {dict(exp.mesh.shape)}'
      f' of {devices} {device.platform} devices'
      f' ({device.device_kind}), compiled in {seconds:.1f} s',
      f'  TFLOPs per step: {flops / 1e12:.3f} ({flops / 1e12 / devices:.3f}'
      ' per device; XLA cost analysis of the unscanned step without remat)',
      '  memory per device (XLA memory analysis):',
      f"    arguments   {gib(memory['arguments'])}  (train state + batch)",
      f"    outputs     {gib(memory['outputs'])}  ({gib(memory['aliased'])} "
      'in donated buffers)',
      f"    temporaries {gib(memory['temporaries'])}",
      f"    code        {gib(memory['code'])}",
      f"    total       {gib(memory['total'])}",
  ]
  if capacity:
    fits = memory['total'] <= capacity
    lines.append(f'  device capacity {gib(capacity)} ({source}): '
                 + ('fits' if fits else
                    f"does NOT fit ({memory['total'] / capacity:.2f}x); try "
                    'model.remat, grad_accum_steps, more devices or FSDP '
                    '(partitioning.fsdp_min_size)'))
  else:
    lines.append(f'  device capacity {source}')
  return lines
