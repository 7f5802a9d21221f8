"""`model.moe.kernels`: the MoE layer on Pallas kernels equals the XLA path.

* selection and validation (`vmoe.kernels.registry`);
* one ViT-MoE train step (digits configs, SGD) with kernels='pallas'
  (interpreted on CPU) against kernels='xla', for token choice with BPR,
  expert choice, Soft MoE with a z-loss and dropless token choice (grouped
  matmuls): the kernels really run (pallas_call in the step), loss, routing
  metrics and updated parameters agree;
* the layer with its experts split over 2 simulated devices: the kernels run
  per device inside the expert-parallel shard_map, for token choice, expert
  choice and Soft MoE (tests/workers/pallas_ep.py);
* `main.py --config.model.moe.kernels=pallas` on configs/vmoe_b16_digits.py
  and configs/soft_moe_b16_digits.py logs the losses of the same run with
  kernels='xla'.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import load_config
from vmoe.kernels import registry
from vmoe.nn import moe
from vmoe.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- selection ---------------------------------------------------------------


def test_spec_selects_parts():
  assert registry.pallas_parts('xla') == frozenset()
  assert registry.pallas_parts('pallas') == frozenset(registry.PARTS)
  assert registry.pallas_parts('pallas:routing, dispatch') == {'routing',
                                                               'dispatch'}
  # 'auto' is XLA everywhere until a kernel is measured faster.
  for platform in ('cpu', 'gpu', 'tpu'):
    assert registry.pallas_parts('auto', platform) == frozenset()
  assert registry.uses_kernel('pallas', 'routing', 'token_choice_from_logits')
  assert not registry.uses_kernel('pallas:dispatch', 'routing',
                                  'token_choice_from_logits')
  assert registry.lookup('xla', 'routing', 'token_choice_from_logits',
                         'x') == 'x'


@pytest.mark.parametrize('spec,message', [
    ('cuda', "model.moe.kernels='cuda' is not one of"),
    ('pallas:routing,sort', "model.moe.kernels='pallas:routing,sort' names "
                            "unknown kernel part 'sort'"),
    ('xla:routing', "model.moe.kernels='xla:routing' is not one of"),
    (True, 'model.moe.kernels=True must be a string'),
])
def test_bad_spec_is_one_line(spec, message):
  with pytest.raises(ValueError) as info:
    moe.validate_moe_config({'kernels': spec})
  assert message in str(info.value)
  assert '\n' not in str(info.value)


def test_interpreted_kernels_with_an_expert_axis_are_refused_on_cpu():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vmoe.train import config_validation  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      batch_size=8, eval_batch_size=8, mesh=dict(data=-1, expert=2),
      model=dict(moe=dict(num_experts=4, kernels='pallas'))))
  with pytest.raises(ValueError) as info:
    config_validation.validate_mesh(config, num_devices=2)
  assert ("config.model.moe.kernels='pallas' with config.mesh.expert=2 on CPU"
          in str(info.value))
  config.model.moe.kernels = 'xla'
  config_validation.validate_mesh(config, num_devices=2)


# -- one train step ----------------------------------------------------------


def _config(name, data_dir, kernels, **moe_overrides):
  config = load_config(name)
  config.dataset.data_dir = data_dir
  config.model.moe.update(dict(moe_overrides, kernels=kernels))
  # Plain SGD without warmup: the step moves every parameter by
  # lr * gradient, so parameter differences measure gradient differences.
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.0
  config.optimizer.learning_rate = 0.5
  config.schedule.update(warmup_steps=0, warmup_fraction=None)
  return config


def _pallas_calls(jaxpr) -> list[str]:
  """Names of the pallas_calls in a (closed) jaxpr, sub-jaxprs included."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      info = eqn.params.get('name', eqn.params.get('name_and_src_info'))
      names.append(str(getattr(info, 'name', info)))
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None and hasattr(inner, 'eqns'):
          names.extend(_pallas_calls(inner))
        elif hasattr(sub, 'eqns'):
          names.extend(_pallas_calls(sub))
  return names


# Small programs: compile them fast (the interpreted kernels are loops).
FAST = {'xla_backend_optimization_level': 0,
        'xla_llvm_disable_expensive_passes': True}


def _steps(name, data_dir, compare=True, **moe_overrides):
  """One train step from the same initial state and batch, per kernels
  setting: {kernels: (pallas_call names, new params, metrics)}; without
  `compare` only the pallas_calls of the kernels='pallas' step (traced)."""
  out, state = {}, None
  for kernels in ('pallas', 'xla'):
    exp = trainer.Experiment(_config(name, data_dir, kernels,
                                     **moe_overrides))
    if state is None:  # the parameters do not depend on the kernels
      rng = np.random.default_rng(0)
      images = rng.uniform(0, 1, (8, 8, 8, 1)).astype(np.float32)
      labels = np.eye(exp.num_classes, dtype=np.float32)[
          rng.integers(0, exp.num_classes, 8)]
      batch = jax.device_put({'image': images, 'labels': labels},
                             exp.batch_sharding)
      init = exp._init_state  # pylint: disable=protected-access
      state = jax.jit(init).lower().compile(FAST)()
    traced = exp.train_step.trace(state, batch)
    calls = _pallas_calls(traced.jaxpr.jaxpr)
    if not compare:
      return {kernels: (calls, None, None)}
    # The step donates its state: run it on a copy.
    new_state, metrics = traced.lower().compile(FAST)(
        jax.tree.map(jnp.copy, state), batch)
    out[kernels] = (calls, jax.device_get(new_state['params']),
                    jax.device_get(metrics))
  return out


def _assert_same_step(steps):
  """kernels='pallas' and 'xla' gave the same metrics and parameters."""
  _, params, metrics = steps['pallas']
  ref_calls, ref_params, ref_metrics = steps['xla']
  assert ref_calls == []
  assert set(metrics) == set(ref_metrics)
  for key in metrics:
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=2e-5,
                               atol=1e-6, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, ref_params)


@pytest.mark.parametrize('name,decision,overrides', [
    ('vmoe_b16_digits', 'TokenChoiceRouting', {}),  # top-2, BPR, noisy gates
    ('ec_moe_b16_digits', 'ExpertChoiceRouting', {}),
    # A z-loss weight, so that the router's z-loss gradient flows through the
    # kernels' log-sum-exp statistics (no [g, s, n] logits in the step).
    ('soft_moe_b16_digits', 'SoftRouting', {'z_loss_weight': 0.01}),
])
def test_train_step_pallas_equals_xla(name, decision, overrides,
                                      digits_data_dir):
  routing_op = {'TokenChoiceRouting': 'token_choice_from_logits',
                'ExpertChoiceRouting': 'expert_choice_from_logits'}.get(decision)
  routing = routing_op and registry.uses_kernel('pallas', 'routing',
                                                routing_op)
  movement = registry.uses_kernel(
      'pallas', 'soft' if decision == 'SoftRouting' else 'dispatch', decision)
  steps = _steps(name, digits_data_dir, compare=routing or movement,
                 **overrides)
  calls = steps['pallas'][0]
  if not (routing or movement):
    # No kernel for this decision (yet): kernels='pallas' runs the XLA path.
    assert calls == [], calls
    pytest.skip(f'no Pallas kernel registered for {decision}: '
                "kernels='pallas' runs the XLA program")
  routing_kernel = {'TokenChoiceRouting': 'token_choice_routing',
                    'ExpertChoiceRouting': 'expert_choice_routing'}.get(decision)
  if routing:
    assert routing_kernel in calls, calls
  if movement:  # some other kernel moved the tokens
    assert set(calls) - {routing_kernel}, calls
  if decision == 'SoftRouting':
    for kernel in ('soft_dispatch', 'soft_combine', 'soft_token_stats',
                   'soft_slot_mass', 'soft_dispatch_dx', 'soft_dispatch_dphi',
                   'soft_combine_dx', 'soft_combine_dslot',
                   'soft_token_stats_dx', 'soft_token_stats_dphi'):
      assert kernel in calls, (kernel, calls)
    assert steps['pallas'][2]['moe/block_2/z_loss'] > 0
  _assert_same_step(steps)


def test_dropless_token_choice_step(digits_data_dir):
  """dispatch='dropless': the experts' grouped matmuls run as
  `vmoe.kernels.gmm` (forward, d lhs and d rhs kernels)."""
  steps = _steps('vmoe_b16_digits', digits_data_dir, dispatch='dropless')
  calls = steps['pallas'][0]
  # Per expert MLP (2 matmuls) of the 2 MoE blocks: forward and d lhs
  # ('gmm_triton'), d rhs ('tgmm_triton').
  assert calls.count('tgmm_triton') == 2 * 2, calls
  assert calls.count('gmm_triton') == 2 * 2 * 2, calls
  _assert_same_step(steps)


# -- expert parallelism -------------------------------------------------------


@pytest.mark.slow
def test_expert_parallel_layer_pallas_equals_xla():
  """Kernels per device inside the expert-parallel shard_map (2 devices)."""
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  proc = subprocess.run([sys.executable, '-m', 'tests.workers.pallas_ep'],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')][-1]
  for router, result in json.loads(line[len('RESULT '):]).items():
    assert result['pallas_calls'] >= 4, (router, result)  # routing + moves
    assert result['all_to_all'] >= 2, (router, result)
    for key in ('y', 'metrics', 'grads'):
      assert result[key] < 1e-5, (router, key, result)


# -- the command line ----------------------------------------------------------


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r for r in records if r['split'] == 'train'}


@pytest.mark.slow
@pytest.mark.parametrize('name,moe_blocks', [
    ('vmoe_b16_digits', (1, 3)), ('soft_moe_b16_digits', (2, 3))])
def test_main_pallas_logs_the_losses_of_xla(name, moe_blocks, digits_data_dir,
                                            tmp_path):
  """`main.py --config.model.moe.kernels=pallas` (3 short steps, interpreted
  kernels) logs the losses of the same run on XLA."""
  args = [f'--config=configs/{name}.py',
          f'--config.dataset.data_dir={digits_data_dir}',
          '--config.num_train_steps=3',
          '--config.log_every_steps=1', '--config.batch_size=32',
          '--config.eval_batch_size=200']
  pallas_dir = tmp_path / 'pallas'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, 'main.py', *args, f'--workdir={pallas_dir}',
       '--config.model.moe.kernels=pallas'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  # The same run with kernels='xla', in this process.
  config = load_config(name)
  config.dataset.data_dir = digits_data_dir
  for flag in args[2:]:
    key, value = flag[len('--config.'):].split('=')
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = int(value)
  config.model.moe.kernels = 'xla'
  xla_dir = tmp_path / 'xla'
  trainer.train_and_evaluate(config, str(xla_dir))

  got, want = _train_records(pallas_dir), _train_records(xla_dir)
  assert sorted(got) == sorted(want) == [1, 2, 3]
  for step in want:
    first, last = moe_blocks
    for key in ('loss', 'cross_entropy', 'grad_norm',
                f'moe/block_{first}/dropped_fraction',
                f'moe/block_{last}/router_entropy'):
      np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5,
                                 err_msg=f'step {step} {key}')
