"""`python -m bench [--quick]`: the whole benchmark suite (see run_all)."""

import sys

from bench import run_all

sys.exit(run_all.main())
