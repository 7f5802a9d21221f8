"""Gated attention (`model.attention='gated'`): the baseline of mixture-of-
head attention in which every head is kept but scaled by its own sigmoid
gate.

"Gated Attention for Large Language Models: Non-linearity, Sparsity, and
Attention-Sink-Free" (Qiu et al. 2025, https://arxiv.org/abs/2505.06708;
code github.com/qiuzh20/gated_attention, `modeling_qwen3.py`, the
convention followed here): after the scaled dot-product attention (their
position G1), each head's output is multiplied by sigmoid(x W_g + b_g),
computed from the attention's input x (after the block's LayerNorm) by a
projection that is part of the query projection there (same input, same
bias setting: our qkv projection has a bias, so the gate has one).
`gated_granularity`: 'headwise' (one gate per head and token, the
issue's per-head gates; W_g [d, h]) or 'elementwise' (one per head
dimension, the paper's best; W_g [d, h, k]).

Metrics (under 'attention/'): 'gate_mean', the mean gate (the paper reads
small means as sparse gating), and 'auxiliary_loss' 0.

Axis letters: b images, n tokens, d model dim, h heads, k head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vmoe.nn import kinds
from vmoe.nn.attention.registry import ATTENTION
from vmoe.nn.layers import AUX_LOSS_KEY, param

GRANULARITIES = ('headwise', 'elementwise')


@ATTENTION.register('gated')
class GatedAttention(kinds.Mixin, nnx.Module):
  """The standard attention with a sigmoid gate on every head's output.

  Params beyond the standard attention's: gate_kernel [d, h] ('headwise') or
  [d, h, k] ('elementwise'), gate_bias [h] or [h, k] (zeros); the kernel
  is initialised like the query projection (Xavier uniform over d ->
  h * k).
  """
  OPTIONS = dict(gated_granularity='headwise')

  @classmethod
  def validate(cls, c, need, **context):
    need(c.gated_granularity in GRANULARITIES, 'gated_granularity',
         f'is not one of {GRANULARITIES}')

  def __init__(self, dim: int, num_heads: int, *, options,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **kw):
    super().__init__(dim, num_heads, param_dtype=param_dtype, rngs=rngs, **kw)
    head_dim = dim // num_heads
    self.granularity = options.gated_granularity
    shape = ((num_heads,) if self.granularity == 'headwise'
             else (num_heads, head_dim))
    axes = ('heads',) if len(shape) == 1 else ('heads', 'kv')
    out_axis = tuple(range(1, len(shape) + 1))
    init = nnx.initializers.xavier_uniform(in_axis=0, out_axis=out_axis)
    self.gate_kernel = param(rngs, init, (dim,) + shape, ('embed',) + axes,
                             param_dtype)
    self.gate_bias = param(rngs, nnx.initializers.zeros_init(), shape, axes,
                           param_dtype)

  def gates(self, x: jax.Array) -> jax.Array:
    """x [b, n, d] -> sigmoid gates [b, n, h] or [b, n, h, k] (float32)."""
    kernel = self.gate_kernel[...].astype(jnp.float32)
    scores = jnp.tensordot(x.astype(jnp.float32), kernel, axes=1)
    return jax.nn.sigmoid(scores + self.gate_bias[...].astype(jnp.float32))

  def attend(self, x: jax.Array, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """x [b, n, d] -> (y [b, n, d], metrics)."""
    del train, rngs
    heads = self.heads(x)                                   # [b, n, h, k]
    g = self.gates(x)
    if g.ndim == 3:
      g = g[..., None]
    metrics = {AUX_LOSS_KEY: jnp.zeros((), jnp.float32),
               'gate_mean': jnp.mean(g)}
    return self.project(heads * g.astype(heads.dtype)), metrics

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.attend(x)[0]


def reference(layer: GatedAttention, x: jax.Array) -> jax.Array:
  """y [b, n, d] of `layer` on x [b, n, d] with Python loops over images,
  tokens, heads and keys; differentiable."""
  b, n, d = x.shape
  qkv_kernel = layer.qkv_kernel[...]
  qkv_bias = layer.qkv_bias[...]
  h, k = qkv_kernel.shape[2], qkv_kernel.shape[3]
  ys = []
  for b_ in range(b):
    # proj[t][j][i]: query / key / value (j) of head i for token t.
    proj = [[[x[b_, t] @ qkv_kernel[:, j, i] + qkv_bias[j, i]
              for i in range(h)] for j in range(3)] for t in range(n)]
    for t in range(n):
      y = layer.out_bias[...]
      for i in range(h):
        logits = jnp.stack([jnp.dot(proj[t][0][i], proj[m][1][i])
                            for m in range(n)]) * k ** -0.5
        weights = jax.nn.softmax(logits)
        head = sum(weights[m] * proj[m][2][i] for m in range(n))
        gate = jax.nn.sigmoid(x[b_, t] @ layer.gate_kernel[...][:, i]
                              + layer.gate_bias[...][i])
        y = y + (gate * head) @ layer.out_kernel[...][i]
      ys.append(y)
  return jnp.stack(ys).reshape(b, n, d)
