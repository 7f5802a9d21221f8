"""`config.init_from`: start a training run from a checkpoint.

Fields (`default_config()`; path None = off):
  path: a big_vision / vit_jax .npz, a vmoe checkpoint prefix, or a workdir /
    checkpoints/<step> of ours; None or '' (on the command line:
    --config.init_from.path='') trains from scratch.
  format: 'auto' | 'ours' | 'big_vision' | 'vmoe'.
  head: 'auto' (keep the checkpoint's head if it has the model's number of
    classes, else a new one), 'new' (always the model's fresh head: zero
    kernel with model.head_zero_init, as big_vision) or 'keep' (fail if it
    does not fit). A new head drops a checkpoint's pre_logits layer unless
    the model has one (model.representation_size), as vit_jax and vmoe do.
  resize_posemb: position embeddings of another grid are resized bilinearly
    (class-token row kept; `vmoe.checkpoints.posemb`).
  reinit: regex (re.search on our parameter names, e.g. 'router') of
    parameters that keep the model's fresh initialisation.
  freeze: regex of parameters that are not trained (`freeze.py`).
  upcycle: MoE blocks of the model whose checkpoint block is a dense MLP
    get every expert (and shared expert) as a copy of it, the router freshly
    initialised (`upcycle.py`).
  upcycle_noise: std of the noise on each expert copy's kernels, relative to
    the kernel's RMS (0 = exact copies).

The trainer calls `initialize_state` when the workdir has no checkpoint
yet (a resumed run continues from its own checkpoint). Every other
parameter must exist in the checkpoint with the model's shape; the first
that does not fails in one line.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np

from vmoe import checkpoints
from vmoe.config import ConfigError, checker, is_bool, is_name, is_number
from vmoe.checkpoints import layout
from vmoe.checkpoints import mapping
from vmoe.checkpoints import posemb
from vmoe.checkpoints import upcycle as upcycle_lib
from vmoe.checkpoints.source import CheckpointError, Source

HEADS = ('auto', 'new', 'keep')


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      path=None, format='auto', head='auto', resize_posemb=True, reinit=None,
      freeze=None, upcycle=False, upcycle_noise=0.0))


def enabled(config) -> bool:
  """init_from.path is set (None or '' = from scratch, the latter for the
  command line: --config.init_from.path='')."""
  init = config.get('init_from')
  return init is not None and init.get('path') not in (None, '')


def _regex_ok(value) -> bool:
  if value is None:
    return True
  if not isinstance(value, str):
    return False
  try:
    re.compile(value)
    return True
  except re.error:
    return False


def validate_config(config, check_path: bool = True) -> None:
  """One-line `ConfigError` for the first bad init_from field (before any
  work).

  check_path: check that `path` is a readable checkpoint of `format` (a
  resumed run never reads it)."""
  if not enabled(config):
    return
  init = config.init_from
  known = set(default_config().keys())
  for key in init.keys():
    if key not in known:
      raise ConfigError(f'config.init_from.{key} is not a known field (known: '
                  f'{", ".join(sorted(known))})')
  c = {**default_config().to_dict(), **init.to_dict()}

  need = checker('config.init_from', c)
  need(is_name(c['path']), 'path',
       'must be a checkpoint path')
  need(c['format'] in checkpoints.FORMATS, 'format',
       f'is not one of {checkpoints.FORMATS}')
  need(c['head'] in HEADS, 'head', f'is not one of {HEADS}')
  for field in ('resize_posemb', 'upcycle'):
    need(is_bool(c[field]), field, 'must be a bool')
  for field in ('reinit', 'freeze'):
    need(_regex_ok(c[field]), field, 'must be None or a regular expression')
  noise = c['upcycle_noise']
  need(is_number(noise) and noise >= 0, 'upcycle_noise',
       'must be a number >= 0')
  need(not c['upcycle'] or config.model.get('moe') is not None, 'upcycle',
       'needs an MoE model (config.model.moe)')
  if config.get('dry_run') or not check_path:
    return  # a dry run or a resumed run reads no checkpoint
  try:
    detected = checkpoints.detect_format(os.path.expanduser(c['path']))
  except CheckpointError as e:
    hint = ("; --config.init_from.path='' trains from scratch"
            if c['path'] in ('None', 'none') else '')
    raise ConfigError(f'config.init_from.path={c["path"]!r}: {e}{hint}'
                      ) from None
  need(c['format'] in ('auto', detected), 'format',
       f'does not match the checkpoint, which looks like format {detected!r}')


def _moe_blocks(flat: dict[str, Any]) -> set[str]:
  return {m[1] for k in flat
          if (m := re.match(r'(blocks/\d+/mlp)/experts/kernel1$', k))}


def _upcycle(source: Source, target: dict[str, Any], params: dict, *,
             noise: float, seed: int, notes: list[str]) -> set[str]:
  """Expert (and shared expert) copies of each dense MLP of the checkpoint
  where the model has an MoE block; returns the router names kept fresh."""
  fresh = set()
  upcycled = []
  for mlp in sorted(_moe_blocks(target), key=lambda s: int(s.split('/')[1])):
    if f'{mlp}/fc1/kernel' not in params:
      continue  # the checkpoint has an MoE layer here too: loaded as is
    dense = [params.pop(f'{mlp}/{n}') for n in
             ('fc1/kernel', 'fc1/bias', 'fc2/kernel', 'fc2/bias')]
    shared = f'{mlp}/shared_experts/kernel1' in target
    num_shared = (np.shape(target[f'{mlp}/shared_experts/kernel1'])[0]
                  if shared else 0)
    block = int(mlp.split('/')[1])
    rng = np.random.default_rng([seed, block])
    for group in ('experts',) + (('shared_experts',) if shared else ()):
      e = np.shape(target[f'{mlp}/{group}/kernel1'])[0]
      copies = upcycle_lib.experts_from_dense(
          *dense, num_experts=e, output_scale=1.0 / (1 + num_shared),
          noise=noise if group == 'experts' else 0.0, rng=rng)
      for name, value in copies.items():
        params[f'{mlp}/{group}/{name}'] = value
        source.origin[f'{mlp}/{group}/{name}'] = f'copies of dense {mlp}'
    fresh |= {n for n in target if n.startswith(f'{mlp}/router/')}
    upcycled.append(block)
  if upcycled:
    notes.append(f'upcycled blocks {upcycled} (router freshly initialised)')
  return fresh


def initialize(config, params: Any) -> tuple[Any, list[str]]:
  """Parameters for step 0 from `config.init_from`.

  Args:
    config: the experiment config (init_from, model, seed).
    params: the model's freshly initialised parameters, a nested dict of
      host arrays (the structure of the train state's 'params').

  Returns:
    (params of the same structure and dtypes, notes on what was done).

  Raises:
    CheckpointError: the checkpoint does not fit (one line).
  """
  init = {**default_config().to_dict(), **config.init_from.to_dict()}
  source = checkpoints.read(init['path'], init['format'])
  target = checkpoints.flat_names(params)
  loaded = dict(source.params)
  fresh: set[str] = set()
  notes = [f'{source.describe()}']

  # Head: keep, or the model's fresh head (its pre_logits layer dropped).
  head_fits = all(n in loaded and loaded[n].shape == np.shape(target[n])
                  for n in ('head/kernel', 'head/bias'))
  new_head = init['head'] == 'new' or (init['head'] == 'auto' and not head_fits)
  if init['head'] == 'keep' and not head_fits:
    if 'head/kernel' not in loaded:
      raise CheckpointError(f'{source.describe()} has no head; set '
                            "config.init_from.head='new'")
    raise checkpoints.shape_error(
        source, 'head/kernel', loaded['head/kernel'].shape,
        np.shape(target['head/kernel']),
        " (config.init_from.head='keep'; 'new' makes a fresh head)")
  checkpoints.check_extras(source)
  if new_head:
    for n in ('head/kernel', 'head/bias'):
      loaded.pop(n, None)
      fresh.add(n)
    notes.append(f'new head ({np.shape(target["head/bias"])[0]} classes)')
    if 'pre_logits/kernel' in loaded and 'pre_logits/kernel' not in target:
      # As vit_jax and vmoe fine-tune: the representation layer goes too.
      loaded.pop('pre_logits/kernel')
      loaded.pop('pre_logits/bias')
      notes.append('pre_logits dropped')

  # Position embeddings of another resolution.
  pe, want = loaded.get('pos_embedding'), target.get('pos_embedding')
  if pe is not None and want is not None and pe.shape != np.shape(want):
    has_cls = 'cls_token' in target
    if (not init['resize_posemb'] or pe.shape[2] != np.shape(want)[2]
        or has_cls != ('cls_token' in loaded)):
      hint = ('' if init['resize_posemb'] else
              ' (config.init_from.resize_posemb=False)')
      raise checkpoints.shape_error(source, 'pos_embedding', pe.shape,
                                    np.shape(want), hint)
    loaded['pos_embedding'] = posemb.resize(pe, np.shape(want)[1], has_cls)
    notes.append(f'pos_embedding resized {pe.shape[1]} -> '
                 f'{np.shape(want)[1]} tokens')

  # Dense checkpoint blocks into MoE blocks of the model.
  dense_into_moe = [m for m in _moe_blocks(target)
                    if f'{m}/fc1/kernel' in loaded]
  if dense_into_moe and not init['upcycle']:
    raise CheckpointError(
        f'{source.describe()}: {sorted(dense_into_moe)[0]} is a dense MLP in '
        'the checkpoint and an MoE layer in the model; set '
        'config.init_from.upcycle=True to copy it into every expert')
  if init['upcycle']:
    fresh |= _upcycle(source, target, loaded, noise=init['upcycle_noise'],
                      seed=int(config.get('seed', 0)), notes=notes)
  moe_into_dense = sorted(_moe_blocks(loaded) - _moe_blocks(target))
  if moe_into_dense:
    raise CheckpointError(f'{source.describe()}: {moe_into_dense[0]} is an '
                          'MoE layer in the checkpoint and a dense MLP in the '
                          'model')

  # Explicit re-initialisation.
  if init['reinit']:
    pattern = re.compile(init['reinit'])
    hits = {n for n in target if pattern.search(n)}
    if not hits:
      raise CheckpointError(f'config.init_from.reinit={init["reinit"]!r} '
                            'matches no parameter of the model')
    fresh |= hits
    for n in list(loaded):
      if pattern.search(n):
        loaded.pop(n)
  for n in fresh:
    loaded.pop(n, None)
  checkpoints.check_names(
      source, {n: v for n, v in target.items() if n not in fresh}, loaded)
  if init['freeze']:
    pattern = re.compile(init['freeze'])
    frozen = sum(1 for n in target if pattern.search(n))
    if not frozen:
      raise CheckpointError(f'config.init_from.freeze={init["freeze"]!r} '
                            'matches no parameter of the model')
    notes.append(f'{frozen} of {len(target)} parameter arrays frozen')
  notes.insert(1, f'{len(target) - len(fresh)} of {len(target)} parameter '
                  'arrays loaded')
  out = {n: (np.asarray(loaded[n]).astype(np.asarray(v).dtype)
             if n not in fresh else np.asarray(v))
         for n, v in target.items()}
  return checkpoints.unflatten_like(params, out), notes


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def initialize_state(config, state: dict[str, Any], *, tx,
                     state_sharding: dict[str, Any]) -> dict[str, Any]:
  """The trainer's step-0 state with `config.init_from` applied.

  state: {'params', 'opt_state', ...} as `Experiment.init_state()` makes it;
  the optimizer state is re-initialised for the loaded parameters, and every
  array placed with `state_sharding`. Errors are one line, raised before the
  first step.
  """
  if not enabled(config):
    return state
  host = original = jax.tree.map(_to_host, state['params'])
  flat_host = checkpoints.flat_names(host)
  scanned = layout.is_scanned(flat_host)
  if scanned:  # names below are the unscanned 'blocks/{i}/...'
    host = mapping.unflatten(layout.to_canonical_flat(flat_host))
  try:
    params, notes = initialize(config, host)
  except CheckpointError as e:
    raise ConfigError(f'config.init_from: {e}') from None
  if scanned:
    params = checkpoints.unflatten_like(
        original,
        layout.to_layout_flat(checkpoints.flat_names(params), flat_host))
  if jax.process_index() == 0:
    print('init_from: ' + '; '.join(notes), flush=True)
  params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s,
                                                lambda i, x=x: x[i]),
      params, state_sharding['params'])
  opt_state = jax.jit(tx.init, out_shardings=state_sharding['opt_state'])(
      params)
  return dict(state, params=params, opt_state=opt_state)
