"""The package's shape: no import circle, dependencies pointing down, and a
wheel that installs `vmoe` and nothing else at the top level."""

import ast
import os
import subprocess
import sys
import zipfile

import pytest

from tests import helpers
from tests.helpers import REPO

# Layers, lowest first: a module may import its own layer and those below.
# The most specific prefix decides a module's layer.
LAYERS = (
    ('vmoe.config', 0),
    ('vmoe.kernels', 1),
    ('vmoe.nn', 2),
    ('vmoe.sharding', 2),
    ('vmoe.data', 2),
    ('vmoe.cpu_allocator', 2),
    ('vmoe.config_flag', 2),
    ('vmoe.recipes', 3),
    ('vmoe.workdir', 4),
    ('vmoe.checkpoints', 5),
    ('vmoe.evaluate.fewshot', 5),
    ('vmoe.train', 6),
    ('vmoe.analysis', 7),
    ('vmoe.evaluate', 8),
    ('vmoe.predict', 8),
    ('vmoe.export', 8),
    ('vmoe', 9),  # the package itself and anything new: flagged below
)
# Kernels implement the routing decision types of vmoe.nn.routing.
ALLOWED_UPWARD = {('vmoe.kernels', 'vmoe.nn.routing')}


def _modules() -> dict[str, str]:
  """{module name: file} of every module of the package (kernels included,
  through the vmoe/kernels link)."""
  root = os.path.join(REPO, 'vmoe')
  out = {}
  for directory, _, files in os.walk(root, followlinks=True):
    for file in files:
      if file.endswith('.py'):
        rel = os.path.relpath(os.path.join(directory, file), REPO)[:-3]
        name = rel.replace(os.sep, '.')
        out[name[:-len('.__init__')] if name.endswith('.__init__') else name] = (
            os.path.join(directory, file))
  return out


def _imports(name: str, path: str, known: set[str]) -> set[str]:
  """The package modules `name` imports anywhere (function bodies too)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  out = set()
  for node in ast.walk(tree):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + (
            [base] if base else []))
      # `from package import name`: the submodule when `name` is one (as
      # import-linter counts it), else the package.
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base
                 for a in node.names]
    for target in targets:
      while target and target not in known:
        target = target.rpartition('.')[0]
      if target and target != name:
        out.add(target)
  return out


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  known = set(modules)
  return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> tuple[str, int]:
  best = max((p for p, _ in LAYERS if module == p or module.startswith(p + '.')),
             key=len)
  return best, dict(LAYERS)[best]


def test_the_graph_sees_the_imports():
  graph = _graph()
  assert 'vmoe.kernels.registry' in graph['vmoe.nn.dispatch']
  assert 'vmoe.nn.routing' in graph['vmoe.kernels.routing']
  assert 'vmoe.config' in graph['vmoe.train.config_validation']


def test_no_import_circle():
  graph = _graph()
  # Tarjan's strongly connected components: a component of two or more
  # modules is a circle.
  index, low, on_stack, stack, circles = {}, {}, set(), [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not circles, f'import circles: {circles}'


FIRST_PARTY = ('configs', 'pallas_kernels', 'bench', 'tests', 'main')


def test_the_library_imports_no_experiment_or_test_code():
  """vmoe/ imports none of the repository's other top-level code (configs
  are files loaded by path; the kernels are vmoe.kernels)."""
  found = []
  for name, path in _modules().items():
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ''] if isinstance(node, ast.ImportFrom)
                 and not node.level else [])
      found += [f'{name} -> {t}' for t in targets
                if t.split('.')[0] in FIRST_PARTY]
  assert not found, found


def test_imports_point_down():
  upward = []
  for module, imported in sorted(_graph().items()):
    prefix, layer = _layer(module)
    assert prefix != 'vmoe' or module == 'vmoe', (
        f'{module} is in no layer of tests/test_layout.py: add it')
    for target in sorted(imported):
      target_prefix, target_layer = _layer(target)
      if target_layer > layer and (prefix, target) not in ALLOWED_UPWARD:
        upward.append(f'{module} -> {target}')
  assert not upward, f'imports pointing up: {upward}'


@pytest.mark.slow
def test_wheel_installs_only_vmoe(tmp_path):
  """`pip install .` puts `vmoe` (kernels included) in site-packages and no
  top-level `configs` or `pallas_kernels`."""
  source = helpers.copy_checkout(str(tmp_path / 'src'))
  proc = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w',
       str(tmp_path), str(source)], capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  wheel, = tmp_path.glob('vmoe-*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  top = {n.split('/')[0] for n in names if not n.split('/')[0].endswith(
      '.dist-info')}
  assert top == {'vmoe'}, top
  assert 'vmoe/kernels/registry.py' in names
  assert 'vmoe/recipes/common.py' in names
