"""Session setup and shared fixtures (the digits dataset is built once per
session); shared helpers live in tests/helpers.py."""

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
  """A data_dir for the digits configs. The digits configs read the embedded
  arrays and need none; where TensorFlow Datasets is installed it holds the
  prepared TFDS `digits` too, for tests of `config.dataset.source='tfds'`."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return data_dir
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  from vmoe.recipes import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  common.digits_data(config)
  config.dataset.source = 'tfds'
  config.dataset.data_dir = data_dir
  pipeline.prepare_dataset(config.dataset)
  return data_dir
