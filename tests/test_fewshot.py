"""Few-shot linear evaluation: the ridge regression against hand computations,
a plain solve and big_vision's evaluator (fixture), and the evaluator on a
tiny trained model."""

import json
import os

import jax
import numpy as np
from flax import nnx
import pytest

from tests.helpers import tiny_digits_config
from vmoe.evaluate import fewshot

DATA = os.path.join(os.path.dirname(__file__), 'data', 'fewshot_big_vision.npz')


# -- ridge regression ---------------------------------------------------------


@pytest.mark.parametrize('extra_dims,l2', [(0, 0.0), (0, 10.0), (9, 10.0)])
def test_ridge_hand_computed(extra_dims, l2):
  # One informative feature: train [-1, -2, 2, 1] (classes 0, 0, 1, 1),
  # mean 0, std sqrt(2.5), so standardised x = [-1, -2, 2, 1] / sqrt(2.5) with
  # sum(x^2) = 4. With zero-mean features the bias column decouples and
  # the class-0 slope is sum(x * y0) / (sum(x^2) + l2), y0 = [1, 1, -1, -1].
  # extra_dims constant features (std 0 -> standardised to 0) make d + 1 > m
  # and exercise the dual (X X^T) branch.
  x = np.array([[-1.], [-2.], [2.], [1.]])
  x = np.pad(x, ((0, 0), (0, extra_dims)), constant_values=3.0)
  y = np.array([0, 0, 1, 1])
  ridge = fewshot.Ridge(x, y, num_classes=2)
  w = ridge.weights(l2)
  xs = np.array([-1., -2., 2., 1.]) / (np.sqrt(2.5) + 1e-5)
  slope0 = np.sum(xs * np.array([1, 1, -1, -1])) / (np.sum(xs ** 2) + l2)
  np.testing.assert_allclose(w[0], [slope0, -slope0], rtol=1e-6)
  np.testing.assert_allclose(w[1:], 0.0, atol=1e-9)  # constants, bias
  # Test points -1 (class 0) and -2 (class 1): both fall on class 0's side.
  test_x = np.pad(np.array([[-1.], [-2.]]), ((0, 0), (0, extra_dims)),
                  constant_values=3.0)
  np.testing.assert_array_equal(ridge.predict(test_x, l2), [0, 0])
  assert ridge.accuracy(test_x, [0, 1], l2) == 0.5


@pytest.mark.parametrize('m,d', [(40, 5), (6, 12)])
def test_ridge_matches_plain_solve(m, d):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(m, d)) * rng.uniform(0.1, 5, size=d) + 2.0
  y = rng.integers(0, 4, size=m)
  ridge = fewshot.Ridge(x, y, num_classes=4)
  xs = np.pad((x - x.mean(0)) / (x.std(0) + 1e-5), ((0, 0), (0, 1)),
              constant_values=fewshot.BIAS_CONSTANT)
  targets = 2.0 * np.eye(4)[y] - 1.0
  for l2 in (1e-3, 1.0, 2.0 ** 10):
    plain = np.linalg.solve(xs.T @ xs + l2 * np.eye(d + 1), xs.T @ targets)
    np.testing.assert_allclose(ridge.weights(l2), plain, rtol=1e-6, atol=1e-9)


def test_matches_big_vision_fixture():
  ref = np.load(DATA)
  shots = tuple(int(n) for n in ref['shots'])
  for tag, l2 in (('l2_1024', 2.0 ** 10), ('l2_1', 1.0)):
    acc = fewshot.fewshot_accuracies(
        ref['train_x'], ref['train_y'], ref['test_x'], ref['test_y'],
        num_classes=3, shots=shots, seeds=3, l2_regs=l2)
    got = np.array([[acc[(s, n, l2)] for n in shots] for s in range(3)])
    np.testing.assert_allclose(got, ref[f'acc_{tag}'], atol=1e-6)
  for n in (1, 5):
    idx = fewshot.shot_indices(ref['train_y'], 3, (n,), seed=0)[n]
    np.testing.assert_array_equal(idx, ref[f'idx_{n}shot_seed0'])
    w = fewshot.Ridge(ref['train_x'][idx], ref['train_y'][idx], 3).weights(1.0)
    # The reference solves in float32; with the bias column of 100 the Gram
    # matrix has eigenvalues ~1e5 next to ~1, so its weights carry ~1e-3
    # relative error (ours: float64).
    np.testing.assert_allclose(w, ref[f'w_{n}shot_seed0_l2_1'], atol=1e-3)


def test_shot_indices():
  labels = np.array([0] * 7 + [1] * 3 + [2] * 12)
  sets = fewshot.shot_indices(labels, 3, (1, 5, 10), seed=4)
  for n, idx in sets.items():
    counts = np.bincount(labels[idx], minlength=3)
    np.testing.assert_array_equal(counts, np.minimum(n, [7, 3, 12]))
    assert len(set(idx.tolist())) == len(idx)
  assert set(sets[1]) <= set(sets[5]) <= set(sets[10])  # nested
  again = fewshot.shot_indices(labels, 3, (5,), seed=4)[5]
  np.testing.assert_array_equal(again, sets[5])
  other = fewshot.shot_indices(labels, 3, (5,), seed=5)[5]
  assert not np.array_equal(other, sets[5])


def test_summarize():
  acc = {(0, 1, 1.0): 0.2, (1, 1, 1.0): 0.4, (0, 5, 1.0): 0.5,
         (1, 5, 1.0): 0.5}
  out = fewshot.summarize(acc, prefix='d/')
  assert out == pytest.approx({'d/1shot': 0.3, 'd/1shot_std': 0.1,
                               'd/5shot': 0.5, 'd/5shot_std': 0.0})


# -- config ------------------------------------------------------------------


@pytest.mark.parametrize('field,value,message', [
    ('every_steps', -1, 'config.fewshot.every_steps=-1 must be'),
    ('shots', (), 'config.fewshot.shots=() must be'),
    ('shots', (1, 0), 'config.fewshot.shots=(1, 0) must be'),
    ('seeds', 0, 'config.fewshot.seeds=0 must be'),
    ('l2_reg', -1.0, 'config.fewshot.l2_reg=-1.0 must be'),
    ('train_split', '', "config.fewshot.train_split='' must be"),
    ('dataset', 3, 'config.fewshot.dataset=3 must be'),
])
def test_validate_config(field, value, message):
  from vmoe.train.config_validation import ConfigError
  config = tiny_digits_config('/nonexistent')
  config.fewshot = fewshot.default_config()
  fewshot.validate_config(config)  # defaults are valid
  config.fewshot[field] = value
  with pytest.raises(ConfigError) as e:
    fewshot.validate_config(config)
  assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_validate_config_unknown_field():
  from vmoe.train.config_validation import ConfigError
  config = tiny_digits_config('/nonexistent')
  config.fewshot = fewshot.default_config()
  config.fewshot.shot = 3
  with pytest.raises(ConfigError, match=r'config.fewshot.shot is not a'):
    fewshot.validate_config(config)


def test_defaults_match_base_config():
  from vmoe.recipes import common
  assert (common.get_base_config().fewshot.to_dict()
          == fewshot.default_config().to_dict())


def test_evaluator_missing_split_fails_fast(digits_data_dir, tmp_path):
  from vmoe.train import trainer
  from vmoe.train.config_validation import ConfigError
  config = tiny_digits_config(digits_data_dir)
  config.fewshot.test_split = 'validation'
  message = r"^config.fewshot.test_split='validation': split='validation' is not"
  with pytest.raises(ConfigError, match=message):
    fewshot.FewShotEvaluator(config, model_fn=None)
  # The trainer finds it before it touches the workdir.
  config.fewshot.every_steps = 2
  with pytest.raises(ConfigError, match=message):
    trainer.train_and_evaluate(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
  config.fewshot.test_split = 'test'
  config.fewshot.dataset = 'no_such_dataset'
  with pytest.raises(ConfigError, match=r"^config.fewshot.dataset="
                                        r"'no_such_dataset': "):
    fewshot.check_data(config, only_if_on=False)


def test_main_rejects_bad_fewshot_config(digits_data_dir):
  from vmoe.train.config_validation import ConfigError, validate_config
  config = tiny_digits_config(digits_data_dir)
  validate_config(config)
  config.fewshot.seeds = 0
  with pytest.raises(ConfigError, match=r'config.fewshot.seeds=0 must be'):
    validate_config(config)


# -- on a trained model -------------------------------------------------------


@pytest.fixture(scope='module')
def trained(digits_data_dir, tmp_path_factory):
  """A ViT-mu trained for a few steps with `config.fewshot` on (metrics in
  metrics.jsonl), and its parameters."""
  from vmoe.train import trainer
  workdir = str(tmp_path_factory.mktemp('fewshot'))
  config = tiny_digits_config(digits_data_dir, num_train_steps=8,
                              checkpoint_every_steps=8, eval_every_steps=8)
  config.fewshot = fewshot.default_config()
  config.fewshot.every_steps = 4
  config.fewshot.shots = (1, 5)
  config.fewshot.seeds = 2
  trainer.train_and_evaluate(config, workdir)
  return config, workdir, trainer.final_params(workdir)


def test_evaluator_on_trained_model(trained):
  from vmoe.data import pipeline
  from vmoe.nn import vit
  from vmoe.train import steps
  config, _, params = trained
  model = nnx.eval_shape(lambda: vit.create_model(
      config.model, num_classes=10, image_size=8, num_channels=1,
      rngs=nnx.Rngs(0)))
  model_fn = steps.ModelFn(model)
  ev = fewshot.FewShotEvaluator(config, model_fn)
  test_x, test_y = ev.features(params, 'test')
  train_x, train_y = ev.features(params, 'train')
  assert test_x.shape == (300, 64) and train_x.shape == (1497, 64)
  # The features are the head's input: head(features) = the model's logits.
  batch = next(pipeline.eval_iterator(config))
  logits, _ = jax.jit(lambda p, x: model_fn(p, x, train=False))(
      params, batch['image'])
  head = params['head']
  np.testing.assert_allclose(test_x[:100] @ head['kernel'] + head['bias'],
                             np.asarray(logits), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(test_y[:100], batch['label'])
  out = ev(params)
  direct = fewshot.summarize(fewshot.fewshot_accuracies(
      train_x, train_y, test_x, test_y, num_classes=10, shots=(1, 5),
      seeds=2), prefix='digits/')
  assert {k: v for k, v in out.items() if k != 'duration_secs'} == direct
  assert 0.1 < out['digits/5shot'] <= 1.0


def test_trainer_writes_fewshot_metrics(trained):
  _, workdir, _ = trained
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  shots = [r for r in records if r['split'] == 'fewshot']
  assert [r['step'] for r in shots] == [4, 8]
  for r in shots:
    assert set(r) >= {'digits/1shot', 'digits/5shot', 'digits/1shot_std',
                      'duration_secs'}
    assert 0.0 <= r['digits/5shot'] <= 1.0
  assert os.path.isdir(os.path.join(workdir, 'tensorboard', 'fewshot'))
