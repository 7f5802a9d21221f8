"""`python -m vmoe.predict`: top-k classes and routing of a tiny workdir."""

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

from vmoe import checkpoints
from vmoe import config_flag
from vmoe import predict
from vmoe.checkpoints import checkpointer as checkpoint_lib
from vmoe.data import embedded
from vmoe.nn import moe
from vmoe.nn import routing as rt
from vmoe.nn import vit
from vmoe.recipes import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_moe_config(data_dir):
  config = common.digits_recipe(common.get_base_config())
  config.dataset.data_dir = data_dir
  config.model.moe = common.moe_config(
      layers=(1, 3), router='token_choice', num_experts=4, k=2,
      group_size=2 * 17, capacity_factor=1.0, batch_priority=True)
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir as training leaves it: config.json and checkpoints/<step>."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('predict')
  config = tiny_moe_config(str(path / 'tfds'))
  abstract = nnx.eval_shape(lambda: vit.create_model(
      config.model, num_classes=10, image_size=8, num_channels=1,
      rngs=nnx.Rngs(3)))
  # Random weights (no initialiser to compile), a head that is not zero.
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda x: (0.3 * rng.standard_normal(x.shape)).astype(x.dtype),
      nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  ckpt = checkpoint_lib.Checkpointer(str(path / 'checkpoints'), max_to_keep=1,
                                     async_save=False)
  ckpt.save(7, {'step': np.int32(7), 'params': params})
  ckpt.close()
  (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  arrays = embedded.load('digits')
  images, labels = arrays['train_image'], arrays['train_label']
  files = []
  for i in (0, 1, 2):
    files.append(str(path / f'digit{i}_{labels[i]}.png'))
    Image.fromarray(images[i, :, :, 0]).save(files[-1])
  return str(path), files, images[:3]


@pytest.mark.slow
def test_predict_cli_end_to_end(workdir):
  path, files, raw = workdir
  out = subprocess.run(
      [sys.executable, '-m', 'vmoe.predict', f'--workdir={path}', '--routing',
       '--top=3', *files], cwd=REPO, capture_output=True, text=True,
      timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  # Per image: its path, 3 classes, one routing line per MoE block (1, 3).
  assert len(lines) == 3 * 6, out.stdout
  # The same model evaluated here on the same preprocessed pixels.
  config = ml_collections.ConfigDict(json.load(open(f'{path}/config.json')))
  model, _ = predict.build_model(config, checkpoints.read(path))
  images = np.asarray(raw, np.float32) * (2 / 255.0) - 1.0
  batch = np.concatenate([images, np.full_like(images[:1], -1.0)])
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])(
      state, jnp.asarray(batch))
  probs = np.asarray(jax.nn.softmax(logits))[:3]
  for i, file in enumerate(files):
    block = lines[6 * i:6 * i + 6]
    assert block[0] == file
    top = np.argsort(-probs[i])[:3]
    for line, c in zip(block[1:4], top):
      pct, label = line.split()
      assert label == str(c)  # digits' class names are '0'..'9'
      assert abs(float(pct.rstrip('%')) - 100 * probs[i, c]) < 0.006
    for line, b in zip(block[4:], (1, 3)):
      assert line.startswith(f'  block {b} (token_choice, 4 experts): '
                             'expert use [')
      use = [float(v) for v in line.split('[')[1].split(']')[0].split()]
      dropped = float(line.rsplit(' ', 1)[1])
      assert len(use) == 4 and 0 <= dropped <= 1
      assert 0 < sum(use) <= 2.0 + 1e-6  # k=2 assignments per token at most


def test_predict_errors_are_one_line(workdir, capsys):
  path, files, _ = workdir
  cases = (([f'--workdir={path}', '/no/such.png'], 'does not exist'),
           ([f'--workdir={path}'], 'give one or more image'),
           ([f'--workdir={path}', f'--checkpoint={path}', files[0]],
            'exactly one of'),
           ([f'--checkpoint={path}/nothing', files[0]], 'needs --config'),
           ([f'--checkpoint={path}', '--config=/no/such_config.py', files[0]],
            'such_config.py'))
  for argv, message in cases:
    with pytest.raises(SystemExit) as info:
      subprocess_free_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and message in err and '\n' not in err


_PREDICT_FLAGS = []


def subprocess_free_main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not _PREDICT_FLAGS:  # define them once per process, as the command does
    _PREDICT_FLAGS.append(predict.define_flags())
  flags.FLAGS.unparse_flags()
  # As the command parses: a bad flag is one line and exit status 2.
  rest = config_flag.parse_flags(['predict'] + argv)
  predict.main(rest, _PREDICT_FLAGS[0])


def test_expert_use_counts_each_images_tokens():
  # 2 images of 3 tokens in one group of 6; k=2, 3 experts.
  index = np.array([[[0, 1], [0, 2], [1, 2], [2, 0], [2, 1], [0, 1]]])
  valid = np.ones_like(index, bool)
  valid[0, 5] = False  # token 2 of image 1 dropped entirely
  valid[0, 1, 1] = False  # second choice of token 1 of image 0 dropped
  r = rt.TokenChoiceRouting(
      expert_index=jnp.asarray(index, jnp.int32),
      position=jnp.zeros(index.shape, jnp.int32),
      combine_weight=jnp.asarray(valid, jnp.float32), valid=jnp.asarray(valid),
      capacity=4, num_experts=3)
  use = predict.expert_use({1: moe.Captured(r, None, 6)}, 2, 3)
  per_image, dropped = use[1]
  np.testing.assert_allclose(per_image[0], [2 / 3, 2 / 3, 1 / 3])
  np.testing.assert_allclose(per_image[1], [1 / 3, 1 / 3, 2 / 3])
  np.testing.assert_allclose(dropped, [0.0, 1 / 3])
  # Expert choice: expert e holds tokens token_index[0, e].
  ec = rt.ExpertChoiceRouting(
      token_index=jnp.asarray([[[0, 1], [3, 4], [0, 3]]], jnp.int32),
      combine_weight=jnp.ones((1, 3, 2)), num_tokens=6)
  per_image, dropped = predict.expert_use({0: moe.Captured(ec, None, 6)}, 2,
                                          3)[0]
  np.testing.assert_allclose(per_image, [[2 / 3, 0, 1 / 3], [0, 2 / 3, 1 / 3]])
  np.testing.assert_allclose(dropped, [1 / 3, 1 / 3])  # tokens 2 and 5


def test_predict_big_vision_checkpoint_with_a_config(tmp_path):
  """--checkpoint/--config path: an imported .npz, labels as indices."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = os.path.join(REPO, 'tests', 'data')
  images = np.load(os.path.join(data, 'big_vision_vit_expected.npz'))['images']
  pixels = np.round((images[:2] + 1) * 127.5).astype(np.uint8)
  files = []
  for i, p in enumerate(pixels):
    files.append(str(tmp_path / f'img{i}.png'))
    Image.fromarray(p).save(files[-1])
  config = common.get_base_config()
  config.dataset.name = 'no_such_dataset'
  config.preprocess.image_size = 16
  config.model.update(dict(variant='S/8', width=32, depth=1, mlp_dim=64,
                           num_heads=2, pool='gap'))
  source = checkpoints.read(os.path.join(data, 'big_vision_vit_gap.npz'))
  report = predict.predict(config, source, files, top=2).splitlines()
  model, num_classes = predict.build_model(config, source)
  assert num_classes == 5
  graphdef, state = nnx.split(model)
  logits = np.asarray(jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[0])(
      state, jnp.asarray(pixels * (2 / 255.0) - 1.0, jnp.float32)))
  for i in range(2):
    assert report[3 * i] == files[i]
    assert report[3 * i + 1].split()[1:] == ['class', str(np.argmax(logits[i]))]
  # Soft MoE: combine-weight mass per expert (uniform logits: 1 / e each).
  soft = rt.SoftRouting(logits=jnp.zeros((1, 6, 3 * 2)), num_experts=3)
  per_image, dropped = predict.expert_use({2: moe.Captured(soft, None, 6)}, 2,
                                          3)[2]
  np.testing.assert_allclose(per_image, np.full((2, 3), 1 / 3), rtol=1e-6)
  np.testing.assert_array_equal(dropped, 0.0)
