"""What every benchmark shares: specs, running, records, reporting, storage,
the command line, step cost, offline data, and `run_all` (`python -m benchmarks`)."""
