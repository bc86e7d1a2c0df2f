"""One-off studies, not run by `python -m benchmarks`: each measured how a default
was chosen or what a design costs (see benchmarks/README.md and
docs/benchmark-history.md)."""
