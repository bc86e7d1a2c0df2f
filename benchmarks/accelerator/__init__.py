"""The accelerator command: `benchmarks/accelerator.sh` runs `run.sh`, which
runs the benchmark parts (`parts.py`) and writes the summary (`report.py`)."""
