"""Train and evaluate a ViT / V-MoE / Soft MoE model.

  python main.py --config=configs/vit_digits.py --workdir=/tmp/vit_digits
  python main.py --config=configs/vit_b16.py --workdir=gs://... \
      --config.dataset.data_dir=/data/tfds --config.num_train_steps=1000

Running the same command again resumes from the latest checkpoint in workdir.
Invalid configs and missing data are reported in one line before any work.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints and metrics.')


def _fail(message: str, code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if config is None:
    _fail('--config is required (e.g. --config=configs/vit_digits.py)')
  # Heavy imports after flag parsing: `--help` and flag errors stay fast.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  from vmoe.data.pipeline import DatasetNotFoundError  # pylint: disable=g-import-not-at-top
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  from vmoe.train.config_validation import ConfigError, validate_config  # pylint: disable=g-import-not-at-top

  try:
    validate_config(config)
  except ConfigError as e:
    _fail(str(e))
  if config.dry_run:
    from vmoe.train import model_summary  # pylint: disable=g-import-not-at-top
    print(model_summary.summarize(config))
    return
  if not _WORKDIR.value:
    _fail('--workdir is required (checkpoints and metrics are written there)')
  logging.set_verbosity(logging.WARNING)
  try:
    result = trainer.train_and_evaluate(config, _WORKDIR.value)
  except (ConfigError, DatasetNotFoundError,
          trainer.IncompatibleCheckpointError) as e:
    _fail(str(e))
  except trainer.NonFiniteLossError as e:
    _fail(str(e), code=1)
  except trainer.Preempted as e:
    print(f'stopped: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  print(f"done: step {result['step']}, eval accuracy {result['accuracy']:.4f},"
        f" eval loss {result['loss']:.4f}, {result['train_seconds']:.0f} s, "
        f'workdir {os.path.abspath(_WORKDIR.value)}')


if __name__ == '__main__':
  app.run(main)
