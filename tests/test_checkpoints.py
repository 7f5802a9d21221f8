"""Checkpoint import (big_vision / vit_jax npz, vmoe, ours), init_from,
position-embedding resizing, freezing and sparse upcycling."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from vmoe.recipes import common
from tests.helpers import fast_jit, load_config
from vmoe import checkpoints
from vmoe.checkpoints import big_vision
from vmoe.checkpoints import freeze
from vmoe.checkpoints import init_from
from vmoe.checkpoints import posemb
from vmoe.checkpoints import vmoe_format
from vmoe.checkpoints.source import CheckpointError
from vmoe.config import ConfigError
from vmoe.nn import moe
from vmoe.nn import vit
from vmoe.checkpoints import checkpointer as checkpoint_lib

DATA = os.path.join(os.path.dirname(__file__), 'data')
TOK = os.path.join(DATA, 'big_vision_vit_tok.npz')  # vit_jax, 2 blocks
GAP = os.path.join(DATA, 'big_vision_vit_gap.npz')  # big_vision, GAP
VMOE = os.path.join(DATA, 'vmoe_vit_moe', 'ckpt')
IMAGES = np.load(os.path.join(DATA, 'big_vision_vit_expected.npz'))['images']


def model_config(**kw):
  """The fixtures' size: width 32, 2 blocks, mlp 64, 2 heads, patch 4."""
  cfg = ml_collections.ConfigDict(dict(
      variant='S/4', width=32, depth=2, mlp_dim=64, num_heads=2, pool='tok',
      gelu='tanh', moe=None, representation_size=None))
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def experiment_config(path, model_cfg, **init):
  config = common.get_base_config()
  config.model = model_cfg
  config.init_from.path = path
  config.init_from.update(init)
  return config


def make_model(model_cfg, num_classes=5, image_size=16, seed=0,
               num_channels=3):
  """The model with its initialisers run as one (fast-compiled) program."""
  make = lambda: vit.create_model(model_cfg, num_classes=num_classes,
                                  image_size=image_size,
                                  num_channels=num_channels,
                                  rngs=nnx.Rngs(seed))
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  return nnx.merge(graphdef, fast_jit(lambda: nnx.state(make()))())


def pure(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model,
                                                             nnx.Param)))


def logits_of(model, params, images=IMAGES):
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  run = fast_jit(lambda st, x: nnx.merge(graphdef, st, rest)(x)[0])
  return np.asarray(run(state, jnp.asarray(images)))


def one_line_error(fn, *match):
  with pytest.raises(CheckpointError) as info:
    fn()
  message = str(info.value)
  assert '\n' not in message, message
  for m in match:
    assert m in message, message
  return message


# -- formats ------------------------------------------------------------------


def write_ours(directory, params, step=3):
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=2,
                                     async_save=False)
  ckpt.save(step, {'step': np.int32(step), 'params': params})
  ckpt.close()


def test_detect_format_and_errors(tmp_path):
  assert checkpoints.detect_format(TOK) == 'big_vision'
  assert checkpoints.detect_format(TOK + ':img') == 'big_vision'
  assert checkpoints.detect_format(VMOE) == 'vmoe'
  assert checkpoints.detect_format(VMOE + '.index') == 'vmoe'
  params = pure(make_model(model_config()))
  write_ours(str(tmp_path / 'work' / 'checkpoints'), params)
  for path in (tmp_path / 'work', tmp_path / 'work' / 'checkpoints',
               tmp_path / 'work' / 'checkpoints' / '3'):
    assert checkpoints.detect_format(str(path)) == 'ours'
  source = checkpoints.read(str(tmp_path / 'work'))
  assert source.path.endswith('checkpoints/3')
  jax.tree.map(np.testing.assert_array_equal, params,
               checkpoints.import_params(source, params))
  one_line_error(lambda: checkpoints.read(str(tmp_path / 'nope.npz')),
                 'does not exist')
  one_line_error(lambda: checkpoints.read(str(tmp_path / 'missing')),
                 'does not exist')
  (tmp_path / 'empty').mkdir()
  one_line_error(lambda: checkpoints.read(str(tmp_path / 'empty')),
                 'cannot tell the format')
  one_line_error(lambda: checkpoints.read(TOK, 'vmoe'),
                 "looks like format 'big_vision', not 'vmoe'")
  one_line_error(lambda: checkpoints.read(TOK, 'npz'), 'is not one of')
  (tmp_path / 'bad.npz').write_bytes(b'not a zip')
  one_line_error(lambda: checkpoints.read(str(tmp_path / 'bad.npz')),
                 'not a readable .npz')


def test_npz_layouts_read_the_same(tmp_path):
  """params/ prefix, scan layout, bfloat16-as-void and ':sub' models."""
  flat = big_vision.read_flat(TOK)
  ref = checkpoints.read(TOK).params
  # Linen names (as big_vision) instead of the pre-Linen ones, blocks
  # stacked along a leading axis (lax.scan), under 'params/'.
  rename = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
            'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
  blocks, scan = {}, {}
  for k, v in flat.items():
    parts = k.split('/')
    if len(parts) > 2 and parts[1].startswith('encoderblock_'):
      name = '/'.join(rename.get(p, p) for p in parts[2:])
      blocks.setdefault(name, {})[int(parts[1].split('_')[1])] = v
    else:
      scan[f'params/{k}'] = v
  for name, per_block in blocks.items():
    scan[f'params/Transformer/encoderblock/{name}'] = np.stack(
        [per_block[i] for i in sorted(per_block)])
  np.savez(tmp_path / 'scan.npz', **scan)
  # bfloat16 arrays as numpy saves them (2-byte void), in a sub-model.
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  bf16 = {f'img/{k}': v.astype(ml_dtypes.bfloat16).view('V2')
          for k, v in flat.items()}
  np.savez(tmp_path / 'two_tower.npz', **bf16, **{'txt/x': np.zeros(3)})
  for path, exact in ((tmp_path / 'scan.npz', True),
                      (f'{tmp_path}/two_tower.npz:img', False)):
    got = checkpoints.read(str(path)).params
    assert sorted(got) == sorted(ref)
    for k in ref:
      want = ref[k] if exact else ref[k].astype(ml_dtypes.bfloat16)
      np.testing.assert_array_equal(got[k], want, err_msg=k)
  one_line_error(lambda: checkpoints.read(f'{tmp_path}/two_tower.npz:vision'),
                 "no sub-model 'vision'")


def test_vmoe_reader_reassembles_chunks_and_reports_damage(tmp_path):
  flat = vmoe_format.read_flat(VMOE)
  assert flat['Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel'].shape == (
      4, 32, 32)
  assert flat['Encoder/encoderblock_1/Moe/Router/dense/kernel'].shape == (
      32, 4)
  source = checkpoints.read(VMOE)
  np.testing.assert_array_equal(
      source.params['blocks/1/mlp/router/kernel'],
      flat['Encoder/encoderblock_1/Moe/Router/dense/kernel'].T)
  assert 'MoE blocks [1] with 4 experts' in source.summary()
  copy = tmp_path / 'ckpt'
  shutil.copy(VMOE + '.index', str(copy) + '.index')
  shutil.copy(VMOE + '.data-00000-of-00002',
              str(copy) + '.data-00000-of-00002')
  one_line_error(lambda: checkpoints.read(str(copy)),
                 'data shard', '.data-00001-of-00002 is missing')
  (tmp_path / 'junk.index').write_bytes(b'\xc1\xc1junk')
  one_line_error(lambda: checkpoints.read(str(tmp_path / 'junk')),
                 'not a vmoe checkpoint')


# -- one-line errors on a model that does not fit -----------------------------


def target_of(model_cfg, num_classes=5, image_size=16):
  """The model's parameter tree of ShapeDtypeStructs."""
  model = nnx.eval_shape(lambda: vit.create_model(
      model_cfg, num_classes=num_classes, image_size=image_size,
      num_channels=3, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def random_params(model_cfg, seed=0):
  """Stand-in for freshly initialised parameters where their values do not
  matter (no initialiser to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: (0.1 * rng.standard_normal(x.shape)).astype(x.dtype),
      target_of(model_cfg))


def test_import_errors_name_the_first_bad_parameter(tmp_path):
  source = checkpoints.read(TOK)
  imp = lambda cfg: checkpoints.import_params(source, target_of(cfg))
  one_line_error(lambda: imp(model_config(width=64)), 'parameter',
                 'has shape (', 'the model expects (', 'width 32, patch 4')
  one_line_error(lambda: imp(model_config(depth=3)),
                 'has no parameter for blocks/2/', '2 blocks')
  one_line_error(lambda: imp(model_config(depth=1)), 'blocks/1/',
                 'has no place in the model')
  one_line_error(lambda: imp(model_config(mlp_dim=128)),
                 'parameter blocks/0/mlp/fc1/bias (Transformer/encoderblock_0/'
                 'MlpBlock_3/Dense_0/bias) has shape (64,), the model '
                 'expects (128,)')
  one_line_error(lambda: imp(model_config(pool='gap')),
                 'has a class token (cls), the model not', "pool='tok'")
  one_line_error(lambda: checkpoints.import_params(
      checkpoints.read(GAP), target_of(model_config(variant='S/8', depth=1))),
                 'has no class token', "pool='gap'")
  one_line_error(
      lambda: checkpoints.import_params(source, target_of(model_config(),
                                                          num_classes=10)),
      'parameter head/bias has shape (5,), the model expects (10,)')
  flat = big_vision.read_flat(TOK)
  extra = {'pre_logits/kernel': np.ones((32, 32), np.float32),
           'pre_logits/bias': np.zeros(32, np.float32)}
  np.savez(tmp_path / 'pre.npz', **flat, **extra)
  pre = checkpoints.read(str(tmp_path / 'pre.npz'))
  one_line_error(lambda: checkpoints.import_params(pre, target_of(
      model_config())), 'pre_logits/kernel', 'representation_size=32',
                 "head='new'")
  # With the representation layer and a head of its width, it imports.
  fixed = dict(flat, **extra)
  np.savez(tmp_path / 'pre.npz', **fixed)
  params = checkpoints.import_params(checkpoints.read(
      str(tmp_path / 'pre.npz')), target_of(model_config(
          representation_size=32)))
  np.testing.assert_array_equal(params['pre_logits']['kernel'], 1.0)
  np.savez(tmp_path / 'map.npz', **flat,
           **{'MAPHead_0/probe': np.zeros((1, 1, 32), np.float32)})
  one_line_error(lambda: checkpoints.import_params(
      checkpoints.read(str(tmp_path / 'map.npz')), target_of(model_config())),
                 'MAP (attention pooling) head', 'MAPHead_0')
  qk = dict(flat)
  qk['Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query_ln/'
     'scale'] = np.ones(16, np.float32)
  np.savez(tmp_path / 'qk.npz', **qk)
  one_line_error(lambda: checkpoints.import_params(
      checkpoints.read(str(tmp_path / 'qk.npz')), target_of(model_config())),
                 'LayerNorms on queries and keys')
  np.savez(tmp_path / 'odd.npz', **flat, **{'Transformer/foo': np.zeros(2)})
  one_line_error(lambda: checkpoints.read(str(tmp_path / 'odd.npz')),
                 "'Transformer/foo'", 'no part of our ViT')


# -- position embeddings ------------------------------------------------------


def test_resize_posemb_bilinear_keeps_class_token_and_corners():
  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, 1 + 16, 3)).astype(np.float32)
  assert posemb.resize(pe, 17, True) is pe or np.array_equal(
      posemb.resize(pe, 17, True), pe)
  out = posemb.resize(pe, 1 + 64, True)
  assert out.shape == (1, 65, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 0], pe[:, 0])  # class token kept
  grid, new = pe[0, 1:].reshape(4, 4, 3), out[0, 1:].reshape(8, 8, 3)
  for (i, j), (a, b) in {(0, 0): (0, 0), (0, 3): (0, 7), (3, 0): (7, 0),
                         (3, 3): (7, 7)}.items():  # corners stay corners
    np.testing.assert_allclose(new[a, b], grid[i, j], rtol=1e-6, atol=1e-6)
  # Bilinear interpolation is exact on a linear function of the position.
  y, x = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing='ij')
  ramp = np.stack([2 * y + x, y - 3 * x], -1).reshape(1, 16, 2)
  got = posemb.resize(ramp.astype(np.float32), 9 * 9, False)[0]
  yy, xx = np.meshgrid(np.linspace(0, 3, 9), np.linspace(0, 3, 9),
                       indexing='ij')
  np.testing.assert_allclose(
      got, np.stack([2 * yy + xx, yy - 3 * xx], -1).reshape(81, 2),
      atol=1e-5)
  with pytest.raises(ValueError, match='not square'):
    posemb.resize(pe, 1 + 10, True)


# -- init_from -----------------------------------------------------------------


def test_init_from_new_head_and_new_resolution():
  cfg = model_config()
  model = make_model(cfg, num_classes=10, image_size=32)
  fresh = pure(model)
  config = experiment_config(TOK, cfg)
  params, notes = init_from.initialize(config, fresh)
  src = checkpoints.read(TOK).params
  np.testing.assert_array_equal(params['head']['kernel'], 0.0)  # zero init
  np.testing.assert_array_equal(params['head']['bias'],
                                fresh['head']['bias'])
  np.testing.assert_array_equal(params['pos_embedding'],
                                posemb.resize(src['pos_embedding'], 65, True))
  np.testing.assert_array_equal(params['blocks'][1]['attn']['qkv_kernel'],
                                src['blocks/1/attn/qkv_kernel'])
  assert any('new head (10 classes)' in n for n in notes)
  assert any('17 -> 65 tokens' in n for n in notes)
  # Same classes and resolution: everything is the checkpoint's.
  same, _ = init_from.initialize(config, pure(make_model(cfg)))
  flat = checkpoints.flat_names(same)
  assert all(np.array_equal(flat[k], v) for k, v in src.items())
  config.init_from.head = 'keep'
  one_line_error(lambda: init_from.initialize(config, fresh),
                 "head='keep'", '(32, 5)', '(32, 10)')
  config.init_from.head = 'auto'
  config.init_from.resize_posemb = False
  one_line_error(lambda: init_from.initialize(config, fresh),
                 'pos_embedding', 'resize_posemb=False')
  config.init_from.resize_posemb = True
  config.init_from.reinit = 'blocks/1/attn'
  params, _ = init_from.initialize(config, fresh)
  np.testing.assert_array_equal(params['blocks'][1]['attn']['qkv_kernel'],
                                fresh['blocks'][1]['attn']['qkv_kernel'])
  config.init_from.reinit = 'nothing_like_this'
  one_line_error(lambda: init_from.initialize(config, fresh),
                 'matches no parameter')


def test_validate_config_one_line_errors(tmp_path):
  Bad = ConfigError  # pylint: disable=invalid-name

  config = experiment_config(None, model_config())
  init_from.validate_config(config)  # off
  config.init_from.path = ''  # off, as --config.init_from.path=''
  init_from.validate_config(config)
  assert not init_from.enabled(config)
  config.init_from.path = 'None'  # what --config.init_from.path=None gives
  with pytest.raises(Bad, match="init_from.path='' trains from scratch"):
    init_from.validate_config(config)
  config.init_from.path = TOK
  init_from.validate_config(config)
  for field, value, message in (
      ('path', str(tmp_path / 'x.npz'), 'does not exist'),
      ('format', 'vmoe', "which looks like format 'big_vision'"),
      ('format', 'orbax', 'is not one of'),
      ('head', 'fresh', 'is not one of'),
      ('freeze', '(', 'regular expression'),
      ('upcycle', True, 'needs an MoE model'),
      ('upcycle_noise', -1.0, '>= 0'),
      ('resize_posemb', 'yes', 'must be a bool')):
    bad = experiment_config(TOK, model_config())
    bad.init_from = ml_collections.ConfigDict(
        dict(bad.init_from.to_dict(), **{field: value}))
    with pytest.raises(Bad, match=f'^config.init_from.{field}=') as info:
      init_from.validate_config(bad)
    assert message in str(info.value) and '\n' not in str(info.value)


def test_freeze_gives_zero_updates_and_no_optimizer_state():
  params = {'blocks': {0: {'w': jnp.ones((3, 3))}},
            'head': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}}
  config = common.get_base_config()
  assert freeze.wrap_optimizer(optax.adamw(0.1), config) is not None
  config.init_from.path = TOK
  config.init_from.freeze = '^(?!head/)'  # train the head only
  tx = freeze.wrap_optimizer(optax.adamw(0.1, weight_decay=0.5), config)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['blocks'][0]['w'], 1.0)  # no decay
  assert np.all(np.asarray(new['head']['kernel']) < 1.0)
  frozen_state = [x for x in jax.tree.leaves(state) if np.shape(x) == (3, 3)]
  assert not frozen_state  # Adam moments only for the trained parameters
  assert freeze.labels(params, 'blocks/0/')['blocks'][0]['w'] == 'frozen'


# -- sparse upcycling ---------------------------------------------------------

# Block 0 of the 2-block fixture becomes an MoE layer (in the last block only
# the class token's output would reach the logits).
MOE_BLOCK = 0


def upcycled_logits(router, **moe_kw):
  moe_cfg = moe.default_moe_config()
  moe_cfg.update(dict(layers=(MOE_BLOCK,), router=router, num_experts=4,
                      group_size=17, **moe_kw))
  cfg = model_config(moe=moe_cfg)
  model = nnx.eval_shape(lambda: vit.create_model(
      cfg, num_classes=5, image_size=16, num_channels=3, rngs=nnx.Rngs(0)))
  fresh = random_params(cfg)
  config = experiment_config(TOK, cfg, upcycle=True)
  params, notes = init_from.initialize(config, fresh)
  assert any(f'upcycled blocks [{MOE_BLOCK}]' in n for n in notes)
  mlp = params['blocks'][MOE_BLOCK]['mlp']
  for name, value in fresh['blocks'][MOE_BLOCK]['mlp']['router'].items():
    np.testing.assert_array_equal(mlp['router'][name], value)  # fresh router
  return logits_of(model, params), mlp


@pytest.fixture(scope='module')
def dense_logits():
  model = nnx.eval_shape(lambda: vit.create_model(
      model_config(), num_classes=5, image_size=16, num_channels=3,
      rngs=nnx.Rngs(0)))
  return logits_of(model, checkpoints.import_params(
      checkpoints.read(TOK), target_of(model_config())))


def test_upcycled_token_choice_equals_dense_without_drops(dense_logits):
  # Capacity for every (token, choice) pair and combine weights summing to 1.
  logits, mlp = upcycled_logits('token_choice', k=2, capacity_factor=4.0,
                                renormalize_gates=True)
  np.testing.assert_allclose(logits, dense_logits, rtol=0, atol=1e-5)
  src = checkpoints.read(TOK).params
  for e in range(4):
    np.testing.assert_array_equal(mlp['experts']['kernel1'][e],
                                  src[f'blocks/{MOE_BLOCK}/mlp/fc1/kernel'])
  # Shared experts are copies too; output layers scaled by 1 / (1 + 1).
  logits, mlp = upcycled_logits('token_choice', k=1, capacity_factor=4.0,
                                renormalize_gates=True, num_shared_experts=1)
  np.testing.assert_allclose(logits, dense_logits, rtol=0, atol=1e-5)
  np.testing.assert_allclose(mlp['shared_experts']['kernel2'][0],
                             src[f'blocks/{MOE_BLOCK}/mlp/fc2/kernel'] / 2)


def test_where_upcycling_does_not_keep_the_dense_function(dense_logits):
  """Documented in vmoe/checkpoints/upcycle.py: raw top-k gates scale the
  output, dropped tokens lose it, expert choice picks tokens 0..e times and
  Soft MoE mixes tokens in its slots."""
  def gap(logits):
    return float(np.abs(logits - dense_logits).max())

  raw, _ = upcycled_logits('token_choice', k=2, capacity_factor=4.0)
  drops, _ = upcycled_logits('token_choice', k=1, capacity_factor=0.25,
                             renormalize_gates=True)
  ec, _ = upcycled_logits('expert_choice', capacity_factor=1.0)
  soft, _ = upcycled_logits('soft', num_slots=2)
  for logits in (raw, drops, ec, soft):
    assert gap(logits) > 1e-3
  assert gap(soft) < np.abs(dense_logits).max()  # a smoothed version of it


def test_upcycle_noise_and_errors():
  moe_cfg = moe.default_moe_config()
  moe_cfg.update(dict(layers=(1,), num_experts=4, k=2))
  cfg = model_config(moe=moe_cfg)
  fresh = random_params(cfg)
  config = experiment_config(TOK, cfg, upcycle=True, upcycle_noise=0.01)
  params, _ = init_from.initialize(config, fresh)
  k1 = params['blocks'][1]['mlp']['experts']['kernel1']
  assert 0 < np.abs(k1[0] - k1[1]).max() < 0.1 * np.abs(k1[0]).max()
  config.init_from.upcycle = False
  one_line_error(lambda: init_from.initialize(config, fresh),
                 'blocks/1/mlp is a dense MLP in the checkpoint',
                 'upcycle=True')
  one_line_error(lambda: init_from.initialize(
      experiment_config(VMOE, model_config(mlp_dim=32)),
      random_params(model_config(mlp_dim=32))),
                 'blocks/1/mlp is an MoE layer in the checkpoint')


# -- configs ------------------------------------------------------------------


@pytest.mark.parametrize('name', ['vit_b16_cifar10', 'vit_b16_pets',
                                  'vmoe_s32_cifar10', 'vmoe_s32_pets'])
def test_paper_finetune_configs_are_valid(name):
  from vmoe.train import config_validation  # pylint: disable=g-import-not-at-top
  config = load_config(f'finetune/{name}')
  assert config.preprocess.image_size == 384 and config.init_from.path
  with pytest.raises(config_validation.ConfigError, match='does not exist'):
    config_validation.validate_config(config)  # the checkpoint is not here
  config.dry_run = True  # costs without the checkpoint
  config_validation.validate_config(config)


# -- the digits configs through the trainer ----------------------------------


def tiny(config, data_dir, source):
  config.dataset.data_dir = data_dir
  config.init_from.path = source
  config.batch_size = 32
  config.eval_batch_size = 300
  config.num_train_steps = 2
  config.log_every_steps = 1
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.schedule.update(warmup_steps=1, warmup_fraction=None)
  return config


@pytest.fixture(scope='module')
def vit_digits_workdir(tmp_path_factory):
  """A workdir holding a configs/vit_digits.py checkpoint (initial weights:
  the training itself is tested elsewhere)."""
  config = common.digits_recipe(common.get_base_config())
  model = make_model(config.model, num_classes=10, image_size=8,
                     num_channels=1)
  workdir = tmp_path_factory.mktemp('vit_digits')
  write_ours(str(workdir / 'checkpoints'), pure(model), step=800)
  return str(workdir), pure(model)


@pytest.mark.slow
def test_digits_finetune_and_upcycle_configs_train(digits_data_dir,
                                                   vit_digits_workdir,
                                                   tmp_path):
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  from vmoe import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  source, source_params = vit_digits_workdir
  config = tiny(load_config('finetune/vit_digits_16px'), digits_data_dir, source)
  config.init_from.freeze = '^blocks/0/'
  result = trainer.train_and_evaluate(config, str(tmp_path / 'ft'))
  assert result['step'] == 2
  final = trainer.final_params(str(tmp_path / 'ft'))
  jax.tree.map(np.testing.assert_array_equal, final['blocks']['0'],
               source_params['blocks'][0])  # frozen
  assert final['pos_embedding'].shape == (1, 65, 64)
  assert not np.array_equal(final['blocks']['1']['attn']['qkv_kernel'],
                            source_params['blocks'][1]['attn']['qkv_kernel'])
  # A resumed run never reads init_from.path: it may have moved away; the
  # freeze regex shapes the optimizer state, so it may not change.
  config.init_from.path = str(tmp_path / 'moved_away.npz')
  config.num_train_steps = 3
  assert trainer.train_and_evaluate(config, str(tmp_path / 'ft'))['step'] == 3
  config.init_from.freeze = '^blocks/1/'
  with pytest.raises(workdir_lib.ConfigChangedError,
                     match=r"config.init_from.freeze='\^blocks/1/'"):
    trainer.train_and_evaluate(config, str(tmp_path / 'ft'))
  config = tiny(load_config('finetune/vmoe_digits_upcycle'), digits_data_dir, source)
  result = trainer.train_and_evaluate(config, str(tmp_path / 'up'))
  assert result['step'] == 2 and result['accuracy'] >= 0
  final = trainer.final_params(str(tmp_path / 'up'))
  assert final['blocks']['1']['mlp']['experts']['kernel1'].shape == (8, 64,
                                                                     128)
