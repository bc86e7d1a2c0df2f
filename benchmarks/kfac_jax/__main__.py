"""`python -m benchmarks.kfac_jax [--setup]`: see `launcher.py`."""

import sys

from benchmarks.kfac_jax.launcher import main

main(sys.argv[1:])
