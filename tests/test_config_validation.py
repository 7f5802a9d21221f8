"""Config validation: one line naming the field and the bad value."""

import pytest

from vmoe.recipes import common
from vmoe.train.config_validation import ConfigError, validate_config


def _base():
  config = common.get_base_config()
  common.digits_data(config)
  config.model.variant = 'mu/2'
  return config


def test_base_config_is_valid():
  validate_config(_base())


@pytest.mark.parametrize('path,value,message', [
    ('model.variant', 'Q/16', "config.model.variant='Q/16'"),
    ('model.variant', 'B/3', "config.preprocess.image_size=8 is not divisible by the patch size 3"),
    ('optimizer.learning_rate', -3e-4, 'config.optimizer.learning_rate=-0.0003 must be positive'),
    ('optimizer.learning_rate', float('nan'), 'config.optimizer.learning_rate=nan'),
    ('optimizer.name', 'adagradx', "config.optimizer.name='adagradx' is not one of"),
    ('schedule.name', 'step', "config.schedule.name='step' is not one of"),
    ('schedule.warmup_steps', -1, 'config.schedule.warmup_steps=-1 must be an integer >= 0'),
    ('schedule.warmup_steps', None, 'config.schedule.warmup_steps=None and schedule.warmup_fraction=None: set one of them'),
    ('schedule.warmup_fraction', 1.5, 'config.schedule.warmup_fraction=1.5 must be in [0, 1]'),
    ('grad_accum_steps', 0, 'config.grad_accum_steps=0 must be an integer >= 1'),
    ('grad_accum_steps', 3, 'config.grad_accum_steps=3 does not divide batch_size=128'),
    ('loss', 'mse', "config.loss='mse' is not one of"),
    ('model.remat', 'half', "config.model.remat='half' is not one of"),
    ('model.remat', 'save:qkv,foo', "config.model.remat='save:qkv,foo': ['foo'] not among"),
    ('model.scan_layers', 1, 'config.model.scan_layers=1 must be True or False'),
    ('model.param_dtype', 'int8', "config.model.param_dtype='int8'"),
    ('model.head_bias_init', 'x', "config.model.head_bias_init='x' must be a number"),
    ('optimizer.mu_dtype', 'int8', "config.optimizer.mu_dtype='int8' is not one of"),
    ('optimizer.weight_decay', (('kernel', -1.0),), "config.optimizer.weight_decay=(('kernel', -1.0),) must be a number >= 0 or"),
    ('optimizer.weight_decay', (('[', 0.1),), "config.optimizer.weight_decay regex '[' is invalid"),
    ('profile_steps', (3, 1), 'config.profile_steps=(3, 1) must be None or (first, last)'),
    ('cost.peak_tflops', 0, 'config.cost.peak_tflops=0 must be None or a number > 0'),
    ('batch_size', 0, 'config.batch_size=0 must be a positive integer'),
    ('num_train_steps', -1, 'config.num_train_steps=-1'),
    ('model.dropout', 1.5, 'config.model.dropout=1.5 must be in [0, 1)'),
    ('model.pool', 'max', "config.model.pool='max'"),
    ('model.dtype', 'int8', "config.model.dtype='int8'"),
    ('label_smoothing', -0.1, 'config.label_smoothing=-0.1'),
    ('preprocess.train_crop', 'center', "config.preprocess.train_crop='center'"),
    ('preprocess.value_range', (1.0, -1.0), 'config.preprocess.value_range=(1.0, -1.0)'),
    ('dataset.name', None, 'config.dataset.name is missing'),
    # A learning rate that is inf in the float32 parameters.
    ('optimizer.learning_rate', 1e39,
     'config.optimizer.learning_rate=1e+39 is not finite in float32'),
    ('preprocess.num_channels', 4, 'config.preprocess.num_channels=4'),
    ('preprocess.resize_method', 'cubic',
     "config.preprocess.resize_method='cubic'"),
    ('preprocess.eval_crop_fraction', 0.0,
     'config.preprocess.eval_crop_fraction=0.0'),
    # Values of another type (command-line literals of tuple/None fields).
    ('preprocess.crop_scale', 0.5, 'config.preprocess.crop_scale=0.5'),
    ('preprocess.value_range', 'wide', "config.preprocess.value_range='wide'"),
    ('model.moe', 3, 'config.model.moe=3 must be None'),
    ('seed', 2**64, 'config.seed=18446744073709551616 must be a 64-bit'),
])
def test_bad_values_name_the_field(path, value, message):
  config = _base()
  section, _, name = path.rpartition('.')
  node = config[section] if section else config
  with node.ignore_type():
    node[name] = value
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  text = str(info.value)
  assert message in text
  assert '\n' not in text


def test_missing_field():
  config = _base()
  del config.model['variant']
  with pytest.raises(ConfigError, match=r'config.model.variant is missing'):
    validate_config(config)


@pytest.mark.parametrize('moe,message', [
    (dict(layers=3), 'config.model.moe.layers=3 is not one of'),
    (dict(layers=('1', 3)), "config.model.moe.layers=('1', 3) is not one of"),
    (dict(layers='every:2', group_size=5),
     'config.model.moe.group_size=5 does not divide the 1088 tokens per device '
     'of config.batch_size=64'),
])
def test_bad_moe_fields(moe, message):
  config = _base()
  config.batch_size = 64
  config.model.moe = common.moe_config(**moe)
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  assert message in str(info.value) and '\n' not in str(info.value)
