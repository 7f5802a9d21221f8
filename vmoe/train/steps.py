"""Pure train and eval steps over plain pytrees.

The model is split once into a graphdef (static structure) and a pure dict of
parameters; the jitted steps merge them back at trace time only, so the hot
loop has no Python graph traversal. The train state is a dict:

  {'step': int32 [], 'params': pure dict, 'opt_state': optax state,
   'nonfinite_step': int32 [] (-1 while every loss so far was finite)}

Randomness of step t is `fold_in(key(seed), t)`, so a resumed run draws the same
dropout masks and router noise as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vmoe.nn.layers import AUX_LOSS_KEY

PyTree = Any
State = dict[str, Any]


class ModelFn:
  """Applies a split NNX model: (params, images, train, rng) -> (logits, metrics)."""

  def __init__(self, abstract_model: nnx.Module):
    """abstract_model: e.g. `nnx.eval_shape(lambda: create_model(...))`."""
    self.graphdef, self._abstract_state = nnx.split(abstract_model)

  def merge(self, params: PyTree) -> nnx.Module:
    state = jax.tree.map(lambda x: x, self._abstract_state)  # fresh copy
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def __call__(self, params, images, *, train: bool, rng: jax.Array | None = None):
    model = self.merge(params)
    rngs = None
    if rng is not None:
      dropout_key, gating_key = jax.random.split(rng)
      rngs = nnx.Rngs(dropout=dropout_key, gating=gating_key)
    return model(images, train=train, rngs=rngs)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Per-example CE; logits/labels [b, classes], labels are soft targets."""
  if label_smoothing:
    labels = labels * (1 - label_smoothing) + label_smoothing / labels.shape[-1]
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def all_finite(tree: PyTree) -> jax.Array:
  """bool []: no NaN/inf in any floating-point leaf of `tree`."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(model_fn: ModelFn, tx: optax.GradientTransformation, *,
                    seed: int, label_smoothing: float,
                    learning_rate_fn: Callable[[jax.Array], jax.Array]):
  """Returns train_step(state, batch) -> (state, metrics).

  batch: {'image': [b, H, W, C], 'labels': [b, classes]}. A non-finite loss or
  gradient leaves the state unchanged and records the step in
  'nonfinite_step'; every later step is then a no-op too, so the caller can
  stop at its next check with the last good parameters intact.

  Finite gradients can still make the new parameters or optimizer moments
  non-finite (overflow, e.g. a huge learning rate). That is not checked
  here: on XLA:CPU a reduction over the updated state is not fused with the
  update and would cost a third of it every step. The caller checks
  `all_finite(state)` before it saves or logs instead (the trainer does).
  """
  base_key = jax.random.key(seed)

  def train_step(state: State, batch: dict[str, jax.Array]):
    step = state['step']
    rng = jax.random.fold_in(base_key, step)

    def loss_fn(params):
      logits, metrics = model_fn(params, batch['image'], train=True, rng=rng)
      ce = jnp.mean(softmax_cross_entropy(logits, batch['labels'],
                                          label_smoothing))
      return ce + metrics[AUX_LOSS_KEY], (ce, logits, metrics)

    (loss, (ce, logits, metrics)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state['params'])
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    ok = finite & (state['nonfinite_step'] < 0)

    def update(params_and_opt):
      params, opt_state = params_and_opt
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    # A conditional, not a select of new and old values: the update then
    # runs in place on the donated buffers (a select keeps both alive and
    # made XLA copy the optimizer state: 2.3x slower for 226M parameters).
    params, opt_state = jax.lax.cond(
        ok, update, lambda p_o: p_o, (state['params'], state['opt_state']))
    new_state = {
        'step': step + 1,
        'params': params,
        'opt_state': opt_state,
        'nonfinite_step': jnp.where(
            finite | (state['nonfinite_step'] >= 0), state['nonfinite_step'],
            step).astype(jnp.int32),
    }
    top1 = jnp.argmax(logits, -1) == jnp.argmax(batch['labels'], -1)
    out = {'loss': loss, 'cross_entropy': ce,
           'accuracy': jnp.mean(top1.astype(jnp.float32)),
           'grad_norm': grad_norm, 'learning_rate': learning_rate_fn(step)}
    # Routing metrics of MoE blocks ('block_{i}/...'): scalars and, for
    # 'expert_load', [e] vectors.
    out.update({f'moe/{k}': v for k, v in metrics.items()})
    return new_state, out

  return train_step


def make_eval_step(model_fn: ModelFn):
  """Returns eval_step(params, batch) -> sums over the (masked) batch.

  batch: {'image': [b, H, W, C], 'label': int [b], 'mask': [b]}.
  """

  def eval_step(params, batch):
    logits, metrics = model_fn(params, batch['image'], train=False)
    labels = jax.nn.one_hot(batch['label'], logits.shape[-1])
    mask = batch['mask'].astype(jnp.float32)
    loss = softmax_cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    sums = {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}
    # Routing metrics are batch means; weight them by the real examples.
    for k, v in metrics.items():
      if jnp.ndim(v) == 0:
        sums[f'moe/{k}'] = v * jnp.sum(mask)
    return sums

  return eval_step
