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

  def __call__(self, params, images, *, train: bool,
               rng: jax.Array | None = None,
               example_ids: jax.Array | None = None,
               micro_batch: jax.Array | int | None = None):
    """example_ids, micro_batch: the indices of `images` in the whole batch
    and the micro-batch number, when `images` is micro-batch `micro_batch`
    of a step (`make_train_step`'s grad_accum_steps): router noise is drawn
    per example (the same as in one pass over the batch), dropout per
    micro-batch."""
    model = self.merge(params)
    rngs = None
    if rng is not None:
      dropout_key, gating_key = jax.random.split(rng)
      if micro_batch is not None:
        dropout_key = jax.random.fold_in(dropout_key, micro_batch)
      rngs = nnx.Rngs(dropout=dropout_key, gating=gating_key)
    if example_ids is None:
      return model(images, train=train, rngs=rngs)
    return model(images, train=train, rngs=rngs, example_ids=example_ids)


LOSSES = ('softmax_xent', 'sigmoid_xent')


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Per-example CE; logits/labels [b, classes], labels are soft targets."""
  if label_smoothing:
    labels = labels * (1 - label_smoothing) + label_smoothing / labels.shape[-1]
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Per-example sigmoid CE summed over classes: an independent binary
  cross-entropy per class (google-research/vmoe's and big_vision's
  'sigmoid_xent', used by the V-MoE upstream and the AugReg recipes).
  label_smoothing moves the targets as in `softmax_cross_entropy`."""
  if label_smoothing:
    labels = labels * (1 - label_smoothing) + label_smoothing / labels.shape[-1]
  return jnp.sum(optax.sigmoid_binary_cross_entropy(
      logits.astype(jnp.float32), labels), axis=-1)


def classification_loss(name: str) -> Callable[..., jax.Array]:
  """The per-example loss of `config.loss` ('softmax_xent' | 'sigmoid_xent')."""
  if name == 'softmax_xent':
    return softmax_cross_entropy
  if name == 'sigmoid_xent':
    return sigmoid_cross_entropy
  raise ValueError(f'loss={name!r} is not one of {LOSSES}')


def split_micro_batches(x: jax.Array, num: int, shards: int = 1) -> jax.Array:
  """[b, ...] -> [num, b / num, ...]: micro-batch m takes the m-th slice of
  every shard's rows.

  The batch is split over `shards` devices in contiguous blocks of b /
  shards rows; each micro-batch takes b / (num * shards) rows of every
  block, so every micro-batch is spread over all devices and the split
  moves no data between them.
  """
  b = x.shape[0]
  if b % (num * shards):
    raise ValueError(f'batch of {b} does not split into {num} micro-batches '
                     f'over {shards} batch shards')
  rows = b // (num * shards)
  y = x.reshape(shards, num, rows, *x.shape[1:]).swapaxes(0, 1)
  return y.reshape(num, shards * rows, *x.shape[1:])


def all_finite(tree: PyTree) -> jax.Array:
  """bool []: no NaN/inf in any floating-point leaf of `tree`."""
  checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(model_fn: ModelFn, tx: optax.GradientTransformation, *,
                    seed: int, label_smoothing: float,
                    learning_rate_fn: Callable[[jax.Array], jax.Array],
                    loss: str = 'softmax_xent', grad_accum_steps: int = 1,
                    batch_shards: int = 1):
  """Returns train_step(state, batch) -> (state, metrics).

  batch: {'image': [b, H, W, C], 'labels': [b, classes]}. A non-finite loss or
  gradient leaves the state unchanged and records the step in
  'nonfinite_step'; every later step is then a no-op too, so the caller can
  stop at its next check with the last good parameters intact.

  loss: the classification loss (`LOSSES`), plus the MoE auxiliary losses.

  grad_accum_steps: k > 1 runs the batch as k micro-batches of b / k images
  inside the step (a `jax.lax.scan`; only one micro-batch's activations are
  alive) and applies the mean of their gradients once. Each micro-batch
  takes b / (k * batch_shards) rows of every device's share
  (`split_micro_batches`). The result is the step over the whole batch, to
  float32 rounding: the loss and every metric are means over equal
  micro-batches; router noise is drawn per example (`ModelFn`); routing
  groups are contiguous tokens, so with group_size dividing a device's
  tokens of a micro-batch (checked by the config validation) every group is
  the one of the whole batch. What differs: dropout and stochastic-depth
  masks (drawn per micro-batch), and routing groups can be at most a
  micro-batch's tokens per device.

  Finite gradients can still make the new parameters or optimizer moments
  non-finite (overflow, e.g. a huge learning rate). That is not checked
  here: on XLA:CPU a reduction over the updated state is not fused with the
  update and would cost a third of it every step. The caller checks
  `all_finite(state)` before it saves or logs instead (the trainer does).
  """
  base_key = jax.random.key(seed)
  loss_per_example = classification_loss(loss)

  def loss_fn(params, images, labels, rng, example_ids=None,
              micro_batch=None):
    logits, metrics = model_fn(params, images, train=True, rng=rng,
                               example_ids=example_ids,
                               micro_batch=micro_batch)
    ce = jnp.mean(loss_per_example(logits, labels, label_smoothing))
    top1 = jnp.argmax(logits, -1) == jnp.argmax(labels, -1)
    out = {'cross_entropy': ce,
           'accuracy': jnp.mean(top1.astype(jnp.float32))}
    # Routing metrics of MoE blocks ('block_{i}/...'): scalars and, for
    # 'expert_load', [e] vectors.
    out.update({f'moe/{k}': v for k, v in metrics.items()})
    return ce + metrics[AUX_LOSS_KEY], out

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated(params, batch, rng):
    """(loss, metrics, grads): means over the micro-batches."""
    k = grad_accum_steps
    split = lambda x: split_micro_batches(x, k, batch_shards)
    ids = split(jnp.arange(batch['image'].shape[0]))
    xs = (split(batch['image']), split(batch['labels']), ids, jnp.arange(k))

    def micro(carry, xs):
      images, labels, example_ids, m = xs
      (loss, metrics), grads = grad_fn(params, images, labels, rng,
                                       example_ids, m)
      # Sums in float32 whatever the parameter dtype.
      add = lambda acc, g: acc + g.astype(jnp.float32)
      carry = jax.tree.map(add, carry, (loss, metrics, grads))
      return carry, None

    (loss_shape, metrics_shape), grads_shape = jax.eval_shape(
        lambda: grad_fn(params, xs[0][0], xs[1][0], rng, xs[2][0], 0))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32),
                         (loss_shape, metrics_shape, grads_shape))
    sums, _ = jax.lax.scan(micro, zeros, xs)
    loss, metrics, grads = jax.tree.map(lambda a: a / k, sums)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, metrics, grads

  def train_step(state: State, batch: dict[str, jax.Array]):
    step = state['step']
    rng = jax.random.fold_in(base_key, step)
    if grad_accum_steps == 1:
      (loss, metrics), grads = grad_fn(state['params'], batch['image'],
                                       batch['labels'], rng)
    else:
      loss, metrics, grads = accumulated(state['params'], batch, rng)
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
    out = {'loss': loss, 'grad_norm': grad_norm,
           'learning_rate': learning_rate_fn(step), **metrics}
    return new_state, out

  return train_step


def make_eval_step(model_fn: ModelFn, loss: str = 'softmax_xent'):
  """Returns eval_step(params, batch) -> sums over the (masked) batch.

  batch: {'image': [b, H, W, C], 'label': int [b], 'mask': [b]}. loss: the
  training loss (`LOSSES`), reported as 'loss'.
  """
  loss_per_example = classification_loss(loss)

  def eval_step(params, batch):
    logits, metrics = model_fn(params, batch['image'], train=False)
    labels = jax.nn.one_hot(batch['label'], logits.shape[-1])
    mask = batch['mask'].astype(jnp.float32)
    loss = loss_per_example(logits, labels)
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    sums = {'loss': jnp.sum(loss * mask), 'correct': jnp.sum(correct * mask),
            'count': jnp.sum(mask)}
    # Routing metrics are batch means; weight them by the real examples.
    for k, v in metrics.items():
      if jnp.ndim(v) == 0:
        sums[f'moe/{k}'] = v * jnp.sum(mask)
    return sums

  return eval_step
