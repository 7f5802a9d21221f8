"""`vmoe.export`: big_vision .npz and safetensors round trips."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.helpers import REPO, fixture_vit_config, imported_logits
from vmoe import checkpoints
from vmoe import export
from vmoe.checkpoints import big_vision
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.nn import vit

DATA = os.path.join(REPO, 'tests', 'data')
EXPECTED = np.load(os.path.join(DATA, 'big_vision_vit_expected.npz'))
IMAGES = EXPECTED['images']
FILES = {'vit_tok': ('big_vision_vit_tok.npz', dict()),
         'gap': ('big_vision_vit_gap.npz', dict(variant='S/8', depth=1,
                                                 pool='gap')),
         'tok_bv': ('big_vision_vit_tok_bv.npz', dict(depth=1))}


@pytest.mark.parametrize('name', ['gap', 'tok_bv'])
def test_big_vision_checkpoints_round_trip_exactly(name):
  """A big_vision checkpoint imported and exported again is the same
  archive: the names and arrays big_vision's loader reads."""
  path = os.path.join(DATA, FILES[name][0])
  original = big_vision.read_flat(path)
  exported = export.to_big_vision(checkpoints.read(path).params)
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
    assert exported[key].dtype == value.dtype, key


@pytest.mark.parametrize('name', ['vit_tok', 'gap', 'tok_bv'])
def test_exported_npz_reads_back_to_the_same_logits(name, tmp_path):
  """vit_jax's layout (a class-token row in the position embedding) folds
  that row into `cls`: the exported model computes the reference logits."""
  file, model_kw = FILES[name]
  source = checkpoints.read(os.path.join(DATA, file))
  out = str(tmp_path / 'model.npz')
  export.export(source.params, 'big_vision', out)
  again = checkpoints.read(out)
  assert again.format == 'big_vision'
  model_cfg = fixture_vit_config(**model_kw)
  np.testing.assert_allclose(imported_logits(again, model_cfg, IMAGES),
                             imported_logits(source, model_cfg, IMAGES), rtol=0, atol=1e-6)
  np.testing.assert_allclose(imported_logits(again, model_cfg, IMAGES),
                             EXPECTED[f'{name}/logits'], rtol=0, atol=1e-5)
  if name == 'vit_tok':
    assert np.abs(source.params['pos_embedding'][:, 0]).max() > 0
    assert not np.abs(again.params['pos_embedding'][:, 0]).any()


def _vmoe_params():
  return checkpoints.read(os.path.join(DATA, 'vmoe_vit_moe', 'ckpt')).params


def test_moe_models_export_as_safetensors_only(tmp_path):
  params = _vmoe_params()
  out = tmp_path / 'moe.npz'
  with pytest.raises(export.ExportError, match='no big_vision layout'):
    export.export(params, 'big_vision', str(out))
  assert not os.listdir(tmp_path)


def test_safetensors_round_trip_with_a_readable_map(tmp_path):
  pytest.importorskip('safetensors')
  params = _vmoe_params()
  out = str(tmp_path / 'moe.safetensors')
  export.export(params, 'safetensors', out)
  back = export.read_safetensors(out)
  assert sorted(back) == sorted(params)
  for key, value in params.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  with open(out + '.json') as f:
    table = json.load(f)
  assert sorted(table) == sorted(params)
  for key, entry in table.items():
    assert entry['shape'] == list(params[key].shape), key
    assert 'without a description' not in entry['meaning'], key
  expert = [k for k in table if k.endswith('mlp/experts/kernel1')][0]
  assert table[expert]['meaning'].endswith("first layers [e, d, h]")
  assert table['blocks/0/attn/qkv_kernel']['meaning'].startswith('block 0: ')


def test_command_writes_a_workdir_checkpoint(tmp_path):
  """`python -m vmoe.export` reads the workdir's latest checkpoint; a bad
  format is one line and writes nothing."""
  source = checkpoints.read(os.path.join(DATA, FILES['tok_bv'][0]))
  params = jax.tree.map(np.asarray,
                        checkpoints.mapping.unflatten(source.params))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'),
                                     max_to_keep=1, async_save=False)
  ckpt.save(3, {'step': np.int32(3), 'params': params})
  ckpt.close()
  out = tmp_path / 'exported.npz'
  run = lambda *a: subprocess.run(
      [sys.executable, '-m', 'vmoe.export', f'--workdir={tmp_path}', *a],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  proc = run('--format=big_vision', f'--output={out}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  exported = np.load(out)
  original = big_vision.read_flat(os.path.join(DATA, FILES['tok_bv'][0]))
  assert sorted(exported.files) == sorted(original)
  proc = run('--format=big_vision', f'--output={tmp_path}/no/such/dir.npz')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --output=')
  assert not (tmp_path / 'no').exists()
