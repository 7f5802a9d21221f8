"""vmoe.train.cost (memory analysis, peaks, meter, profiler), the dry run's
per-device memory, and the paper configs' fixes (S/32, per-parameter weight
decay, sigmoid cross-entropy, short digits runs)."""

import glob
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers import tiny_digits_config
from vmoe.nn import moe as moe_lib
from vmoe.nn import vit
from vmoe.train import cost
from vmoe.train import optimizer as optimizer_lib
from vmoe.train import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_program_memory_counts_arguments_outputs_and_donation():
  x = jnp.ones((64, 32), jnp.float32)
  w = jnp.ones((32, 16), jnp.float32)
  plain = cost.program_memory(jax.jit(lambda x, w: x @ w).lower(x, w).compile())
  assert plain['arguments'] == x.nbytes + w.nbytes
  assert plain['outputs'] == 64 * 16 * 4 and plain['aliased'] == 0
  assert plain['total'] == (plain['arguments'] + plain['outputs']
                            + plain['temporaries'] + plain['code'])
  donated = cost.program_memory(jax.jit(
      lambda x: x * 2, donate_argnums=0).lower(x).compile())
  assert donated['aliased'] == x.nbytes
  assert donated['total'] == (donated['arguments'] + donated['temporaries']
                              + donated['code'])


def test_peak_table_override_and_unknown_devices():
  config = ml_collections.ConfigDict({'model': {'dtype': 'bfloat16'},
                                      'cost': {'peak_tflops': None}})
  assert cost.table_peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.0
  assert cost.table_peak_tflops('NVIDIA H100 PCIe', 'float32') == 378.0
  assert cost.table_peak_tflops('TPU v5p', 'bfloat16') == 459.0
  assert cost.table_peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert cost.table_peak_tflops('some new chip', 'bfloat16') is None
  config.cost.peak_tflops = 123.0
  assert cost.peak_flops(config) == (123e12, 'config.cost.peak_tflops')


def test_meter_counts_completed_steps_without_excluded_time(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(cost.time, 'perf_counter', lambda: clock[0])
  meter = cost.Meter(batch_size=8, flops_per_step=4e12, num_devices=2,
                     peak=1e12)
  meter.start(10)
  clock[0] += 5.0
  meter.exclude(1.0)  # e.g. a checkpoint: not training time
  perf = meter.measure(14)
  assert perf['perf/steps_per_sec'] == pytest.approx(1.0)
  assert perf['perf/images_per_sec'] == pytest.approx(8.0)
  assert perf['perf/tflops_per_device'] == pytest.approx(2.0)
  assert perf['perf/mfu'] == pytest.approx(2.0)
  assert perf['perf/memory_in_use_gib'] > 0
  clock[0] += 2.0
  assert meter.measure(15)['perf/steps_per_sec'] == pytest.approx(0.5)
  line = cost.perf_line(perf)
  assert '8 img/s' in line and 'MFU 200.0%' in line


def test_profiler_traces_only_the_chosen_steps(tmp_path):
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((16, 16))
  profiler = cost.Profiler(str(tmp_path), (2, 3))
  for step in range(1, 6):
    profiler.before(step)
    assert profiler.active == (step in (2, 3))
    out = f(x)
    profiler.after(step, out)
  assert not profiler.active
  assert glob.glob(str(tmp_path / 'profile' / '**' / '*.xplane.pb'),
                   recursive=True)
  assert glob.glob(str(tmp_path / 'profile' / '**' / 'perfetto_trace.json.gz'),
                   recursive=True)
  off = cost.Profiler(str(tmp_path / 'off'), None)
  off.before(1)
  assert not off.active and not os.path.exists(tmp_path / 'off')


def test_model_flops_ignore_scan_and_remat():
  from vmoe.recipes import common  # pylint: disable=g-import-not-at-top
  config = tiny_digits_config('/nonexistent')
  config.model.moe = common.moe_config(layers='every:2', num_experts=4, k=1)
  config.model.depth = 4
  base = cost.model_flops(config, 10)
  config.model.scan_layers = True
  config.model.remat = 'full'
  assert cost.model_flops(config, 10) == base > 0


def test_per_parameter_weight_decay_by_regex():
  wd = (('head/kernel', 0.0), ('kernel$', 0.1), ('bias', 0.0))
  assert optimizer_lib.weight_decay_of(wd, 'head/kernel', 2) == 0.0
  assert optimizer_lib.weight_decay_of(wd, 'encoder/block0/mlp/kernel', 2) == 0.1
  assert optimizer_lib.weight_decay_of(wd, 'encoder/ln/scale', 1) == 0.0
  # A number decays the matrices only (biases and norms are left alone).
  assert optimizer_lib.weight_decay_of(0.3, 'a/kernel', 2) == 0.3
  assert optimizer_lib.weight_decay_of(0.3, 'a/bias', 1) == 0.0
  params = {'head': {'kernel': jnp.ones((2, 2))},
            'mlp': {'kernel': jnp.full((2, 2), 2.0), 'bias': jnp.ones(2)}}
  updates = jax.tree.map(jnp.zeros_like, params)
  tx = optimizer_lib.add_decayed_weights(wd)
  out, _ = tx.update(updates, tx.init(params), params)
  np.testing.assert_allclose(out['head']['kernel'], 0.0)
  np.testing.assert_allclose(out['mlp']['kernel'], 0.2)
  np.testing.assert_allclose(out['mlp']['bias'], 0.0)
  with pytest.raises(ValueError, match='needs the parameters'):
    tx.update(updates, tx.init(params))


def test_sigmoid_cross_entropy_is_the_per_class_binary_loss():
  logits = jax.random.normal(jax.random.key(0), (5, 7))
  labels = jax.nn.one_hot(jnp.arange(5) % 7, 7)
  got = steps.sigmoid_cross_entropy(logits, labels)
  p = jax.nn.sigmoid(logits)
  want = -jnp.sum(labels * jnp.log(p) + (1 - labels) * jnp.log1p(-p), -1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert steps.classification_loss('sigmoid_xent') is steps.sigmoid_cross_entropy
  with pytest.raises(ValueError, match="loss='mse'"):
    steps.classification_loss('mse')


def test_vmoe_s32_is_the_papers_s32():
  from vmoe import config_flag  # pylint: disable=g-import-not-at-top
  config = config_flag.load_config_file(
      os.path.join(REPO, 'configs', 'vmoe_s32_last2.py'))
  model = nnx.eval_shape(lambda: vit.create_model(
      config.model, num_classes=1000, image_size=224, num_channels=3,
      rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert config.model.depth == 8 and config.model.width == 512
  assert config.model.num_heads == 8 and config.model.mlp_dim == 2048
  moe_paths = ['/'.join(map(str, path)) for path in moe_lib.moe_layers(model)]
  assert moe_paths == ['blocks/5/mlp', 'blocks/7/mlp']
  assert sum(1 for path, _ in nnx.iter_modules(model)
             if len(path) == 2 and path[0] == 'blocks') == 8
  assert config.model.moe.layers == (5, 7)
  widths = {x.shape[-1] for x in jax.tree.leaves(params) if x.ndim == 1}
  assert 512 in widths and 384 not in widths


def _dry_run(config_path: str, devices: int, *overrides: str) -> str:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run(
      [sys.executable, 'main.py', f'--config={config_path}',
       '--config.dry_run=True', f'--num_cpu_devices={devices}', *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow
def test_dry_run_prints_memory_per_device_on_a_simulated_mesh():
  text = _dry_run('configs/vmoe_s32_last2_digits.py', 8)
  assert 'of 8 cpu devices' in text
  for field in ('arguments', 'outputs', 'temporaries', 'total'):
    assert f'    {field}' in text
  assert 'device capacity' in text and 'TFLOPs per step' in text


@pytest.mark.slow
@pytest.mark.parametrize('name', [
    'vit_digits', 'vmoe_b16_digits', 'soft_moe_b16_digits',
    'soft_moe_s16_digits', 'ec_moe_b16_digits', 'vmoe_s32_last2_digits'])
def test_digits_configs_train_with_only_num_train_steps_overridden(
    name, digits_data_dir, tmp_path):
  out = subprocess.run(
      [sys.executable, 'main.py', f'--config=configs/{name}.py',
       f'--workdir={tmp_path}', '--config.num_train_steps=10',
       f'--config.dataset.data_dir={digits_data_dir}'],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'done: step 10' in out.stdout


@pytest.mark.slow
def test_short_run_reports_throughput_and_writes_a_trace(digits_data_dir,
                                                         tmp_path, capsys):
  from vmoe.train import metrics_writer  # pylint: disable=g-import-not-at-top
  from vmoe.train import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_digits_config(digits_data_dir, profile_steps=(5, 6))
  config.cost.peak_tflops = 1.0
  result = trainer.train_and_evaluate(config, str(tmp_path))
  printed = capsys.readouterr()
  text = printed.out + printed.err
  assert 'compiled the train step in' in text
  assert 'img/s' in text and 'MFU' in text
  assert result['perf/images_per_sec'] > 0 and 0 < result['perf/mfu'] < 1
  train = [r for r in metrics_writer.read_metrics(str(tmp_path))
           if r['split'] == 'train']
  assert all('perf/mfu' in r and 'perf/images_per_sec' in r for r in train)
  assert glob.glob(str(tmp_path / 'profile' / '**' / '*.xplane.pb'),
                   recursive=True)
