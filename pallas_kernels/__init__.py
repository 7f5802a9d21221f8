"""Pallas kernels of the MoE layer, each beside its plain reference.

  routing.py    softmax gates, top-k, Batch Priority order and buffer
                positions (token choice), top-c tokens per expert (expert
                choice): one kernel per decision of `vmoe.nn.routing`
  dispatch.py   gathers into [e, g, c, d] expert buffers and back with the
                gate multiply fused in, each one's VJP the other kernel
  gmm.py        grouped matmul of the dropless dispatch (megablox on TPU)
  soft_moe.py   Soft MoE dispatch / combine
  compat.py     the one place for jax-version and platform differences
  registry.py   `model.moe.kernels` -> which part runs as a kernel

Every kernel has a 'tpu' (Mosaic) and a 'triton' (GPU) variant, runs
interpreted on a CPU host and lowers for TPU and CUDA from any host. The
MoE layer never imports a kernel directly: it asks `registry.lookup`, and a
new kernel is its module plus one `registry.register(...)` line (see
registry.py for the operations and their contracts).

Importable without TensorFlow: only jax and `vmoe.nn.{routing,dispatch}`.
"""
