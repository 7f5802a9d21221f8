"""Every notebook executes headless in quick mode (QUICK=1), as CI runs it,
and produces its key outputs (tables, plots)."""

import json
import os

import pytest

from vmoe.analysis import claims as declared

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')
pd = pytest.importorskip('pandas')
PIL = pytest.importorskip('PIL.Image')


NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         'notebooks')


def execute(name, monkeypatch, data_dir, tmp_path, params_source=''):
  """Runs notebooks/<name> in a fresh kernel (QUICK=1, results in tmp_path,
  `params_source` appended to its parameters cell); returns the executed
  notebook."""
  monkeypatch.setenv('QUICK', '1')
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  # Results go to a temp dir in quick mode; point it at tmp_path to check.
  params = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1, f'{name}: needs exactly one cell tagged parameters'
  params[0].source += f'\nRESULTS_DIR = {str(tmp_path)!r}\n{params_source}'
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': NOTEBOOKS}})
  client.execute()
  return nb


def outputs_text(nb):
  out = []
  for cell in nb.cells:
    for o in cell.get('outputs', []):
      out.append(o.get('text', '') + str(o.get('data', {}).get('text/plain', '')))
  return '\n'.join(out)


def images(nb):
  return sum('image/png' in o.get('data', {}) for c in nb.cells
             for o in c.get('outputs', []))


def test_notebooks_are_clean():
  """Committed notebooks carry no outputs and start with the Colab cell."""
  for name in sorted(os.listdir(NOTEBOOKS)):
    if not name.endswith('.ipynb'):
      continue
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert not any(c.get('outputs') for c in code), f'{name} has outputs'
    assert "'google.colab' in sys.modules" in code[0].source, name
    assert 'parameters' in code[1].metadata.get('tags', []), name
    assert "os.environ.get('QUICK', '0') == '1'" in code[1].source, name


def dpi(path):
  with PIL.open(path) as image:
    return min(image.info['dpi'])


@pytest.mark.slow
def test_router_study(monkeypatch, digits_data_dir, tmp_path):
  nb = execute('router_study.ipynb', monkeypatch, digits_data_dir, tmp_path)
  claims = pd.read_csv(tmp_path / 'claims.csv')
  # 5 router claims and 2 sanity checks, then the declared claims.
  assert len(claims) == 7 + len(declared.CLAIMS)
  assert list(claims.claim[7:]) == [c.claim for c in declared.CLAIMS]
  assert (claims.kind == 'sanity check').sum() == 2
  sane = claims[claims.kind == 'sanity check']
  assert set(sane.status) <= {declared.SANITY_HOLDS, declared.SANITY_FAILS}
  assert set(claims[claims.kind == 'claim'].status) <= set(declared.VERDICTS)
  # One seed in quick mode: no claim between noisy numbers can be decided.
  ordering = claims[claims.claim.str.startswith('Soft MoE > expert choice')]
  assert (ordering.status == declared.INCONCLUSIVE).all()
  assert ordering.compute.str.contains('FLOPs').all()
  runs = pd.read_csv(tmp_path / 'runs.csv')
  assert {'dense', 'tc_k2_bpr', 'ec_cf2', 'soft_k2'} <= set(runs.config)
  assert runs.accuracy.between(0, 1).all() and runs.fewshot_10.notna().all()
  by_config = pd.read_csv(tmp_path / 'by_config.csv')
  assert (by_config.accuracy_images_low <= by_config.accuracy).all()
  assert (by_config.accuracy <= by_config.accuracy_images_high).all()
  for plot in ('accuracy_vs_cost', 'expert_load', 'capacity_sweep',
               'dropped_vs_experts', 'training_curves'):
    path = tmp_path / f'{plot}.png'
    assert path.stat().st_size > 1000, plot
    assert dpi(path) >= 149.5, plot
  assert images(nb) >= 5
  sweep = pd.read_csv(tmp_path / 'capacity_sweep.csv')
  assert set(sweep.batch_priority) == {True, False}
  drops = pd.read_csv(tmp_path / 'drops.csv')
  assert (drops[drops.router == 'soft'].dropped_fraction == 0).all()


@pytest.fixture
def cifar10_data_dir(tmp_path):
  """A prepared TFDS `cifar10` (its own builder's features and file layout)
  holding 256 random 32x32 images per split: the notebooks' CIFAR-10 path
  (retarget to 16 pixels, 3 channels, flips) without a download.

  Not tfds.testing.mock_data: its generator-backed datasets left orbax's
  asynchronous checkpoint save without its array metadata (training fails
  at the first save), so the files here are real records instead."""
  tf = pytest.importorskip('tensorflow')
  tfds = pytest.importorskip('tensorflow_datasets')
  import numpy as np  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  builder = tfds.builder('cifar10', data_dir=data_dir)
  out = os.path.join(data_dir, 'cifar10', str(builder.version))
  os.makedirs(out)
  rng = np.random.default_rng(0)
  splits = []
  for split in ('train', 'test'):
    path = os.path.join(out, f'cifar10-{split}.tfrecord-00000-of-00001')
    with tf.io.TFRecordWriter(path) as writer:
      for i in range(256):
        writer.write(builder.info.features.serialize_example({
            'id': f'{split}_{i}', 'label': int(rng.integers(10)),
            'image': rng.integers(0, 256, (32, 32, 3), np.uint8)}))
    splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[256],
                                      num_bytes=os.path.getsize(path)))
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(out)
  return data_dir


@pytest.mark.slow
def test_router_study_on_cifar10(monkeypatch, cifar10_data_dir, tmp_path):
  monkeypatch.setenv('DATASET', 'cifar10')
  nb = execute('router_study.ipynb', monkeypatch, cifar10_data_dir, tmp_path,
               "IMAGE_SIZE = 16\nCONFIGS = ['dense', 'tc_k2_bpr', 'soft_k2']\n")
  runs = pd.read_csv(tmp_path / 'runs.csv')
  assert set(runs.config) == {'dense', 'tc_k2_bpr', 'soft_k2'}
  assert runs.accuracy.between(0, 1).all()
  cost = pd.read_csv(tmp_path / 'cost.csv')
  assert set(cost.applications_per_token) == {1.0, 2.0}
  with open(tmp_path / 'meta.json') as f:
    assert json.load(f)['dataset'] == 'cifar10'
  claims = pd.read_csv(tmp_path / 'claims.csv')
  missing = claims[claims.claim.str.startswith('Soft MoE > expert choice')]
  assert (missing.status == declared.INCONCLUSIVE).all()
  assert images(nb) >= 4


@pytest.mark.slow
def test_expert_specialization(monkeypatch, digits_data_dir, tmp_path):
  nb = execute('expert_specialization.ipynb', monkeypatch, digits_data_dir,
               tmp_path)
  spec = pd.read_csv(tmp_path / 'specialization.csv')
  assert spec.block.tolist() == [0, 1, 2, 3]
  assert spec.nmi.between(0, 1).all()
  balance = pd.read_csv(tmp_path / 'aux_losses.csv')
  assert set(balance.auxiliary_losses) == {'on', 'off'}
  ablation = pd.read_csv(tmp_path / 'ablation.csv')
  assert len(ablation) == 10 + 4 * 8 * 10  # base + 4 blocks x 8 experts
  assert images(nb) >= 4


@pytest.mark.slow
def test_soft_moe_walkthrough(monkeypatch, digits_data_dir, tmp_path):
  nb = execute('soft_moe_walkthrough.ipynb', monkeypatch, digits_data_dir,
               tmp_path)
  text = outputs_text(nb)
  diff = float(text.split('max |by hand - MoeLayer| = ')[1].split()[0])
  assert diff < 1e-4
  assert 'same logits as vmoe.nn.routing.soft_routing: True' in text
  assert 'dispatch columns sum to 1: True | combine rows sum to 1: True' in text
  timing = pd.read_csv(tmp_path / 'layer_time.csv')
  assert len(timing) == 2 and (timing.ms > 0).all()
  similarity = pd.read_csv(tmp_path / 'slot_similarity.csv')
  assert set(similarity.parameters) == {'initialisation', 'trained'}
  assert images(nb) >= 4
