"""Mixture-of-head attention (`model.attention='moh'`).

"MoH: Multi-Head Attention as Mixture-of-Head Attention" (Jin et al. 2024,
https://arxiv.org/abs/2410.11842; code github.com/SkyworkAI/MoH, MoH-ViT
`attention_native.py` and MoH-DiT `models.py`, the convention followed
here). The h heads of a standard attention are experts: the first h_s are
shared (always on), each token picks its top-k of the other h_r = h - h_s,
and the output projection sums the heads weighted by gates,
y = sum_i g_i head_i W_O^i + b_O (the standard attention has g_i = 1):

  routed gates   r = softmax(x W_r) over the h_r routed heads, kept on the
                 top-k, renormalised to sum 1, times k;
  shared gates   s = softmax(x W_s) over the h_s shared heads, times h_s
                 (1 for a single shared head);
  two-stage mix  [a_s, a_r] = 2 softmax(x W_m) when both kinds exist:
                 g = [a_s s, a_r r].

x is the attention's input (after the block's LayerNorm). With k = 0 every
head is shared (h_s = h). Auxiliary loss: the reference code's load balance
of the routed heads, h_r * sum_i f_i P_i (f_i: fraction of the batch's
tokens that picked head i, P_i: its mean gate), weighted by
`moh_balance_loss_weight` (0.01, as MoH-ViT; MoH-ViT averages it over
layers, here each layer adds its own). The dense computation of all heads
is kept (as the reference code): the gates make the unselected heads'
contributions exactly zero.

Metrics (under 'attention/' in the block's metrics): 'auxiliary_loss',
'balance_loss', 'heads_per_token' (h_s + k), 'active_head_fraction'
((h_s + k) / h), and with routed heads 'router_entropy' (of the routed
softmax) and 'head_load' [h_r] (share of the routed selections per head).

Axis letters: b images, n tokens, d model dim, h heads, k head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vmoe.config import is_int, is_number
from vmoe.nn import kinds
from vmoe.nn import routing as rt
from vmoe.nn.attention.registry import ATTENTION
from vmoe.nn.layers import AUX_LOSS_KEY, param


@ATTENTION.register('moh')
class MixtureOfHeads(kinds.Mixin, nnx.Module):
  """The standard attention with gated heads: shared + top-k routed.

  Params beyond the standard attention's: router_kernel [h_r, d] (if k > 0),
  shared_kernel [h_s, d] (if h_s > 1), mix_kernel [2, d] (if h_s > 0 and
  k > 0); no biases (as the reference code).
  """
  OPTIONS = dict(moh_shared_heads=1, moh_k=1, moh_balance_loss_weight=0.01)

  @classmethod
  def validate(cls, c, need, num_heads=None, **context):
    need(is_int(c.moh_shared_heads) and c.moh_shared_heads >= 0,
         'moh_shared_heads', 'must be an integer >= 0')
    need(is_int(c.moh_k) and c.moh_k >= 0, 'moh_k', 'must be an integer >= 0')
    need(is_number(c.moh_balance_loss_weight)
         and c.moh_balance_loss_weight >= 0, 'moh_balance_loss_weight',
         'must be a number >= 0')
    if num_heads is None:
      return
    need(c.moh_shared_heads <= num_heads, 'moh_shared_heads',
         f'exceeds model.num_heads={num_heads}')
    routed = num_heads - c.moh_shared_heads
    need(c.moh_k <= routed, 'moh_k',
         f'exceeds the {routed} routed heads (model.num_heads={num_heads} '
         f'minus {c.moh_shared_heads} shared)')
    need(c.moh_k >= 1 or routed == 0, 'moh_k',
         f'must be >= 1 while {routed} heads are routed (k = 0 needs every '
         'head shared)')

  def __init__(self, dim: int, num_heads: int, *, options,
               param_dtype=jnp.float32, rngs: nnx.Rngs, **kw):
    super().__init__(dim, num_heads, param_dtype=param_dtype, rngs=rngs, **kw)
    self.shared_heads = int(options.moh_shared_heads)
    self.k = int(options.moh_k)
    self.balance_loss_weight = float(options.moh_balance_loss_weight)
    routed = num_heads - self.shared_heads
    init = nnx.initializers.lecun_normal(in_axis=-1, out_axis=-2)

    def gate(rows):
      return param(rngs, init, (rows, dim), (None, 'embed'), param_dtype)

    self.router_kernel = gate(routed) if self.k else None
    self.shared_kernel = gate(self.shared_heads) if self.shared_heads > 1 else None
    self.mix_kernel = gate(2) if self.shared_heads and self.k else None

  def gates(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x [b, n, d] -> (gates [b, n, h] float32, metrics)."""
    x32 = x.astype(jnp.float32)
    project = lambda w: jnp.einsum('bnd,rd->bnr', x32,  # noqa: E731
                                   w[...].astype(jnp.float32))
    hs, k = self.shared_heads, self.k
    b, n, _ = x.shape
    metrics = {}
    if self.shared_kernel is not None:
      shared = jax.nn.softmax(project(self.shared_kernel), axis=-1) * hs
    else:
      shared = jnp.full((b, n, hs), float(hs), jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    balance = zero
    if k:
      probs = jax.nn.softmax(project(self.router_kernel), axis=-1)
      _, top = rt.top_k(jax.lax.stop_gradient(probs), k)
      mask = jnp.sum(jax.nn.one_hot(top, probs.shape[-1]), axis=-2)
      routed = probs * mask
      routed = routed / jnp.maximum(jnp.sum(routed, -1, keepdims=True),
                                    jnp.finfo(jnp.float32).eps) * k
      h_r = probs.shape[-1]
      me = jnp.mean(probs, axis=(0, 1))
      ce = jnp.mean(mask, axis=(0, 1))
      balance = jnp.mean(me * ce) * h_r * h_r
      metrics['router_entropy'] = rt.entropy(probs)
      metrics['head_load'] = ce / k
      if hs:
        mix = 2.0 * jax.nn.softmax(project(self.mix_kernel), axis=-1)
        gates = jnp.concatenate([mix[..., :1] * shared, mix[..., 1:] * routed],
                                axis=-1)
      else:
        gates = routed
    else:
      gates = shared
    h = gates.shape[-1]
    metrics.update({
        AUX_LOSS_KEY: self.balance_loss_weight * balance,
        'balance_loss': balance,
        'heads_per_token': jnp.asarray(float(hs + k), jnp.float32),
        'active_head_fraction': jnp.asarray((hs + k) / h, jnp.float32)})
    return gates, metrics

  def attend(self, x: jax.Array, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> tuple[jax.Array, dict]:
    """x [b, n, d] -> (y [b, n, d], metrics)."""
    del train, rngs
    heads = self.heads(x)                                   # [b, n, h, k]
    gates, metrics = self.gates(x)
    return self.project(heads * gates[..., None].astype(heads.dtype)), metrics

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.attend(x)[0]


def reference(layer: MixtureOfHeads, x: jax.Array) -> tuple[jax.Array,
                                                             jax.Array]:
  """(y [b, n, d], balance loss) of `layer` on x [b, n, d] with Python loops
  over images, tokens, heads and keys; differentiable."""
  b, n, d = x.shape
  qkv_kernel = layer.qkv_kernel[...]                     # [d, 3, h, k]
  qkv_bias = layer.qkv_bias[...]                         # [3, h, k]
  out_kernel = layer.out_kernel[...]                     # [h, k, d]
  h = qkv_kernel.shape[2]
  hs, top = layer.shared_heads, layer.k
  scale = qkv_kernel.shape[-1] ** -0.5

  def softmax(values):
    m = max(jax.lax.stop_gradient(v) for v in values)
    ex = [jnp.exp(v - m) for v in values]
    total = sum(ex)
    return [v / total for v in ex]

  def row(w, token):
    return [jnp.dot(w[i], token) for i in range(w.shape[0])]

  ys, probs_all, masks_all = [], [], []
  for img in range(b):
    q = [[x[img, t] @ qkv_kernel[:, 0, i] + qkv_bias[0, i] for i in range(h)]
         for t in range(n)]
    kk = [[x[img, t] @ qkv_kernel[:, 1, i] + qkv_bias[1, i] for i in range(h)]
          for t in range(n)]
    v = [[x[img, t] @ qkv_kernel[:, 2, i] + qkv_bias[2, i] for i in range(h)]
         for t in range(n)]
    for t in range(n):
      token = x[img, t]
      shared = ([hs * g for g in softmax(row(layer.shared_kernel[...], token))]
                if layer.shared_kernel is not None else [float(hs)] * hs)
      if top:
        probs = softmax(row(layer.router_kernel[...], token))
        order = sorted(range(len(probs)),
                       key=lambda i: (-float(jax.lax.stop_gradient(probs[i])),
                                      i))
        chosen = set(order[:top])
        total = sum(probs[i] for i in chosen)
        routed = [probs[i] / total * top if i in chosen else 0.0 * probs[i]
                  for i in range(len(probs))]
        probs_all.append(probs)
        masks_all.append([1.0 if i in chosen else 0.0
                          for i in range(len(probs))])
        if hs:
          mix = [2.0 * m for m in softmax(row(layer.mix_kernel[...], token))]
          gates = [mix[0] * g for g in shared] + [mix[1] * g for g in routed]
        else:
          gates = routed
      else:
        gates = shared
      y = layer.out_bias[...]
      for i in range(h):
        weights = softmax([jnp.dot(q[t][i] * scale, kk[m][i])
                           for m in range(n)])
        head = sum(weights[m] * v[m][i] for m in range(n))
        y = y + gates[i] * (head @ out_kernel[i])
      ys.append(y)
  balance = jnp.zeros(())
  if top:
    count = len(probs_all)
    h_r = len(probs_all[0])
    me = [sum(p[i] for p in probs_all) / count for i in range(h_r)]
    ce = [sum(mk[i] for mk in masks_all) / count for i in range(h_r)]
    balance = sum(me[i] * ce[i] for i in range(h_r)) * h_r
  return jnp.stack(ys).reshape(b, n, d), balance
