"""bench/kernels.py runs: its CPU mode (interpret-mode correctness rows) and,
with XLA-only variants, the timing and train-step code of its accelerator
mode (tiny sizes, no timing claims)."""

import jax.numpy as jnp

from bench import kernels


def test_cpu_mode_checks_the_kernels_against_xla(tmp_path):
  md, rows = kernels.run(backends=('triton',), only=('gmm',),
                         out_dir=str(tmp_path))
  assert 'interpret-mode correctness only' in md and 'says nothing' in md
  assert {(r['kernel'], r['variant']) for r in rows} == {('gmm', 'pallas'),
                                                         ('gmm', 'einsum')}
  for r in rows:
    assert r['fwd_err'] < 1e-5 and r['bwd_err'] < 1e-5, r
  assert (tmp_path / 'kernels_cpu.md').exists()


def test_a_wrong_variant_shows_in_the_error_columns():
  case = kernels.gmm_cases(1, 16, 32, 'tiny', jnp.float32, 'triton', True)[0]
  case.variants = {'xla': case.variants['xla'],
                   'wrong': lambda a, b, s: 1.01 * case.variants['xla'](a, b, s)}
  errs = kernels.check_rows(case, kernels.programs(case))
  assert errs['xla'] == {'fwd_err': 0.0, 'bwd_err': 0.0}
  assert 0.005 < errs['wrong']['fwd_err'] < 0.02
  assert 0.005 < errs['wrong']['bwd_err'] < 0.02


def test_timing_rows_of_the_accelerator_mode():
  # XLA variants only: the code path of a GPU run, timed on this CPU.
  case = kernels.gmm_cases(1, 16, 32, 'tiny', jnp.float32, 'triton', True)[0]
  case.variants = {k: case.variants[k] for k in ('xla', 'einsum')}
  rows = kernels.time_case(case, repeats=1, peak_tflops=1.0, peak_gbs=10.0)
  assert [r['variant'] for r in rows] == ['xla', 'einsum']
  assert rows[0]['fwd_vs_xla'] == 1.0 and rows[0]['fwd_err'] == 0.0
  for r in rows:
    assert r['fwd_ms'] > 0 and r['fwd_bwd_ms'] > 0 and r['fwd_tflops'] > 0
  assert kernels.bandwidth_peak(mb=4, repeats=1) > 0


def test_train_rows_run_a_config_with_each_mode():
  models = {'V-MoE digits': ('vmoe_b16_digits', {}, 10)}
  rows, note = kernels.train_rows(batch=4, repeats=1, models=models,
                                  modes=('xla',), dtype='float32')
  assert note == '' and len(rows) == 1
  assert rows[0]['kernels'] == 'xla' and rows[0]['vs_xla'] == 1.0
  assert rows[0]['img_s'] > 0
