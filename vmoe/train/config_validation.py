"""Validation of experiment configs before any work starts.

Every check raises `ConfigError` with one line naming the field and the bad
value, so `main.py` can print it and exit without a traceback and without
touching the workdir.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import numpy as np

from vmoe import sharding
from vmoe.checkpoints import init_from
from vmoe.config import ConfigError, check, is_int, is_number
from vmoe.data import preprocess_config
from vmoe.evaluate import fewshot
from vmoe.kernels import registry as kernel_registry
from vmoe.nn import moe as moe_lib
from vmoe.nn import routers
from vmoe.nn import routing
from vmoe.nn import scan as scan_lib
from vmoe.nn import vit
from vmoe.nn.batched_mlp import DEFAULT_GELU, GELU_FORMS
from vmoe.train import optimizer as optimizer_lib
from vmoe.train import steps

REQUIRED_FIELDS = (
    'seed', 'batch_size', 'eval_batch_size', 'num_train_steps',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
    'max_to_keep', 'dataset.name', 'dataset.data_dir',
    'dataset.train_split', 'dataset.eval_split',
    'preprocess.image_size', 'preprocess.num_channels', 'model.variant',
    'optimizer.name', 'optimizer.learning_rate', 'schedule.name')
TRAIN_CROPS = preprocess_config.TRAIN_CROPS
DTYPES = ('float32', 'bfloat16', 'float16')


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ConfigError(f'config.{path} is missing (required field)')
    node = node[part]
  return node


def _check(ok: bool, path: str, value: Any, why: str) -> None:
  check(ok, f'config.{path}', value, why)


def validate_config(config: ml_collections.ConfigDict,
                    resuming: bool = False) -> None:
  """Raises ConfigError on the first invalid field.

  resuming: the workdir holds checkpoints, so `init_from.path` is not read
  (and need not exist any more).

  Values of any type are expected (command-line overrides of None or tuple
  fields are Python literals); a check that a value of an unexpected type
  still trips up becomes a ConfigError too, never a traceback.
  """
  try:
    _validate(config, resuming)
  except ConfigError:
    raise
  except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    raise ConfigError(f'config is invalid: {type(e).__name__}: '
                      f'{lines[0] if lines else ""}') from None


def _validate(config: ml_collections.ConfigDict, resuming: bool) -> None:
  for path in REQUIRED_FIELDS:
    if _get(config, path) is None:
      raise ConfigError(f'config.{path} is missing (required field, got None)')

  for path in ('batch_size', 'eval_batch_size', 'num_train_steps',
               'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
               'max_to_keep', 'preprocess.image_size', 'preprocess.num_channels'):
    value = _get(config, path)
    _check(is_int(value) and value > 0, path, value,
           'must be a positive integer')
  _check(is_int(config.seed) and -2**63 <= config.seed < 2**63, 'seed',
         config.seed, 'must be a 64-bit integer')

  # Model.
  try:
    vit_size, patch = vit.model_size(config.model)
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  rep = config.model.get('representation_size')
  _check(rep is None or (is_int(rep) and rep >= 1),
         'model.representation_size', rep,
         'must be None or a positive integer')
  size = config.preprocess.image_size
  _check(size % patch == 0, 'preprocess.image_size', size,
         f'is not divisible by the patch size {patch} of '
         f'model.variant={config.model.variant!r}')
  _check(config.model.get('pool', 'tok') in ('tok', 'gap'), 'model.pool',
         config.model.get('pool'), "is not one of ('tok', 'gap')")
  _check(config.model.get('gelu', DEFAULT_GELU) in GELU_FORMS, 'model.gelu',
         config.model.get('gelu'), f'is not one of {GELU_FORMS}')
  _check(config.model.get('dtype', 'float32') in DTYPES, 'model.dtype',
         config.model.get('dtype'), f'is not one of {DTYPES}')
  _check(config.model.get('param_dtype', 'float32') in DTYPES,
         'model.param_dtype', config.model.get('param_dtype'),
         f'is not one of {DTYPES}')
  _check(isinstance(config.model.get('scan_layers', False), bool),
         'model.scan_layers', config.model.get('scan_layers'),
         'must be True or False')
  try:
    scan_lib.validate_remat(config.model.get('remat', 'none'))
  except ValueError as e:
    raise ConfigError(f'config.{e}') from None
  _check(config.get('loss', 'softmax_xent') in steps.LOSSES, 'loss',
         config.get('loss'), f'is not one of {steps.LOSSES}')
  accum = config.get('grad_accum_steps', 1)
  _check(is_int(accum) and accum >= 1, 'grad_accum_steps', accum,
         'must be an integer >= 1')
  _check(config.batch_size % accum == 0, 'grad_accum_steps', accum,
         f'does not divide batch_size={config.batch_size}')
  _validate_cost(config)
  _check(is_number(config.model.get('head_bias_init', 0.0)),
         'model.head_bias_init', config.model.get('head_bias_init'),
         'must be a number')
  for path in ('model.dropout', 'model.stochastic_depth', 'label_smoothing'):
    value = _get(config, path)
    _check(is_number(value) and 0 <= value < 1, path, value,
           'must be in [0, 1)')
  moe = config.model.get('moe')
  if moe is not None:
    _check(isinstance(moe, (ml_collections.ConfigDict, dict)), 'model.moe',
           moe, 'must be None (dense) or a ConfigDict of MoE options')
    layers = moe.get('layers')
    _check(layers is None or isinstance(layers, str) or (
        isinstance(layers, (tuple, list)) and all(map(is_int, layers))),
           'model.moe.layers', layers, "is not one of 'every:N', 'last:N', "
           "'second_half', 'none' or a tuple of block indices")
    try:
      blocks = vit.moe_block_indices(moe.get('layers'), vit_size.depth)
      moe_lib.validate_moe_config(moe, prefix='config.model.moe',
                                  mlp_dim=vit_size.mlp_dim,
                                  other_router_options=False,
                                  dim=vit_size.width)
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(f'config.{e}') from None
    _check(bool(blocks), 'model.moe.layers', moe.get('layers'),
           'selects no block; set model.moe=None for a dense model')
    expert_dropout = moe.get('dropout')
    _check(expert_dropout is None or (is_number(expert_dropout)
                                      and 0 <= expert_dropout < 1),
           'model.moe.dropout', expert_dropout,
           'must be None (model.dropout) or in [0, 1)')
  # Attention and block kinds (vmoe.nn.attention, vmoe.nn.blocks).
  for name in ('attention_options', 'block_options'):
    value = config.model.get(name)
    _check(value is None or isinstance(value, (ml_collections.ConfigDict,
                                               dict)), f'model.{name}', value,
           'must be None (defaults) or a ConfigDict of options')
  vit.validate_kinds(
      size=vit_size, pool=config.model.get('pool', 'tok'),
      attention=config.model.get('attention', 'mha'),
      attention_options=config.model.get('attention_options'),
      block=config.model.get('block', 'standard'),
      block_options=config.model.get('block_options'), moe=moe,
      prefix='config.model')

  # Optimizer and schedule.
  opt = config.optimizer
  _check(opt.name in optimizer_lib.OPTIMIZERS, 'optimizer.name', opt.name,
         f'is not one of {optimizer_lib.OPTIMIZERS}')
  _check(is_number(opt.learning_rate) and opt.learning_rate > 0,
         'optimizer.learning_rate', opt.learning_rate, 'must be positive')
  # Parameters are float32: a larger learning rate is inf there, and its
  # first update would make every parameter NaN/inf.
  _check(abs(opt.learning_rate) <= float(np.finfo(np.float32).max),
         'optimizer.learning_rate', opt.learning_rate,
         'is not finite in float32 (the parameter dtype)')
  for name in ('grad_clip_norm', 'eps'):
    value = opt.get(name, 0.0)
    _check(is_number(value) and value >= 0, f'optimizer.{name}', value,
           'must be >= 0')
  _check_weight_decay(opt.get('weight_decay', 0.0))
  _check(opt.get('mu_dtype') in optimizer_lib.MU_DTYPES, 'optimizer.mu_dtype',
         opt.get('mu_dtype'), f'is not one of {optimizer_lib.MU_DTYPES}')
  for name in ('b1', 'b2', 'momentum'):
    value = opt.get(name, 0.0)
    _check(is_number(value) and 0 <= value < 1, f'optimizer.{name}', value,
           'must be in [0, 1)')
  sched = config.schedule
  _check(sched.name in optimizer_lib.SCHEDULES, 'schedule.name', sched.name,
         f'is not one of {optimizer_lib.SCHEDULES}')
  warmup, fraction = sched.get('warmup_steps'), sched.get('warmup_fraction')
  # Both may be set: warmup_steps then wins (a command-line
  # --config.schedule.warmup_steps=N on a recipe that uses a fraction; the
  # trainer says so in its first lines).
  _check(warmup is not None or fraction is not None, 'schedule.warmup_steps',
         warmup, 'and schedule.warmup_fraction=None: set one of them')
  _check(warmup is None or (is_int(warmup) and warmup >= 0),
         'schedule.warmup_steps', warmup,
         'must be an integer >= 0 (clamped to num_train_steps)')
  _check(fraction is None or (is_number(fraction) and 0 <= fraction <= 1),
         'schedule.warmup_fraction', fraction, 'must be in [0, 1]')
  _check(is_number(sched.end_lr_fraction) and 0 <= sched.end_lr_fraction <= 1,
         'schedule.end_lr_fraction', sched.end_lr_fraction, 'must be in [0, 1]')

  # Data fields the pipeline reads as they are (its own checks are of the
  # preprocessing and the data itself).
  shuffle = config.dataset.get('shuffle_buffer', None)
  _check(shuffle is None or (is_int(shuffle) and shuffle >= 1),
         'dataset.shuffle_buffer', shuffle,
         'must be an integer >= 1 (examples shuffled at a time; 1: none)')

  # Preprocessing.
  try:
    preprocess_config.check_preprocess(config.preprocess)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  if 'mesh' in config:
    validate_mesh(config, tokens_per_image=vit.num_tokens(
        config.model, config.preprocess.image_size))
  init_from.validate_config(config, check_path=not resuming)
  fewshot.validate_config(config)


def _check_weight_decay(wd: Any) -> None:
  """A number >= 0 or a sequence of (regex, number >= 0) pairs."""
  if is_number(wd):
    _check(wd >= 0, 'optimizer.weight_decay', wd, 'must be >= 0')
    return
  ok = isinstance(wd, (tuple, list)) and all(
      isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str)
      and is_number(p[1]) and p[1] >= 0 for p in wd)
  _check(ok, 'optimizer.weight_decay', wd,
         'must be a number >= 0 or a sequence of (regex, value >= 0) pairs')
  for regex, _ in wd:
    try:
      re.compile(regex)
    except re.error as e:
      raise ConfigError(f'config.optimizer.weight_decay regex {regex!r} is '
                        f'invalid ({e})') from None


def _validate_cost(config: ml_collections.ConfigDict) -> None:
  steps_range = config.get('profile_steps')
  _check(steps_range is None or (
      isinstance(steps_range, (tuple, list)) and len(steps_range) == 2
      and all(map(is_int, steps_range)) and 1 <= steps_range[0] <= steps_range[1]),
         'profile_steps', steps_range,
         'must be None or (first, last) train steps with 1 <= first <= last')
  cost = config.get('cost') or {}
  for name in ('peak_tflops', 'memory_gib'):
    value = cost.get(name)
    _check(value is None or (is_number(value) and value > 0), f'cost.{name}',
           value, 'must be None or a number > 0')


def validate_mesh(config: ml_collections.ConfigDict,
                  num_devices: int | None = None,
                  tokens_per_image: int | None = None) -> None:
  """Checks mesh, rules, batch and expert divisibility before any work.

  tokens_per_image: tokens entering the encoder per image (patches + class
  token, `vmoe.nn.vit.num_tokens`), to check that `model.moe.group_size`
  divides the tokens on each device; the check is skipped when None.

  Raises ConfigError with one line naming the config field and its value.
  """
  num_devices = num_devices or jax.device_count()
  num_processes = jax.process_count()
  sizes = sharding.mesh_shape(config, num_devices)
  rules = sharding.partitioning_rules(config)
  sharding.partitioning_overrides(config)
  sharding.fsdp_options(config)
  value = config.batch_size
  if value % num_devices or value % num_processes:
    raise ConfigError(f'config.batch_size={value} is not divisible by the '
                      f'{num_devices} devices of mesh {sizes} '
                      f'({num_processes} processes)')
  accum = config.get('grad_accum_steps', 1) or 1
  if value % (num_devices * accum):
    raise ConfigError(f'config.grad_accum_steps={accum} micro-batches of '
                      f'config.batch_size={value} do not split evenly over the '
                      f'{num_devices} devices of mesh {sizes}')
  # Eval batches are padded (mask 0) to a multiple of the devices.
  if config.eval_batch_size % num_processes:
    raise ConfigError(f'config.eval_batch_size={config.eval_batch_size} is '
                      f'not divisible by the {num_processes} processes')
  moe = config.get('model', {}).get('moe')
  if moe is None:
    return
  expert_axis = rules.get('expert')
  num_experts = moe.get('num_experts', 8)
  if expert_axis is not None and num_experts % sizes[expert_axis]:
    raise ConfigError(f'config.model.moe.num_experts={num_experts} is not a '
                      f'multiple of config.mesh.{expert_axis}='
                      f'{sizes[expert_axis]}')
  decision = routers.get(moe.get('router', 'token_choice')).DECISION
  # Dropless dispatch has no expert-parallel path; Soft MoE never drops.
  if (sizes['expert'] > 1 and moe.get('dispatch', 'indices') == 'dropless'
      and decision is not routing.SoftRouting):
    raise ConfigError("config.model.moe.dispatch='dropless' does not support "
                      f"config.mesh.expert={sizes['expert']}; use 'indices' "
                      "or 'einsum'")
  if sizes['expert'] > 1 and jax.default_backend() == 'cpu':
    kernels = moe.get('kernels', 'auto')
    if kernel_registry.pallas_parts(kernels, 'cpu'):
      # The layer itself is right there (tests/workers/pallas_ep.py), but a
      # training loop stalls: in jax 0.10.2 the interpreter's callbacks then
      # wait on an operand that never becomes ready (second train step).
      raise ConfigError(
          f'config.model.moe.kernels={kernels!r} with config.mesh.expert='
          f"{sizes['expert']} on CPU devices: interpreted Pallas kernels in "
          "the expert-parallel train step hang in jax's TPU interpreter; "
          "use kernels='xla' on CPU")
  group_size = moe.get('group_size')
  if group_size and tokens_per_image:
    tokens = tokens_per_image
    for name in ('batch_size', 'eval_batch_size'):
      local = -(-config[name] // num_devices) * tokens
      if name == 'batch_size' and accum > 1:
        local //= accum  # routing groups stay within a micro-batch
        what = f'of a micro-batch (grad_accum_steps={accum}) '
      else:
        what = ''
      if local % group_size:
        raise ConfigError(
            f'config.model.moe.group_size={group_size} does not divide the '
            f'{local} tokens per device {what}of config.{name}={config[name]} '
            f'({tokens} tokens per image, {num_devices} devices)')
