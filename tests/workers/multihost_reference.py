"""`main.py` in one process that reads the data of a 2-process job.

  python -m tests.multihost_reference --config=... --workdir=... [main flags]

Every global batch is the concatenation of what processes 0 and 1 of a
`process_count=2` job read, so one process with all the devices sees exactly
the global batches of the two-process run (the data stream depends on the
process count by design).
"""

import sys

import numpy as np
from absl import app

import main
from vmoe.data import pipeline

PROCESSES = 2


def _concat(make):
  def iterator(config, *, process_index=0, process_count=1, **kwargs):
    del process_index, process_count
    streams = [make(config, process_index=i, process_count=PROCESSES,
                    **kwargs) for i in range(PROCESSES)]
    for parts in zip(*streams):
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return iterator


if __name__ == '__main__':
  pipeline.train_iterator = _concat(pipeline.train_iterator)
  pipeline.eval_iterator = _concat(pipeline.eval_iterator)
  sys.argv[0] = 'main.py'
  app.run(main.main)
