"""`python -m benchmarks.accelerator`: the benchmark parts (see `parts.py`)."""

import sys

from benchmarks.accelerator.parts import main

sys.exit(main())
