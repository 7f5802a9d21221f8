"""Step d of bench/gpu_check.sh: main.py trains V-MoE with Pallas kernels,
then resumes.

    python -m bench.gpu_check_train WORKDIR STEPS

Runs `main.py --config=configs/vmoe_b16_digits.py` (the embedded digits
arrays: no TensorFlow, no download) with model.moe.kernels=pallas for STEPS
steps into a fresh WORKDIR, then the same command with STEPS + STEPS // 10
steps, which must resume from the checkpoint of step STEPS. Exit 0 when the
train loss falls (mean of the last logged records below the first's) and
the second run continued from STEPS (its records start after STEPS, the
first run's records are kept); prints the numbers either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir: str, steps: int) -> tuple[int, str, float]:
  log = max(1, steps // 10)
  args = [sys.executable, 'main.py', '--config=configs/vmoe_b16_digits.py',
          f'--workdir={workdir}', '--config.model.moe.kernels=pallas',
          f'--config.num_train_steps={steps}',
          f'--config.log_every_steps={log}',
          f'--config.eval_every_steps={steps}',
          f'--config.checkpoint_every_steps={steps}',
          f'--config.schedule.warmup_steps={min(50, steps // 4)}']
  start = time.perf_counter()
  proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
  return proc.returncode, proc.stdout + proc.stderr, (
      time.perf_counter() - start)


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def main() -> int:
  workdir, steps = sys.argv[1], int(sys.argv[2])
  shutil.rmtree(workdir, ignore_errors=True)
  rc, out, seconds = _train(workdir, steps)
  print(out[-3000:])
  if rc:
    print(f'FAIL: training exited {rc}')
    return 1
  first = [r for r in _records(workdir) if r['split'] == 'train']
  losses = [r['loss'] for r in first]
  print(f'trained {steps} steps in {seconds:.0f} s; train loss '
        + ' '.join(f'{l:.3f}' for l in losses))
  more = steps + max(1, steps // 10)
  rc, out, seconds = _train(workdir, more)
  print(out[-3000:])
  if rc:
    print(f'FAIL: the resumed run exited {rc}')
    return 1
  records = [r for r in _records(workdir) if r['split'] == 'train']
  resumed = [r['step'] for r in records if r['step'] > steps]
  kept = [r for r in records if r['step'] <= steps] == first
  k = max(1, len(losses) // 4)
  falls = sum(losses[-k:]) / k < sum(losses[:k]) / k
  print(f'resumed to {more} steps in {seconds:.0f} s: records after step '
        f'{steps}: {resumed}; first run kept: {kept}; loss falls: {falls}')
  return 0 if falls and kept and resumed and min(resumed) > steps else 1


if __name__ == '__main__':
  sys.exit(main())
