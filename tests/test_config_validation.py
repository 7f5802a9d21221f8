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
    ('schedule.warmup_steps', 5000, 'config.schedule.warmup_steps=5000 must be in'),
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
