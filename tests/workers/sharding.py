"""Multi-device checks run in a subprocess with 8 simulated CPU devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m tests.sharding_worker DATA_DIR ROUTER MESHES [CKPT_DIR]

MESHES is e.g. '8x1,2x4,1x8'. Prints one JSON line (prefixed 'RESULT ') with,
per mesh, the loss and max parameter difference of one train step against the
single-device step, HLO statistics of the sharded train step, and (with
CKPT_DIR) the same for a second step after restoring the 2x4 checkpoint onto
every mesh and onto a single device.
"""

from __future__ import annotations

import json
import re
import sys

import jax
import numpy as np

from tests.helpers import tiny_digits_config
from vmoe import sharding
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.data import pipeline
from vmoe.recipes import common
from vmoe.train import trainer

ROUTERS = {
    'token_choice': dict(router='token_choice', batch_priority=True,
                         dispatch='indices', group_size=17),
    'soft': dict(router='soft', num_slots=2, dispatch='indices'),
    'expert_choice': dict(router='expert_choice', dispatch='einsum'),
}


def make_config(data_dir: str, router: str):
  moe = common.moe_config(layers='every:2', num_experts=8, **ROUTERS[router])
  # Plain SGD without warmup: the first step moves every parameter by
  # lr * gradient, so parameter differences measure gradient differences
  # (Adam's first step, lr * sign(g), would amplify rounding of tiny g).
  return tiny_digits_config(data_dir, **{
      'model.moe': moe, 'schedule.warmup_steps': 0, 'optimizer.name': 'sgd',
      'optimizer.momentum': 0.0, 'optimizer.learning_rate': 0.5})


def experiment(config, shape: tuple[int, int] | None) -> trainer.Experiment:
  """Experiment on a (data, expert) mesh; None = the first device alone."""
  config = config.copy_and_resolve_references()
  if shape is None:
    config.mesh.data, config.mesh.expert = 1, 1
    create = sharding.create_mesh
    sharding.create_mesh = lambda c: create(c, devices=jax.devices()[:1])
    try:
      return trainer.Experiment(config)
    finally:
      sharding.create_mesh = create
  config.mesh.data, config.mesh.expert = shape
  return trainer.Experiment(config)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def max_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
      a, b)))


def hlo_stats(exp, state, batch, expert_shapes) -> dict:
  text = exp.train_step.lower(state, batch).compile().as_text()
  gathers = re.findall(r'= (\w+\[[\d,]*\])[^ ]* all-gather\(', text)
  shapes = [tuple(int(d) for d in g.split('[')[1][:-1].split(',') if d)
            for g in gathers]
  return {'all_to_all': len(re.findall(r' all-to-all\(', text)),
          'all_gather': len(shapes),
          'expert_weight_all_gathers': sum(s in expert_shapes for s in shapes)}


def main(data_dir: str, router: str, meshes: str, ckpt_dir: str | None):
  config = make_config(data_dir, router)
  batches = pipeline.train_iterator(config)
  b1, b2 = next(batches), next(batches)
  ref = experiment(config, None)
  state0 = host(ref.init_state())
  put = lambda exp, tree: jax.device_put(tree, exp.state_sharding)
  gb = lambda exp, b: sharding.global_batch(b, exp.batch_sharding)
  s1, m1 = ref.train_step(put(ref, state0), gb(ref, b1))
  state1, loss1 = host(s1), float(m1['loss'])
  s2, m2 = ref.train_step(s1, gb(ref, b2))
  state2, loss2 = host(s2), float(m2['loss'])
  expert_shapes = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state0['params'])[0]:
    if 'experts' in jax.tree_util.keystr(path):
      expert_shapes.add(tuple(leaf.shape))
  out = {'loss': loss1, 'meshes': {},
         'moved': max_diff(state1['params'], state0['params'])}
  exps = {}
  for name in meshes.split(','):
    shape = tuple(int(v) for v in name.split('x'))
    exp = experiment(config, shape)
    exps[name] = exp
    state = put(exp, state0)
    batch = gb(exp, b1)
    stats = hlo_stats(exp, state, batch, expert_shapes)
    new, metrics = exp.train_step(state, batch)
    row = dict(stats, loss_diff=abs(float(metrics['loss']) - loss1),
               param_diff=max_diff(host(new['params']), state1['params']))
    if ckpt_dir and name == '2x4':
      ckpt = checkpoint_lib.Checkpointer(ckpt_dir, max_to_keep=2,
                                         async_save=False)
      ckpt.save(1, new)
      ckpt.close()
    out['meshes'][name] = row
  if ckpt_dir:
    exps['single'] = ref
    out['restore'] = {}
    for name, exp in exps.items():
      ckpt = checkpoint_lib.Checkpointer(ckpt_dir, max_to_keep=2,
                                         async_save=False)
      state = ckpt.restore(1, exp.abstract_state)
      ckpt.close()
      same_sharding = all(
          a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
              jax.tree.leaves(state), jax.tree.leaves(exp.state_sharding)))
      new, metrics = exp.train_step(state, gb(exp, b2))
      out['restore'][name] = dict(
          sharding_ok=same_sharding,
          loss_diff=abs(float(metrics['loss']) - loss2),
          param_diff=max_diff(host(new['params']), state2['params']),
          compilations=exp.train_step._cache_size())  # pylint: disable=protected-access
  print('RESULT ' + json.dumps(out), flush=True)


if __name__ == '__main__':
  main(*sys.argv[1:4], sys.argv[4] if len(sys.argv) > 4 else None)
