"""Sparse upcycling: a dense ViT checkpoint into an MoE model.

Sparse Upcycling (Komatsuzaki et al., ICLR 2023,
https://arxiv.org/abs/2212.05055): every expert of an MoE block starts as a
copy of the dense MLP of that block; the router is freshly initialised
(kept from the new model's initialisation); shared experts
(`model.moe.num_shared_experts`) are copies of the dense MLP too. Optional
noise on the expert kernels breaks the symmetry between the copies.

When does the upcycled model compute the dense model's function at step 0?
Let f be the dense MLP of a block and every expert a copy of f:

* Token choice, no token dropped (capacity large enough for every
  (token, choice) pair) and combine weights summing to 1
  (`model.moe.renormalize_gates=True`): y = sum_k w_k f(x) = f(x). Equal.
  Without renormalisation y = (sum of the top-k gates) * f(x), a per-token
  scale < 1; with drops, dropped tokens lose their MLP output.
* Shared experts add n_s more copies of f: y = (1 + n_s) f(x). To keep the
  function, the output projections (kernel2, bias2) of all routed and
  shared copies are scaled by 1 / (1 + n_s) (f is affine in its output
  layer), so the equality above still holds.
* Expert choice: a token picked by no expert gets 0, one picked by several
  gets (sum of their gates) * f(x), which is not 1 in general: not equal.
* Soft MoE: slot j processes the convex combination xs_j = sum_s D[s, j] x_s
  of the group's tokens and token t receives sum_j C[t, j] f(xs_j). Although
  the weights are convex and all experts are f, this is not f(x_t): the
  slots mix tokens, and f is not linear (even for a linear f it would be
  f(sum_s (C D^T)[t, s] x_s), equal to f(x_t) only if C D^T = I). So an
  upcycled Soft MoE does NOT compute the dense function at step 0; it starts
  from a smoothed version of it (tests/test_checkpoints.py measures how far).
"""

from __future__ import annotations

import numpy as np


def experts_from_dense(fc1_kernel: np.ndarray, fc1_bias: np.ndarray,
                       fc2_kernel: np.ndarray, fc2_bias: np.ndarray, *,
                       num_experts: int, output_scale: float = 1.0,
                       noise: float = 0.0,
                       rng: np.random.Generator | None = None
                       ) -> dict[str, np.ndarray]:
  """e copies of a dense MLP in the `Experts` layout.

  Args:
    fc1_kernel [d, h], fc1_bias [h], fc2_kernel [h, d], fc2_bias [d]: the
      dense MLP.
    num_experts: e.
    output_scale: multiplies kernel2 and bias2 (1 / (1 + shared experts)).
    noise: std of Gaussian noise added to each copy's kernels, relative to
      the RMS of the dense kernel (0 = exact copies).
    rng: numpy Generator for the noise.

  Returns:
    {'kernel1' [e, d, h], 'bias1' [e, h], 'kernel2' [e, h, d],
     'bias2' [e, d]}.
  """
  def copies(w, scale=1.0, noisy=False):
    out = np.repeat(np.asarray(w)[None] * scale, num_experts, axis=0)
    if noisy and noise > 0:
      rms = float(np.sqrt(np.mean(np.square(w, dtype=np.float64))))
      out = out + (noise * rms * scale
                   * rng.standard_normal(out.shape)).astype(out.dtype)
    return out.astype(np.asarray(w).dtype)

  return {'kernel1': copies(fc1_kernel, noisy=True),
          'bias1': copies(fc1_bias),
          'kernel2': copies(fc2_kernel, output_scale, noisy=True),
          'bias2': copies(fc2_bias, output_scale)}
