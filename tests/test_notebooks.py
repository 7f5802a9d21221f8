"""Every notebook executes headless in quick mode (QUICK=1), as CI runs it,
and produces its key outputs (tables, plots)."""

import os

import pytest

from vmoe.analysis import claims as declared

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')
pd = pytest.importorskip('pandas')


NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         'notebooks')


def execute(name, monkeypatch, data_dir, tmp_path):
  """Runs notebooks/<name> in a fresh kernel; returns {variable: repr} of
  the names asked for by `outputs` and the executed notebook."""
  monkeypatch.setenv('QUICK', '1')
  monkeypatch.setenv('TFDS_DATA_DIR', data_dir)
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  # Results go to a temp dir in quick mode; point it at tmp_path to check.
  params = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(params) == 1, f'{name}: needs exactly one cell tagged parameters'
  params[0].source += f'\nRESULTS_DIR = {str(tmp_path)!r}\n'
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


@pytest.mark.slow
def test_router_study(monkeypatch, digits_data_dir, tmp_path):
  nb = execute('router_study.ipynb', monkeypatch, digits_data_dir, tmp_path)
  claims = pd.read_csv(tmp_path / 'claims.csv')
  # The 7 router claims, then the declared ones (vmoe.analysis.claims.CLAIMS).
  assert len(claims) == 7 + len(declared.CLAIMS)
  assert list(claims.claim[7:]) == [c.claim for c in declared.CLAIMS]
  assert set(claims.status) <= {'reproduced', 'not reproduced',
                                'not testable at this scale'}
  runs = pd.read_csv(tmp_path / 'runs.csv')
  assert {'dense', 'tc_k2_bpr', 'ec_cf2', 'soft_k2'} <= set(runs.config)
  assert runs.accuracy.between(0, 1).all() and runs.fewshot_10.notna().all()
  for plot in ('accuracy_vs_cost', 'expert_load', 'capacity_sweep',
               'dropped_vs_experts'):
    assert (tmp_path / f'{plot}.png').stat().st_size > 1000, plot
  assert images(nb) >= 4
  sweep = pd.read_csv(tmp_path / 'capacity_sweep.csv')
  assert set(sweep.batch_priority) == {True, False}
  drops = pd.read_csv(tmp_path / 'drops.csv')
  assert (drops[drops.router == 'soft'].dropped_fraction == 0).all()


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
