"""The entry points' glibc malloc settings: when they apply, and the re-exec."""

import os
import subprocess
import sys

import pytest

from vmoe import cpu_allocator as ca

GLIBC = (2, 36)


def test_tuned_environment_sets_the_tunables():
  env = ca.tuned_environment({'PATH': '/bin'}, GLIBC, False)
  assert env['PATH'] == '/bin'
  assert env['GLIBC_TUNABLES'].split(':') == list(ca.TUNABLES)


@pytest.mark.parametrize('environ, glibc, accelerator', [
    ({'VMOE_TUNE_MALLOC': '0'}, GLIBC, False),          # opted out
    ({'VMOE_TUNE_MALLOC': 'off'}, GLIBC, False),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, GLIBC, False),  # user's
    ({}, None, False),                                   # not glibc
    ({}, (2, 34), False),                                # no hugetlb tunable
    ({'JAX_PLATFORMS': 'tpu'}, GLIBC, False),            # accelerator host
    ({'JAX_PLATFORMS': 'cuda,cpu'}, GLIBC, False),
    ({}, GLIBC, True),                                   # a GPU/TPU device node
])
def test_tuned_environment_leaves_other_processes_alone(environ, glibc,
                                                        accelerator):
  assert ca.tuned_environment(environ, glibc, accelerator) is None


def test_cpu_platform_is_tuned_even_beside_an_accelerator():
  env = ca.tuned_environment({'JAX_PLATFORMS': 'cpu'}, GLIBC, True)
  assert 'GLIBC_TUNABLES' in env


@pytest.mark.parametrize('argv, expected', [
    (['python', '-m', 'bench'], True),
    (['python', '-m', 'bench.moe_layer', '--quick'], True),
    (['python', '-u', '-m', 'bench.scaling'], True),
    (['python', '-W', 'error', '-X', 'dev', '-m', 'bench'], True),
    (['python', '-W', 'error', 'bench/run_all.py'], False),
    (['python', '-m', 'benchmarks'], False),
    (['python', '-m', 'pytest', 'bench'], False),
    (['python', 'bench/run_all.py'], False),
    (['python'], False),
])
def test_started_as_module(monkeypatch, argv, expected):
  monkeypatch.setattr(sys, 'orig_argv', argv)
  assert ca.started_as_module('bench') is expected


def test_reexec_sets_the_tunables_in_the_new_process():
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', ca.OPT_OUT)}
  code = ('from vmoe import cpu_allocator as c; '
          'c.reexec_with_tuned_malloc(); '
          'import os; print(os.environ.get("GLIBC_TUNABLES"))')
  proc = subprocess.run([sys.executable, '-c', code], env=env,
                        capture_output=True, text=True, timeout=60,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr
  tunables = proc.stdout.strip()
  expected = ca.tuned_environment(
      env, ca._glibc_version(),  # pylint: disable=protected-access
      any(os.path.exists(p) for p in ca.ACCELERATOR_DEVICE_NODES))
  if expected is None:
    assert tunables == 'None'
  else:
    assert tunables == expected['GLIBC_TUNABLES']
