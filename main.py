"""Train and evaluate a ViT / V-MoE / Soft MoE model.

  python main.py --config=configs/vit_digits.py --workdir=/tmp/vit_digits
  python main.py --config=configs/vit_b16.py --workdir=gs://... \
      --config.dataset.data_dir=/data/tfds --config.num_train_steps=1000

Running the same command again resumes from the latest checkpoint in workdir
(or, if the run is complete, prints its summary). Every error a user can make
(a bad config, override, data or workdir, another run on the same workdir) is
one line `error: ...` on stderr with exit status 2, before anything in the
workdir is written; see vmoe/train/trainer.py for the order of the checks.

Several processes (one per host, or several on one machine) form one job with
`jax.distributed`: pass --coordinator_address=HOST:PORT --num_processes=N
--process_id=I to every process (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), or --distributed=auto on TPU pods and
SLURM/Open MPI clusters, where JAX detects them itself.
"""

import os
import signal
import sys
import time

_START = time.perf_counter()  # the `done:` line reports the command's time

from absl import app
from absl import flags
from absl import logging

from vmoe import config_flag

_CONFIG = config_flag.define_config_flag(
    'config', 'Path to a config file (configs/*.py), optionally followed by '
    ':ARG for get_config(ARG).')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints and metrics.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', None, ['auto', 'off'],
    "'auto': call jax.distributed.initialize() with no arguments (TPU pods, "
    "SLURM, Open MPI detect the job themselves); 'off': single process. "
    'Default: initialise when --coordinator_address/--num_processes or the '
    'JAX_COORDINATOR_ADDRESS environment variable is given.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'HOST:PORT of process 0 for jax.distributed (all processes pass the same).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes of the job (jax.distributed).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Index of this process in [0, num_processes).')
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    'num_cpu_devices', None,
    'Simulated CPU devices per process (testing multi-device code on CPU).')


def _fail(message: str, code: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(code)


def _init_distributed() -> None:
  """Starts jax.distributed when this process is part of a multi-process job.

  Must run before anything queries devices. Errors are one line (exit 2).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if _NUM_CPU_DEVICES.value is not None:
    if _NUM_CPU_DEVICES.value < 1:
      _fail(f'--num_cpu_devices={_NUM_CPU_DEVICES.value} must be >= 1')
    jax.config.update('jax_num_cpu_devices', _NUM_CPU_DEVICES.value)
  mode = _DISTRIBUTED.value
  explicit = {k: v for k, v in (
      ('coordinator_address', _COORDINATOR.value),
      ('num_processes', _NUM_PROCESSES.value),
      ('process_id', _PROCESS_ID.value)) if v is not None}
  if mode == 'off':
    if explicit:
      _fail(f'--distributed=off contradicts --{next(iter(explicit))}')
    return
  # Flags win over the environment (JAX itself reads only the address).
  for key, var in (('num_processes', 'JAX_NUM_PROCESSES'),
                   ('process_id', 'JAX_PROCESS_ID')):
    if key not in explicit and os.environ.get(var):
      try:
        explicit[key] = int(os.environ[var])
      except ValueError:
        _fail(f'{var}={os.environ[var]!r} must be an integer')
  if mode is None and not explicit and not os.environ.get(
      'JAX_COORDINATOR_ADDRESS'):
    return
  num = explicit.get('num_processes')
  pid = explicit.get('process_id')
  if num is not None and num < 1:
    _fail(f'--num_processes={num} must be >= 1')
  if pid is not None and num is not None and not 0 <= pid < num:
    _fail(f'--process_id={pid} must be in [0, --num_processes={num})')
  try:
    jax.distributed.initialize(**explicit)
  except (ValueError, RuntimeError) as e:
    _fail(f'jax.distributed.initialize failed: {str(e).splitlines()[0]}')
  if jax.default_backend() == 'cpu' and jax.process_count() > 1:
    # CPU collectives (gloo) of an executable loaded from the persistent
    # compilation cache never complete in jax 0.11-0.12: every process waits
    # in the first all-reduce. Compile them in this run instead.
    jax.config.update('jax_enable_compilation_cache', False)


class _EarlySignals:
  """SIGTERM/SIGINT before the trainer takes over: recorded, and the run
  stops before it writes anything (not a KeyboardInterrupt in an import)."""

  signum = None

  @classmethod
  def install(cls) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      signal.signal(sig, cls._handle)

  @classmethod
  def _handle(cls, signum, frame):
    del frame
    if signum == signal.SIGINT and cls.signum is not None:
      # Ctrl-C twice: at once, without a KeyboardInterrupt traceback from
      # wherever the import or start-up was (nothing was written yet).
      print('stopped: interrupted twice before training started; nothing '
            'was written', file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access
    cls.signum = signum

  @classmethod
  def stop_if_signalled(cls) -> None:
    if cls.signum is not None:
      print(f'stopped: received {signal.Signals(cls.signum).name} before '
            'training started; nothing was written', file=sys.stderr)
      sys.exit(128 + cls.signum)


def main(argv):
  _EarlySignals.install()
  try:
    _main(argv)
  except KeyboardInterrupt:  # SIGINT while no handler of ours was installed
    print('stopped: interrupted; run the same command to resume from the '
          'last checkpoint', file=sys.stderr)
    sys.exit(130)


def _main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = config_flag.config_value(_CONFIG)
  if config is None:
    _fail('--config is required (e.g. --config=configs/vit_digits.py)')
  # Heavy imports after flag parsing: `--help` and flag errors stay fast.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  # Quiet absl INFO lines (e.g. JAX probing for absent TPU/GPU backends).
  logging.set_verbosity(logging.WARNING)
  _init_distributed()
  import jax  # pylint: disable=g-import-not-at-top
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
  workdir = _WORKDIR.value
  if '://' not in workdir:  # gs://... stays a URL
    workdir = os.path.abspath(os.path.expanduser(workdir))
  _EarlySignals.stop_if_signalled()
  try:
    result = trainer.train_and_evaluate(config, _WORKDIR.value)
  except trainer.USER_ERRORS as e:
    _fail(str(e))
  except trainer.NonFiniteLossError as e:
    _fail(str(e), code=1)
  except trainer.Preempted as e:
    print(f'stopped: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except OSError as e:  # e.g. the disk filled up while training
    _fail(str(e))
  if jax.process_index() != 0:
    return
  evaluated = ''
  if 'accuracy' in result:
    evaluated = (f"eval accuracy {result['accuracy']:.4f}, eval loss "
                 f"{result['loss']:.4f}, ")
  if result.get('already_trained'):
    print(f"done: already trained to step {result['step']} "
          f'(num_train_steps={config.num_train_steps}), {evaluated}'
          f'workdir {workdir}')
    return
  perf = ''
  if 'perf/images_per_sec' in result:
    perf = f", {result['perf/images_per_sec']:,.0f} img/s"
    if 'perf/mfu' in result:
      perf += f", MFU {100 * result['perf/mfu']:.1f}%"
  print(f"done: step {result['step']}, {evaluated}"
        f'{time.perf_counter() - _START:.0f} s (compile '
        f"{result['compile_seconds']:.0f} s, training "
        f"{result['train_seconds'] - result['compile_seconds']:.0f} s{perf}), "
        f'workdir {workdir}')


if __name__ == '__main__':
  _EarlySignals.install()
  # Before jax starts: glibc malloc settings that spare XLA:CPU the page
  # faults of re-mapping its buffers every step (no-op on GPU/TPU hosts).
  from vmoe import cpu_allocator  # pylint: disable=g-import-not-at-top
  cpu_allocator.reexec_with_tuned_malloc()
  app.run(main, flags_parser=config_flag.parse_flags)
