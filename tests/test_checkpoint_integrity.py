"""Content integrity of checkpoints (issue 21): the digest of every array
against its definition, bit flips in the data of a checkpoint detected and
fallen back from, the per-file CRCs of small checkpoints, the record's CRC,
and write failures reported in one line naming the step that failed."""

import errno
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.helpers import tiny_digits_config
from vmoe.recipes import common
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.checkpoints import digest
from vmoe.checkpoints.source import CheckpointError
from vmoe.train import trainer

MASK = (1 << 64) - 1


# --------------------------------------------- the digest, by definition --


def _splitmix(x: int) -> int:
  z = (x + 0x9E3779B97F4A7C15) & MASK
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
  return z ^ (z >> 31)


def _key(axis: int, j: int, low_bits: int) -> int:
  """The module docstring's key of index j on `axis`, in Python integers."""
  low = _splitmix((j % (1 << low_bits)) + ((axis + 1) * 0xD1B54A32D192ED03
                                           & MASK)) | 1
  high = _splitmix((j >> low_bits) + ((axis + 1) * 0x8CB92BA72F3D8DD7
                                      & MASK)) | 1
  return low * high & MASK


def _defined_digest(array, low_bits: int) -> int:
  """sum_i K_i * w_i mod 2^64, element by element."""
  a = np.asarray(array)
  if a.dtype.itemsize in (1, 2, 4):
    w = a.view(f'uint{8 * a.dtype.itemsize}')
  else:
    w = a.view(np.uint32).reshape(a.shape + (a.dtype.itemsize // 4,))
  w = w.reshape(1) if w.ndim == 0 else w
  total = 0
  for index in np.ndindex(*w.shape):
    key = 1
    for axis, j in enumerate(index):
      key = key * _key(axis, j, low_bits) & MASK
    total = (total + key * int(w[index])) & MASK
  return total


ARRAYS = [((3, 5), np.float32), ((), np.int32), ((7,), ml_dtypes.bfloat16),
          ((2, 3, 4), np.float64), ((9,), np.bool_), ((2, 0), np.float32),
          ((4, 11), np.uint8), ((2, 13), np.int16)]


@pytest.mark.parametrize('low_bits', [15, 2])
def test_digest_is_its_definition(monkeypatch, low_bits):
  """The chunked numpy computation (and the module's own element-wise
  reference) equals the definition, also when axes span several high parts
  and rows several chunks (low_bits=2: parts of 4 indices)."""
  if low_bits != digest.LOW_BITS:
    monkeypatch.setattr(digest, 'LOW_BITS', low_bits)
    monkeypatch.setattr(digest, '_CHUNK_ELEMENTS', 1 << low_bits)
    monkeypatch.setattr(digest, '_low_tables', {})
  rng = np.random.default_rng(0)
  for shape, dtype in ARRAYS:
    x = (rng.standard_normal(shape) * 50).astype(dtype)
    expected = _defined_digest(x, low_bits)
    assert digest.block_digest(x) == expected, (shape, dtype)
    assert digest.reference_digest(x) == expected


@pytest.mark.parametrize('low_bits', [15, 2])
def test_digests_of_blocks_add_up(monkeypatch, low_bits):
  """Shards at any offsets (what each process holds) sum to the digest of
  the whole array: the digest does not depend on the mesh."""
  monkeypatch.setattr(digest, 'LOW_BITS', low_bits)
  monkeypatch.setattr(digest, '_CHUNK_ELEMENTS', 1 << low_bits)
  monkeypatch.setattr(digest, '_low_tables', {})
  x = np.random.default_rng(1).standard_normal((6, 10, 7)).astype(np.float32)
  whole = digest.block_digest(x)
  # Per axis, consecutive ranges that cover it (a different mesh each).
  for ranges in ([[(0, 6)], [(0, 10)], [(0, 3), (3, 7)]],
                 [[(0, 2), (2, 6)], [(0, 5), (5, 10)], [(0, 7)]],
                 [[(0, 6)], [(0, 1), (1, 9), (9, 10)], [(0, 2), (2, 7)]]):
    total = 0
    for r0 in ranges[0]:
      for r1 in ranges[1]:
        for r2 in ranges[2]:
          block = x[r0[0]:r0[1], r1[0]:r1[1], r2[0]:r2[1]]
          total += digest.block_digest(block, (r0[0], r1[0], r2[0]))
    assert total & MASK == whole


def test_every_single_bit_flip_changes_the_digest():
  """A change confined to one element always changes the digest (odd keys,
  changes below 2^32): every bit of small float32, bfloat16 and int8 arrays."""
  rng = np.random.default_rng(2)
  for dtype in (np.float32, ml_dtypes.bfloat16, np.int8):
    x = (rng.standard_normal((3, 5)) * 10).astype(dtype)
    base = digest.block_digest(x)
    raw = bytearray(x.tobytes())
    for byte in range(len(raw)):
      for bit in range(8):
        raw[byte] ^= 1 << bit
        flipped = np.frombuffer(bytes(raw), dtype).reshape(x.shape)
        assert digest.block_digest(flipped) != base, (dtype, byte, bit)
        raw[byte] ^= 1 << bit


def test_partial_digests_of_jax_arrays_numpy_and_scalars():
  tree = [jnp.arange(12.0).reshape(3, 4), np.int32(7),
          np.ones((5, 2), np.float16), jnp.zeros((), jnp.bfloat16)]
  one = digest.partial_digests(tree, threads=1)
  assert digest.partial_digests(tree, threads=2) == one
  assert one == [digest.block_digest(np.asarray(x)) for x in tree]
  assert digest.sum_over_processes(one) == one  # a single process


# --------------------------------------------------- trained checkpoints --


@pytest.fixture(scope='module')
def trained(digits_data_dir, tmp_path_factory):
  """A workdir trained for 4 steps: checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp('integrity') / 'work'
  config = tiny_digits_config(digits_data_dir, num_train_steps=4,
                              log_every_steps=2, eval_every_steps=4,
                              checkpoint_every_steps=2)
  trainer.train_and_evaluate(config, str(workdir))
  return workdir, trainer.Experiment(config)


def _restore(workdir, experiment):
  ckpt = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'),
                                     max_to_keep=3)
  try:
    _, step, _ = trainer._restore_newest(ckpt, experiment, True)  # pylint: disable=protected-access
  finally:
    ckpt.close()
  return step


def test_twenty_random_bit_flips_in_the_data_are_detected(trained, tmp_path,
                                                         capsys):
  """One flipped bit anywhere in the data files of the newest checkpoint
  (file and position drawn in proportion to the bytes): the restore sets it
  aside with one warning and resumes from the previous one, 20 times of 20."""
  source, experiment = trained
  rng = np.random.default_rng(21)
  capsys.readouterr()
  for trial in range(20):
    workdir = tmp_path / str(trial)
    shutil.copytree(source, workdir)
    step_dir = workdir / 'checkpoints' / '4'
    files = sorted(step_dir.glob('default/ocdbt.process_0/d/*'))
    sizes = np.array([f.stat().st_size for f in files], np.float64)
    path = files[rng.choice(len(files), p=sizes / sizes.sum())]
    data = bytearray(path.read_bytes())
    position = int(rng.integers(len(data)))
    data[position] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))
    assert _restore(workdir, experiment) == 2, (trial, path, position)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f'warning: skipped checkpoint 4 in {workdir / "checkpoints"} ('), lines
    assert (workdir / 'checkpoints' / '4.corrupt').is_dir()
    shutil.rmtree(workdir)


def test_value_digests_catch_what_the_files_do_not(tmp_path, monkeypatch):
  """With per-file CRCs off (large checkpoints), a changed value is caught by
  the digest of its array; the message names the array."""
  monkeypatch.setattr(checkpoint_lib, 'FILE_CHECK_BYTES', 0)
  rng = np.random.default_rng(3)
  state = {'step': np.int32(1),
           'params': {'w': rng.standard_normal((256, 256)).astype(np.float32)}}
  directory = tmp_path / 'checkpoints'
  ckpt = checkpoint_lib.Checkpointer(str(directory), max_to_keep=3,
                                     async_save=False)
  ckpt.save(1, state)
  assert not ckpt.info(1).files
  # Random float32 is stored as raw zstd blocks: the middle of the largest
  # data file is a value of `w`.
  files = sorted(directory.glob('1/default/ocdbt.process_0/d/*'),
                 key=lambda p: p.stat().st_size)
  data = bytearray(files[-1].read_bytes())
  data[len(data) // 2] ^= 0x10
  files[-1].write_bytes(bytes(data))
  with pytest.raises(checkpoint_lib.CorruptCheckpointError,
                     match='the content of params/w differs from what was '
                           'saved'):
    ckpt.restore_as_saved(1)
  with pytest.raises(CheckpointError, match=r'no checkpoint in .* restores '
                     r'\(steps 1; checkpoint 1: the content of params/w'):
    checkpoint_lib.read(str(directory))
  ckpt.close()


def test_the_record_is_checked_by_its_crc(trained, tmp_path, capsys):
  """A changed field of the record (here the stored config) is corruption:
  the previous checkpoint is restored."""
  source, experiment = trained
  workdir = tmp_path / 'work'
  shutil.copytree(source, workdir)
  path = workdir / 'checkpoints' / '4' / '_CHECKPOINT_METADATA'
  meta = json.loads(path.read_text())
  meta['custom_metadata']['vmoe']['config']['seed'] = 1
  path.write_text(json.dumps(meta))
  assert _restore(workdir, experiment) == 2
  assert 'does not match its CRC-32' in capsys.readouterr().err


def test_small_checkpoints_list_every_file(trained):
  source, experiment = trained
  item = source / 'checkpoints' / '4' / 'default'
  manifest = json.loads((item / checkpoint_lib.FILES_NAME).read_text())
  on_disk = sorted(str(p.relative_to(item)) for p in item.rglob('*')
                   if p.is_file() and p.name not in (
                       checkpoint_lib.FILES_NAME, 'commit_success.txt'))
  assert sorted(manifest['files']) == on_disk
  checkpoint_lib.verify_files(4, str(item))
  info = checkpoint_lib.read_step_info(str(item.parent), 4)
  assert info.files and info.evaluations == ('eval',)
  assert info.config['num_train_steps'] == 4
  assert {p: (shape, dtype) for p, (shape, dtype, _) in info.arrays.items()
          } == checkpoint_lib.tree_signature(experiment.abstract_state)


def test_failed_async_save_names_its_step_without_tracebacks(tmp_path,
                                                             capfd):
  """The write of checkpoint 5 fails in orbax's background thread (here:
  a full disk while finalizing): the next save reports checkpoint 5, in one
  line, and nothing else reaches stderr."""
  state = {'step': jnp.asarray(1), 'w': jnp.ones((64, 64))}
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'),
                                     max_to_keep=3)

  def full(directory):
    raise OSError(errno.ENOSPC, 'No space left on device', str(directory))

  ckpt._handler.finalize = full  # pylint: disable=protected-access
  ckpt.save(5, state)
  with pytest.raises(checkpoint_lib.CheckpointWriteError) as info:
    ckpt.save(6, state)
  message = str(info.value)
  assert message.startswith(f'cannot write checkpoint 5 to '
                            f'{tmp_path / "checkpoints"}: ')
  assert 'No space left on device' in message and '\n' not in message
  ckpt.close()
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'Exception' not in err, err
  assert not (tmp_path / 'checkpoints' / '5').exists()


# ------------------------------------------- readers of a workdir (predict) --


def _flip_a_bit(step_dir: pathlib.Path) -> None:
  path = max(step_dir.glob('default/ocdbt.process_0/d/*'),
             key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x04
  path.write_bytes(bytes(data))


def test_readers_skip_a_corrupt_checkpoint_and_move_nothing(trained, tmp_path,
                                                           capsys):
  from vmoe import analysis  # pylint: disable=g-import-not-at-top
  source, _ = trained
  workdir = tmp_path / 'work'
  shutil.copytree(source, workdir)
  _flip_a_bit(workdir / 'checkpoints' / '4')
  capsys.readouterr()
  assert checkpoint_lib.read(str(workdir / 'checkpoints')).step == 2
  assert analysis.load(str(workdir)).step == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 2 and all(
      l.startswith(f'warning: skipped checkpoint 4 in {workdir / "checkpoints"}'
                   ' (') for l in lines), lines
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [
      '2', '4']


def test_readers_take_the_next_newest_when_one_is_deleted(trained, tmp_path,
                                                          capsys, monkeypatch):
  """A training run's max_to_keep deletes checkpoint 4 while it is read: the
  reader takes checkpoint 2, in silence."""
  source, _ = trained
  workdir = tmp_path / 'work'
  shutil.copytree(source, workdir)
  real_read = checkpoint_lib._read  # pylint: disable=protected-access

  def deleted_meanwhile(step, step_dir, *args, **kwargs):
    if step == 4:
      shutil.rmtree(step_dir)
    return real_read(step, step_dir, *args, **kwargs)

  monkeypatch.setattr(checkpoint_lib, '_read', deleted_meanwhile)
  capsys.readouterr()
  assert checkpoint_lib.read(str(workdir / 'checkpoints')).step == 2
  assert capsys.readouterr().err == ''
  shutil.rmtree(workdir / 'checkpoints' / '2')
  shutil.copytree(source / 'checkpoints' / '4', workdir / 'checkpoints' / '4')
  with pytest.raises(CheckpointError, match='the last one was deleted while '
                     'it was read'):
    checkpoint_lib.read(str(workdir / 'checkpoints'))


def test_readers_refuse_another_config(trained, digits_data_dir):
  """The config recorded by the checkpoint decides: a --config that differs
  in a field that defines the run is refused in one line; one that differs
  only where a resume may differ (here the data_dir) is taken."""
  from vmoe import analysis  # pylint: disable=g-import-not-at-top
  from vmoe import predict  # pylint: disable=g-import-not-at-top
  source, _ = trained
  fields = dict(num_train_steps=4, log_every_steps=2, eval_every_steps=4,
                checkpoint_every_steps=2)
  other = tiny_digits_config(digits_data_dir, **fields,
                             **{'model.moe': common.moe_config(
                                 layers='every:2', router='expert_choice')})
  with pytest.raises(ValueError) as info:
    analysis.load(str(source), config=other)
  assert '\n' not in str(info.value)
  assert str(info.value).startswith("config.model.moe={'")
  assert '(the config recorded by checkpoint 4)' in str(info.value)
  with pytest.raises(predict.PredictError, match='--config is not the config '
                     'the run in --workdir='):
    predict.workdir_run_config(str(source), other)
  same = tiny_digits_config('/elsewhere', **fields)
  assert predict.workdir_run_config(str(source), same) is same
  assert analysis.load(str(source), config=same).config is same
  recorded = predict.workdir_run_config(str(source), None)
  assert recorded.to_dict() == tiny_digits_config(digits_data_dir,
                                                  **fields).to_dict()
