"""glibc malloc settings for XLA:CPU: huge pages, freed memory kept for reuse.

XLA:CPU mallocs every program output and the scratch buffer of every run, on
its worker threads. With glibc's defaults each large buffer is a fresh mmap,
returned to the OS when freed, so every train step page-faults its whole
working set back in, 4 KiB at a time. Measured on a 2-core CPU host: writing a
freshly allocated 1 GiB output costs 0.30 s of page faults (0.04 s when the
memory is reused); the V-MoE-S/16 train step (2.4 GB of scratch) spends 0.6 s
of its 2.5 s in faults.

The fix is process-wide and must be in place before glibc initialises, so the
entry points (`main.py`, `python -m bench ...`) re-execute themselves once with
`GLIBC_TUNABLES` set (`reexec_with_tuned_malloc`):

  glibc.malloc.hugetlb=1       transparent huge pages for malloc'ed memory
                               (2 MiB faults; needs THP 'madvise' or 'always')
  glibc.malloc.arena_max=1     one heap for all threads (XLA's worker threads
                               would otherwise mmap large blocks from their own
                               arenas whatever the limits below)
  glibc.malloc.mmap_max=0      large blocks come from the heap, not mmap ...
  glibc.malloc.trim_threshold  ... and stay mapped after free, to be reused.

The settings apply only to CPU hosts: a process whose JAX platform is a GPU or
TPU (JAX_PLATFORMS, or an NVIDIA / AMD / TPU device node) is left alone, as is
any process that already sets GLIBC_TUNABLES. VMOE_TUNE_MALLOC=0 turns it off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping

TUNABLES = ('glibc.malloc.hugetlb=1', 'glibc.malloc.arena_max=1',
            'glibc.malloc.mmap_max=0',
            'glibc.malloc.trim_threshold=1099511627776')  # 1 TiB: never trim
OPT_OUT = 'VMOE_TUNE_MALLOC'
_OPTIONS_WITH_VALUE = ('-W', '-X', '--check-hash-based-pycs')
ACCELERATOR_DEVICE_NODES = ('/dev/nvidia0', '/dev/nvidiactl', '/dev/kfd',
                            '/dev/accel0',
                            '/dev/vfio/0')


def _glibc_version() -> tuple[int, int] | None:
  try:
    name = os.confstr('CS_GNU_LIBC_VERSION')  # 'glibc 2.36'
  except (ValueError, OSError, AttributeError):
    return None
  if not name or not name.startswith('glibc '):
    return None
  try:
    major, minor = name.split()[1].split('.')[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def tuned_environment(environ: Mapping[str, str],
                      glibc: tuple[int, int] | None,
                      accelerator_present: bool) -> dict[str, str] | None:
  """The environment to re-execute with, or None to run as is.

  Pure function of its inputs (tested directly): None when the user opted out
  or set GLIBC_TUNABLES, when glibc is absent or older than 2.35 (no
  `hugetlb` tunable), or when the process will run on a GPU/TPU.
  """
  if environ.get(OPT_OUT, '1').strip().lower() in ('0', 'false', 'no', 'off'):
    return None
  if 'GLIBC_TUNABLES' in environ or glibc is None or glibc < (2, 35):
    return None
  platforms = environ.get('JAX_PLATFORMS', '').lower()
  if platforms and platforms.split(',')[0] != 'cpu':
    return None
  if accelerator_present and not platforms:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = ':'.join(TUNABLES)
  return env


def reexec_with_tuned_malloc() -> None:
  """Re-executes this process with `TUNABLES` if they apply (see module doc).

  Call first thing in a program's entry point, before jax is imported. Does
  nothing when already tuned or not applicable; otherwise never returns.
  """
  if platform.system() != 'Linux' or not getattr(sys, 'orig_argv', None):
    return
  env = tuned_environment(
      os.environ, _glibc_version(),
      any(os.path.exists(p) for p in ACCELERATOR_DEVICE_NODES))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def started_as_module(prefix: str) -> bool:
  """True if this process was started as `python -m <prefix>[.something]`."""
  argv = getattr(sys, 'orig_argv', None) or []
  i = 1
  while i < len(argv) - 1:
    arg = argv[i]
    if arg == '-m':
      name = argv[i + 1]
      return name == prefix or name.startswith(prefix + '.')
    if not arg.startswith('-'):
      return False  # a script path: not a module run
    # Interpreter options whose value is the next argument.
    i += 2 if arg in _OPTIONS_WITH_VALUE else 1
  return False
