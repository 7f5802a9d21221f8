"""Shared fixtures: the digits dataset is built once per test session."""

import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# Many tests compile the same small programs (also in subprocesses, which
# inherit the environment): share XLA executables through JAX's persistent
# compilation cache.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'vmoe-tests-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """A data_dir holding the prepared `digits` dataset."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  config = common.get_base_config()
  common.digits_data(config)
  config.dataset.data_dir = data_dir
  pipeline.prepare_dataset(config.dataset)
  return data_dir


def tiny_digits_config(data_dir: str, **overrides):
  """A seconds-long training config on digits (ViT-mu/2)."""
  from configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  common.digits_data(config)
  config.dataset.data_dir = data_dir
  config.model.variant = 'mu/2'
  config.batch_size = 32
  config.eval_batch_size = 100
  config.num_train_steps = 12
  config.log_every_steps = 4
  config.eval_every_steps = 12
  config.checkpoint_every_steps = 4
  config.schedule.warmup_steps = 2
  config.optimizer.learning_rate = 3e-3
  for key, value in overrides.items():
    node = config
    *parents, name = key.split('.')
    for p in parents:
      node = node[p]
    node[name] = value
  return config


def tiny_digits_config_file(tmp_path, data_dir: str, moe: dict | None = None,
                            **overrides) -> str:
  """Writes a config file for `main.py` subprocesses: `tiny_digits_config`
  with `overrides`, plus `model.moe = common.moe_config(**moe)` if given."""
  path = tmp_path / 'tiny_config.py'
  moe_line = (f'  config.model.moe = common.moe_config(**{moe!r})\n'
              if moe is not None else '')
  path.write_text(
      'from configs import common\n'
      'from tests.conftest import tiny_digits_config\n\n\n'
      'def get_config():\n'
      f'  config = tiny_digits_config({data_dir!r}, **{overrides!r})\n'
      f'{moe_line}'
      '  return config\n')
  return str(path)
