"""Few-shot linear evaluation on frozen pre-logit features.

The papers' "ImageNet 10-shot" numbers (V-MoE, Soft MoE, big_vision) are the
accuracy of a closed-form ridge regression fitted on the frozen pre-logit
features (the pooled encoder output, the input of the head) of n training
images per class. This module follows the big_vision / google-research/vmoe
convention exactly:

  * n-shot training set: for each class c, the examples of c in the train
    split, permuted with `np.random.default_rng(seed)` (one generator per seed,
    classes in order), first n kept; n in (1, 5, 10, 25), 3 seeds;
  * features standardised with the mean and std (+1e-5) of those n-shot
    examples, plus a constant column of 100 (a bias that is almost
    unregularised);
  * targets 2 * one_hot - 1 (in {-1, +1});
  * ridge regression w = (X^T X + l2 I)^-1 X^T Y, solved through the
    eigendecomposition of X^T X (or of X X^T when there are fewer examples
    than features), l2 = 2^10 (big_vision's default; google-research/vmoe
    instead keeps the best of a grid by test accuracy, which is optimistic);
  * prediction argmax(X_test w), accuracy on the whole test split.

Here the linear algebra runs in float64 numpy on the host; the references use
float32 jax on CPU, whose weights carry ~1e-3 relative error (the Gram matrix
holds the bias column's 100^2 next to O(1) entries). Accuracies and shot
selections equal big_vision's on the fixture of tests/test_fewshot.py.

`config.fewshot` (see `default_config`) makes `main.py` run this periodically;
the trainer writes records with split 'fewshot' to metrics.jsonl and
TensorBoard, with keys '<dataset>/<n>shot' (mean over seeds),
'<dataset>/<n>shot_std' and 'duration_secs'.

Shapes: b batch, d feature dim, c classes, m examples.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from vmoe.config import ConfigError, checker, is_int, is_name, is_number

BIAS_CONSTANT = 100.0
SHOTS = (1, 5, 10, 25)
L2_REG = 2.0 ** 10
NUM_SEEDS = 3


def default_config() -> ml_collections.ConfigDict:
  """Fields of `config.fewshot` with their defaults.

  every_steps: evaluate every this many steps and at the last step; 0 = off.
  dataset: TFDS name of the few-shot data (None = config.dataset.name);
    data_dir: None = config.dataset.data_dir.
  train_split: where the n-shot examples are drawn from; test_split: where
    accuracy is measured.
  shots, seeds, l2_reg: see the module docstring.
  """
  return ml_collections.ConfigDict(dict(
      every_steps=0, dataset=None, data_dir=None, train_split='train',
      test_split='test', shots=SHOTS, seeds=NUM_SEEDS, l2_reg=L2_REG))


# ----------------------------------------------------------------------------
# Ridge regression (closed form).
# ----------------------------------------------------------------------------


def shot_indices(labels: np.ndarray, num_classes: int, shots: Sequence[int],
                 seed: int) -> dict[int, np.ndarray]:
  """{n: indices of the n-shot training set} for labels [m].

  One `np.random.default_rng(seed)` permutes the examples of each class in
  turn (classes 0..c-1); the n-shot set takes the first n of every class
  (fewer if a class has fewer), classes concatenated in order. The sets are
  nested: the 5-shot set contains the 1-shot set.
  """
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c))
               for c in range(num_classes)]
  return {n: np.concatenate([idx[:n] for idx in per_class]).astype(np.int64)
          for n in shots}


class Ridge:
  """Ridge regression of {-1, +1} one-hot targets on standardised features.

  Precomputes the eigendecomposition once so that `weights(l2)` costs one
  matmul per regularisation strength.

  Args:
    x: [m, d] features of the training examples.
    y: [m] int labels in [0, num_classes).
    num_classes: c.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int):
    x = np.asarray(x, np.float64)
    self.mean = x.mean(axis=0, keepdims=True)
    self.std = x.std(axis=0, keepdims=True) + 1e-5
    xs = self.features(x)                                   # [m, d + 1]
    targets = 2.0 * np.eye(num_classes)[np.asarray(y)] - 1.0  # [m, c]
    m, d = xs.shape
    # (X^T X + l2 I)^-1 X^T Y = X^T (X X^T + l2 I)^-1 Y; with the
    # eigendecomposition Q diag(eigs) Q^T of the smaller Gram matrix both read
    # lhs diag(1 / (eigs + l2)) rhs.
    if m >= d:
      self.eigs, q = np.linalg.eigh(xs.T @ xs)
      self.lhs, self.rhs = q, q.T @ (xs.T @ targets)
    else:
      self.eigs, q = np.linalg.eigh(xs @ xs.T)
      self.lhs, self.rhs = xs.T @ q, q.T @ targets

  def features(self, x: np.ndarray) -> np.ndarray:
    """[m, d] -> standardised [m, d + 1] with the constant bias column."""
    xs = (np.asarray(x, np.float64) - self.mean) / self.std
    return np.pad(xs, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)

  def weights(self, l2_reg: float) -> np.ndarray:
    """[d + 1, c] ridge weights (the last row acts on the bias column)."""
    return (self.lhs / (self.eigs + l2_reg)) @ self.rhs

  def predict(self, x: np.ndarray, l2_reg: float) -> np.ndarray:
    """[m, d] -> [m] predicted classes."""
    return np.argmax(self.features(x) @ self.weights(l2_reg), axis=1)

  def accuracy(self, x: np.ndarray, y: np.ndarray, l2_reg: float) -> float:
    return float(np.mean(self.predict(x, l2_reg) == np.asarray(y)))


def fewshot_accuracies(train_x: np.ndarray, train_y: np.ndarray,
                       test_x: np.ndarray, test_y: np.ndarray, *,
                       num_classes: int, shots: Sequence[int] = SHOTS,
                       seeds: int | Sequence[int] = NUM_SEEDS,
                       l2_regs: float | Sequence[float] = L2_REG
                       ) -> dict[tuple[int, int, float], float]:
  """{(seed, n, l2): test accuracy} of n-shot ridge regressions.

  Args:
    train_x, train_y: [m, d] features and [m] labels the shots come from.
    test_x, test_y: [m', d], [m'] where accuracy is measured.
    num_classes: c.
    shots: the n of each n-shot problem.
    seeds: a count (seeds 0..count-1) or explicit seeds.
    l2_regs: one or several regularisation strengths.
  """
  seeds = range(seeds) if isinstance(seeds, int) else seeds
  l2_regs = (l2_regs,) if isinstance(l2_regs, (int, float)) else l2_regs
  out = {}
  for seed in seeds:
    for n, idx in shot_indices(train_y, num_classes, shots, seed).items():
      ridge = Ridge(train_x[idx], train_y[idx], num_classes)
      for l2 in l2_regs:
        out[(int(seed), int(n), float(l2))] = ridge.accuracy(test_x, test_y, l2)
  return out


def summarize(accuracies: Mapping[tuple[int, int, float], float],
              prefix: str = '') -> dict[str, float]:
  """'{prefix}{n}shot' (mean over seeds) and '{prefix}{n}shot_std' (std over
  seeds, 0 for one seed) of `fewshot_accuracies` with a single l2."""
  by_shot: dict[int, list[float]] = {}
  for (_, n, _), acc in accuracies.items():
    by_shot.setdefault(n, []).append(acc)
  out = {}
  for n in sorted(by_shot):
    out[f'{prefix}{n}shot'] = float(np.mean(by_shot[n]))
    out[f'{prefix}{n}shot_std'] = float(np.std(by_shot[n]))
  return out


# ----------------------------------------------------------------------------
# Pre-logit features of a model.
# ----------------------------------------------------------------------------


def make_features_fn(model_fn, mesh=None, params_sharding=None,
                     batch_sharding=None) -> Callable[..., Any]:
  """Jitted (params, batch) -> (pre-logits [b, d], label [b], mask [b]).

  batch: an eval batch {'image' [b, H, W, C], 'label' [b], 'mask' [b]}.
  model_fn: a `vmoe.train.steps.ModelFn`. With a mesh (the trainer's), the
  function is traced under it like the eval step, so MoE layers place their
  own collectives, and the outputs are replicated: every process gets the
  whole global batch.
  """
  def fn(params, batch):
    features, _ = model_fn.merge(params).features(batch['image'], train=False)
    return features, batch['label'], batch['mask']

  if mesh is None:
    return jax.jit(fn)
  from vmoe import sharding  # pylint: disable=g-import-not-at-top
  return jax.jit(sharding.with_mesh(fn, mesh),
                 in_shardings=(params_sharding, batch_sharding),
                 out_shardings=sharding.replicated(mesh))


def features_of_split(features_fn, params, batches: Iterable[dict[str, Any]],
                      *, num_devices: int = 1, batch_sharding=None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(features [m, d], labels [m]) of the real (mask 1) examples of eval
  batches (`vmoe.data.pipeline.eval_iterator`), in batch order."""
  from vmoe import sharding  # pylint: disable=g-import-not-at-top
  feats, labels = [], []
  for batch in batches:
    batch = sharding.pad_batch(batch, num_devices)
    if batch_sharding is not None:
      batch = sharding.global_batch(batch, batch_sharding)
    f, label, mask = jax.device_get(features_fn(params, batch))
    keep = np.asarray(mask) > 0
    feats.append(np.asarray(f)[keep])
    labels.append(np.asarray(label)[keep])
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def split_config(config: ml_collections.ConfigDict, split: str,
                 dataset: str | None = None, data_dir: str | None = None
                 ) -> ml_collections.ConfigDict:
  """`config` whose eval split (and optionally dataset) is `split`, so that
  `pipeline.eval_iterator` reads it with the eval preprocessing."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  if dataset:
    cfg.dataset.name = dataset
  if data_dir:
    cfg.dataset.data_dir = data_dir
  cfg.dataset.eval_split = split
  return cfg


# ----------------------------------------------------------------------------
# The periodic evaluator of `main.py`.
# ----------------------------------------------------------------------------


def _fewshot_config(config) -> ml_collections.ConfigDict:
  c = default_config()
  c.update(dict(config.get('fewshot', None) or {}))
  return c


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.fewshot` (if any); raises `ConfigError` naming the field."""
  if config.get('fewshot', None) is None:
    return
  known = set(default_config().keys())
  for key in config.fewshot.keys():
    if key not in known:
      raise ConfigError(f'config.fewshot.{key} is not a few-shot option '
                        f'(known: {", ".join(sorted(known))})')
  c = _fewshot_config(config)

  need = checker('config.fewshot', c)
  need(is_int(c.every_steps) and c.every_steps >= 0, 'every_steps',
       'must be an integer >= 0 (0 = off)')
  need(isinstance(c.shots, (tuple, list)) and len(c.shots) > 0
       and all(is_int(n) and n >= 1 for n in c.shots), 'shots',
       'must be a non-empty sequence of integers >= 1')
  need(is_int(c.seeds) and c.seeds >= 1, 'seeds', 'must be an integer >= 1')
  need(is_number(c.l2_reg) and c.l2_reg > 0, 'l2_reg',
       'must be a number > 0')
  for field in ('dataset', 'data_dir'):
    need(c[field] is None or is_name(c[field]), field,
         'must be None or a non-empty string')
  for field in ('train_split', 'test_split'):
    need(is_name(c[field]), field,
         'must be a non-empty split name')


def check_data(config: ml_collections.ConfigDict, only_if_on: bool = True
               ) -> None:
  """The few-shot dataset and splits exist (with `only_if_on`, only when
  `every_steps` turns few-shot on), before any work; one-line `ConfigError`
  naming the `config.fewshot` field."""
  from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
  validate_config(config)
  fc = _fewshot_config(config)
  if only_if_on and fc.every_steps == 0:
    return
  sizes = {}
  for field in ('train_split', 'test_split'):
    cfg = split_config(config, fc[field], fc.dataset, fc.data_dir)
    try:
      pipeline.prepare_dataset(cfg.dataset)
      sizes[field] = pipeline.num_examples(cfg.dataset,
                                           cfg.dataset.eval_split)
      num_classes = pipeline.num_classes(cfg.dataset)
    except (ValueError, pipeline.DataError) as e:
      name = 'dataset' if fc.dataset else field
      raise ConfigError(f'config.fewshot.{name}={fc[name]!r}: '
                        f'{str(e).splitlines()[0]}') from None
  # n shots of each class need n * classes training images at least: fewer
  # would log an "n-shot" result fitted on fewer images per class.
  most = max(fc.shots)
  if most * num_classes > sizes['train_split']:
    raise ConfigError(
        f'config.fewshot.shots={tuple(fc.shots)!r}: {most}-shot needs '
        f'{most} images of each of the {num_classes} classes, the '
        f'train_split {fc.train_split!r} has {sizes["train_split"]} images '
        f'({sizes["train_split"] // num_classes} per class on average)')


class FewShotEvaluator:
  """n-shot ridge accuracies of a model's pre-logit features.

  Checks the data at construction (`check_data`: a missing dataset or split
  is a one-line `ConfigError`); each call extracts the features of the train and test
  splits with the given parameters and fits the ridge regressions.

  Args:
    config: the experiment config (its `fewshot` field, `dataset`,
      `preprocess` and `eval_batch_size` are read).
    model_fn: `vmoe.train.steps.ModelFn` of the model.
    mesh, params_sharding, batch_sharding: the trainer's, or None for a
      single-device jit.
  """

  def __init__(self, config: ml_collections.ConfigDict, model_fn, *,
               mesh=None, params_sharding=None, batch_sharding=None):
    from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
    check_data(config, only_if_on=False)
    self.fewshot = fc = _fewshot_config(config)
    self.name = fc.dataset or config.dataset.name
    self.train_cfg = split_config(config, fc.train_split, fc.dataset,
                                  fc.data_dir)
    self.test_cfg = split_config(config, fc.test_split, fc.dataset,
                                 fc.data_dir)
    self.num_classes = pipeline.num_classes(self.train_cfg.dataset)
    self.features_fn = make_features_fn(model_fn, mesh, params_sharding,
                                        batch_sharding)
    self.batch_sharding = batch_sharding
    self.num_devices = jax.local_device_count() if mesh is not None else 1

  def due(self, step: int, last: bool) -> bool:
    every = self.fewshot.every_steps
    return every > 0 and (step % every == 0 or last)

  def features(self, params, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(features [m, d], labels [m]) of 'train' or 'test'."""
    from vmoe.data import pipeline  # pylint: disable=g-import-not-at-top
    cfg = self.train_cfg if split == 'train' else self.test_cfg
    batches = pipeline.eval_iterator(cfg, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    return features_of_split(self.features_fn, params, batches,
                             num_devices=self.num_devices,
                             batch_sharding=self.batch_sharding)

  def accuracies(self, params) -> dict[tuple[int, int, float], float]:
    """{(seed, n, l2): accuracy} (see `fewshot_accuracies`)."""
    train_x, train_y = self.features(params, 'train')
    test_x, test_y = self.features(params, 'test')
    return fewshot_accuracies(train_x, train_y, test_x, test_y,
                              num_classes=self.num_classes,
                              shots=tuple(self.fewshot.shots),
                              seeds=self.fewshot.seeds,
                              l2_regs=self.fewshot.l2_reg)

  def __call__(self, params) -> dict[str, float]:
    """Metrics for metrics.jsonl: '<dataset>/<n>shot', ..._std, duration."""
    t0 = time.perf_counter()
    out = summarize(self.accuracies(params), prefix=f'{self.name}/')
    out['duration_secs'] = time.perf_counter() - t0
    return out


def evaluator_from_config(config: ml_collections.ConfigDict, exp
                          ) -> FewShotEvaluator | None:
  """The trainer's evaluator (`exp`: a `vmoe.train.trainer.Experiment`), or
  None when `config.fewshot.every_steps` is 0 or the field is absent."""
  if _fewshot_config(config).every_steps == 0:
    return None
  return FewShotEvaluator(config, exp.model_fn, mesh=exp.mesh,
                          params_sharding=exp.state_sharding['params'],
                          batch_sharding=exp.batch_sharding)
