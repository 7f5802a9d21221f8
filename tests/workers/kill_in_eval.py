"""`main.py` that kills itself (SIGKILL) in the middle of the evaluation of
step --kill_at_step, once that step's checkpoint is complete on disk.

  python -m tests.workers.kill_in_eval --kill_at_step=N --config=... \
      --workdir=... [main flags]

What a preemption or an OOM kill during an evaluation does to a run: the
checkpoint of the step precedes its evaluation, so the evaluation is lost
unless the resumed run knows it is due.
"""

import os
import signal
import sys
import time

from absl import app

import main
from vmoe.train import trainer


def _kill_in_eval(step: int, workdir: str):
  evaluate = trainer.Experiment.evaluate

  def evaluate_then_die(self, params):
    metrics = evaluate(self, params)  # the evaluation itself runs
    directory = os.path.join(workdir, 'checkpoints')
    state_step = os.path.join(directory, str(step))
    # save(step) ran just before the evaluation of `step`: its directory
    # exists (maybe still under its temporary name); not so for earlier ones.
    if not any(name.split('.')[0] == str(step)
               for name in os.listdir(directory)):
      return metrics
    deadline = time.time() + 120
    while not os.path.isdir(state_step) and time.time() < deadline:
      time.sleep(0.05)  # the async save of the step commits meanwhile
    if os.path.isdir(state_step):
      os.kill(os.getpid(), signal.SIGKILL)
    return metrics

  trainer.Experiment.evaluate = evaluate_then_die


if __name__ == '__main__':
  argv = list(sys.argv)
  kill_at = next(a for a in argv if a.startswith('--kill_at_step='))
  argv.remove(kill_at)
  workdir = next(a for a in argv if a.startswith('--workdir='))
  _kill_in_eval(int(kill_at.split('=', 1)[1]), workdir.split('=', 1)[1])
  argv[0] = 'main.py'
  sys.argv = argv
  app.run(main.main)
