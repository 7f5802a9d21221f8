"""What the tests share: quick compilation, tiny models and configs, and
independent numpy references of the MoE math.

Axis letters as in the library: g groups, s tokens per group, e experts,
c capacity, d model dim, h hidden dim, k choices per token.
"""

from __future__ import annotations

import functools
import itertools
import math
import os

import jax
import ml_collections
import numpy as np
import scipy.special
from flax import nnx

from vmoe import config_flag
from vmoe.nn import moe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny shapes, shared by most layer tests: parameter initialisers compile once
# per shape, which dominates the run time of these tests.
D, H = 8, 16

# Quick XLA:CPU compilation for tiny test programs (compile time dominates).
fast_jit = functools.partial(jax.jit, compiler_options={
    'xla_backend_optimization_level': 0,
    'xla_llvm_disable_expensive_passes': True})


def max_diff(a, b) -> float:
  """Largest absolute difference between the leaves of two pytrees."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# -- configs ------------------------------------------------------------------


def load_config(name: str) -> ml_collections.ConfigDict:
  """`get_config()` of configs/<name>.py (e.g. 'routers/tc_k1_digits')."""
  return config_flag.load_config_file(
      os.path.join(REPO, 'configs', f'{name}.py'))


def set_fields(config, overrides: dict) -> None:
  """config[a][b] = value for each 'a.b': value of `overrides`."""
  for key, value in overrides.items():
    node = config
    *parents, name = key.split('.')
    for p in parents:
      node = node[p]
    node[name] = value


def tiny_digits_config(data_dir: str, **overrides):
  """A seconds-long training config on digits (ViT-mu/2); `overrides` are
  dotted field names ('optimizer.learning_rate') and values."""
  from vmoe.recipes import common  # pylint: disable=g-import-not-at-top
  config = common.get_base_config()
  common.digits_data(config)
  config.dataset.data_dir = data_dir
  config.model.variant = 'mu/2'
  config.batch_size = 32
  config.eval_batch_size = 100
  config.num_train_steps = 12
  config.log_every_steps = 4
  config.eval_every_steps = 12
  config.checkpoint_every_steps = 4
  config.schedule.warmup_steps = 2
  config.optimizer.learning_rate = 3e-3
  set_fields(config, overrides)
  return config


def tiny_digits_config_file(tmp_path, data_dir: str, moe: dict | None = None,
                            **overrides) -> str:
  """Writes a config file for `main.py` subprocesses: `tiny_digits_config`
  with `overrides`, plus `model.moe = common.moe_config(**moe)` if given."""
  path = tmp_path / 'tiny_config.py'
  moe_line = (f'  config.model.moe = common.moe_config(**{moe!r})\n'
              if moe is not None else '')
  path.write_text(
      'from vmoe.recipes import common\n'
      'from tests.helpers import tiny_digits_config\n\n\n'
      'def get_config():\n'
      f'  config = tiny_digits_config({data_dir!r}, **{overrides!r})\n'
      f'{moe_line}'
      '  return config\n')
  return str(path)


# -- tiny ViTs of the checkpoint fixtures -------------------------------------


def fixture_vit_config(**kw) -> ml_collections.ConfigDict:
  """`config.model` of the tiny ViTs of tests/data (width 32, 2 heads, MLP 64,
  patch 4, 2 blocks, class token, tanh GELU); `kw` overrides."""
  cfg = ml_collections.ConfigDict(dict(
      variant='S/4', width=32, depth=2, mlp_dim=64, num_heads=2, pool='tok',
      gelu='tanh', moe=None))
  cfg.update(kw)
  return cfg


def imported_logits(source, model_cfg, images, num_classes: int = 5
                    ) -> np.ndarray:
  """Logits [b, num_classes] of the model `model_cfg` with the parameters of
  a checkpoint `source` (`vmoe.checkpoints.read`) on float images
  [b, 16, 16, 3]."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vmoe import checkpoints  # pylint: disable=g-import-not-at-top
  from vmoe.nn import vit  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: vit.create_model(
      model_cfg, num_classes=num_classes, image_size=16, num_channels=3,
      rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
  params = checkpoints.import_params(source, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  logits, _ = fast_jit(lambda st, x: nnx.merge(graphdef, st, rest)(x))(
      state, jnp.asarray(images))
  return np.asarray(logits)


# -- tiny MoE layers ----------------------------------------------------------


def build(make, seed=0):
  """make(rngs) -> module, with the initialisers run as one compiled program."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(seed))))
  state = fast_jit(lambda: nnx.state(make(nnx.Rngs(seed))))()
  return nnx.merge(graphdef, state)


def moe_config(**kw):
  """Default MoE config with overrides (built fresh, so any type is allowed)."""
  return ml_collections.ConfigDict({**moe.default_moe_config().to_dict(),
                                    **kw})


def moe_layer(seed=0, **kw):
  """A MoeLayer of model dim D and hidden dim H; `kw`: MoE options plus
  dropout_rate and dtype."""
  dropout_rate = kw.pop('dropout_rate', 0.0)
  dtype = kw.pop('dtype', None)
  return build(lambda rngs: moe.MoeLayer(D, H, config=moe_config(**kw),
                                         dropout_rate=dropout_rate,
                                         dtype=dtype, rngs=rngs), seed)


def layer_fn(layer):
  """Jitted (x, train, key) -> (y, metrics) for an MoeLayer."""
  graphdef, state = nnx.split(layer)

  @fast_jit
  def f(state, x, key):
    m = nnx.merge(graphdef, state)
    return m(x, train=True, rngs=nnx.Rngs(gating=key, dropout=key))

  @fast_jit
  def f_eval(state, x):
    return nnx.merge(graphdef, state)(x, train=False)

  return (lambda x, key=jax.random.key(0): f(state, x, key),
          lambda x: f_eval(state, x))


# -- numpy references (float64) -----------------------------------------------


def np_gelu(a, form: str = 'tanh'):
  """GELU in float64: 'tanh' (the layers' default) or 'exact' (erf)."""
  if form == 'exact':
    return 0.5 * a * (1 + scipy.special.erf(a / math.sqrt(2)))
  return 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))


def np_params(layer):
  """[kernel1 [e, d, h], bias1 [e, h], kernel2 [e, h, d], bias2 [e, d]] of a
  layer's experts, float64."""
  ex = layer.experts
  return [np.asarray(p[...], np.float64) for p in
          (ex.kernel1, ex.bias1, ex.kernel2, ex.bias2)]


def np_expert(params, e, x, gelu: str = 'tanh'):
  """Expert e's MLP applied to x [..., d]."""
  k1, b1, k2, b2 = params
  return np_gelu(x @ k1[e] + b1[e], gelu) @ k2[e] + b2[e]


def np_softmax(z, axis):
  z = z - z.max(axis=axis, keepdims=True)
  p = np.exp(z)
  return p / p.sum(axis=axis, keepdims=True)


def np_sinkhorn(logits, num_iters=20):
  """Kernel-mode Sinkhorn in float64: u = 1; v = b / K^T u; u = a / K v."""
  kernel = np.exp(np.asarray(logits, np.float64))
  g, s, e = kernel.shape
  u = np.ones((g, s))
  for _ in range(num_iters):
    v = (s / e) / np.einsum('gse,gs->ge', kernel, u)
    u = 1.0 / np.einsum('gse,ge->gs', kernel, v)
  return u[:, :, None] * kernel * v[:, None, :]


def np_simplex(v):
  """Euclidean projection of a vector onto the probability simplex."""
  u = np.sort(v)[::-1]
  css = np.cumsum(u)
  rho = np.nonzero(u * np.arange(1, len(v) + 1) > css - 1)[0][-1]
  return np.maximum(v - (css[rho] - 1) / (rho + 1), 0)


def np_sparse_projection_bruteforce(x, c):
  """argmin ||x - p|| over the simplex with <= c non-zeros, by enumerating
  every support of size <= c (columns of x [s, e] independently)."""
  s, e = x.shape
  out = np.zeros_like(x, np.float64)
  for j in range(e):
    best, best_d = None, np.inf
    for size in range(1, c + 1):
      for support in itertools.combinations(range(s), size):
        p = np.zeros(s)
        p[list(support)] = np_simplex(x[list(support), j])
        d = np.sum((x[:, j] - p) ** 2)
        if d < best_d - 1e-12:
          best, best_d = p, d
    out[:, j] = best
  return out


def np_sparse_projection(x, c):
  """Columns of x [s, e]: the c largest entries onto the simplex."""
  out = np.zeros_like(x, np.float64)
  for j in range(x.shape[1]):
    top = np.argsort(-x[:, j], kind='stable')[:c]
    out[top, j] = np_simplex(x[top, j])
  return out


def np_sparse_plan(scores, c, num_steps=20, lr=1e-2):
  """Adam (b1 0.9, b2 0.999, eps 1e-8) on the k-sparse semi-dual, float64."""
  scores = np.asarray(scores, np.float64)
  plans = []
  for x in scores:
    s, e = x.shape
    b = s / e
    alpha, m, v = np.zeros(s), np.zeros(s), np.zeros(s)
    for t in range(1, num_steps + 1):
      grad = b * np_sparse_projection((alpha[:, None] + x) / b, c).sum(1) - 1
      m = 0.9 * m + 0.1 * grad
      v = 0.999 * v + 0.001 * grad ** 2
      alpha = alpha - lr * (m / (1 - 0.9 ** t)) / (
          np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    plans.append(b * np_sparse_projection((alpha[:, None] + x) / b, c))
  return np.stack(plans)


def copy_checkout(dest: str) -> str:
  """A copy of the checkout at `dest` for pip to build from (pip builds in
  the source tree: build/ and *.egg-info must not land in the checkout)."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
      '.git', '__pycache__', '*.egg-info', 'build', 'results', '.pytest_cache'))
  return dest
