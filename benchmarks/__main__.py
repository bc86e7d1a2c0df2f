"""`python -m benchmarks`: every benchmark (see `benchmarks/harness/run_all.py`)."""

from benchmarks.harness.run_all import main

main()
