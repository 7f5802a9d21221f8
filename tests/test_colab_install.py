"""The notebooks' first cell installs the package the way Colab would, on
top of the jax already there, and leaves that jax alone.

Simulated offline: a fresh virtualenv whose only packages are this test
interpreter's (added through a .pth file, the way Colab's preinstalled
packages sit below anything pip installs), pip with no index (any attempt to
fetch another jax, jaxlib or numpy fails instead of passing unnoticed), and
the cell pointed at this checkout through VMOE_INSTALL_SOURCE. On the
GPU-box CI stack the preinstalled jax (0.11.2) is another version than
requirements.txt pins (0.12.1).
"""

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, 'notebooks')


def first_cells() -> dict[str, str]:
  cells = {}
  for name in sorted(os.listdir(NOTEBOOKS)):
    if name.endswith('.ipynb'):
      with open(os.path.join(NOTEBOOKS, name)) as f:
        nb = json.load(f)
      cells[name] = next(''.join(c['source']) for c in nb['cells']
                         if c['cell_type'] == 'code')
  return cells


def test_every_notebook_has_the_same_install_cell():
  cells = first_cells()
  assert len(cells) >= 3
  assert len(set(cells.values())) == 1, sorted(cells)
  cell = next(iter(cells.values()))
  assert "'google.colab' in sys.modules" in cell
  assert 'requirements.txt' not in cell.split('#')[0]  # never the CPU lock


def _versions(python: str, cwd: str) -> dict[str, str]:
  code = ('import importlib.metadata as m, json; print(json.dumps({p: '
          'm.version(p) for p in ("jax", "jaxlib", "numpy")}))')
  out = subprocess.run([python, '-c', code], cwd=cwd, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_install_cell_keeps_the_preinstalled_jax(tmp_path):
  pytest.importorskip('setuptools')  # the build backend, offline
  venv = tmp_path / 'colab'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  purelib = subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      check=True, capture_output=True, text=True).stdout.strip()
  # The "preinstalled" packages: this interpreter's site-packages.
  preinstalled = {sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}
  with open(os.path.join(purelib, 'preinstalled.pth'), 'w') as f:
    f.write('\n'.join(sorted(preinstalled)) + '\n')
  cwd = str(tmp_path)  # not the checkout: `import vmoe` must find the install
  before = _versions(python, cwd)
  assert before == _versions(sys.executable, cwd)

  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('PIP_', 'PYTHON', 'VIRTUAL_ENV'))}
  env.update(PIP_NO_INDEX='1', PIP_NO_BUILD_ISOLATION='0',
             PIP_DISABLE_PIP_VERSION_CHECK='1',
             VMOE_INSTALL_SOURCE=helpers.copy_checkout(str(tmp_path / 'checkout')))
  cell = next(iter(first_cells().values()))
  run = subprocess.run([python, '-c', cell], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

  assert _versions(python, cwd) == before
  check = subprocess.run(
      [python, '-c', 'import vmoe, vmoe.analysis, vmoe.train.trainer; '
       'print(vmoe.__file__)'],
      cwd=cwd, env=env, check=True, capture_output=True, text=True)
  location = check.stdout.strip().splitlines()[-1]
  assert location.startswith(purelib), location  # the installed copy
