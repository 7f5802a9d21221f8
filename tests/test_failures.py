"""What a user can do wrong to a run, and what they see (issue 15).

Every case ends either in a correct recovery or in one line naming the field
or path (an exception of `trainer.USER_ERRORS`, which `main.py` prints as
`error: ...` with exit status 2), and leaves the checkpoints, config.json and
metrics.jsonl of the workdir byte-identical. Most cases fail before the model
is built (`_no_model` makes building it an error); the others share one tiny
trained workdir. The command-line wiring (exit status, stderr, no traceback)
is checked on a few cases with real `main.py` processes.
"""

import errno
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

from vmoe.recipes import common
from tests.helpers import tiny_digits_config, tiny_digits_config_file
from vmoe import config_flag
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.train import trainer
from vmoe import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers --


def _snapshot(workdir) -> dict[str, str]:
  """sha256 of every file a run must not lose or overwrite."""
  root = pathlib.Path(workdir)
  paths = [p for p in root.glob('checkpoints/**/*') if p.is_file()]
  paths += [root / n for n in ('config.json', 'metrics.jsonl')
            if (root / n).is_file()]
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in paths}


def _config(data_dir, **overrides):
  fields = dict(num_train_steps=4, log_every_steps=2, eval_every_steps=4,
                checkpoint_every_steps=2)
  return tiny_digits_config(data_dir, **{**fields, **overrides})


def _tfds_config(data_dir, **overrides):
  """`_config` on the TFDS digits (tests of TFDS files and data_dir)."""
  pytest.importorskip('tensorflow_datasets')
  return _config(data_dir, **{'dataset.source': 'tfds', **overrides})


def _no_model(monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError('the model was built before the error was found')
  monkeypatch.setattr(trainer, 'Experiment', forbidden)


def _user_error(config, workdir, *fragments):
  """Runs the trainer; asserts a one-line user error naming `fragments` and
  an unchanged workdir. Returns the message."""
  before = _snapshot(workdir) if os.path.isdir(workdir) else None
  with pytest.raises(trainer.USER_ERRORS) as info:
    trainer.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert '\n' not in message, message
  for fragment in fragments:
    assert fragment in message, message
  if before is not None:
    assert _snapshot(workdir) == before
  return message


@pytest.fixture(scope='module')
def trained(digits_data_dir, tmp_path_factory):
  """A workdir trained for 4 steps: checkpoints 2 and 4, eval at 4."""
  workdir = tmp_path_factory.mktemp('trained') / 'work'
  trainer.train_and_evaluate(_config(digits_data_dir), str(workdir))
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = tmp_path / 'work'
  shutil.copytree(trained, copy)
  return copy


def _data_copy(digits_data_dir, tmp_path) -> tuple[str, dict[str, str]]:
  """A copy of the digits data_dir and its {split: tfrecord path}."""
  pytest.importorskip('tensorflow_datasets')
  data_dir = tmp_path / 'tfds'
  shutil.copytree(digits_data_dir, data_dir)
  files = {}
  for split in ('train', 'test'):
    (path,) = data_dir.glob(f'digits/*/digits-{split}.tfrecord*')
    files[split] = str(path)
  return str(data_dir), files


# ------------------------------------------------- config and command line --


def _parse(argv):
  """Parses a main.py-like command line with a fresh set of flags."""
  values = flags.FlagValues()
  holder = config_flag.define_config_flag(flag_values=values, sys_argv=argv)
  flags.DEFINE_string('workdir', None, 'w', flag_values=values)
  _, message = config_flag.parse_or_error(argv, values)
  return (config_flag.config_value(holder) if message is None else None,
          message)


@pytest.mark.parametrize('args,message', [
    (['--config.optimizer.lerning_rate=1e-3'],
     "--config.optimizer.lerning_rate: config.optimizer has no field "
     "'lerning_rate' (did you mean config.optimizer.learning_rate?)"),
    (['--config.model.moe.k=1'],
     "--config.model.moe.k: config.model.moe is None in this config"),
    (['--config.seed.deep=1'], "config.seed=0 is a value"),
    (['--config.num_train_steps=1.5'], 'config.num_train_steps=1.5'),
    (['--config.optimizer.learning_rate=fast'],
     'config.optimizer.learning_rate=fast'),
    (['--wokdir=/tmp/x'], 'unknown flag --wokdir (did you mean --workdir?)'),
])
def test_bad_override_is_one_line(args, message):
  config, error = _parse(['main.py', '--config=configs/vit_digits.py', *args])
  assert config is None and '\n' not in error
  assert message in error


def test_config_file_errors(tmp_path):
  (tmp_path / 'syntax.py').write_text('def get_config(:\n')
  (tmp_path / 'raises.py').write_text(
      'def get_config():\n  return {}["missing"]\n')
  (tmp_path / 'empty.py').write_text('x = 1\n')
  (tmp_path / 'other.py').write_text('def get_config():\n  return 3\n')
  cases = {
      str(tmp_path / 'nope.py'): 'no such file',
      str(tmp_path): 'is a directory, not a config file',
      str(tmp_path / 'syntax.py'): 'does not parse: invalid syntax '
                                   '(syntax.py, line 1)',
      str(tmp_path / 'raises.py'): "get_config() raised KeyError: 'missing' "
                                   '(raises.py, line 2)',
      str(tmp_path / 'empty.py'): 'defines no get_config() function',
      str(tmp_path / 'other.py'): 'returned a int, not a ConfigDict',
  }
  for path, message in cases.items():
    config, error = _parse(['main.py', f'--config={path}'])
    assert config is None and error.startswith(f'--config={path}'), error
    assert message in error


def test_literal_overrides_of_tuple_and_none_fields():
  """The README's forms of model.moe.layers, and optional fields."""
  base = ['main.py', '--config=configs/vmoe_s32_last2_digits.py']
  for value, expected in (('every:2', 'every:2'), ('last:1', 'last:1'),
                          ('1,3', (1, 3)), ('(3,)', (3,))):
    config, error = _parse(base + [f'--config.model.moe.layers={value}'])
    assert error is None and config.model.moe.layers == expected
  config, error = _parse(base + ['--config.model.moe.capacity=4',
                                 '--config.model.moe.eval_capacity_factor=2.0',
                                 '--config.preprocess.crop_scale=0.5,1.0'])
  assert error is None
  assert config.model.moe.capacity == 4
  assert config.model.moe.eval_capacity_factor == 2.0
  assert tuple(config.preprocess.crop_scale) == (0.5, 1.0)
  # A literal of the wrong type is caught by validation, in one line.
  from vmoe.train.config_validation import ConfigError, validate_config  # pylint: disable=g-import-not-at-top
  for override, message in (
      ('--config.model.moe.layers=3', 'config.model.moe.layers=3'),
      ('--config.model.moe.capacity=many', "config.model.moe.capacity='many'"),
      ('--config.preprocess.crop_scale=0.5',
       'config.preprocess.crop_scale=0.5')):
    config, error = _parse(base + [override])
    assert error is None
    with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
      validate_config(config)


def test_flag_errors_in_main_exit_2_without_traceback(tmp_path):
  """The command-line wiring: two flag errors and a missing config file."""
  for args, message in (
      (['--config=configs/vit_digits.py', '--config.optimizer.lerning_rate=1'],
       'did you mean config.optimizer.learning_rate?'),
      (['--config=configs/vit_digits.py', '--config.model.moe.foo=1'],
       'config.model.moe is None'),
      ([f'--config={tmp_path / "missing.py"}'], 'no such file')):
    proc = subprocess.run(
        [sys.executable, 'main.py', f'--workdir={tmp_path / "w"}', *args],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ')
    assert message in lines[0]
    assert not (tmp_path / 'w').exists()


# ---------------------------------------------------- validation and data --


@pytest.mark.parametrize('overrides,message', [
    ({'optimizer.learning_rate': 1e39},
     'config.optimizer.learning_rate=1e+39 is not finite in float32'),
    ({'preprocess.num_channels': 4}, 'config.preprocess.num_channels=4'),
    ({'preprocess.resize_method': 'cubic'},
     "config.preprocess.resize_method='cubic'"),
    ({'dataset.train_split': 'validation'},
     "config.dataset.train_split='validation' is not a split"),
    ({'dataset.eval_split': 'test[:0]'},
     "config.dataset.eval_split='test[:0]' has no examples"),
    ({'dataset.label_key': 'id'}, "config.dataset.label_key='id'"),
    ({'dataset.image_key': 'img'}, "config.dataset.image_key='img'"),
    ({'model.moe': common.moe_config(layers='every:2', group_size=5)},
     'config.model.moe.group_size=5 does not divide'),
    ({'dataset.shuffle_buffer': -1},
     'config.dataset.shuffle_buffer=-1 must be an integer >= 1'),
])
def test_bad_config_or_data_fails_before_the_model(
    digits_data_dir, workdir, monkeypatch, overrides, message):
  _no_model(monkeypatch)
  _user_error(_config(digits_data_dir, **overrides), workdir, message)


def test_bad_data_dir(digits_data_dir, tmp_path, monkeypatch):
  _no_model(monkeypatch)
  afile = tmp_path / 'afile'
  afile.write_text('not a directory')
  for data_dir, message in ((afile, 'is a file, not a directory'),
                            (afile / 'sub', 'cannot be created')):
    _user_error(_tfds_config(str(data_dir)), tmp_path / 'w',
                f'config.dataset.data_dir={str(data_dir)!r}', message)
  assert not (tmp_path / 'w').exists()


def test_broken_data_files_are_named_before_the_model(
    digits_data_dir, workdir, tmp_path, monkeypatch):
  _no_model(monkeypatch)
  data_dir, files = _data_copy(digits_data_dir, tmp_path)
  with open(files['train'], 'r+b') as f:
    f.truncate(os.path.getsize(files['train']) // 2)
  _user_error(_tfds_config(data_dir), workdir, files['train'],
              'is truncated')
  data_dir, files = _data_copy(digits_data_dir, tmp_path / 'b')
  os.remove(files['test'])
  _user_error(_tfds_config(data_dir), workdir,
              "config.dataset.eval_split='test'",
              files['test'], 'is missing')


def test_eval_read_error_keeps_the_steps_checkpoint(digits_data_dir,
                                                    tmp_path):
  """Damage inside a record (framing intact) shows when the eval split is
  read, after checkpoint 6 was saved; the error names the file."""
  workdir = tmp_path / 'work'
  data_dir, files = _data_copy(digits_data_dir, tmp_path)
  data = bytearray(pathlib.Path(files['test']).read_bytes())
  data[20:40] = bytes(20)  # inside the first record's data: bad CRC
  pathlib.Path(files['test']).write_bytes(bytes(data))
  config = _tfds_config(data_dir, num_train_steps=6, eval_every_steps=6)
  with pytest.raises(trainer.pipeline.DataError) as info:
    trainer.train_and_evaluate(config, str(workdir))
  assert f'cannot read {files["test"]}' in str(info.value)
  assert '\n' not in str(info.value)
  ckpt = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'),
                                     max_to_keep=3)
  assert ckpt.all_steps() == [2, 4, 6]
  ckpt.close()


# ---------------------------------------------------------------- workdir --


def test_bad_workdir(digits_data_dir, tmp_path, monkeypatch):
  _no_model(monkeypatch)
  config = _config(digits_data_dir)
  afile = tmp_path / 'afile'
  afile.write_text('x')
  _user_error(config, afile, f'--workdir={afile} is a file')
  _user_error(config, afile / 'sub', 'cannot be created: Not a directory')
  real_makedirs = os.makedirs

  def read_only(path, *args, **kwargs):
    if str(path).startswith(str(tmp_path / 'ro')):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_makedirs(path, *args, **kwargs)

  monkeypatch.setattr(os, 'makedirs', read_only)
  _user_error(config, tmp_path / 'ro' / 'w', 'Read-only file system')


def test_full_disk(digits_data_dir, workdir, monkeypatch):
  usage = shutil.disk_usage(workdir)
  monkeypatch.setattr(workdir_lib.shutil, 'disk_usage',
                      lambda path: usage._replace(free=1 << 20))
  _user_error(_config(digits_data_dir), workdir, '1.0 MiB free',
              'a checkpoint of this model needs')


def test_full_disk_on_a_new_workdir_leaves_nothing(digits_data_dir, tmp_path,
                                                   monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(workdir_lib.shutil, 'disk_usage',
                      lambda path: usage._replace(free=1 << 20))
  empty = tmp_path / 'empty'
  empty.mkdir()
  for workdir in (tmp_path / 'new', empty):
    _user_error(_config(digits_data_dir), workdir, '1.0 MiB free')
  assert not (tmp_path / 'new').exists()
  assert list(empty.iterdir()) == []  # no lock file


def test_fewshot_shots_beyond_the_training_images(digits_data_dir, tmp_path,
                                                  monkeypatch):
  from vmoe.evaluate import fewshot  # pylint: disable=g-import-not-at-top
  _no_model(monkeypatch)
  config = _config(digits_data_dir)
  config.fewshot = fewshot.default_config()
  config.fewshot.every_steps = 4
  config.fewshot.shots = (1, 1000)
  _user_error(config, tmp_path / 'w', 'config.fewshot.shots=(1, 1000): '
              '1000-shot needs 1000 images of each of the 10 classes')
  assert not (tmp_path / 'w').exists()


def test_second_run_on_a_locked_workdir(digits_data_dir, workdir,
                                        monkeypatch):
  _no_model(monkeypatch)
  holder = workdir_lib.Lock(str(workdir))
  holder.acquire()
  try:
    _user_error(_config(digits_data_dir), workdir, 'is in use by another run',
                f'pid {os.getpid()} on')
  finally:
    holder.release()


@pytest.mark.parametrize('overrides,message', [
    ({'model.moe': common.moe_config(layers='every:2')},
     "config.model.moe={'"),
    ({'model.variant': 'mu/4'}, "config.model.variant='mu/4' (was 'mu/2')"),
    ({'optimizer.learning_rate': 0.01},
     'config.optimizer.learning_rate=0.01 (was 0.003)'),
    ({'seed': 1}, 'config.seed=1 (was 0)'),
])
def test_resume_refuses_changes_that_define_the_run(
    digits_data_dir, workdir, monkeypatch, overrides, message):
  _no_model(monkeypatch)
  _user_error(_config(digits_data_dir, **overrides), workdir, message,
              'only vmoe.workdir.RESUME_CHANGEABLE may change')


def test_config_comparison_rules():
  stored = {'seed': 0, 'num_train_steps': 10, 'model': {
      'variant': 'mu/2', 'moe': {'router': 'token_choice', 'k': 2,
                                 'eval_capacity_factor': None}},
            'removed_field': 1}
  current = {'seed': 0, 'num_train_steps': 99, 'model': {
      'variant': 'mu/2', 'gelu': 'tanh',
      'moe': {'router': 'token_choice', 'k': 2, 'eval_capacity_factor': 2.0,
              'granularity': 1}}}
  defaults = {'model': {'gelu': 'tanh', 'moe': {'granularity': 1}}}
  assert workdir_lib.config_changes(stored, current, defaults) == []
  current['model']['gelu'] = 'exact'
  current['model']['moe']['router'] = 'expert_choice'
  current['model']['moe']['granularity'] = 2
  assert workdir_lib.config_changes(stored, current, defaults) == [
      ('model.gelu', 'tanh', 'exact'),
      ('model.moe.granularity', 1, 2),
      ('model.moe.router', 'token_choice', 'expert_choice')]
  # Every default of the base config and of the MoE options is known.
  defaults = workdir_lib.default_values()
  assert defaults['model']['moe']['router'] == 'token_choice'
  assert defaults['optimizer']['name'] == 'adamw'


def _strip_records(workdir) -> None:
  """Makes the checkpoints of `workdir` look written before checkpoints
  recorded digests, config and evaluations."""
  for path in pathlib.Path(workdir).glob('checkpoints/*/_CHECKPOINT_METADATA'):
    meta = json.loads(path.read_text())
    meta.pop('custom_metadata', None)
    path.write_text(json.dumps(meta))


def test_the_checkpoints_config_decides_not_config_json(
    digits_data_dir, workdir, monkeypatch):
  """Deleting or breaking config.json unlocks nothing: each checkpoint
  records the config (config.json is a readable copy)."""
  _no_model(monkeypatch)
  changed = _config(digits_data_dir, seed=1,
                    **{'optimizer.learning_rate': 0.01})
  for damage in ('delete', 'garbage'):
    if damage == 'delete':
      (workdir / 'config.json').unlink()
    else:
      (workdir / 'config.json').write_text('{"seed": ')
    _user_error(changed, workdir, 'config.optimizer.learning_rate=0.01 (was '
                '0.003), config.seed=1 (was 0)',
                '(the config recorded by checkpoint 4)')


def test_unreadable_config_json_of_older_checkpoints(digits_data_dir, workdir,
                                                     monkeypatch):
  """Checkpoints without a record: config.json is the run's config."""
  _no_model(monkeypatch)
  _strip_records(workdir)
  (workdir / 'config.json').write_text('{"seed": ')
  _user_error(_config(digits_data_dir), workdir,
              f'{workdir / "config.json"} cannot be read')


def test_finished_run_returns_its_summary(digits_data_dir, workdir,
                                          monkeypatch):
  """Same or fewer steps: nothing trained, nothing written; stale temporary
  directories of killed saves and foreign files are no obstacle."""
  stale = workdir / 'checkpoints' / '6.orbax-checkpoint-tmp-1700000000'
  stale.mkdir()
  (stale / 'partial').write_text('x')
  (workdir / 'checkpoints' / 'notes.txt').write_text('mine')
  (workdir / 'checkpoints' / 'old').mkdir()
  before = _snapshot(workdir)
  del before[str(stale.relative_to(workdir) / 'partial')]
  monkeypatch.chdir(workdir.parent)
  for steps in (4, 2):
    result = trainer.train_and_evaluate(
        _config(digits_data_dir, num_train_steps=steps), 'work')
    assert result['already_trained'] and result['step'] == 4
    assert 0 < result['accuracy'] <= 1 and result['loss'] > 0
    assert not stale.exists()
    assert _snapshot(workdir) == before


# ------------------------------------------- evaluations lost to a kill --


def _drop_records(workdir, split: str, step: int) -> dict:
  """Removes the `split` record of `step` from metrics.jsonl (as a kill
  during that evaluation leaves it); returns it."""
  path = workdir / 'metrics.jsonl'
  lines = path.read_text().splitlines(keepends=True)
  (dropped,) = [json.loads(l) for l in lines
                if json.loads(l)['split'] == split
                and json.loads(l)['step'] == step]
  path.write_text(''.join(l for l in lines if json.loads(l) != dropped))
  return dropped


def test_an_evaluation_lost_to_a_kill_runs_on_resume(digits_data_dir,
                                                     workdir, capsys):
  """Checkpoint 4 records that the eval of step 4 is due: a resume that
  finds no eval record of step 4 runs it before anything else, with the
  values the killed run would have logged."""
  lost = _drop_records(workdir, 'eval', 4)
  assert checkpoint_lib.read_step_info(
      str(workdir / 'checkpoints' / '4'), 4).evaluations == ('eval',)
  before = _snapshot(workdir)
  del before['metrics.jsonl']
  result = trainer.train_and_evaluate(_config(digits_data_dir), str(workdir))
  assert result['already_trained'] and result['step'] == 4
  assert result['accuracy'] == lost['accuracy']
  assert result['loss'] == lost['loss']
  evals = [r for r in _records(workdir) if r['split'] == 'eval']
  assert evals == [lost]
  after = _snapshot(workdir)
  del after['metrics.jsonl']
  assert after == before  # checkpoints and config.json untouched
  # A second resume finds the record: nothing runs again.
  trainer.train_and_evaluate(_config(digits_data_dir), str(workdir))
  assert [r for r in _records(workdir) if r['split'] == 'eval'] == [lost]
  assert 'warning' not in capsys.readouterr().err


def test_a_non_finite_eval_loss_is_logged_with_a_warning(digits_data_dir,
                                                         workdir, capsys,
                                                         monkeypatch):
  _drop_records(workdir, 'eval', 4)
  monkeypatch.setattr(trainer.Experiment, 'evaluate',
                      lambda self, params: {'loss': float('inf'),
                                            'accuracy': 0.1})
  result = trainer.train_and_evaluate(_config(digits_data_dir), str(workdir))
  assert result['loss'] == float('inf')
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['warning: step 4: eval loss is inf (logged as it is): the '
                 'model gives a true class probability 0 or computes NaN']


def _records(workdir) -> list[dict]:
  return [json.loads(l) for l in
          (workdir / 'metrics.jsonl').read_text().splitlines()]


# ------------------------------------------------------------ checkpoints --


def _corrupt(step_dir: pathlib.Path, kind: str) -> None:
  data = [p for p in step_dir.glob('default/ocdbt.process_0/d/*')]
  if kind == 'truncated':
    for p in data:
      with open(p, 'r+b') as f:
        f.truncate(p.stat().st_size // 2)
  elif kind == 'overwritten':
    for p in data:
      p.write_bytes(np.random.default_rng(0).bytes(p.stat().st_size))
  elif kind == 'metadata_deleted':
    (step_dir / 'default' / '_METADATA').unlink()
  elif kind == 'metadata_garbage':
    (step_dir / 'default' / '_METADATA').write_text('{"tree_metadata": ')
  elif kind == 'emptied':
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  elif kind == 'zeroed':
    for p in step_dir.rglob('*'):
      if p.is_file():
        p.write_bytes(bytes(p.stat().st_size))


@pytest.fixture(scope='module')
def experiment(digits_data_dir):
  return trainer.Experiment(_config(digits_data_dir))


@pytest.mark.parametrize('kind', ['truncated', 'overwritten',
                                  'metadata_deleted', 'metadata_garbage',
                                  'emptied', 'zeroed'])
def test_corrupt_latest_checkpoint_falls_back(experiment, workdir, capsys,
                                              kind):
  step_dir = workdir / 'checkpoints' / '4'
  _corrupt(step_dir, kind)
  before = _snapshot(workdir)
  ckpt = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'),
                                     max_to_keep=3)
  try:
    state, step, _ = trainer._restore_newest(ckpt, experiment, True)  # pylint: disable=protected-access
    assert ckpt.all_steps() == [2]
  finally:
    ckpt.close()
  assert step == 2 and int(state['step']) == 2
  # Set aside, not deleted: the same files under 4.corrupt.
  moved = {k.replace('checkpoints/4/', 'checkpoints/4.corrupt/', 1): v
           for k, v in before.items()}
  assert _snapshot(workdir) == moved
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f'warning: skipped checkpoint 4 in {workdir / "checkpoints"} (')
  assert lines[0].endswith(f'moved it to {step_dir}.corrupt')


def test_no_checkpoint_restores(digits_data_dir, workdir):
  for step in (2, 4):
    _corrupt(workdir / 'checkpoints' / str(step), 'emptied')
  # Nothing restores: the cause may be this run's, so nothing is moved.
  before = _snapshot(workdir)
  with pytest.raises(trainer.NoUsableCheckpointError,
                     match=r'restores \(steps 2, 4; checkpoint 4: .*nothing '
                           r'was moved'):
    trainer.train_and_evaluate(_config(digits_data_dir), str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert _snapshot(workdir) == before


def test_other_model_in_checkpoint_is_not_corruption(digits_data_dir, workdir):
  """Without a recorded config (older checkpoints, no config.json) only the
  stored shapes can tell: an error that names them, and no checkpoint is set
  aside."""
  _strip_records(workdir)
  (workdir / 'config.json').unlink()
  _user_error(_config(digits_data_dir, **{'model.variant': 'mu/4'}), workdir,
              'checkpoint 4 in', 'holds another model or optimizer',
              'patch_kernel is float32[2, 2, 1, 64] in the checkpoint, '
              'float32[4, 4, 1, 64] in this config')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def test_checkpoint_write_error_is_one_line(trained, tmp_path, monkeypatch):
  """A save that fails (e.g. the disk filled up while training)."""
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'),
                                     max_to_keep=3, async_save=False)
  source = checkpoint_lib.Checkpointer(str(trained / 'checkpoints'),
                                       max_to_keep=3)
  state = source.restore_as_saved(4)
  source.close()

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), 'ocdbt.process_0')

  monkeypatch.setattr(ckpt._manager, 'save', full)  # pylint: disable=protected-access
  with pytest.raises(trainer.USER_ERRORS,
                     match=r'cannot write checkpoint 5 to .*: OSError: '
                           r'\[Errno 28\] No space left on device'):
    ckpt.save(5, state)
  ckpt.close()


# ------------------------------------------------------ real main.py runs --


def _main(config, workdir, *args, **popen):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, 'main.py', f'--config={config}', f'--workdir={workdir}',
       *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
      **popen)


def _start_main(config, workdir) -> subprocess.Popen:
  """main.py started in the background (to be sent signals)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.Popen(
      [sys.executable, 'main.py', f'--config={config}', f'--workdir={workdir}'],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


@pytest.mark.slow
def test_main_on_a_finished_workdir_and_a_locked_one(digits_data_dir,
                                                     workdir, tmp_path):
  config = tiny_digits_config_file(
      tmp_path, digits_data_dir, num_train_steps=4, log_every_steps=2,
      eval_every_steps=4, checkpoint_every_steps=2)
  before = _snapshot(workdir)
  proc = _main(config, workdir, '--config.num_train_steps=3')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith(
      'done: already trained to step 4 (num_train_steps=3), eval accuracy ')
  assert 'Traceback' not in proc.stderr and proc.stderr.strip() == ''

  holder = workdir_lib.Lock(str(workdir))
  holder.acquire()
  try:
    proc = _main(config, workdir)
  finally:
    holder.release()
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in proc.stderr
  assert lines[0].startswith(f'error: --workdir={workdir} is in use by '
                             f'another run (pid {os.getpid()} on ')
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_main_interrupted_while_starting_writes_nothing(digits_data_dir,
                                                        workdir, tmp_path):
  """SIGINT before training starts (here: while the config file loads)."""
  config = tiny_digits_config_file(tmp_path, digits_data_dir,
                                   num_train_steps=6)
  slow = tmp_path / 'slow_config.py'  # a start that outlasts the signal
  slow.write_text('import time\n'
                  f'exec(open({config!r}).read())\n'
                  'time.sleep(8)\n')
  config = str(slow)
  before = _snapshot(workdir)
  child = _start_main(config, workdir)
  try:
    time.sleep(3)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=300)
  finally:
    if child.poll() is None:
      child.kill()
  assert 'Traceback' not in err
  assert child.returncode in (130, -signal.SIGINT), err
  if child.returncode == 130:
    assert err.strip().splitlines()[-1].startswith('stopped: received SIGINT')
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_a_kill_in_the_final_evaluation_is_made_good_on_resume(
    digits_data_dir, tmp_path):
  """SIGKILL during the evaluation of the last step, after its checkpoint:
  the rerun of the same command evaluates step 4 and prints it."""
  config = tiny_digits_config_file(
      tmp_path, digits_data_dir, num_train_steps=4, log_every_steps=2,
      eval_every_steps=4, checkpoint_every_steps=2)
  workdir = tmp_path / 'work'
  proc = subprocess.run(
      [sys.executable, '-m', 'tests.workers.kill_in_eval', '--kill_at_step=4',
       f'--config={config}', f'--workdir={workdir}'], cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'), capture_output=True,
      text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  assert (workdir / 'checkpoints' / '4').is_dir()
  assert not [r for r in _records(workdir) if r['split'] == 'eval']
  proc = _main(config, workdir)
  assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr
  (record,) = [r for r in _records(workdir) if r['split'] == 'eval']
  assert record['step'] == 4
  assert proc.stdout.strip().splitlines()[-1].startswith(
      f"done: already trained to step 4 (num_train_steps=4), eval accuracy "
      f"{record['accuracy']:.4f}, eval loss {record['loss']:.4f}, ")


@pytest.mark.slow
def test_ctrl_c_twice_while_training_exits_130_in_one_line(digits_data_dir,
                                                           tmp_path):
  config = tiny_digits_config_file(
      tmp_path, digits_data_dir, num_train_steps=100_000, log_every_steps=1,
      eval_every_steps=100_000, checkpoint_every_steps=100_000)
  workdir = tmp_path / 'work'
  child = _start_main(config, workdir)
  try:
    deadline = time.time() + 240
    while not (workdir / 'metrics.jsonl').is_file() and time.time() < deadline:
      time.sleep(0.2)  # training has started once a step is logged
    assert child.poll() is None
    child.send_signal(signal.SIGINT)
    time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
  finally:
    if child.poll() is None:
      child.kill()
  assert child.returncode == 130, err[-2000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err
  assert err.strip().splitlines()[-1].startswith('stopped: '), err


@pytest.mark.slow
def test_two_processes_agree_when_the_workdir_is_locked(digits_data_dir,
                                                        workdir, tmp_path):
  """Only process 0 locks; the other learns that it failed and stops too."""
  import socket  # pylint: disable=g-import-not-at-top
  config = tiny_digits_config_file(tmp_path, digits_data_dir,
                                   num_train_steps=6)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  holder = workdir_lib.Lock(str(workdir))
  holder.acquire()
  try:
    procs = [subprocess.Popen(
        [sys.executable, 'main.py', f'--config={config}',
         f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={i}', '--num_cpu_devices=1'],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = []
    try:
      for p in procs:
        outs.append(p.communicate(timeout=300))
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
  finally:
    holder.release()
  errors = []
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 2 and 'Traceback' not in err, err[-2000:]
    errors.append(err.strip().splitlines()[-1])
  assert errors[0].startswith(f'error: --workdir={workdir} is in use')
  assert errors[1] == (f'error: process 0 could not prepare '
                       f'--workdir={workdir} (see its error)')


# ------------------------------------------- predict and the capacity sweep --


def _command(module, *args):
  return subprocess.run(
      [sys.executable, '-m', module, *args], cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'), capture_output=True,
      text=True, timeout=300)


def _one_line_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize('factors,message', [
    ('inf', '--capacity_factors=inf: inf must be a finite number > 0'),
    ('1.0,nan', '--capacity_factors=1.0,nan: nan must be a finite number'),
    ('0', '--capacity_factors=0: 0 must be a finite number > 0'),
    ('a', "--capacity_factors=a: 'a' is not a number"),
    ('', '--capacity_factors= is empty'),
])
def test_capacity_factors_errors(factors, message):
  from vmoe.evaluate import capacity_sweep  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError) as info:
    capacity_sweep.parse_factors(factors.split(',') if factors else [])
  assert str(info.value).startswith(message), str(info.value)
  assert capacity_sweep.parse_factors(['0.5', ' 2']) == [0.5, 2.0]


def test_commands_on_bad_arguments_write_nothing(workdir, tmp_path):
  before = _snapshot(workdir)
  image = tmp_path / 'x.png'
  image.write_bytes(b'')
  _one_line_error(_command('vmoe.predict', f'--workdir={workdir}', '--top=-1',
                           str(image)), '--top=-1 must be an integer >= 1')
  _one_line_error(_command('vmoe.evaluate.capacity_sweep',
                           f'--workdir={workdir}', '--capacity_factors='),
                  '--capacity_factors= is empty')
  missing = tmp_path / 'missing'
  _one_line_error(_command('vmoe.evaluate.capacity_sweep',
                           f'--workdir={missing}', '--capacity_factors=1'),
                  f'{missing / "checkpoints"} does not exist')
  assert not missing.exists()
  assert _snapshot(workdir) == before
  assert not (workdir / 'capacity_sweep.json').exists()
