"""Benchmarks of the MoE layers and models (`python -m bench`, see run_all).

Run as `python -m bench...`, the process first re-executes itself with the
glibc malloc settings of `vmoe.cpu_allocator` (as `main.py` does), so that the
benchmarks measure what training runs.
"""

from vmoe import cpu_allocator as _cpu_allocator

if _cpu_allocator.started_as_module('bench'):
  _cpu_allocator.reexec_with_tuned_malloc()
