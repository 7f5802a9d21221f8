"""Cost of the checkpoints' content checks.

    python -m bench.checkpoint_digest                 # 300M values (1.2 GB)
    python -m bench.checkpoint_digest --values=3e7 --repeats=2

Saves and restores a train-state-shaped tree of --values float32 values (by
default 300M: a 100M-parameter model with Adam's two moments) with plain
orbax (a CheckpointManager with the trainer's options; restore into the same
abstract target) and with `vmoe.checkpoints.checkpointer.Checkpointer`
(digest of every array computed and recorded at save, recomputed and compared
at restore; above `FILE_CHECK_BYTES` no per-file CRC), interleaved so that
background load hits both alike; the save is timed until the async write has
finished. Prints the medians, the overheads and the digest computation alone,
and writes bench/results/checkpoint_digest.{csv,json,md}. The target: at
most 5% of save and of restore time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bench import common
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.checkpoints import digest

TARGET = 0.05


def train_state(values: float, seed: int = 0) -> dict:
  """{'step', 'params', 'opt_state': (mu, nu)} of about `values` float32
  values: blocks of ViT-like kernels (width 1024) sized to fit."""
  per_model = max(int(values) // 3, 1024)
  width = 1024 if per_model >= 12 * 1024 * 1024 else 64
  shapes = {'qkv': (width, 3 * width), 'out': (width, width),
            'fc1': (width, 4 * width), 'fc2': (4 * width, width)}
  per_block = sum(a * b for a, b in shapes.values())
  blocks = max(1, round(per_model / per_block))
  rng = np.random.default_rng(seed)

  def params(scale):
    return {'blocks': {str(i): {
        k: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * scale)
        for k, s in shapes.items()} for i in range(blocks)}}

  return {'step': jnp.asarray(1, jnp.int32), 'params': params(0.02),
          'opt_state': (params(1e-3), params(1e-6))}


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def run(values: float, repeats: int, directory: str) -> list[dict]:
  state = train_state(values)
  n = sum(int(x.size) for x in jax.tree.leaves(state))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  plain_dir = os.path.join(directory, 'plain')
  ours_dir = os.path.join(directory, 'ours')
  plain = ocp.CheckpointManager(plain_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=True))
  ours = checkpoint_lib.Checkpointer(ours_dir, max_to_keep=1)
  restorer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  times = {k: [] for k in ('save_plain', 'save_ours', 'restore_plain',
                           'restore_ours', 'digest')}

  def save_plain(step):
    plain.save(step, args=ocp.args.StandardSave(state), force=True)
    plain.wait_until_finished()

  def save_ours(step):
    ours.save(step, state)
    ours.wait()

  def restore_plain(step):
    jax.block_until_ready(restorer.restore(
        os.path.join(plain_dir, str(step), 'default'),
        args=ocp.args.StandardRestore(abstract)))

  def restore_ours(step):
    jax.block_until_ready(ours.restore(step, abstract))

  for r in range(repeats + 1):  # the first round warms up (not counted)
    step = r + 1
    first, second = ((save_plain, save_ours) if r % 2 else
                     (save_ours, save_plain))
    t = {first.__name__: _timed(lambda: first(step)),
         second.__name__: _timed(lambda: second(step))}
    first, second = ((restore_plain, restore_ours) if r % 2 else
                     (restore_ours, restore_plain))
    t[first.__name__] = _timed(lambda: first(step))
    t[second.__name__] = _timed(lambda: second(step))
    t['digest'] = _timed(lambda: digest.partial_digests(jax.tree.leaves(state)))
    if r:
      for k, v in t.items():
        times[k].append(v)
    print(f'round {r}: ' + ', '.join(f'{k} {v:.2f} s' for k, v in t.items()),
          flush=True)
  plain.close()
  ours.close()
  med = {k: statistics.median(v) for k, v in times.items()}
  rows = []
  for what in ('save', 'restore'):
    base, ours_t = med[f'{what}_plain'], med[f'{what}_ours']
    rows.append({'operation': what, 'values_m': round(n / 1e6, 1),
                 'gbytes': round(4 * n / 1e9, 2), 'plain_s': base,
                 'with_digests_s': ours_t,
                 'overhead': (ours_t - base) / base,
                 'digest_alone_s': med['digest'],
                 'digest_share': med['digest'] / base,
                 'repeats': repeats})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--values', type=float, default=3e8)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default=None,
                      help='where to write the checkpoints (default: a '
                      'temporary directory, removed afterwards)')
  parser.add_argument('--out', default=common.RESULTS_DIR)
  args = parser.parse_args(argv)
  info = common.machine_info()
  print(common.machine_line(info), flush=True)
  directory = args.dir or tempfile.mkdtemp(prefix='vmoe_ckpt_bench_')
  try:
    rows = run(args.values, args.repeats, directory)
  finally:
    if args.dir is None:
      shutil.rmtree(directory, ignore_errors=True)
  columns = ['operation', 'values_m', 'gbytes', 'plain_s', 'with_digests_s',
             'overhead', 'digest_alone_s', 'digest_share']
  md = common.markdown_table(
      [dict(r, overhead=f"{100 * r['overhead']:+.1f}%",
            digest_share=f"{100 * r['digest_share']:.1f}%") for r in rows],
      columns, ['operation', 'values (M)', 'GB', 'orbax (s)',
                'with digests (s)', 'overhead', 'digests alone (s)',
                'digests / orbax'])
  print(md)
  ok = all(r['overhead'] <= TARGET for r in rows)
  print(f'target: overhead <= {100 * TARGET:.0f}% of save and restore: '
        f'{"met" if ok else "NOT met"}')
  common.save_results('checkpoint_digest', rows, info, md, out_dir=args.out)
  return rows


if __name__ == '__main__':
  main()
