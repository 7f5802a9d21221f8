"""Meshes, partitioning rules, expert parallelism and resharding restore.

Multi-device checks run in subprocesses with 8 simulated CPU devices (the
pytest process itself has one device): `tests/workers/sharding.py`.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from vmoe.recipes import common
from tests.helpers import tiny_digits_config
from vmoe import sharding
from vmoe.train import config_validation

REPO = pathlib.Path(__file__).resolve().parents[1]
EIGHT = '--xla_force_host_platform_device_count=8'


def _worker(data_dir, router, meshes, ckpt_dir=None, timeout=600):
  env = dict(os.environ, XLA_FLAGS=EIGHT, TF_CPP_MIN_LOG_LEVEL='3')
  args = [sys.executable, '-m', 'tests.workers.sharding', data_dir, router,
          meshes] + ([str(ckpt_dir)] if ckpt_dir else [])
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


def _assert_same_step(result, meshes):
  assert result['moved'] > 1e-3  # the step really changes the parameters
  for name in meshes:
    row = result['meshes'][name]
    assert row['loss_diff'] < 1e-5, (name, row)
    assert row['param_diff'] < 1e-5, (name, row)
    expert = int(name.split('x')[1])
    # Tokens reach the experts of other devices with all-to-alls (2 forward,
    # 2 backward per MoE layer, 2 layers); expert weights are never gathered.
    assert row['all_to_all'] == (8 if expert > 1 else 0), (name, row)
    assert row['expert_weight_all_gathers'] == 0, (name, row)


@pytest.mark.slow
def test_vmoe_bpr_sharded_step_and_resharding_restore(digits_data_dir,
                                                      tmp_path):
  """Token choice + BPR: one step on (8,1), (2,4), (1,8) equals one device;
  the 2x4 checkpoint restores onto (8,1), (1,8) and one device and the next
  step matches too, each step function compiled once."""
  meshes = ('8x1', '2x4', '1x8')
  result = _worker(digits_data_dir, 'token_choice', ','.join(meshes),
                   tmp_path / 'ckpt')
  _assert_same_step(result, meshes)
  assert set(result['restore']) == {'8x1', '2x4', '1x8', 'single'}
  for name, row in result['restore'].items():
    assert row['sharding_ok'], (name, row)
    assert row['loss_diff'] < 1e-5 and row['param_diff'] < 1e-5, (name, row)
    assert row['compilations'] == 1, (name, row)  # no recompilation


@pytest.mark.slow
def test_soft_moe_sharded_step(digits_data_dir):
  meshes = ('8x1', '2x4', '1x8')
  _assert_same_step(_worker(digits_data_dir, 'soft', ','.join(meshes)),
                    meshes)


@pytest.mark.slow
def test_expert_choice_einsum_sharded_step(digits_data_dir):
  _assert_same_step(_worker(digits_data_dir, 'expert_choice', '2x4'),
                    ('2x4',))


# -- rules and specs (single process, no devices needed) ----------------------


def _moe_config(data_dir='/nonexistent', **moe):
  return tiny_digits_config(data_dir, **{
      'model.moe': common.moe_config(layers='every:2', num_experts=8, **moe)})


def _specs(config, sizes):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(lambda: vit.create_model(
      config.model, num_classes=10, image_size=8, num_channels=1,
      rngs=nnx.Rngs(0)))
  return sharding.param_specs(model, config, sizes)


def test_default_rules_shard_experts_only():
  specs = _specs(_moe_config(), {'data': 2, 'expert': 4})
  experts = specs['blocks'][1]['mlp']['experts']
  assert experts['kernel1'] == P('expert')
  assert experts['bias2'] == P('expert')
  assert specs['blocks'][1]['mlp']['router']['kernel'] == P()
  assert specs['blocks'][0]['mlp']['fc1']['kernel'] == P()


def test_fsdp_rule_shards_large_params_over_data():
  config = _moe_config()
  config.partitioning = ml_collections.ConfigDict(
      {'fsdp_min_size': 8192, 'fsdp_regex': 'blocks/'})
  specs = _specs(config, {'data': 2, 'expert': 4})
  # [e, d, h] = [8, 64, 128]: 'expert' from the rules, largest free axis h.
  assert specs['blocks'][1]['mlp']['experts']['kernel1'] == P(
      'expert', None, 'data')
  assert specs['blocks'][0]['mlp']['fc1']['kernel'] == P(None, 'data')
  assert specs['blocks'][0]['ln1']['scale'] == P()  # small: replicated


def test_rules_and_overrides_from_config():
  config = _moe_config()
  config.partitioning = ml_collections.ConfigDict({
      'rules': (('expert', 'expert'), ('mlp', 'data')),
      'overrides': ((r'blocks/0/', ()),)})
  specs = _specs(config, {'data': 2, 'expert': 4})
  assert specs['blocks'][0]['mlp']['fc1']['kernel'] == P()
  assert specs['blocks'][2]['mlp']['fc1']['kernel'] == P(None, 'data')
  assert specs['blocks'][1]['mlp']['experts']['kernel1'] == P(
      'expert', None, 'data')


def test_optimizer_state_follows_params():
  import optax  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((1, 1), sharding.MESH_AXES)
  params = {'a': {'w': jax.ShapeDtypeStruct((8, 4), 'float32')},
            'b': jax.ShapeDtypeStruct((3,), 'float32')}
  spec = {'a': {'w': P('expert')}, 'b': P()}
  state = {'params': params,
           'opt_state': jax.eval_shape(optax.adam(1e-3).init, params)}
  shardings = sharding.state_shardings(mesh, state, spec)
  assert shardings['params']['a']['w'].spec == P('expert')
  mu = shardings['opt_state'][0].mu
  assert mu['a']['w'].spec == P('expert') and mu['b'].spec == P()
  assert shardings['opt_state'][0].count.spec == P()


def test_summary_is_short():
  mesh = jax.make_mesh((1, 1), sharding.MESH_AXES)
  params = {f'p{i}': jax.ShapeDtypeStruct((64, 64), 'float32')
            for i in range(100)}
  state = {'params': params}
  text = sharding.sharding_summary(
      state, sharding.state_shardings(mesh, state), mesh)
  assert len(text.splitlines()) < 15 and 'per device' in text


# -- start-up errors ------------------------------------------------------------


@pytest.mark.parametrize('overrides,message', [
    ({'mesh.expert': 3}, 'config.mesh='),
    ({'mesh.data': 3, 'mesh.expert': 1}, 'config.mesh='),
    ({'mesh.expert': 4, 'model.moe.num_experts': 6},
     'config.model.moe.num_experts=6 is not a multiple of config.mesh.expert=4'),
    ({'batch_size': 36}, 'config.batch_size=36 is not divisible'),
    ({'mesh.expert': 2, 'model.moe.dispatch': 'dropless'},
     "dispatch='dropless' does not support"),
])
def test_bad_mesh_fails_before_work(overrides, message):
  config = _moe_config()
  for key, value in overrides.items():
    node = config
    *parents, name = key.split('.')
    for p in parents:
      node = node[p]
    node[name] = value
  with pytest.raises(ValueError, match=None) as e:
    config_validation.validate_mesh(config, num_devices=8)
  assert message in str(e.value) and '\n' not in str(e.value)


@pytest.mark.parametrize('flags,message', [
    (['--config.mesh.expert=3'], 'config.mesh='),
    (['--config.model.moe.num_experts=6', '--config.mesh.expert=4'],
     'is not a multiple of config.mesh.expert=4'),
    (['--config.batch_size=100'], 'config.batch_size=100 is not divisible'),
    (['--config.model.moe.group_size=32'],
     'config.model.moe.group_size=32 does not divide the 272 tokens per '
     'device of config.batch_size=128'),
])
@pytest.mark.slow
def test_bad_mesh_from_command_line(tmp_path, flags, message):
  env = dict(os.environ, XLA_FLAGS=EIGHT, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/vmoe_s32_last2_digits.py',
       f'--workdir={tmp_path / "w"}', *flags], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith('error: ') and message in lines[-1], proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w').exists()
