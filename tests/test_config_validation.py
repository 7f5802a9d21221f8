"""Config validation: one line naming the field and the bad value."""

import pytest

from configs import common
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
])
def test_bad_values_name_the_field(path, value, message):
  config = _base()
  section, _, name = path.rpartition('.')
  node = config[section] if section else config
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
